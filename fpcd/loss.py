"""The denoising score-matching loss: diffusion-time sampling, loss weighting and the loss itself.

:class:`LossSettings` holds every lever of the loss (parametrisation, ``t_min``, time sampling,
weighting); :class:`fpcd.train.TrainSettings` carries it from a config section to the train step.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from fpcd.nets import PREDICTIONS, apply_batched
from fpcd.sde import VPSDE, broadcast_time, mask_or_ones

TIME_SAMPLINGS = ("uniform", "lognormal")
LOSS_WEIGHTINGS = ("none", "min_snr", "likelihood")


def stratified_uniform(key, batch_size: int):
    """Stratified uniforms ``frac(u + i / B)`` for ``i < B`` with one ``u ~ U[0, 1)``: ``(B,)``."""
    u = jax.random.uniform(key, ())
    return jnp.mod(u + jnp.arange(batch_size) / batch_size, 1.0)


def antithetic_times(key, batch_size: int, t_min: float):
    """Stratified diffusion times ``t_min + (1 - t_min) frac(u + i / B)`` for ``i < B``: ``(B,)``."""
    return t_min + (1.0 - t_min) * stratified_uniform(key, batch_size)


def lognormal_times(key, batch_size: int, sde: VPSDE, t_min: float, *, mean: float = -1.2, std: float = 1.2):
    """Diffusion times whose noise level ``sigma_t / alpha_t`` is log-normal (EDM, Karras et al. 2022:
    ``log sigma ~ N(mean, std^2)``, stratified like :func:`antithetic_times`), mapped to ``t`` through
    the exact inverse of the schedule (``log SNR = -2 log sigma``) and clipped to ``[t_min, 1]``: ``(B,)``.

    EDM's defaults (-1.2, 1.2) put the median at ``sigma = 0.30`` (log SNR 2.4): most draws fall
    where the data's details are decided, far fewer in the almost-pure-noise part of ``[0, 1]``
    that uniform times favour (half of uniform VP times have log SNR below -2.4)."""
    u = jnp.clip(stratified_uniform(key, batch_size), 1e-6, 1.0 - 1e-6)
    log_sigma = mean + std * jax.scipy.special.ndtri(u)
    return jnp.clip(sde.time_of_log_snr(-2.0 * log_sigma), t_min, 1.0)


def loss_weights(sde: VPSDE, t, *, prediction: str, weighting: str = "none", min_snr_gamma: float = 5.0):
    """Per-row weights ``(B,)`` of the squared error of a ``prediction`` network at times ``t``.

    * ``"none"``: 1 (the plain eps- or v-loss).
    * ``"min_snr"``: Min-SNR-gamma (Hang et al. 2023): ``min(SNR, gamma)`` on the x0 error, i.e.
      ``min(SNR, gamma) / SNR`` on the eps error and ``min(SNR, gamma) / (SNR + 1)`` on the v error.
    * ``"likelihood"``: score_sde's likelihood weighting ``lambda(t) = g(t)^2`` on the score error
      (the weighting whose loss bounds the KL divergence, Song et al. 2021 "Maximum likelihood
      training"): ``g^2 / sigma^2`` on the eps error, ``g^2 alpha^2 / sigma^2`` on the v error
      (``v_hat - v = (eps_hat - eps) / alpha``). Without importance sampling of the times (as
      score_sde) the weight spans ~10 at ``t = 1`` to ~1e5 at ``t = 1e-5``.
    """
    if weighting not in LOSS_WEIGHTINGS:
        raise ValueError(f"unknown loss weighting {weighting!r}; expected one of {LOSS_WEIGHTINGS}")
    if weighting == "none":
        return jnp.ones_like(t)
    alpha, sigma = sde.marginal(t)
    if weighting == "min_snr":
        snr = (alpha / sigma) ** 2
        clipped = jnp.minimum(snr, min_snr_gamma)
        return clipped / snr if prediction == "eps" else clipped / (snr + 1.0)
    weight = sde.diffusion(t) ** 2 / sigma**2
    return weight if prediction == "eps" else weight * alpha**2


def training_times(key, batch_size: int, sde: VPSDE, t_min: float, *, time_sampling: str = "uniform",
                   noise_mean: float = -1.2, noise_std: float = 1.2):
    """The diffusion times of a training batch: :func:`antithetic_times` (``"uniform"``) or
    :func:`lognormal_times` (``"lognormal"``)."""
    if time_sampling == "uniform":
        return antithetic_times(key, batch_size, t_min)
    if time_sampling == "lognormal":
        return lognormal_times(key, batch_size, sde, t_min, mean=noise_mean, std=noise_std)
    raise ValueError(f"unknown time sampling {time_sampling!r}; expected one of {TIME_SAMPLINGS}")


def draw_rows(draw: Callable, key, shape: tuple, rows=None):
    """``draw(key, shape)`` for a batch, or this shard's rows of the global batch's draw.

    With ``rows = (offset, global_batch)`` the draw is made for ``(global_batch, *shape[1:])`` and
    rows ``offset : offset + shape[0]`` are returned, so the draws of every shard of a sharded
    batch are those of the whole batch (the result does not depend on the number of devices).
    """
    if rows is None:
        return draw(key, tuple(shape))
    offset, global_batch = rows
    return jax.lax.dynamic_slice_in_dim(draw(key, (global_batch,) + tuple(shape[1:])), offset, shape[0])


@dataclasses.dataclass(frozen=True)
class LossSettings:
    """The levers of :func:`dsm_loss`, checked on construction (:class:`ValueError` naming the field).

    Attributes:
      prediction: ``"eps"`` (noise) or ``"v"`` (``v = alpha eps - sigma x``) parametrisation.
      t_min: the smallest diffusion time trained on, in ``(0, 1)``.
      time_sampling: ``"uniform"`` (stratified times, :func:`antithetic_times`) or ``"lognormal"``
        (EDM's log-normal noise levels, :func:`lognormal_times`).
      noise_mean, noise_std: ``log sigma ~ N(noise_mean, noise_std^2)`` of ``"lognormal"``.
      weighting: ``"none"``, ``"min_snr"`` or ``"likelihood"`` (:func:`loss_weights`).
      min_snr_gamma: the clip of ``"min_snr"``.
    """

    prediction: str = "eps"
    t_min: float = 1e-5
    time_sampling: str = "uniform"
    noise_mean: float = -1.2
    noise_std: float = 1.2
    weighting: str = "none"
    min_snr_gamma: float = 5.0

    def __post_init__(self):
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {self.prediction!r}; expected one of {PREDICTIONS}")
        if self.time_sampling not in TIME_SAMPLINGS:
            raise ValueError(f"unknown time sampling {self.time_sampling!r}; expected one of {TIME_SAMPLINGS}")
        if self.weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"unknown loss weighting {self.weighting!r}; expected one of {LOSS_WEIGHTINGS}")
        if not 0.0 < float(self.t_min) < 1.0:
            raise ValueError(f"t_min must lie in (0, 1), got {self.t_min!r}")
        if not float(self.noise_std) > 0.0:
            raise ValueError(f"noise_std must be positive, got {self.noise_std!r}")
        if not float(self.min_snr_gamma) > 0.0:
            raise ValueError(f"min_snr_gamma must be positive, got {self.min_snr_gamma!r}")


LOSS_OPTIONS = tuple(f.name for f in dataclasses.fields(LossSettings))


def dsm_terms(model, sde: VPSDE, x, key, settings: LossSettings = LossSettings(), *, mask=None, cond=None,
              rows=None):
    """``(sum of weighted squared errors over real entries, number of real entries)`` of :func:`dsm_loss`.

    With ``rows = (offset, global_batch)``, ``x`` holds rows ``offset : offset + len(x)`` of a batch
    of ``global_batch`` rows, and the diffusion times and noise are those rows of the global
    batch's draws (:func:`draw_rows`): the terms of every shard sum to the terms of the whole batch.
    """
    s = settings
    k_t, k_eps = jax.random.split(key)
    m = mask_or_ones(mask, x)
    t = draw_rows(lambda k, shape: training_times(k, shape[0], sde, s.t_min, time_sampling=s.time_sampling,
                                                  noise_mean=s.noise_mean, noise_std=s.noise_std),
                  k_t, (x.shape[0],), rows)
    eps = draw_rows(lambda k, shape: jax.random.normal(k, shape, x.dtype), k_eps, x.shape, rows) * m
    alpha, sigma = sde.marginal(broadcast_time(t, x))
    x = x * m
    x_t = alpha * x + sigma * eps
    output = apply_batched(model, x_t, t, mask=mask, cond=cond)
    target = eps if s.prediction == "eps" else alpha * eps - sigma * x
    squared = m * (output - target) ** 2
    if s.weighting != "none":  # (the unweighted loss keeps its exact arithmetic)
        squared = squared * broadcast_time(loss_weights(sde, t, prediction=s.prediction, weighting=s.weighting,
                                                        min_snr_gamma=s.min_snr_gamma), x)
    return jnp.sum(squared), jnp.sum(m)


def dsm_loss(model, sde: VPSDE, x, key, *, mask=None, cond=None, prediction: str = "eps", t_min: float = 1e-5,
             **options):
    """Denoising score-matching loss of a noise- or v-prediction network, averaged over real entries.

    ``x_t = alpha_t x + sigma_t eps`` with ``t`` stratified in ``[t_min, 1]`` (or log-normal noise
    levels, ``time_sampling="lognormal"``, :func:`training_times`); the target is ``eps``
    (``prediction="eps"``) or ``v = alpha_t eps - sigma_t x`` (``"v"``), each row's squared error
    weighted by :func:`loss_weights` (``weighting``, default none). Padded entries (``mask == 0``)
    are zero in ``x_t`` and excluded from the mean.

    Args:
      x: clean data ``(B, ...)``; mask: ``(B, N)`` or broadcastable; cond: ``(B, C)`` or None.
      options: ``time_sampling``, ``noise_mean``, ``noise_std``, ``weighting``, ``min_snr_gamma``
        (the fields of :class:`LossSettings`).
    """
    settings = loss_settings(prediction=prediction, t_min=t_min, **options)
    total, count = dsm_terms(model, sde, x, key, settings, mask=mask, cond=cond)
    return total / jnp.maximum(count, 1.0)


def loss_settings(**options) -> LossSettings:
    """:class:`LossSettings` of keyword ``options``; :class:`TypeError` naming unknown ones."""
    unknown = sorted(set(options) - set(LOSS_OPTIONS))
    if unknown:
        raise TypeError(f"unknown loss option(s) {unknown}; expected some of {LOSS_OPTIONS}")
    return LossSettings(**options)
