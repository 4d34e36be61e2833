"""Denoising score matching: loss, optimiser, train state, the jitted train step and the loop.

The train state is one pytree (:class:`TrainState`): model, EMA model, optimiser state, PRNG
key data and step. The step's randomness is ``fold_in(key, step)``, and batches are chosen by
``(seed, step)`` alone (:func:`batch_indices`), so a resumed run repeats an uninterrupted one
exactly.
"""

from __future__ import annotations

import dataclasses
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

from fpcd.errors import ExpectedError
from fpcd.parallel import DATA_AXIS
from fpcd.loss import (  # noqa: F401  (the loss's public names, also importable from fpcd.train)
    LOSS_OPTIONS, LOSS_WEIGHTINGS, TIME_SAMPLINGS, LossSettings, antithetic_times, draw_rows, dsm_loss, dsm_terms,
    loss_settings, loss_weights, lognormal_times, stratified_uniform, training_times)
from fpcd.sde import VPSDE


class NonFiniteLossError(ExpectedError, FloatingPointError):
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


LEARNING_RATE_SCHEDULES = ("cosine", "constant")


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


def sharded_loss_and_grads(model, sde: VPSDE, batch, key, mesh, *, prediction: str, t_min: float, **options):
    """``(loss, grads)`` of :func:`dsm_loss` over a batch sharded along ``mesh``'s ``"data"`` axis
    (:func:`sharded_terms_and_grads` of :func:`dsm_terms`; ``options`` as :func:`dsm_loss`)."""
    settings = loss_settings(prediction=prediction, t_min=t_min, **options)
    return sharded_terms_and_grads(_dsm_batch_terms(sde, settings), model, batch, key, mesh)


def _dsm_batch_terms(sde: VPSDE, settings: LossSettings):
    def terms(model, batch, key, rows, constants):
        return dsm_terms(model, sde, batch["x"], key, settings, mask=batch.get("mask"), cond=batch.get("cond"),
                         rows=rows)

    return terms


def ema_update(ema_model, model, decay):
    """``decay * ema + (1 - decay) * model`` on inexact-array leaves; other leaves from ``model``."""
    ema_params, _ = eqx.partition(ema_model, eqx.is_inexact_array)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    new = jax.tree_util.tree_map(lambda e, p: decay * e + (1.0 - decay) * p, ema_params, params)
    return eqx.combine(new, static)


def ema_decay_at(step, decay: float, warmup: bool = False):
    """The EMA decay used after optimiser step ``step`` (0-based): ``decay``, or with ``warmup``
    ``min(decay, (1 + step) / (10 + step))`` (the warm-up of TensorFlow's ``ExponentialMovingAverage``
    with ``num_updates``, used by score_sde and Equinox's examples), so that the average forgets the
    random initialisation within the first few hundred steps instead of ``~1 / (1 - decay)`` steps."""
    if not warmup:
        return decay
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def apply_gradients(state: TrainState, grads, optimizer: optax.GradientTransformation, ema_decay: float,
                    ema_warmup: bool = False) -> TrainState:
    """The state after one optimiser step on ``grads``: updated model, its EMA (decay
    :func:`ema_decay_at`), optimiser state, step + 1."""
    params = eqx.filter(state.model, eqx.is_inexact_array)
    updates, opt_state = optimizer.update(grads, state.opt_state, params)
    model = eqx.apply_updates(state.model, updates)
    decay = ema_decay_at(state.step, ema_decay, ema_warmup)
    return TrainState(model=model, ema_model=ema_update(state.ema_model, model, decay), opt_state=opt_state,
                      key_data=state.key_data, step=state.step + 1)


