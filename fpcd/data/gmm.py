"""Diagonal Gaussian mixtures: a data source whose VP-SDE marginals, score and density are exact.

Under the VP SDE, ``x_0 ~ sum_k w_k N(mu_k, diag(s_k^2))`` has the marginal

    p_t(x) = sum_k w_k N(x; alpha_t mu_k, diag(alpha_t^2 s_k^2 + sigma_t^2)),

so the score ``grad_x log p_t`` and ``log p_t`` are known in closed form. Tests use them as the
ground truth for samplers and likelihoods, and the toy experiment trains on samples from one.

Points are the last axis: ``x`` may be ``(B, D)`` or ``(B, N, D)`` (a cloud of i.i.d. points).
"""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp

from fpcd.sde import VPSDE, broadcast_time, expand_mask, masked_sum


class GaussianMixture(eqx.Module):
    """``sum_k weights[k] N(means[k], diag(scales[k]^2))`` with ``weights (K,)``, ``means, scales (K, D)``."""

    weights: jax.Array
    means: jax.Array
    scales: jax.Array

    def __check_init__(self):
        k, d = self.means.shape
        if self.weights.shape != (k,) or self.scales.shape != (k, d):
            raise ValueError(
                f"GaussianMixture: weights {self.weights.shape}, means {self.means.shape}, scales "
                f"{self.scales.shape} do not describe K components in D dimensions"
            )

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(self, key, num_samples: int):
        """``(num_samples, D)`` i.i.d. draws from the mixture at ``t = 0``."""
        k_comp, k_noise = jax.random.split(key)
        comp = jax.random.choice(k_comp, self.weights.shape[0], (num_samples,), p=self.weights / self.weights.sum())
        noise = jax.random.normal(k_noise, (num_samples, self.dim))
        return self.means[comp] + self.scales[comp] * noise

    def _marginal_components(self, t, sde: VPSDE | None, x):
        """Component means and variances of ``p_t`` broadcast against ``x (..., D)``: ``(..., K, D)``."""
        if sde is None:
            return self.means, self.scales**2
        alpha, sigma = sde.marginal(broadcast_time(t, x[..., 0]))
        alpha = jnp.asarray(alpha)[..., None, None]
        sigma = jnp.asarray(sigma)[..., None, None]
        return alpha * self.means, alpha**2 * self.scales**2 + sigma**2

    def _component_logpdf(self, x, t, sde):
        mean, var = self._marginal_components(t, sde, x)
        diff = x[..., None, :] - mean
        return -0.5 * jnp.sum(diff**2 / var + jnp.log(2.0 * math.pi * var), axis=-1)

    def log_prob(self, x, t=0.0, sde: VPSDE | None = None):
        """Per-point log-density of ``p_t`` at ``x (B, ..., D)`` -> ``(B, ...)``; ``t (B,)`` or scalar.

        With ``sde=None`` this is the data density ``p_0``.
        """
        log_w = jnp.log(self.weights / self.weights.sum())
        return jax.nn.logsumexp(self._component_logpdf(x, t, sde) + log_w, axis=-1)

    def score(self, x, t, sde: VPSDE):
        """Exact score ``grad_x log p_t(x)`` for ``x (B, ..., D)``, ``t (B,)`` -> ``(B, ..., D)``."""
        mean, var = self._marginal_components(t, sde, x)
        log_w = jnp.log(self.weights / self.weights.sum())
        resp = jax.nn.softmax(self._component_logpdf(x, t, sde) + log_w, axis=-1)
        return jnp.sum(resp[..., None] * (mean - x[..., None, :]) / var, axis=-2)


class ExactScore(eqx.Module):
    """``score_fn(x, t)`` of a :class:`GaussianMixture` diffused by ``sde``; padded points score 0.

    ``mask`` is ``(B, N)`` for clouds ``x (B, N, D)`` (or broadcastable to ``x``).
    """

    mixture: GaussianMixture
    sde: VPSDE
    mask: jax.Array | None = None

    def __call__(self, x, t):
        t = jnp.broadcast_to(jnp.asarray(t, x.dtype), (x.shape[0],))
        score = self.mixture.score(x, t, self.sde)
        if self.mask is not None:
            score = score * expand_mask(self.mask, score)
        return score

    def log_prob(self, x, t=0.0):
        """Log-density per sample ``(B,)`` of ``x`` under ``p_t``: a vector ``(B, D)``, or a cloud
        ``(B, N, D)`` of i.i.d. points of which only those with ``self.mask == 1`` count."""
        t = jnp.broadcast_to(jnp.asarray(t, x.dtype), (x.shape[0],))
        per_point = self.mixture.log_prob(x, t, self.sde)
        if per_point.ndim == 1:
            return per_point
        return masked_sum(per_point, self.mask)


def toy_mixture(dim: int = 2) -> GaussianMixture:
    """The default toy: four unequal, anisotropic components in ``dim`` dimensions (data variance ~1)."""
    if dim < 1:
        raise ValueError(f"toy_mixture: dim must be >= 1, got {dim}")
    base_means = jnp.array([[-1.2, -0.8], [1.1, -0.9], [0.0, 1.3], [1.4, 1.0]])
    base_scales = jnp.array([[0.35, 0.2], [0.2, 0.4], [0.5, 0.15], [0.15, 0.15]])
    reps = -(-dim // 2)
    means = jnp.tile(base_means, (1, reps))[:, :dim]
    scales = jnp.tile(base_scales, (1, reps))[:, :dim]
    return GaussianMixture(weights=jnp.array([0.35, 0.25, 0.25, 0.15]), means=means, scales=scales)
