"""Batched evaluation on every device: any batched function over many items, timed.

:func:`run_batched` runs ``fn(rows, key)`` over ``num_items`` in batches of one compiled shape:
batch ``i`` holds the rows :func:`batch_rows` (the last batch wraps around; its extra rows are
dropped) and draws with ``fold_in(key, i)``; a warm-up call on batch 0 with
``fold_in(key, 10**6)`` compiles it before the clock starts. :class:`BatchSampler` draws a stage's
samples with it; the anomaly experiment computes its likelihoods with it.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from fpcd.parallel import batch_sharding
from fpcd.runner.processes import place_rows, to_host
from fpcd.sampling import sample
from fpcd.sde import VPSDE

WARMUP_KEY_INDEX = 10**6  # the warm-up batch draws with fold_in(key, WARMUP_KEY_INDEX), no batch's key


def batch_rows(index: int, batch_size: int, num_items: int) -> np.ndarray:
    """Rows of batch ``index``: ``index * batch_size + arange(batch_size)`` modulo ``num_items``
    (the last batch wraps around; its extra rows are dropped)."""
    return np.arange(index * batch_size, (index + 1) * batch_size) % num_items


def batch_placement(mesh, batch_size: int):
    """The sharding of a ``batch_size``-row batch over every device of ``mesh`` (of every process),
    or None (the default device) when ``mesh`` is None, has one device, or ``batch_size`` does not
    divide by its size."""
    devices = 1 if mesh is None else mesh.devices.size
    return batch_sharding(mesh) if devices > 1 and batch_size % devices == 0 else None


@dataclasses.dataclass(frozen=True)
class Batched:
    """What :func:`run_batched` returns.

    Attributes:
      outputs: ``fn``'s outputs of every batch on the host, concatenated along axis 0 and trimmed
        to ``num_items`` rows (same pytree structure as one batch's output).
      extras: ``fn``'s per-batch extras (e.g. NFE) on the host, one per batch, in order.
      seconds: wall time of all batches, compilation (the warm-up) excluded.
    """

    outputs: Any
    extras: list
    seconds: float


def run_batched(fn: Callable, key, *, num_items: int, batch_size: int, inputs: dict | None = None,
                sharding=None, warmup: Callable | None = None, progress: bool = True,
                description: str = "") -> Batched:
    """``fn`` over ``num_items`` items in batches of ``batch_size``.

    Args:
      fn: ``(rows, key) -> (output, extra)``: ``rows`` is ``name -> the batch's rows`` of each
        array of ``inputs`` on the devices; ``output`` a pytree of arrays with the batch along
        axis 0 (gathered to every process); ``extra`` a pytree of per-batch values (e.g. NFE).
      key: batch ``i`` is given ``fold_in(key, i)``.
      inputs: host arrays ``(num_items, ...)`` identical on every process, by name (or None).
      sharding: the batches' sharding (:func:`batch_placement`; each process places only its own
        rows), or None for the default device.
      warmup: called once like ``fn`` on batch 0 with ``fold_in(key, 10**6)`` before the clock
        starts, to compile; it must compile the same program as ``fn`` (e.g. looser tolerances,
        which are values, not part of the program). Default: ``fn``.
      progress, description: a tqdm progress bar and its label.

    Returns:
      :class:`Batched`: host outputs ``(num_items, ...)``, the extras of every batch and the seconds.
    """
    inputs = inputs or {}
    num_batches = -(-num_items // batch_size)

    def rows_of(index):
        rows = batch_rows(index, batch_size, num_items)
        return {name: (jnp.asarray(array[rows]) if sharding is None else place_rows(array[rows], sharding))
                for name, array in inputs.items()}

    jax.block_until_ready((warmup or fn)(rows_of(0), jax.random.fold_in(key, WARMUP_KEY_INDEX)))
    outputs, extras = [], []
    start = time.perf_counter()
    for index in tqdm(range(num_batches), desc=description, disable=not progress, dynamic_ncols=True, leave=False):
        output, extra = fn(rows_of(index), jax.random.fold_in(key, index))
        outputs.append(jax.tree.map(to_host, jax.block_until_ready(output)))
        extras.append(jax.tree.map(to_host, extra))
    seconds = time.perf_counter() - start
    outputs = jax.tree.map(lambda *parts: np.concatenate(parts)[:num_items], *outputs)
    return Batched(outputs, extras, seconds)


def warmup_options(method: str, options: dict) -> dict:
    """Options compiling the same sampler as ``options`` but running almost no steps."""
    if method == "ode":
        return {**options, "rtol": 0.5, "atol": 0.5}
    return {**options, "steps": 1}


@dataclasses.dataclass(frozen=True)
class BatchSampler:
    """Draws the samples of one stage in batches with one sampler run, timed (compilation excluded).

    Attributes:
      sde: the VP SDE.
      mesh: the device mesh; a batch whose size divides by its size is sampled data-parallel over
        every device (of every process) and gathered to every process.
      progress: show a progress bar.
      sample_fn: :func:`fpcd.sampling.sample` or a function with its signature (e.g. a baseline);
        only :func:`~fpcd.sampling.sample` is given a sharding.
    """

    sde: VPSDE
    mesh: Any = None
    progress: bool = True
    sample_fn: Callable = sample

    def __call__(self, make_score_fn: Callable, key, *, num_samples: int, batch_size: int, sample_shape: tuple,
                 run: dict, description: str, conditions=None, mask=None):
        """Sample ``num_samples`` in batches of ``batch_size`` (:func:`run_batched`).

        Args:
          make_score_fn: ``(cond, mask) -> score_fn`` for one batch (``cond``, ``mask``: the batch's
            rows of ``conditions`` and ``mask`` on the devices, or None).
          key: batch ``i`` draws with ``fold_in(key, i)``.
          sample_shape: shape of one sample, e.g. ``(D,)`` or ``(N, D)``.
          run: ``{"method": ..., **options}``.
          conditions: host array ``(num_samples, C)`` or None.
          mask: host array ``(num_samples, N)`` (1 = real) or None.

        Returns:
          ``(samples (num_samples, ...), nfe, seconds)``: ``nfe`` is the largest per-batch NFE and
          ``seconds`` the sampling wall time of all batches.
        """
        options = dict(run)
        method = options.pop("method")
        shape = (batch_size,) + tuple(sample_shape)
        sharding = batch_placement(self.mesh, batch_size) if self.sample_fn is sample else None
        inputs = {name: array for name, array in (("cond", conditions), ("mask", mask)) if array is not None}

        def draw(opts):
            extra = {} if sharding is None else {"sharding": sharding}

            def fn(rows, k):
                cond_b, mask_b = rows.get("cond"), rows.get("mask")
                return self.sample_fn(make_score_fn(cond_b, mask_b), self.sde, k, shape, method=method, mask=mask_b,
                                      **extra, **opts)

            return fn

        result = run_batched(draw(options), key, num_items=num_samples, batch_size=batch_size, inputs=inputs,
                             sharding=sharding, warmup=draw(warmup_options(method, options)),
                             progress=self.progress, description=description)
        return result.outputs, max(int(nfe) for nfe in result.extras), result.seconds
