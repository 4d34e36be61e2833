"""Progressive distillation (Salimans & Ho 2022) for the VP SDE: the library core.

A round distils a teacher that samples with deterministic DDIM in ``2 k`` steps into a student
that samples with DDIM in ``k`` steps on the same endpoints. The student's grid is the DDIM grid
of :func:`fpcd.sampling.sample` (``t_i = 1 - i (1 - t_min) / k``, :func:`student_grid`); the
teacher's grid of ``2 k`` steps holds the student's times and, between them, the midpoints.

For a student step ``t -> t_next`` (midpoint ``t_mid``) the target (Algorithm 2 of the paper) is
the x-prediction ``x~`` that makes ONE DDIM step from ``z_t`` land where TWO teacher DDIM steps
``z_t -> z_mid -> z_next`` land::

    x~ = (z_next - (sigma_next / sigma_t) z_t) / (alpha_next - (sigma_next / sigma_t) alpha_t).

The student is trained on ``w(t) |x~ - x0_student|^2`` with the truncated-SNR weight
``w = max(alpha_t^2 / sigma_t^2, 1)``, averaged over real entries. Arrays: ``x``/``z`` are
``(B, ...)`` (clouds ``(B, N, D)`` with a ``(B, N)`` mask, 1 = real, 0 = padding) and times ``(B,)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from fpcd.nets import PREDICTIONS, apply_batched, score_fn_from
from fpcd.sde import VPSDE, broadcast_time, mask_or_ones
from fpcd.train import StateDonatingStep, TrainState, copy_arrays, draw_rows, init_train_state, make_step


def student_grid(steps: int, t_min: float = 1e-3):
    """The student's DDIM grid ``linspace(1, t_min, steps + 1)``: ``(steps + 1,)``.

    Computed as ``1 - i (1 - t_min) / steps``, as the ``ddim`` sampler of :func:`fpcd.sampling.sample`
    does, so a student is trained on the times it samples at (to float32 rounding). The
    round's teacher runs ``2 * steps`` on the same endpoints: its odd times are the midpoints.
    """
    h = (1.0 - t_min) / steps
    return 1.0 - jnp.arange(steps + 1, dtype=jnp.result_type(float)) * h


def grid_times(i, steps: int, t_min: float):
    """``(t, t_mid, t_next)`` of student step ``i`` (integer array, any shape) on :func:`student_grid`."""
    h = (1.0 - t_min) / steps
    i = jnp.asarray(i, jnp.result_type(float))
    return 1.0 - i * h, 1.0 - (i + 0.5) * h, 1.0 - (i + 1.0) * h


def prediction_to_x0(prediction: str, output, z, alpha, sigma):
    """Data prediction ``x0`` from a network output at ``z = alpha x0 + sigma eps`` (``alpha``/``sigma``
    broadcast to ``z``): ``alpha z - sigma v`` for ``"v"``, ``(z - sigma eps) / alpha`` for ``"eps"``."""
    if prediction == "v":
        return alpha * z - sigma * output
    if prediction == "eps":
        return (z - sigma * output) / alpha
    raise ValueError(f"unknown prediction {prediction!r}; expected one of {PREDICTIONS}")


def _teacher_ddim_step(teacher_score_fn, sde: VPSDE, z, t, t_next, m):
    """Deterministic DDIM step ``z_t -> z_next`` with per-example times ``t``, ``t_next`` ``(B,)``:
    ``x0 = (z + sigma_t^2 score) / alpha_t``, ``z' = alpha_next x0 + sigma_next eps``."""
    alpha, sigma = sde.marginal(broadcast_time(t, z))
    alpha_next, sigma_next = sde.marginal(broadcast_time(t_next, z))
    score = teacher_score_fn(z, t)
    eps = -sigma * score
    x0 = (z - sigma * eps) / alpha
    return (alpha_next * x0 + sigma_next * eps) * m


