"""Denoising score matching: loss, optimiser, train state, the jitted train step and the loop.

The train state is one pytree (:class:`TrainState`): model, EMA model, optimiser state, PRNG
key data and step. The step's randomness is ``fold_in(key, step)``, and batches are chosen by
``(seed, step)`` alone (:func:`batch_indices`), so a resumed run repeats an uninterrupted one
exactly.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree
from tqdm.auto import tqdm

from fpcd.nets import PREDICTIONS, apply_batched
from fpcd.parallel import DATA_AXIS
from fpcd.sde import VPSDE, broadcast_time, mask_or_ones


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN/inf loss or parameters; the last good checkpoint is kept."""


class TrainState(eqx.Module):
    """Everything a training run carries from step to step.

    Attributes:
      model: the network being trained.
      ema_model: exponential moving average of ``model``'s parameters (same structure).
      opt_state: optax state of the inexact-array leaves of ``model``.
      key_data: raw ``uint32`` data of the run's PRNG key (``jax.random.key_data``).
      step: number of optimiser steps taken, int32 scalar.
    """

    model: eqx.Module
    ema_model: eqx.Module
    opt_state: optax.OptState
    key_data: jax.Array
    step: jax.Array


def copy_arrays(tree):
    """``tree`` with every array leaf copied into a buffer of its own (other leaves shared)."""
    return jax.tree_util.tree_map(lambda leaf: jnp.copy(leaf) if eqx.is_array(leaf) else leaf, tree)


def init_train_state(model, optimizer: optax.GradientTransformation, key) -> TrainState:
    """Fresh state at step 0: the EMA starts at (a copy of) the model, ``key`` seeds every later step.

    The EMA and the key data hold their own buffers so that the train step can donate the whole
    state without deleting ``key``.
    """
    return TrainState(
        model=model,
        ema_model=copy_arrays(model),
        opt_state=optimizer.init(eqx.filter(model, eqx.is_inexact_array)),
        key_data=jnp.copy(jax.random.key_data(key)),
        step=jnp.zeros((), jnp.int32),
    )


def learning_rate_schedule(
    *, learning_rate: float, num_steps: int, warmup_steps: int = 0, schedule: str = "cosine"
) -> optax.Schedule:
    """Linear warm-up to ``learning_rate``, then cosine decay to 1% (``"cosine"``) or a constant rate."""
    if schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, learning_rate, max(warmup_steps, 1), max(num_steps, warmup_steps + 1), end_value=0.01 * learning_rate
        )
    if schedule == "constant":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, learning_rate, max(warmup_steps, 1)), optax.constant_schedule(learning_rate)],
            [max(warmup_steps, 1)],
        )
    raise ValueError(f"unknown learning-rate schedule {schedule!r}; expected 'cosine' or 'constant'")


def make_optimizer(
    *,
    learning_rate: float,
    num_steps: int,
    warmup_steps: int = 0,
    grad_clip: float | None = 1.0,
    weight_decay: float = 0.0,
    schedule: str = "cosine",
) -> optax.GradientTransformation:
    """AdamW on :func:`learning_rate_schedule` after global-norm gradient clipping (``grad_clip=None``
    disables it)."""
    lr = learning_rate_schedule(learning_rate=learning_rate, num_steps=num_steps, warmup_steps=warmup_steps,
                                schedule=schedule)
    parts = [optax.clip_by_global_norm(grad_clip)] if grad_clip else []
    parts.append(optax.adamw(lr, weight_decay=weight_decay))
    return optax.chain(*parts)


def antithetic_times(key, batch_size: int, t_min: float):
    """Stratified diffusion times ``t_min + (1 - t_min) frac(u + i / B)`` for ``i < B``: ``(B,)``."""
    u = jax.random.uniform(key, ())
    return t_min + (1.0 - t_min) * jnp.mod(u + jnp.arange(batch_size) / batch_size, 1.0)


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