def make_step(terms_fn: Callable, optimizer: optax.GradientTransformation, *, ema_decay: float, mesh=None,
              constants=None, ema_warmup: bool = False) -> "StateDonatingStep":
    """Build the jitted pure step ``(state, batch) -> (state, metrics)`` minimising a sum of loss terms.

    ``terms_fn(model, batch, key, rows, constants) -> (total, count)``: the summed loss terms of the
    batch's rows and their number (``rows`` is None, or ``(offset, global_batch)`` for a shard, see
    :func:`draw_rows`); the loss is ``total / count``. The step key is ``fold_in(state key, step)``.
    With a ``mesh`` of several devices the batch arrives sharded along ``"data"``, each device
    differentiates its own rows and one all-reduce sums the gradients
    (:func:`sharded_terms_and_grads`); the new state is replicated over the mesh. ``constants`` (a
    pytree, e.g. a distillation teacher) are passed to the compiled step as arguments, neither
    donated nor differentiated. The EMA decays by :func:`ema_decay_at` (``ema_warmup``).
    ``metrics`` holds ``loss`` and ``grad_norm``.
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
        new_state = apply_gradients(state, grads, optimizer, ema_decay, ema_warmup)
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
    ema_warmup: bool = False,
    loss: LossSettings | None = None,
    **options,
):
    """Build the jitted pure denoising-score-matching step ``(state, batch) -> (state, metrics)``.

    The loss is :func:`dsm_loss` with ``loss`` (a :class:`LossSettings`, e.g.
    ``TrainSettings.loss``), or else with ``prediction``, ``t_min`` and ``options`` (the other
    fields of :class:`LossSettings`: ``time_sampling``, ``noise_mean``, ``noise_std``,
    ``weighting``, ``min_snr_gamma``); ``ema_warmup`` ramps the EMA decay up from 0.1
    (:func:`ema_decay_at`).

    ``batch`` is a dict with ``"x"`` and optionally ``"mask"`` and ``"cond"``. With a ``mesh`` of
    several devices the batch arrives sharded along ``"data"``, each device differentiates its own
    rows and one all-reduce sums the gradients (:func:`sharded_loss_and_grads`); the new state is
    replicated over the mesh.
    ``metrics`` holds the scalar ``loss`` (mean over the global batch) and ``grad_norm``.
    The input state's buffers are donated (reused for the new state): do not use a state after
    passing it in. The batch is not donated. ``step.lower(state, batch)`` lowers it (e.g. for
    XLA's memory analysis).
    """
    if loss is None:
        loss = loss_settings(prediction=prediction, t_min=t_min, **options)
    elif options:
        raise TypeError(f"make_train_step: pass the loss options {sorted(options)} inside loss=LossSettings(...)")
    return make_step(_dsm_batch_terms(sde, loss), optimizer, ema_decay=ema_decay, mesh=mesh, ema_warmup=ema_warmup)


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """One training section as typed, checked data: the optimiser, the EMA, the loss and the
    checkpoint cadence, from config validation (:func:`fpcd.config.validate_train`) down to the
    loss (:attr:`loss`, :func:`make_train_step`).

    The fields are those of a config training section (:func:`fpcd.config.train_section`, built
    from this class's defaults): ``--config.<section>.<field>=...`` overrides one of them.
    :meth:`from_config` reads a section; :meth:`to_config` writes one.
    """

    num_steps: int
    batch_size: int
    learning_rate: float
    warmup_steps: int = 0
    schedule: str = "cosine"
    grad_clip: float = 1.0  # 0: no clipping
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    ema_warmup: bool = False
    prediction: str = "v"
    # The loss's fields under the section's names, with LossSettings' defaults (prediction "v":
    # the distillation teachers need v-prediction); ``loss`` hands them on.
    t_min: float = LossSettings.t_min
    time_sampling: str = LossSettings.time_sampling
    noise_mean: float = LossSettings.noise_mean
    noise_std: float = LossSettings.noise_std
    loss_weighting: str = LossSettings.weighting
    min_snr_gamma: float = LossSettings.min_snr_gamma
    log_every: int = 100
    checkpoint_every: int = 500
    keep_checkpoints: int = 2

    def __post_init__(self):
        if self.schedule not in LEARNING_RATE_SCHEDULES:
            raise ValueError(f"unknown learning-rate schedule {self.schedule!r}; "
                             f"expected one of {LEARNING_RATE_SCHEDULES}")
        self.loss  # checks the loss's fields

    @classmethod
    def from_config(cls, section) -> "TrainSettings":
        """The settings of a config section (a ``ConfigDict`` or mapping with every field; a
        missing or unknown field is a :class:`KeyError` naming it), with Python types."""
        values = dict(section.items())
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n not in values]
        unknown = sorted(set(values) - set(names))
        if missing or unknown:
            raise KeyError(f"training section: missing field(s) {missing}, unknown field(s) {unknown}")
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        cast = {"int": int, "float": float, "bool": bool, "str": str}
        return cls(**{n: cast[types[n]](values[n]) for n in names})

    def to_config(self):
        """This section as an ``ml_collections.ConfigDict`` (field order as declared)."""
        import ml_collections

        return ml_collections.ConfigDict(dataclasses.asdict(self))

    @property
    def loss(self) -> LossSettings:
        """The loss's settings (:func:`dsm_loss`)."""
        return LossSettings(prediction=self.prediction, t_min=self.t_min, time_sampling=self.time_sampling,
                            noise_mean=self.noise_mean, noise_std=self.noise_std, weighting=self.loss_weighting,
                            min_snr_gamma=self.min_snr_gamma)

    def schedule_fn(self) -> optax.Schedule:
        """The learning rate by step (:func:`learning_rate_schedule`)."""
        return learning_rate_schedule(learning_rate=self.learning_rate, num_steps=self.num_steps,
                                      warmup_steps=self.warmup_steps, schedule=self.schedule)

    def optimizer(self) -> optax.GradientTransformation:
        """The optimiser (:func:`make_optimizer`; ``grad_clip = 0`` disables clipping)."""
        return make_optimizer(learning_rate=self.learning_rate, num_steps=self.num_steps,
                              warmup_steps=self.warmup_steps, schedule=self.schedule,
                              grad_clip=self.grad_clip or None, weight_decay=self.weight_decay)

    def train_step(self, sde: VPSDE, mesh=None, optimizer: optax.GradientTransformation | None = None
                   ) -> "StateDonatingStep":
        """:func:`make_train_step` of these settings, with ``optimizer`` (the one the state was
        initialised with; default :meth:`optimizer`)."""
        return make_train_step(sde, optimizer or self.optimizer(), loss=self.loss, ema_decay=self.ema_decay,
                               ema_warmup=self.ema_warmup, mesh=mesh)


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