def distillation_target(teacher_score_fn, sde: VPSDE, z_t, t, t_mid, t_next, *, mask=None):
    """Salimans & Ho's target ``x~`` for the student step ``t -> t_next`` (Algorithm 2, VP SDE).

    Two deterministic teacher DDIM steps ``z_t -> z_mid -> z_next``, then the x-prediction that
    makes one DDIM step from ``t`` land on ``z_next``::

        x~ = (z_next - (sigma_next / sigma_t) z_t) / (alpha_next - (sigma_next / sigma_t) alpha_t).

    Args:
      teacher_score_fn: ``(z (B, ...), t (B,)) -> score (B, ...)`` (e.g. :func:`fpcd.nets.score_fn_from`).
      z_t: noisy data ``(B, ...)``; t, t_mid, t_next: ``(B,)`` with ``t > t_mid > t_next``.
      mask: ``(B, N)`` for clouds or broadcastable to ``z_t``; padded entries of ``x~`` are 0.

    Returns:
      ``x~`` ``(B, ...)``, zero where ``mask`` is 0. Not wrapped in ``stop_gradient``
      (:func:`distillation_terms` does that).
    """
    m = mask_or_ones(mask, z_t)
    z_t = z_t * m
    z_mid = _teacher_ddim_step(teacher_score_fn, sde, z_t, t, t_mid, m)
    z_next = _teacher_ddim_step(teacher_score_fn, sde, z_mid, t_mid, t_next, m)
    alpha, sigma = sde.marginal(broadcast_time(t, z_t))
    alpha_next, sigma_next = sde.marginal(broadcast_time(t_next, z_t))
    ratio = sigma_next / sigma
    return (z_next - ratio * z_t) / (alpha_next - ratio * alpha) * m


def truncated_snr_weight(sde: VPSDE, t):
    """Salimans & Ho's "truncated SNR" loss weight ``max(alpha_t^2 / sigma_t^2, 1)``, shape of ``t``."""
    return jnp.maximum(jnp.exp(sde.log_snr(t)), 1.0)


def distillation_terms(student_model, teacher_score_fn, sde: VPSDE, x, key, *, steps: int, t_min: float,
                       mask=None, cond=None, prediction: str = "v", rows=None):
    """``(weighted sum of squared x-errors over real entries, number of real entries)`` of
    :func:`distillation_loss`. With ``rows = (offset, global_batch)`` the student steps and noise
    are those rows of the global batch's draws (:func:`fpcd.train.draw_rows`), so that the terms
    of the shards of a batch sum to the terms of the whole batch."""
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; expected one of {PREDICTIONS}")
    k_i, k_eps = jax.random.split(key)
    m = mask_or_ones(mask, x)
    i = draw_rows(lambda k, shape: jax.random.randint(k, shape, 0, steps), k_i, (x.shape[0],), rows)
    t, t_mid, t_next = grid_times(i, steps, t_min)
    t, t_mid, t_next = (s.astype(x.dtype) for s in (t, t_mid, t_next))
    alpha, sigma = sde.marginal(broadcast_time(t, x))
    eps = draw_rows(lambda k, shape: jax.random.normal(k, shape, x.dtype), k_eps, x.shape, rows) * m
    z_t = alpha * (x * m) + sigma * eps
    target = jax.lax.stop_gradient(distillation_target(teacher_score_fn, sde, z_t, t, t_mid, t_next, mask=mask))
    output = apply_batched(student_model, z_t, t, mask=mask, cond=cond)
    x0 = prediction_to_x0(prediction, output, z_t, alpha, sigma) * m
    w = broadcast_time(truncated_snr_weight(sde, t), x)
    return jnp.sum(w * m * (target - x0) ** 2), jnp.sum(m)