def dsm_terms(model, sde: VPSDE, x, key, *, mask=None, cond=None, prediction: str = "eps", t_min: float = 1e-5,
              rows=None):
    """``(sum of squared errors over real entries, number of real entries)`` of :func:`dsm_loss`.

    With ``rows = (offset, global_batch)``, ``x`` holds rows ``offset : offset + len(x)`` of a batch
    of ``global_batch`` rows, and the diffusion times and noise are those rows of the global
    batch's draws (:func:`draw_rows`): the terms of every shard sum to the terms of the whole batch.
    """
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; expected one of {PREDICTIONS}")
    k_t, k_eps = jax.random.split(key)
    m = mask_or_ones(mask, x)
    t = draw_rows(lambda k, shape: antithetic_times(k, shape[0], t_min), k_t, (x.shape[0],), rows)
    eps = draw_rows(lambda k, shape: jax.random.normal(k, shape, x.dtype), k_eps, x.shape, rows) * m
    alpha, sigma = sde.marginal(broadcast_time(t, x))
    x = x * m
    x_t = alpha * x + sigma * eps
    output = apply_batched(model, x_t, t, mask=mask, cond=cond)
    target = eps if prediction == "eps" else alpha * eps - sigma * x
    return jnp.sum(m * (output - target) ** 2), jnp.sum(m)


def dsm_loss(model, sde: VPSDE, x, key, *, mask=None, cond=None, prediction: str = "eps", t_min: float = 1e-5):
    """Denoising score-matching loss of a noise- or v-prediction network, averaged over real entries.

    ``x_t = alpha_t x + sigma_t eps`` with ``t`` stratified in ``[t_min, 1]``; the target is ``eps``
    (``prediction="eps"``) or ``v = alpha_t eps - sigma_t x`` (``"v"``). Padded entries
    (``mask == 0``) are zero in ``x_t`` and excluded from the mean.

    Args:
      x: clean data ``(B, ...)``; mask: ``(B, N)`` or broadcastable; cond: ``(B, C)`` or None.
    """
    total, count = dsm_terms(model, sde, x, key, mask=mask, cond=cond, prediction=prediction, t_min=t_min)
    return total / jnp.maximum(count, 1.0)


def sharded_terms_and_grads(terms_fn: Callable, model, batch, key, mesh, constants=None):
    """``(loss, grads)`` of ``sum(total) / sum(count)`` over a batch sharded along ``mesh``'s ``"data"`` axis.

    ``terms_fn(model, batch, key, rows, constants) -> (total, count)`` gives the summed loss terms
    and their number for the rows of the batch it is handed (``rows = (offset, global_batch)``,
    see :func:`draw_rows`). Each device differentiates the terms of its own rows, then one
    all-reduce sums every gradient, flattened into one vector, with the loss terms. XLA's own
    partitioning of the loss all-reduces each parameter's gradient separately, which costs a
    round trip per parameter array: ~20x slower per step over gloo between processes on CPU.
    ``constants`` (e.g. a distillation teacher) are replicated and not differentiated.
    """
    dynamic, static = eqx.partition(model, eqx.is_array)
    const_dynamic, const_static = eqx.partition(constants, eqx.is_array)
    key_data = jax.random.key_data(key)
    spec = jax.sharding.PartitionSpec(DATA_AXIS)

    def per_device(dynamic, batch, key_data, const_dynamic):
        size = batch["x"].shape[0]
        rows = (jax.lax.axis_index(DATA_AXIS) * size, size * jax.lax.psum(1, DATA_AXIS))
        consts = eqx.combine(const_dynamic, const_static)

        def terms(model):
            return terms_fn(model, batch, jax.random.wrap_key_data(key_data), rows, consts)

        (total, count), grads = eqx.filter_value_and_grad(terms, has_aux=True)(eqx.combine(dynamic, static))
        flat, unravel = ravel_pytree(grads)
        summed = jax.lax.psum(jnp.concatenate([flat, jnp.stack([total, count])]), DATA_AXIS)
        count = jnp.maximum(summed[-1], 1.0)
        return summed[-2] / count, unravel(summed[:-2] / count)

    replicated = jax.sharding.PartitionSpec()
    return jax.shard_map(per_device, mesh=mesh,
                         in_specs=(replicated, jax.tree_util.tree_map(lambda _: spec, batch), replicated, replicated),
                         out_specs=replicated, check_vma=False)(dynamic, batch, key_data, const_dynamic)


def sharded_loss_and_grads(model, sde: VPSDE, batch, key, mesh, *, prediction: str, t_min: float):
    """``(loss, grads)`` of :func:`dsm_loss` over a batch sharded along ``mesh``'s ``"data"`` axis
    (:func:`sharded_terms_and_grads` of :func:`dsm_terms`)."""
    return sharded_terms_and_grads(_dsm_batch_terms(sde, prediction, t_min), model, batch, key, mesh)


def _dsm_batch_terms(sde: VPSDE, prediction: str, t_min: float):
    def terms(model, batch, key, rows, constants):
        return dsm_terms(model, sde, batch["x"], key, mask=batch.get("mask"), cond=batch.get("cond"),
                         prediction=prediction, t_min=t_min, rows=rows)

    return terms


