"""The variance-preserving SDE of Song et al. (2021), as pure functions on an immutable pytree.

Time runs from ``t = 0`` (data) to ``t = 1`` (noise). The forward SDE is

    dx = -1/2 beta(t) x dt + sqrt(beta(t)) dW,

whose transition kernel is ``x_t | x_0 ~ N(alpha_t x_0, sigma_t^2 I)`` with

    alpha_t = exp(-1/2 B(t)),   sigma_t^2 = 1 - exp(-B(t)),   B(t) = int_0^t beta(s) ds.

Two schedules are provided:

* ``"linear"``: ``beta(t) = beta_min + t (beta_max - beta_min)`` (score_sde's VP SDE).
* ``"cosine"``: the cosine schedule of Nichol & Dhariwal (2021), ``alpha_t^2 ∝ cos^2(phi(t))``
  with ``phi`` linear in ``t`` from ``phi(0) = pi/2 s/(1+s)`` (``s = 0.008``). The end angle is
  truncated so that ``alpha_1`` equals the linear schedule's ``alpha_1`` for the same
  ``beta_min``/``beta_max``; the prior mismatch is then the same and ``beta(1)`` stays finite.

Arrays: ``x`` has shape ``(B, ...)`` and ``t`` shape ``(B,)`` (or a scalar), broadcast
against the trailing axes of ``x``.
"""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp

SCHEDULES = ("linear", "cosine")
_COSINE_OFFSET = 0.008


def broadcast_time(t, x):
    """Reshape ``t`` of shape ``(B,)`` (or ``()``) so that it broadcasts against ``x`` ``(B, ...)``."""
    t = jnp.asarray(t)
    if t.ndim == 0:
        return t
    return t.reshape(t.shape + (1,) * (x.ndim - t.ndim))


def expand_mask(mask, x):
    """Broadcast a mask to ``x``'s shape, aligning leading axes: a ``(B, N)`` point mask becomes
    ``(B, N, D)`` for a cloud ``x`` of shape ``(B, N, D)``. ``None`` stays ``None``."""
    if mask is None:
        return None
    mask = jnp.asarray(mask, dtype=x.dtype)
    mask = mask.reshape(mask.shape + (1,) * (x.ndim - mask.ndim))
    return jnp.broadcast_to(mask, x.shape)


def mask_or_ones(mask, x):
    """:func:`expand_mask` of ``mask``, or ones shaped like ``x`` when there is no mask."""
    return jnp.ones_like(x) if mask is None else expand_mask(mask, x)


def masked_sum(values, mask=None):
    """Sum over every non-batch axis of ``values`` ``(B, ...)``, counting only ``mask == 1`` entries."""
    if mask is not None:
        values = values * expand_mask(mask, values)
    return values.reshape(values.shape[0], -1).sum(axis=-1)


def count_dimensions(x, mask=None):
    """Number of real (unmasked) scalar dimensions per sample, shape ``(B,)``."""
    return masked_sum(jnp.ones_like(x), mask)


