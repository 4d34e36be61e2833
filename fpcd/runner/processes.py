"""The processes of a job: who prints and writes, which rows each feeds, how results come back.

Every process of a multi-process job (``jax.distributed``) runs the same code on the same host
data. Each feeds only its own rows of a batch sharded over the mesh (:func:`process_rows`,
:func:`place_rows`); results spanning several processes are gathered back to every process
(:func:`to_host`); only process 0 writes files and prints (:func:`is_main_process`, :func:`say`).
"""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np
from jax.experimental import multihost_utils

from fpcd.parallel import batch_sharding


def is_main_process() -> bool:
    """True on process 0, the only one that writes files and prints."""
    return jax.process_index() == 0


def say(message: str) -> None:
    """Print ``message`` on process 0 only."""
    if is_main_process():
        print(message, flush=True)


def process_rows(mesh, batch_size: int) -> slice:
    """The rows of a ``(batch_size, ...)`` batch sharded over ``mesh`` that this process feeds.

    Raises ValueError when this process's devices do not hold one contiguous block of rows (a
    mesh whose device order interleaves processes).
    """
    indices = batch_sharding(mesh).addressable_devices_indices_map((batch_size,))
    starts = [index[0].start or 0 for index in indices.values()]
    stops = [batch_size if index[0].stop is None else index[0].stop for index in indices.values()]
    rows = slice(min(starts), max(stops))
    expected = batch_size * len(indices) // mesh.devices.size
    if rows.stop - rows.start != expected:
        raise ValueError(f"process {jax.process_index()}'s devices hold rows {sorted(zip(starts, stops))} of a batch "
                         f"of {batch_size}, not one contiguous block of {expected}: order the mesh's devices by "
                         "process")
    return rows


def main_process_first(make: Callable):
    """``make()`` on process 0, then (after a barrier) on the other processes: for work that fills a
    cache on disk, so that process 0 alone writes it and the others read it."""
    if jax.process_count() == 1:
        return make()
    result = make() if is_main_process() else None
    multihost_utils.sync_global_devices("fpcd.runner.main_process_first")
    return result if is_main_process() else make()


def to_host(x) -> np.ndarray:
    """A global array as a numpy array on every process (gathered when it spans several)."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(x)
    if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def place_rows(array, sharding):
    """A host array ``(B, ...)`` identical on every process as a global array with ``sharding``;
    each process copies only its own rows."""
    array = np.asarray(array)
    if jax.process_count() == 1:
        return jax.device_put(array, sharding)
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])