def ema_update(ema_model, model, decay: float):
    """``decay * ema + (1 - decay) * model`` on inexact-array leaves; other leaves from ``model``."""
    ema_params, _ = eqx.partition(ema_model, eqx.is_inexact_array)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    new = jax.tree_util.tree_map(lambda e, p: decay * e + (1.0 - decay) * p, ema_params, params)
    return eqx.combine(new, static)


def apply_gradients(state: TrainState, grads, optimizer: optax.GradientTransformation, ema_decay: float) -> TrainState:
    """The state after one optimiser step on ``grads``: updated model, its EMA, optimiser state, step + 1."""
    params = eqx.filter(state.model, eqx.is_inexact_array)
    updates, opt_state = optimizer.update(grads, state.opt_state, params)
    model = eqx.apply_updates(state.model, updates)
    return TrainState(model=model, ema_model=ema_update(state.ema_model, model, ema_decay), opt_state=opt_state,
                      key_data=state.key_data, step=state.step + 1)


def make_step(terms_fn: Callable, optimizer: optax.GradientTransformation, *, ema_decay: float, mesh=None,
              constants=None) -> "StateDonatingStep":
    """Build the jitted pure step ``(state, batch) -> (state, metrics)`` minimising a sum of loss terms.

    ``terms_fn(model, batch, key, rows, constants) -> (total, count)``: the summed loss terms of the
    batch's rows and their number (``rows`` is None, or ``(offset, global_batch)`` for a shard, see
    :func:`draw_rows`); the loss is ``total / count``. The step key is ``fold_in(state key, step)``.
    With a ``mesh`` of several devices the batch arrives sharded along ``"data"``, each device
    differentiates its own rows and one all-reduce sums the gradients
    (:func:`sharded_terms_and_grads`); the new state is replicated over the mesh. ``constants`` (a
    pytree, e.g. a distillation teacher) are passed to the compiled step as arguments, neither
    donated nor differentiated. ``metrics`` holds ``loss`` and ``grad_norm``.
    """
    replicated = None if mesh is None else jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def step(inputs, state: TrainState):
        batch, consts = inputs
        key = jax.random.fold_in(jax.random.wrap_key_data(state.key_data), state.step)
        if mesh is None or mesh.devices.size == 1:
            def loss_fn(model):
                total, count = terms_fn(model, batch, key, None, consts)
                return total / jnp.maximum(count, 1.0)

            loss, grads = eqx.filter_value_and_grad(loss_fn)(state.model)
        else:
            loss, grads = sharded_terms_and_grads(terms_fn, state.model, batch, key, mesh, consts)
        new_state = apply_gradients(state, grads, optimizer, ema_decay)
        if replicated is not None:
            new_state = eqx.filter_shard(new_state, replicated)
        return new_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    return StateDonatingStep(eqx.filter_jit(step, donate="all-except-first"), constants)


def make_train_step(
    sde: VPSDE,
    optimizer: optax.GradientTransformation,
    *,
    prediction: str = "eps",
    ema_decay: float = 0.999,
    t_min: float = 1e-5,
    mesh=None,
):
    """Build the jitted pure denoising-score-matching step ``(state, batch) -> (state, metrics)``.

    ``batch`` is a dict with ``"x"`` and optionally ``"mask"`` and ``"cond"``. With a ``mesh`` of
    several devices the batch arrives sharded along ``"data"``, each device differentiates its own
    rows and one all-reduce sums the gradients (:func:`sharded_loss_and_grads`); the new state is
    replicated over the mesh.
    ``metrics`` holds the scalar ``loss`` (mean over the global batch) and ``grad_norm``.
    The input state's buffers are donated (reused for the new state): do not use a state after
    passing it in. The batch is not donated. ``step.lower(state, batch)`` lowers it (e.g. for
    XLA's memory analysis).
    """
    return make_step(_dsm_batch_terms(sde, prediction, t_min), optimizer, ema_decay=ema_decay, mesh=mesh)


class StateDonatingStep:
    """``(state, batch) -> (state, metrics)`` around a jitted ``((batch, constants), state)`` function
    that donates every argument but the first (Equinox's ``donate="all-except-first"``): the state
    is donated, the batch and the constants kept."""

    def __init__(self, jitted, constants=None):
        self._jitted = jitted
        self._constants = constants

    def __call__(self, state, batch):
        return self._jitted((batch, self._constants), state)

    def lower(self, state, batch):
        return self._jitted.lower((batch, self._constants), state)


