"""Samplers of the reverse VP SDE and its probability-flow ODE, each reporting its NFE.

The single entry point is :func:`sample`::

    x, nfe = sample(score_fn, sde, key, (B, N, D), method="pc", steps=250, snr=0.16, mask=mask)

Methods (``opts`` in brackets, defaults after ``=``):

* ``"em"``   Euler-Maruyama on the reverse SDE [``steps=500``, ``t_min=1e-3``]; NFE = ``steps``.
* ``"pc"``   predictor-corrector: at each of ``steps`` times, ``corrector_steps`` Langevin
  corrector moves with signal-to-noise ratio ``snr``, then one Euler-Maruyama predictor step
  [``steps=250``, ``snr=0.16``, ``corrector_steps=1``, ``t_min=1e-3``];
  NFE = ``steps * (1 + corrector_steps)``.
* ``"ddim"`` DDIM [``steps=100``, ``eta=0.0``, ``t_min=1e-3``]; ``eta=0`` is deterministic,
  ``eta=1`` is ancestral (DDPM-like); NFE = ``steps``.
* ``"dpmpp_2m"`` DPM-Solver++(2M) on the probability-flow ODE [``steps=20``, ``t_min=1e-3``];
  NFE = ``steps``. Multistep second order in data prediction (Lu et al. 2022, Algorithm 2) on a grid
  uniform in ``lambda = log(alpha_t / sigma_t)``; first order at the first step and, for
  ``steps < 15``, at the last (diffusers' ``lower_order_final``). See :func:`dpmpp_2m_step`.
* ``"heun"`` Heun's second-order method on the probability-flow ODE (Karras et al. 2022,
  Algorithm 1 with ``S_churn = 0``) on the EDM grid with ``rho`` [``steps=18``, ``rho=7.0``,
  ``t_min=1e-3``]; Euler on the last step, so NFE = ``2 * steps - 1``. See :func:`heun_grid`.
* ``"ode"``  probability-flow ODE with diffrax ``Dopri5`` and a PID step-size controller
  [``rtol=1e-5``, ``atol=1e-5``, ``dt0=0.01``, ``max_steps=100000``, ``t_min=1e-3``];
  NFE = the vector-field evaluations of the solve, computed from the solver's step statistics
  (:mod:`fpcd.ode`: ``6 * num_steps + 1`` plus the rejections before the first accepted step).
  The whole batch is one state, so the batch shares its steps under an RMS error norm over real
  entries.

``em``, ``pc`` and ``ddim`` run on the grid ``t_i = linspace(1, t_min, steps + 1)``, ``dpmpp_2m``
and ``heun`` on their own grids from 1 to ``t_min``. Every fixed-step sampler is one jitted
``lax.fori_loop`` whose step count is a traced value (one compilation serves every ``steps``, and
its loop body calls the score once); the stochastic ones return the noise-free mean of the last
step (score_sde's "denoising" of the output), and every one returns ``x`` at ``t_min``.
NFE counts score evaluations per sample, one batched call counting once. Fixed-step samplers draw
the prior in the default float dtype, so inside ``jax.enable_x64(True)`` they run in float64;
``ddim``, ``dpmpp_2m`` and ``heun`` called with the same key start from the same prior draw.

Every method works inside ``jax.jit`` and ``jax.vmap`` (e.g. over keys). Called eagerly,
:func:`sample` returns the NFE as a Python int and raises ``RuntimeError`` when the ODE solver
runs out of ``max_steps``, and :class:`~fpcd.ode.NonFiniteStateError` (a ``RuntimeError``) as
soon as the ODE state becomes NaN/inf (the score returned NaN/inf: the solve stops there instead of
spending its step budget); traced, the NFE is an int32 array and a failed ODE solve returns NaN
samples instead of raising.

Masks: ``mask`` (1 = real, 0 = padding) is ``(B, N)`` for clouds ``x (B, N, D)`` or broadcastable
to ``x``. Padded entries are exactly 0 at every step, the Langevin step size uses norms over real
entries only, and no padded value enters a real entry through the sampler.

The host-side scipy RK45 baseline used for comparison lives in ``benchmarks/scipy_rk45.py``.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from fpcd.ode import as_int, as_number, check_solver_options, checked_nfe, solve_dopri5
from fpcd.sde import VPSDE, broadcast_time, expand_mask, mask_or_ones

METHOD_DEFAULTS = {
    "em": {"steps": 500, "t_min": 1e-3},
    "pc": {"steps": 250, "snr": 0.16, "corrector_steps": 1, "t_min": 1e-3},
    "ddim": {"steps": 100, "eta": 0.0, "t_min": 1e-3},
    "dpmpp_2m": {"steps": 20, "t_min": 1e-3},
    "heun": {"steps": 18, "rho": 7.0, "t_min": 1e-3},
    "ode": {"rtol": 1e-5, "atol": 1e-5, "dt0": 0.01, "max_steps": 100_000, "t_min": 1e-3},
}


def _batch_time(t, x):
    return jnp.full((x.shape[0],), t, dtype=x.dtype)


def em_step(score_fn, sde: VPSDE, x, t, t_next, key, mask):
    """One Euler-Maruyama step of the reverse SDE from ``t`` to ``t_next < t``.

    Returns ``(x_next, x_next_mean)``; both are zero where ``mask`` is 0.
    """
    tb = _batch_time(t, x)
    dt = t_next - t
    g = broadcast_time(sde.diffusion(tb), x)
    drift = sde.drift(x, tb) - g**2 * score_fn(x, tb)
    x_mean = (x + drift * dt) * mask
    noise = jax.random.normal(key, x.shape, x.dtype) * mask
    return x_mean + g * jnp.sqrt(-dt) * noise, x_mean


def per_sample_norm(v, mask):
    """Euclidean norm over every non-batch axis of ``v * mask``: ``(B,)``."""
    return jnp.sqrt(jnp.sum((v * mask).reshape(v.shape[0], -1) ** 2, axis=-1))


def langevin_step(score_fn, sde: VPSDE, x, t, step_fraction, snr, key, mask):
    """One Langevin corrector move at time ``t`` (Song et al. 2021, Alg. 5, VP version).

    The step size is ``2 alpha (snr <|z|> / <|score|>)^2``, where ``|.|`` is the norm of one
    sample over its real entries and ``<.>`` the batch mean (as in score_sde: per-sample norms in
    low dimension fluctuate to 0 and make the step explode), and
    ``alpha = exp(-beta(t) * step_fraction)`` (score_sde's ``1 - beta_i`` for a grid step
    ``step_fraction``). Returns ``(x, x_mean)``.
    """
    tb = _batch_time(t, x)
    score = score_fn(x, tb) * mask
    noise = jax.random.normal(key, x.shape, x.dtype) * mask
    score_norm = jnp.mean(per_sample_norm(score, mask))
    noise_norm = jnp.mean(per_sample_norm(noise, mask))
    alpha = jnp.exp(-sde.beta(t) * step_fraction)
    ratio = jnp.where(score_norm > 0, snr * noise_norm / jnp.where(score_norm > 0, score_norm, 1.0), 0.0)
    step_size = 2.0 * alpha * ratio**2
    x_mean = x + step_size * score
    return x_mean + jnp.sqrt(2.0 * step_size) * noise, x_mean


def ddim_step(score_fn, sde: VPSDE, x, t, t_next, eta, key, mask):
    """One DDIM step from ``t`` to ``t_next`` with stochasticity ``eta`` (Song, Meng, Ermon 2021).

    ``eps = -sigma_t score``, ``x0 = (x - sigma_t eps) / alpha_t``,
    ``x' = alpha_s x0 + sqrt(sigma_s^2 - c^2) eps + c z`` with
    ``c = eta sqrt(sigma_s^2 / sigma_t^2 (1 - alpha_t^2 / alpha_s^2))``. Returns ``(x', mean)``.
    """
    tb = _batch_time(t, x)
    alpha_t, sigma_t = sde.marginal(t)
    alpha_s, sigma_s = sde.marginal(t_next)
    eps = -sigma_t * score_fn(x, tb)
    x0 = (x - sigma_t * eps) / alpha_t
    c = eta * jnp.sqrt(jnp.maximum(sigma_s**2 / sigma_t**2 * (1.0 - alpha_t**2 / alpha_s**2), 0.0))
    x_mean = (alpha_s * x0 + jnp.sqrt(jnp.maximum(sigma_s**2 - c**2, 0.0)) * eps) * mask
    noise = jax.random.normal(key, x.shape, x.dtype) * mask
    return x_mean + c * noise, x_mean


def _grid_times(i, steps, t_min):
    """``(t_i, t_{i+1})`` of the uniform grid from 1 to ``t_min`` in ``steps`` steps (traced ``i``)."""
    h = (1.0 - t_min) / steps
    return 1.0 - i * h, 1.0 - (i + 1) * h


def _float():
    """The default float dtype: float32, or float64 under ``jax.enable_x64``."""
    return jnp.result_type(float)


def _constrain(x, sharding):
    return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)


def _fixed_step_loop(step_fn, key, shape, mask, sde, steps, t_min, sharding=None):
    """Run ``step_fn(x, t, t_next, key, m) -> (x, x_mean)`` over the grid in one ``fori_loop``.

    ``steps`` and ``t_min`` are traced, so one compiled sampler serves every step count.
    Returns the mean of the last step (no noise added at the end).
    """
    k_prior, k_steps = jax.random.split(key)
    x = _constrain(sde.prior_sample(k_prior, shape, _float()), sharding)
    m = mask_or_ones(mask, x)

    def body(i, carry):
        t, t_next = _grid_times(i, steps, t_min)
        return step_fn(carry[0], t, t_next, jax.random.fold_in(k_steps, i), m)

    _, x_mean = jax.lax.fori_loop(0, steps, body, (x * m, x * m))
    return x_mean


@eqx.filter_jit
def _em(score_fn, sde, key, shape, mask, *, steps, t_min, sharding=None):
    def step(x, t, t_next, k, m):
        return em_step(score_fn, sde, x, t, t_next, k, m)

    return _fixed_step_loop(step, key, shape, mask, sde, steps, t_min, sharding)


@eqx.filter_jit
def _pc(score_fn, sde, key, shape, mask, *, steps, snr, corrector_steps, t_min, sharding=None):
    step_fraction = (1.0 - t_min) / steps

    def step(x, t, t_next, k, m):
        k_corr, k_pred = jax.random.split(k)

        def correct(j, x):
            return langevin_step(score_fn, sde, x, t, step_fraction, snr, jax.random.fold_in(k_corr, j), m)[0]

        x = jax.lax.fori_loop(0, corrector_steps, correct, x)
        return em_step(score_fn, sde, x, t, t_next, k_pred, m)

    return _fixed_step_loop(step, key, shape, mask, sde, steps, t_min, sharding)


@eqx.filter_jit
def _ddim(score_fn, sde, key, shape, mask, *, steps, eta, t_min, sharding=None):
    def step(x, t, t_next, k, m):
        return ddim_step(score_fn, sde, x, t, t_next, eta, k, m)

    return _fixed_step_loop(step, key, shape, mask, sde, steps, t_min, sharding)


def _deterministic_prior(sde, key, shape):
    """The prior draw of ``dpmpp_2m`` and ``heun``: the one ``ddim`` makes from the same key."""
    return sde.prior_sample(jax.random.split(key)[0], shape, _float())


def _alpha_sigma_of_lambda(lam):
    """``(alpha_t, sigma_t)`` of the VP marginal at half log-SNR ``lam = log(alpha_t / sigma_t)``."""
    return jnp.sqrt(jax.nn.sigmoid(2.0 * lam)), jnp.sqrt(jax.nn.sigmoid(-2.0 * lam))


def dpmpp_2m_step(score_fn, sde: VPSDE, x, x0_prev, lam, lam_next, r, second_order, mask):
    """One DPM-Solver++(2M) step (Lu et al. 2022, "DPM-Solver++", Algorithm 2) from half log-SNR
    ``lam`` to ``lam_next > lam``.

    With ``h = lam_next - lam``, the data prediction ``x0 = (x - sigma_t eps) / alpha_t`` (``eps =
    -sigma_t score``) at the current point and ``x0_prev`` from the previous step, whose step size
    was ``r h``: ``D = x0 + (x0 - x0_prev) / (2 r)`` if ``second_order`` else ``x0``, and
    ``x' = (sigma_s / sigma_t) x - alpha_s (exp(-h) - 1) D``. One score evaluation.
    Returns ``(x', x0)``; both are zero where ``mask`` is 0.
    """
    alpha_t, sigma_t = _alpha_sigma_of_lambda(lam)
    alpha_s, sigma_s = _alpha_sigma_of_lambda(lam_next)
    t = _batch_time(sde.time_of_log_snr(2.0 * lam), x)
    x0 = (x + sigma_t**2 * score_fn(x, t)) / alpha_t * mask
    d = x0 + jnp.where(second_order, 0.5 / r, 0.0) * (x0 - x0_prev)
    h = lam_next - lam
    return (sigma_s / sigma_t * x - alpha_s * jnp.expm1(-h) * d) * mask, x0


@eqx.filter_jit
def _dpmpp_2m(score_fn, sde, key, shape, mask, *, steps, t_min, sharding=None):
    """DPM-Solver++(2M) from t = 1 to ``t_min`` in ``steps`` steps uniform in ``lambda``.

    Step ``i`` goes from ``lambda_i`` to ``lambda_{i+1}``, ``lambda_i = lambda(1) + i (lambda(t_min) -
    lambda(1)) / steps``, with the score at ``t_i = lambda^-1(lambda_i)`` (closed form,
    :meth:`~fpcd.sde.VPSDE.time_of_log_snr`). Step 0 is first order (no history); the last step is
    first order too when ``steps < 15`` (diffusers' ``lower_order_final``; the authors' reference
    code does the same below 10 steps), which steadies few-step sampling; every other step is
    second order. On this uniform grid the step-size ratio ``r`` is 1.
    """
    x = _constrain(_deterministic_prior(sde, key, shape), sharding)
    m = mask_or_ones(mask, x)
    lam_start, lam_end = 0.5 * sde.log_snr(1.0), 0.5 * sde.log_snr(t_min)
    h = (lam_end - lam_start) / steps

    def body(i, carry):
        x, x0_prev = carry
        lam = lam_start + i * h
        lam_next = jnp.where(i + 1 == steps, lam_end, lam + h)
        last_lower = (i + 1 == steps) & (steps < 15)
        return dpmpp_2m_step(score_fn, sde, x, x0_prev, lam, lam_next, 1.0, (i > 0) & ~last_lower, m)

    x, _ = jax.lax.fori_loop(0, steps, body, (x * m, jnp.zeros_like(x)))
    return x


def heun_grid(i, steps, sigma_max, sigma_min, rho):
    """EDM's noise level ``sigma_i`` (Karras et al. 2022, eq. 5) for ``i = 0 .. steps``:

    ``sigma_i = (sigma_max^(1/rho) + i / steps (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho``,

    here in the VP's ``sigma = sigma_t / alpha_t = exp(-lambda)`` (the noise level of ``x / alpha_t``,
    the variance-exploding form of the VP SDE) with ``sigma_max = sigma(1)``, ``sigma_min =
    sigma(t_min)``; the VP time of ``sigma_i`` is ``t_i = lambda^-1(-log sigma_i)``. EDM's grid has
    ``N = steps + 1`` points ending at ``sigma_min`` (no extra step to 0).
    """
    a, b = sigma_max ** (1.0 / rho), sigma_min ** (1.0 / rho)
    return jnp.where(i == steps, sigma_min, (a + i / steps * (b - a)) ** rho)


@eqx.filter_jit
def _heun(score_fn, sde, key, shape, mask, *, steps, rho, t_min, sharding=None):
    """Heun (EDM Algorithm 1, deterministic) on the probability-flow ODE in EDM's variables.

    With ``y = x / alpha_t`` and ``sigma = sigma_t / alpha_t`` the VP probability-flow ODE is
    ``dy / dsigma = eps(x, t) = -sigma_t score(x, t)`` (the ODE whose Euler steps are DDIM). From
    ``sigma_j`` to ``sigma_{j+1}`` (:func:`heun_grid`, ``Delta = sigma_{j+1} - sigma_j``):
    ``d = eps(y_j)``, ``y' = y_j + Delta d``, and for ``j < steps - 1``
    ``y_{j+1} = y_j + Delta (d + eps(y'))/2``; the last step stops at the Euler ``y'``. Returns
    ``alpha(t_min) y``. The ``2 steps - 1`` evaluations are one ``fori_loop`` of one score call each:
    even iterations ``k = 2j`` are Euler predictors at ``sigma_j``, odd ones their corrections at
    ``sigma_{j+1}``.
    """
    x = _constrain(_deterministic_prior(sde, key, shape), sharding)
    m = mask_or_ones(mask, x)
    sigma_max, sigma_min = jnp.exp(-0.5 * sde.log_snr(1.0)), jnp.exp(-0.5 * sde.log_snr(t_min))
    y = x * m * jnp.sqrt(1.0 + sigma_max**2)

    def body(k, carry):
        y, y_pred, d = carry
        j, correct = k // 2, k % 2 == 1
        sigma_j = heun_grid(j, steps, sigma_max, sigma_min, rho)
        sigma_next = heun_grid(j + 1, steps, sigma_max, sigma_min, rho)
        sigma = jnp.where(correct, sigma_next, sigma_j)
        alpha = jax.lax.rsqrt(1.0 + sigma**2)
        t = _batch_time(sde.time_of_log_snr(-2.0 * jnp.log(sigma)), x)
        point = jnp.where(correct, y_pred, y)
        eps = -sigma * alpha * score_fn(alpha * point, t) * m
        delta = sigma_next - sigma_j
        y_new = jnp.where(correct, y + 0.5 * delta * (d + eps), y)
        y_pred = jnp.where(correct, y_pred, y + delta * eps)
        return y_new, y_pred, jnp.where(correct, d, eps)

    _, y_last, _ = jax.lax.fori_loop(0, 2 * steps - 1, body, (y, y, jnp.zeros_like(y)))
    return y_last * jax.lax.rsqrt(1.0 + sigma_min**2)


class ProbabilityFlow(eqx.Module):
    """Vector field of the probability-flow ODE ``dx/dt = f(x, t) - 1/2 g(t)^2 score(x, t)``,
    zero on padded entries. Call signature ``(t (), x (B, ...), args) -> (B, ...)`` (diffrax's)."""

    score_fn: eqx.Module
    sde: VPSDE
    mask: jax.Array | None

    def __call__(self, t, x, args=None):
        tb = _batch_time(t, x)
        g2 = broadcast_time(self.sde.beta(tb), x)
        velocity = self.sde.drift(x, tb) - 0.5 * g2 * self.score_fn(x, tb)
        return velocity if self.mask is None else velocity * self.mask


def _ode(score_fn, sde, key, shape, mask, *, rtol, atol, dt0, max_steps, t_min, sharding=None):
    """Probability-flow samples (NaN if the solve failed) and the solve's :class:`~fpcd.ode.SolveStats`."""
    x1 = sde.prior_sample(key, shape)
    if sharding is not None:
        x1 = jax.device_put(x1, sharding)
    m = None if mask is None else expand_mask(mask, x1)
    if m is not None:
        x1 = x1 * m
    return solve_dopri5(
        ProbabilityFlow(score_fn, sde, m), x1, t0=1.0, t1=t_min, rtol=rtol, atol=atol, dt0=dt0,
        max_steps=max_steps, mask=m,
    )


_SAMPLERS = {"em": _em, "pc": _pc, "ddim": _ddim, "dpmpp_2m": _dpmpp_2m, "heun": _heun, "ode": _ode}


def check_sampler_options(method: str, options: dict) -> dict:
    """The one check of a sampler's options: ``method``'s defaults (:data:`METHOD_DEFAULTS`)
    updated with ``options`` and validated; integers (Python, NumPy or 0-d integer arrays) come back
    as Python ints and numbers as Python floats. Used by :func:`sample`, :func:`nfe_of` and the
    configs' ``sampling.runs`` check (:func:`fpcd.config.validate_sampling`).

    Raises:
      ValueError: an unknown method, an unknown option, or the first bad value, naming it.
    """
    if method not in METHOD_DEFAULTS:
        raise ValueError(f"unknown sampling method {method!r}; expected one of {sorted(METHOD_DEFAULTS)}")
    allowed = METHOD_DEFAULTS[method]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"sampling method {method!r} got unknown option(s) {unknown}; allowed: {sorted(allowed)}")
    merged = {**allowed, **options}
    if method == "ode":
        merged.update(check_solver_options(**{k: merged[k] for k in ("rtol", "atol", "dt0", "max_steps")},
                                           prefix="sampling option "))
    for name in ("steps", "corrector_steps"):
        if name in merged:
            value = as_int(merged[name])
            if value is None or value < 1:
                raise ValueError(f"sampling option {name} must be a positive integer, got {merged[name]!r}")
            merged[name] = value
    for name in ("snr", "rho", "eta", "t_min"):
        if name in merged:
            value = as_number(merged[name])
            if value is None or not np.isfinite(value):
                raise ValueError(f"sampling option {name} must be a finite number, got {merged[name]!r}")
            merged[name] = value
    for name in ("snr", "rho"):
        if name in merged and not merged[name] > 0:
            raise ValueError(f"sampling option {name} must be a positive number, got {options.get(name, merged[name])!r}")
    if "eta" in merged and not 0.0 <= merged["eta"] <= 1.0:
        raise ValueError(f"sampling option eta must lie in [0, 1], got {options.get('eta', merged['eta'])!r}")
    if not 0.0 < merged["t_min"] < 1.0:
        raise ValueError(f"sampling option t_min must lie in (0, 1), got {options.get('t_min', merged['t_min'])!r}")
    return merged


def nfe_of(method: str, **opts) -> int | None:
    """Score evaluations per sample of a fixed-step method (None for ``"ode"``: it depends on the
    solve)."""
    merged = check_sampler_options(method, opts)
    if method == "pc":
        return merged["steps"] * (1 + merged["corrector_steps"])
    if method in ("em", "ddim", "dpmpp_2m"):
        return merged["steps"]
    if method == "heun":
        return 2 * merged["steps"] - 1
    return None


def sample(score_fn, sde: VPSDE, key, shape, *, method: str, mask=None, sharding=None, **opts):
    """Draw samples of shape ``shape = (B, ...)`` by integrating from the prior at t=1 to ``t_min``.

    Args:
      score_fn: ``score_fn(x (B, ...), t (B,)) -> (B, ...)``; pass an ``eqx.Module``
        (e.g. :func:`fpcd.nets.score_fn_from`) so repeated calls reuse the compiled sampler.
      sde: the :class:`~fpcd.sde.VPSDE`.
      key: a JAX PRNG key.
      shape: output shape ``(B, ...)``.
      method: ``"em"``, ``"pc"``, ``"ddim"``, ``"dpmpp_2m"``, ``"heun"`` or ``"ode"`` (the module
        docstring lists options).
      mask: 1 = real, 0 = padding; ``(B, N)`` for clouds or broadcastable to ``shape``.
      sharding: optional sharding of the batch (e.g. ``fpcd.parallel.batch_sharding(mesh)``):
        the samples are then computed data-parallel over its devices. Results do not depend on it.

    Integer options (``steps``, ``corrector_steps``, ``max_steps``) may be Python or NumPy
    integers or 0-d integer arrays (not ``bool``); number options any real scalar.

    Returns:
      ``(x, nfe)``: samples ``(B, ...)`` (exactly 0 where masked) and the number of score
      evaluations per sample: a Python int when called eagerly, an int32 array when traced
      (inside ``jax.jit``/``jax.vmap``). Traced, an ODE solve that failed (out of ``max_steps``,
      or stopped because the score returned NaN/inf) returns NaN samples (check
      ``jnp.isnan(x).any()``) instead of raising.

    Raises:
      ValueError: unknown method, unknown option, invalid option value, or a mask of the wrong
        shape or (when concrete) holding NaN/inf.
      NonFiniteStateError: (eager ``"ode"`` only) the ODE state became NaN/inf because the score
        returned NaN/inf; raised as soon as it happens, naming the time (a ``RuntimeError``).
      RuntimeError: (eager ``"ode"`` only) the solver ran out of ``max_steps`` or its step size
        collapsed.

    Works inside ``jax.jit`` and ``jax.vmap``; ``shape``, ``method`` and ``opts`` must be
    Python (or concrete NumPy) values there.
    """
    merged = check_sampler_options(method, opts)
    shape = tuple(int(s) for s in shape)
    if mask is not None:
        mask = jnp.asarray(mask, jnp.float32)
        try:
            if mask.ndim > len(shape):
                raise ValueError
            np.broadcast_shapes(mask.shape + (1,) * (len(shape) - mask.ndim), shape)
        except ValueError as err:
            raise ValueError(f"mask of shape {mask.shape} does not broadcast to the sample shape {shape}") from err
        if not isinstance(mask, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(mask))):
            raise ValueError("mask holds NaN/inf values; expected 1 (real) or 0 (padding)")
    if method == "ode":
        x, stats = _ode(score_fn, sde, key, shape, mask, sharding=sharding, **merged)
        return x, checked_nfe(stats, t1=merged["t_min"], max_steps=merged["max_steps"])
    traced = {name: jnp.asarray(value) for name, value in merged.items()}
    x = _SAMPLERS[method](score_fn, sde, key, shape, mask, sharding=sharding, **traced)
    return x, nfe_of(method, **opts)