class VPSDE(eqx.Module):
    """Variance-preserving SDE with a linear or cosine noise schedule.

    Args:
      beta_min: noise rate at ``t = 0`` (linear schedule), dimensionless per unit time.
      beta_max: noise rate at ``t = 1`` (linear schedule).
      schedule: ``"linear"`` or ``"cosine"``.

    Every method is a pure function of its inputs; the module holds only static floats.
    """

    beta_min: float = eqx.field(static=True, default=0.1)
    beta_max: float = eqx.field(static=True, default=20.0)
    schedule: str = eqx.field(static=True, default="linear")

    def __check_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"VPSDE: unknown schedule {self.schedule!r}; expected one of {SCHEDULES}")
        if not (0.0 < self.beta_min < self.beta_max):
            raise ValueError(
                f"VPSDE: need 0 < beta_min < beta_max, got beta_min={self.beta_min}, beta_max={self.beta_max}"
            )

    # --- schedule -------------------------------------------------------------------------------
    def _cosine_angles(self):
        phi0 = 0.5 * math.pi * _COSINE_OFFSET / (1.0 + _COSINE_OFFSET)
        log_alpha1 = -0.5 * (self.beta_min + 0.5 * (self.beta_max - self.beta_min))
        phi1 = math.acos(math.cos(phi0) * math.exp(log_alpha1))
        return phi0, phi1

    def int_beta(self, t):
        """``B(t) = int_0^t beta(s) ds`` (so ``alpha_t = exp(-B/2)``), elementwise in ``t``."""
        t = jnp.asarray(t, dtype=jnp.result_type(float))
        if self.schedule == "linear":
            return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2
        phi0, phi1 = self._cosine_angles()
        phi = phi0 + (phi1 - phi0) * t
        return -2.0 * (jnp.log(jnp.cos(phi)) - math.log(math.cos(phi0)))

    def beta(self, t):
        """Instantaneous noise rate ``beta(t) = dB/dt``, elementwise in ``t``."""
        t = jnp.asarray(t, dtype=jnp.result_type(float))
        if self.schedule == "linear":
            return self.beta_min + t * (self.beta_max - self.beta_min)
        phi0, phi1 = self._cosine_angles()
        phi = phi0 + (phi1 - phi0) * t
        return 2.0 * (phi1 - phi0) * jnp.tan(phi)

    def marginal(self, t):
        """Closed-form ``(alpha_t, sigma_t)`` of ``x_t | x_0 ~ N(alpha_t x_0, sigma_t^2 I)``."""
        b = self.int_beta(t)
        return jnp.exp(-0.5 * b), jnp.sqrt(-jnp.expm1(-b))

    def log_snr(self, t):
        """``log(alpha_t^2 / sigma_t^2)``, decreasing in ``t``."""
        b = self.int_beta(t)
        return -b - jnp.log(-jnp.expm1(-b))

    def time_of_log_snr(self, log_snr):
        """Inverse of :meth:`log_snr`: the ``t`` with ``log(alpha_t^2 / sigma_t^2) = log_snr``, in closed
        form (elementwise). ``B(t) = log(1 + exp(-log_snr))``; then the linear schedule solves the
        quadratic ``B = beta_min t + (beta_max - beta_min) t^2 / 2`` and the cosine schedule
        ``cos(phi(t)) = cos(phi(0)) exp(-B/2)``, written as an ``arctan2`` of sine and cosine so that
        small ``t`` keeps its relative precision in float32. Times outside ``[0, 1]`` come out
        outside ``[0, 1]`` (their values then mean nothing)."""
        b = jax.nn.softplus(-jnp.asarray(log_snr, dtype=jnp.result_type(float)))
        if self.schedule == "linear":
            slope = self.beta_max - self.beta_min
            return 2.0 * b / (self.beta_min + jnp.sqrt(self.beta_min**2 + 2.0 * slope * b))
        phi0, phi1 = self._cosine_angles()
        sin_phi = jnp.sqrt(math.sin(phi0) ** 2 - math.cos(phi0) ** 2 * jnp.expm1(-b))
        phi = jnp.arctan2(sin_phi, math.cos(phi0) * jnp.exp(-0.5 * b))
        return (phi - phi0) / (phi1 - phi0)

    # --- SDE coefficients -----------------------------------------------------------------------
    def drift(self, x, t):
        """Forward drift ``f(x, t) = -1/2 beta(t) x`` for ``x`` ``(B, ...)``, ``t`` ``(B,)``."""
        return -0.5 * broadcast_time(self.beta(t), x) * x

    def diffusion(self, t):
        """Diffusion coefficient ``g(t) = sqrt(beta(t))``, same shape as ``t``."""
        return jnp.sqrt(self.beta(t))

    # --- prior ----------------------------------------------------------------------------------
    def prior_sample(self, key, shape, dtype=jnp.float32):
        """A draw from the prior ``N(0, I)`` at ``t = 1`` of the given shape."""
        return jax.random.normal(key, shape, dtype)

    def prior_logp(self, z, mask=None):
        """Log-density of ``z`` ``(B, ...)`` under ``N(0, I)``, per sample ``(B,)``, in nats.

        With ``mask`` (broadcastable to ``z``; 1 = real, 0 = padding) only real dimensions count.
        """
        n = count_dimensions(z, mask)
        return -0.5 * masked_sum(z**2, mask) - 0.5 * n * math.log(2.0 * math.pi)