def batch_indices(seed: int, step: int, num_examples: int, batch_size: int) -> np.ndarray:
    """Indices of the batch at ``step``: epochs are seeded permutations, so the data order depends
    only on ``(seed, step)``. The last incomplete chunk of each epoch is skipped."""
    if batch_size > num_examples:
        raise ValueError(f"batch size {batch_size} exceeds the number of training examples {num_examples}")
    per_epoch = num_examples // batch_size
    epoch, position = divmod(int(step), per_epoch)
    order = np.random.default_rng([int(seed), epoch]).permutation(num_examples)
    return order[position * batch_size : (position + 1) * batch_size]


def tree_is_finite(tree) -> bool:
    """True when every inexact array leaf of ``tree`` is finite."""
    leaves = jax.tree_util.tree_leaves(eqx.filter(tree, eqx.is_inexact_array))
    return all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in leaves)


def fit(
    state: TrainState,
    *,
    step_fn: Callable,
    batch_fn: Callable[[int], dict],
    num_steps: int,
    checkpointer=None,
    log_every: int = 100,
    description: str = "train",
    progress: bool = True,
    on_step: Callable[[int, TrainState], None] | None = None,
    learning_rate_fn: Callable[[int], float] | None = None,
    on_log: Callable[[dict], None] | None = None,
):
    """Run ``step_fn`` from ``state.step`` to ``num_steps`` with checkpoints and a progress bar.

    Args:
      state: starting (fresh or restored) :class:`TrainState`.
      step_fn: jitted ``(state, batch) -> (state, metrics)`` (it may donate ``state``).
      batch_fn: ``step -> batch`` (already placed on devices).
      checkpointer: a :class:`fpcd.checkpoint.Checkpointer` or None; saves every
        ``checkpointer.save_every`` steps and at the end, after checking losses and parameters.
      on_step: optional host callback ``(step_done, state)`` after each step (tests use it).
      learning_rate_fn: ``step -> learning rate`` (the optimiser's schedule), for the log rows.
      on_log: optional callback receiving each log row as it is made.

    Returns:
      ``(state, history)`` with ``history`` a list of ``{"step", "loss", "grad_norm",
      "learning_rate", "steps_per_second"}`` rows at every ``log_every`` steps (and the last);
      ``steps_per_second`` is measured since the previous row (the first includes compilation).

    Raises:
      NonFiniteLossError: a loss or parameter became NaN/inf; the last checkpoint is untouched.
    """
    start = int(state.step)
    history, pending = [], []
    bar = tqdm(total=num_steps, initial=start, desc=description, disable=not progress or jax.process_index() != 0,
               dynamic_ncols=True, mininterval=1.0)
    clock = {"time": time.perf_counter(), "step": start}

    def check(upto_step):
        values = jax.device_get(pending)
        for s, metrics in values:
            if not math.isfinite(float(metrics["loss"])):
                last = None if checkpointer is None else checkpointer.latest_step()
                raise NonFiniteLossError(
                    f"{description}: non-finite loss {float(metrics['loss'])} at step {s}; training stopped. "
                    f"Last good checkpoint: {'none' if last is None else f'step {last}'}"
                )
        pending.clear()
        return values

    def log_row(s, last):
        now = time.perf_counter()
        rate = (s - clock["step"]) / max(now - clock["time"], 1e-9)
        clock.update(time=now, step=s)
        return {"step": s, "loss": float(last["loss"]), "grad_norm": float(last["grad_norm"]),
                "learning_rate": None if learning_rate_fn is None else float(learning_rate_fn(s - 1)),
                "steps_per_second": rate}

    try:
        for step in range(start, num_steps):
            state, metrics = step_fn(state, batch_fn(step))
            pending.append((step + 1, metrics))
            done = step + 1
            save_now = checkpointer is not None and (done % checkpointer.save_every == 0 or done == num_steps)
            if done % log_every == 0 or save_now or done == num_steps:
                values = check(done)
                row = log_row(*values[-1])
                history.append(row)
                if on_log is not None:
                    on_log(row)
                bar.set_postfix(loss=f"{row['loss']:.4f}")
            if save_now:
                if not tree_is_finite(state):
                    last = checkpointer.latest_step()
                    raise NonFiniteLossError(
                        f"{description}: non-finite parameters after step {done}; training stopped. "
                        f"Last good checkpoint: {'none' if last is None else f'step {last}'}"
                    )
                checkpointer.save(done, state)
            bar.update(1)
            if on_step is not None:
                on_step(done, state)
    finally:
        bar.close()
        if checkpointer is not None:
            checkpointer.wait()
    return state, history
