"""Per-sample log-likelihood through the probability-flow ODE (Song et al. 2021, App. D.2).

Integrating ``dx/dt = v(x, t)`` (the probability flow) together with
``d delta/dt = div_x v(x, t)`` from ``t_min`` to 1 gives

    log p_{t_min}(x) = log N(x(1); 0, I) + delta(1).

The divergence is either exact (trace of the Jacobian from one JVP per real scalar dimension,
for small dimension) or Hutchinson's estimator ``z^T (dv/dx) z`` with one Rademacher or Gaussian
probe per sample drawn once per solve (unbiased: ``E[z z^T] = I`` on real entries). Padded
entries (``mask == 0``) are held at 0, contribute nothing to the divergence (the exact one runs
no JVP for them beyond the batch's largest real count) and are not counted in the prior's
dimension.

The ODE is one Dopri5 solve over the whole batch (:mod:`fpcd.ode`); its NFE (evaluations of the
augmented vector field, each one score call plus its JVPs) comes from the solver's step
statistics. :func:`log_likelihood` works inside ``jax.jit`` and ``jax.vmap``.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp

from fpcd.ode import as_number, check_solver_options, checked_nfe, solve_dopri5
from fpcd.sampling import ProbabilityFlow
from fpcd.sde import VPSDE, expand_mask

DIVERGENCES = ("exact", "hutchinson")
PROBES = ("rademacher", "gaussian")
LIKELIHOOD_DEFAULTS = {"divergence": "exact", "probe": "rademacher", "rtol": 1e-5, "atol": 1e-5, "t_min": 1e-5,
                       "dt0": 0.01, "max_steps": 100_000}


def check_likelihood_options(**options) -> dict:
    """The one check of the likelihood's options (:func:`log_likelihood`; the anomaly experiment's
    likelihood runs): :data:`LIKELIHOOD_DEFAULTS` updated with ``options`` and validated.
    ``divergence`` in :data:`DIVERGENCES`, ``probe`` in :data:`PROBES`, ``t_min`` in ``(0, 1)``, the
    solver's ``rtol``, ``atol``, ``dt0`` and ``max_steps`` by :func:`fpcd.ode.check_solver_options`;
    numbers come back as Python floats and ints (traced values pass unchecked).

    Raises:
      ValueError: an unknown option or the first bad value, naming it.
    """
    unknown = sorted(set(options) - set(LIKELIHOOD_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown likelihood option(s) {unknown}; allowed: {sorted(LIKELIHOOD_DEFAULTS)}")
    merged = {**LIKELIHOOD_DEFAULTS, **options}
    if merged["divergence"] not in DIVERGENCES:
        raise ValueError(f"unknown divergence {merged['divergence']!r}; expected one of {DIVERGENCES}")
    if merged["probe"] not in PROBES:
        raise ValueError(f"unknown probe {merged['probe']!r}; expected one of {PROBES}")
    if not isinstance(merged["t_min"], jax.core.Tracer):
        value = as_number(merged["t_min"])
        if value is None or not 0.0 < value < 1.0:
            raise ValueError(f"t_min must lie in (0, 1), got {merged['t_min']!r}")
        merged["t_min"] = value
    merged.update(check_solver_options(**{k: merged[k] for k in ("rtol", "atol", "dt0", "max_steps")}))
    return merged


def real_entries_first(mask):
    """Per sample, the flat indices of the real (``mask > 0``) scalar entries first, in their
    original order, then the padded ones; and the number of real entries.

    ``mask (B, ...) -> (order (B, S) int32, counts (B,) int32)`` with ``S`` scalars per sample.
    """
    real = mask.reshape(mask.shape[0], -1) > 0
    order = jnp.argsort(~real, axis=-1, stable=True).astype(jnp.int32)
    return order, jnp.sum(real, axis=-1, dtype=jnp.int32)


def exact_divergence(velocity_fn, x, mask=None):
    """``(v(x), tr dv/dx)`` per sample for ``x (B, ...)`` with per-sample independent ``v``.

    Linearises ``v`` once. Without ``mask``: one JVP per scalar dimension of one sample, batched
    with ``vmap``. With ``mask`` (broadcastable to ``x``): the trace over real entries only, from
    ``max_b count_b`` JVPs in a ``fori_loop`` (``count_b`` = real scalar entries of sample ``b``):
    the ``k``-th JVP perturbs each sample's ``k``-th real entry (zero tangent once
    ``k >= count_b``) and reads the output at that entry.
    """
    velocity, jvp_fn = jax.linearize(velocity_fn, x)
    batch, dim = x.shape[0], x[0].size
    if mask is None:
        basis = jnp.eye(dim, dtype=x.dtype).reshape((dim, 1) + x.shape[1:])
        columns = jax.vmap(lambda e: jvp_fn(jnp.broadcast_to(e, x.shape)))(basis)  # (dim, B, ...)
        diagonal = columns.reshape(dim, batch, dim)[jnp.arange(dim), :, jnp.arange(dim)]  # (dim, B)
        return velocity, diagonal.sum(axis=0)
    order, counts = real_entries_first(expand_mask(mask, x))
    rows = jnp.arange(batch)

    def add_diagonal_entry(k, total):
        entry = order[:, k]
        active = k < counts
        tangent = jnp.zeros((batch, dim), x.dtype).at[rows, entry].set(active.astype(x.dtype))
        column = jvp_fn(tangent.reshape(x.shape)).reshape(batch, dim)
        return total + jnp.where(active, column[rows, entry], 0.0)

    trace = jax.lax.fori_loop(0, jnp.max(counts), add_diagonal_entry, jnp.zeros((batch,), velocity.dtype))
    return velocity, trace


def hutchinson_divergence(velocity_fn, x, probe):
    """``(v(x), probe^T (dv/dx) probe)`` per sample: an unbiased estimate of the divergence."""
    velocity, jvp = jax.jvp(velocity_fn, (x,), (probe,))
    return velocity, jnp.sum((probe * jvp).reshape(x.shape[0], -1), axis=-1)


class AugmentedFlow(eqx.Module):
    """Vector field of ``(x, delta)``: the probability flow and its (estimated) divergence."""

    flow: ProbabilityFlow
    divergence: str = eqx.field(static=True)

    def __call__(self, t, state, probe):
        x, _ = state
        velocity_fn = lambda y: self.flow(t, y)  # noqa: E731
        if self.divergence == "exact":
            velocity, div = exact_divergence(velocity_fn, x, self.flow.mask)
        else:
            velocity, div = hutchinson_divergence(velocity_fn, x, probe)
        return velocity, div


def draw_probe(key, shape, probe: str, mask=None, dtype=jnp.float32):
    """A Rademacher (+-1) or standard Gaussian probe of ``shape``, zero on padded entries."""
    if probe == "rademacher":
        z = jax.random.rademacher(key, shape, dtype=dtype)
    elif probe == "gaussian":
        z = jax.random.normal(key, shape, dtype)
    else:
        raise ValueError(f"unknown probe {probe!r}; expected one of {PROBES}")
    return z if mask is None else z * mask


def log_likelihood(
    score_fn,
    sde: VPSDE,
    x,
    *,
    key=None,
    divergence: str = "exact",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    mask=None,
    t_min: float = 1e-5,
    probe: str = "rademacher",
    dt0: float = 0.01,
    max_steps: int = 100_000,
):
    """Log-density of each sample under the model's probability flow, in nats.

    Args:
      score_fn: ``score_fn(x (B, ...), t (B,)) -> (B, ...)`` (an ``eqx.Module`` for reuse).
      sde: the :class:`~fpcd.sde.VPSDE`.
      x: data ``(B, ...)`` at ``t = t_min`` (in the model's units): a batch axis ``B >= 1`` and
        at least one feature axis (one sample is ``x[None]``).
      key: PRNG key for the Hutchinson probe (required for ``divergence="hutchinson"``).
      divergence: ``"exact"`` or ``"hutchinson"``.
      rtol, atol: Dopri5 tolerances.
      mask: 1 = real, 0 = padding; ``(B, N)`` for clouds or broadcastable to ``x``. Only real
        dimensions count.
      t_min: start time of the flow (the density returned is that of ``p_{t_min}``).
      probe: ``"rademacher"`` or ``"gaussian"`` (Hutchinson only).
      dt0: magnitude of the first trial step.
      max_steps: step budget of the solve (a positive integer: Python or NumPy int, or a 0-d
        integer array).

    Returns:
      ``(logp, nfe)``: ``logp`` of shape ``(B,)`` in nats and the number of evaluations of the
      augmented vector field (each is one score call plus its JVPs), from the solver's step
      statistics: a Python int when called eagerly, an int32 array when traced (inside
      ``jax.jit``/``jax.vmap``). Traced, a solve that failed returns NaN ``logp`` (check
      ``jnp.isnan(logp).any()``) instead of raising: it ran out of ``max_steps``, or its state
      became NaN/inf. Traced NaN/inf in ``x`` or ``mask`` cannot be refused, so it gives NaN
      ``logp`` too, after one step (a handful of evaluations), not a full solve.

    Raises:
      ValueError: unknown divergence or probe, missing key, ``t_min`` outside (0, 1), ``max_steps``
        not a positive integer, ``x`` without a batch axis and a feature axis or with an empty
        batch, and (eager calls only) NaN/inf in ``x`` or ``mask``.
      NonFiniteStateError: (eager calls only) the ODE state became NaN/inf because the score
        returned NaN/inf; raised as soon as it happens, naming the time (a ``RuntimeError``).
      RuntimeError: (eager calls only) the solver ran out of ``max_steps`` or its step size
        collapsed.
    """
    opts = check_likelihood_options(divergence=divergence, probe=probe, rtol=rtol, atol=atol, t_min=t_min, dt0=dt0,
                                    max_steps=max_steps)
    if divergence == "hutchinson" and key is None:
        raise ValueError("divergence='hutchinson' needs a PRNG key for its probe")
    x = jnp.asarray(x)
    if x.ndim < 2 or x.size == 0:
        raise ValueError(f"x must have shape (B, ...): a batch axis of B >= 1 samples and at least one non-empty feature "
                         f"axis, got shape {x.shape}"
                         + ("; pass one sample as x[None] or scalar samples as x[:, None]" if x.ndim == 1 else ""))
    for name, value in (("x", x), ("mask", mask)):
        if value is not None and not isinstance(value, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(value))):
            raise ValueError(f"{name} holds NaN/inf values; log_likelihood needs finite input")
    m = None if mask is None else expand_mask(mask, x)
    if m is not None:
        x = x * m
    probe_vector = draw_probe(key, x.shape, probe, m, x.dtype) if divergence == "hutchinson" else None
    flow = AugmentedFlow(ProbabilityFlow(score_fn, sde, m), divergence)
    state0 = (x, jnp.zeros((x.shape[0],), x.dtype))
    (z, delta), stats = solve_dopri5(
        flow, state0, t0=opts["t_min"], t1=1.0, rtol=opts["rtol"], atol=opts["atol"], args=probe_vector,
        dt0=opts["dt0"], max_steps=opts["max_steps"], mask=m,
    )
    return sde.prior_logp(z, m) + delta, checked_nfe(stats, t1=1.0, max_steps=opts["max_steps"])
