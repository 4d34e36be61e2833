"""Adaptive ODE solves with diffrax's Dopri5 and an exact count of vector-field evaluations.

Both the probability-flow sampler (:mod:`fpcd.sampling`) and the likelihood
(:mod:`fpcd.likelihood`) integrate with :func:`solve_dopri5`. The number of function
evaluations (NFE) is *counted*, not inferred from the solver's step statistics: every call of
the vector field inside the compiled solve fires a host callback that increments a tally
identified by a per-solve token (a traced integer, so the compiled solve is reused across calls).
One batched evaluation counts once.
"""

from __future__ import annotations

import itertools
import threading

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import optimistix as optx

_tally_lock = threading.Lock()
_tallies: dict[int, int] = {}
_tokens = itertools.count(1)


def _record_evaluation(token):
    with _tally_lock:
        key = int(token)
        _tallies[key] = _tallies.get(key, 0) + 1


def counted(vector_field, token):
    """Wrap ``vector_field(t, y, args)`` so that each executed evaluation adds 1 to ``token``'s tally."""

    def wrapped(t, y, args):
        jax.debug.callback(_record_evaluation, token)
        return vector_field(t, y, args)

    return wrapped


def new_token():
    """A fresh tally token (host int32 array) for one solve."""
    token = next(_tokens) % (2**31 - 1)
    with _tally_lock:
        _tallies[token] = 0
    return jnp.asarray(token, dtype=jnp.int32)


def take_count(token) -> int:
    """Wait for pending callbacks, then remove and return ``token``'s tally."""
    jax.effects_barrier()
    with _tally_lock:
        return _tallies.pop(int(token), 0)


def masked_rms_norm(mask):
    """Error norm for diffrax's step-size controller: RMS over the real (``mask == 1``) entries of
    the first leaf (the state ``x``) and all entries of the other leaves."""

    def norm(error_tree):
        leaves = jax.tree_util.tree_leaves(error_tree)
        first, rest = leaves[0], leaves[1:]
        total = jnp.sum(mask * first**2)
        count = jnp.sum(mask)
        for leaf in rest:
            total = total + jnp.sum(leaf**2)
            count = count + leaf.size
        return jnp.sqrt(total / jnp.maximum(count, 1.0))

    return norm


@eqx.filter_jit
def _solve(vector_field, y0, args, token, t0, t1, dt0, rtol, atol, max_steps, mask):
    controller = diffrax.PIDController(
        rtol=rtol, atol=atol, norm=masked_rms_norm(mask) if mask is not None else optx.rms_norm
    )
    solution = diffrax.diffeqsolve(
        diffrax.ODETerm(counted(vector_field, token)),
        diffrax.Dopri5(),
        t0=t0,
        t1=t1,
        dt0=dt0,
        y0=y0,
        args=args,
        stepsize_controller=controller,
        saveat=diffrax.SaveAt(t1=True),
        max_steps=max_steps,
        throw=False,
    )
    y1 = jax.tree_util.tree_map(lambda leaf: leaf[-1], solution.ys)
    succeeded = solution.result == diffrax.RESULTS.successful
    return y1, succeeded, solution.stats["num_steps"]


def solve_dopri5(vector_field, y0, *, t0, t1, rtol, atol, args=None, dt0=0.01, max_steps=100_000, mask=None):
    """Integrate ``dy/dt = vector_field(t, y, args)`` from ``t0`` to ``t1`` with Dopri5 + PID control.

    Args:
      vector_field: pure function ``(t (), y pytree, args) -> dy/dt``; may be an ``eqx.Module``.
      y0: initial state pytree; its first leaf is the sample batch ``x``.
      t0, t1: start and end times (``t1 < t0`` integrates backwards).
      rtol, atol: tolerances of the PID controller (RMS error norm).
      dt0: magnitude of the first trial step (its sign follows ``t1 - t0``).
      max_steps: step budget; running out raises ``RuntimeError``.
      mask: if given, broadcast to the first leaf; padded entries are left out of the error norm.

    Returns:
      ``(y1, nfe)``: the state at ``t1`` and the counted number of vector-field evaluations.
    """
    if not (rtol > 0 and atol > 0):
        raise ValueError(f"rtol and atol must be positive, got rtol={rtol}, atol={atol}")
    direction = 1.0 if t1 > t0 else -1.0
    token = new_token()
    try:
        scalars = [jnp.asarray(v, jnp.result_type(float)) for v in (t0, t1, direction * abs(float(dt0)), rtol, atol)]
        y1, succeeded, num_steps = _solve(vector_field, y0, args, token, *scalars, int(max_steps), mask)
        jax.block_until_ready(y1)
    finally:
        nfe = take_count(token)
    if not bool(succeeded):
        raise RuntimeError(
            f"Dopri5 did not reach t1={t1} within max_steps={max_steps} (took {int(num_steps)} steps, "
            f"{nfe} evaluations); loosen rtol/atol or raise max_steps"
        )
    return y1, nfe