def distillation_loss(student_model, teacher_score_fn, sde: VPSDE, x, key, *, steps: int, t_min: float = 1e-3,
                      mask=None, cond=None, prediction: str = "v"):
    """Progressive-distillation loss of a ``steps``-step student (Salimans & Ho 2022, Algorithm 2).

    Each example draws a student step ``i`` uniformly in ``0 .. steps - 1`` (times ``t_i -> t_{i+1}``
    of :func:`student_grid`, teacher midpoint between them) and noise ``eps``; ``z_t = alpha x +
    sigma eps``; the target is :func:`distillation_target` (gradient stopped: the teacher is not
    differentiated); the student's x-prediction comes from its raw output
    (:func:`prediction_to_x0`). The loss is ``sum w(t) (x~ - x0)^2`` over real entries divided by
    their number, with ``w = max(SNR(t), 1)`` (:func:`truncated_snr_weight`).

    Args:
      student_model: per-example network (as for :func:`fpcd.nets.apply_batched`).
      teacher_score_fn: ``(z (B, ...), t (B,)) -> score``, built with this batch's mask and cond.
      x: clean data ``(B, ...)``; key: a ``jax.random.key``.
      steps: the student's number of DDIM steps (the teacher's is ``2 * steps``).
      mask: ``(B, N)`` or broadcastable to ``x``; cond: ``(B, C)`` or None.
      prediction: the student's parametrisation, ``"v"`` or ``"eps"``.

    Returns:
      The scalar loss.
    """
    total, count = distillation_terms(student_model, teacher_score_fn, sde, x, key, steps=steps, t_min=t_min,
                                      mask=mask, cond=cond, prediction=prediction)
    return total / jnp.maximum(count, 1.0)


def init_student_state(teacher, optimizer: optax.GradientTransformation, key) -> TrainState:
    """A fresh :class:`~fpcd.train.TrainState` whose model (and EMA) start as copies of ``teacher``.

    The copies own their buffers, so :func:`make_distill_step` can donate the state while the
    teacher stays alive (``init_train_state(teacher, ...)`` would share, and so donate, its buffers).
    """
    return init_train_state(copy_arrays(teacher), optimizer, key)


def make_distill_step(
    sde: VPSDE,
    optimizer: optax.GradientTransformation,
    teacher,
    *,
    steps: int,
    t_min: float = 1e-3,
    teacher_prediction: str = "v",
    prediction: str = "v",
    ema_decay: float = 0.999,
    mesh=None,
) -> StateDonatingStep:
    """Build the jitted distillation step ``(state, batch) -> (state, metrics)`` of a ``steps``-step student.

    Mirrors :func:`fpcd.train.make_train_step` (it is :func:`fpcd.train.make_step` of
    :func:`distillation_terms`): the state is a :class:`~fpcd.train.TrainState` of the student
    (donated), the step key is ``fold_in(key, step)``, the EMA is updated after the optimiser, and
    with a ``mesh`` of several devices the batch arrives sharded along ``"data"`` and one
    all-reduce sums the per-device gradients; the result does not depend on the number of devices.
    ``teacher`` is the teacher network (``teacher_prediction`` parametrisation; replicate it over
    ``mesh``); its score function is built per batch with the batch's ``"mask"`` and ``"cond"``.
    The teacher is passed to the compiled step as an argument (not baked in as a constant) and
    not donated; start the state with :func:`init_student_state` so that it shares no buffer with
    the teacher. ``metrics`` holds ``loss`` and ``grad_norm``.
    """

    def terms(model, batch, key, rows, teacher_model):
        teacher_score_fn = score_fn_from(teacher_model, sde, prediction=teacher_prediction,
                                         mask=batch.get("mask"), cond=batch.get("cond"))
        return distillation_terms(model, teacher_score_fn, sde, batch["x"], key, steps=steps, t_min=t_min,
                                  mask=batch.get("mask"), cond=batch.get("cond"), prediction=prediction, rows=rows)

    return make_step(terms, optimizer, ema_decay=ema_decay, mesh=mesh, constants=teacher)
