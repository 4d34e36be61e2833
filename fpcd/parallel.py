"""Data parallelism over every local device with ``jit`` + ``NamedSharding`` (no ``pmap``).

Parameters and optimiser state are replicated (``P()``), batches are split along the leading
axis over the mesh axis ``"data"`` (``P("data")``). The jitted train step needs no hand-written
``pmean``: XLA inserts the all-reduce of the gradient of a mean loss.
"""

from __future__ import annotations

import os

import equinox as eqx
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

DATA_AXIS = "data"


def maybe_initialize_distributed() -> bool:
    """Call ``jax.distributed.initialize()`` when the environment describes a multi-process job
    (SLURM with several tasks, Open MPI, a multi-worker TPU slice, or ``JAX_COORDINATOR_ADDRESS``).

    Returns True when it initialised. Must run before any other JAX call.
    """
    env = os.environ
    multi_task_slurm = int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in env
    open_mpi = int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
    explicit = "JAX_COORDINATOR_ADDRESS" in env
    tpu_slice = len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1
    if multi_task_slurm or open_mpi or explicit or tpu_slice:
        jax.distributed.initialize()
        return True
    return False


def data_mesh(devices=None) -> jax.sharding.Mesh:
    """A 1-D mesh named ``"data"`` over ``devices`` (default: every device of every process)."""
    devices = jax.devices() if devices is None else list(devices)
    return jax.make_mesh(
        (len(devices),), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,), devices=devices
    )


def replicated_sharding(mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicate(tree, mesh):
    """Place every array leaf of ``tree`` on every device of ``mesh`` (non-arrays pass through)."""
    sharding = replicated_sharding(mesh)
    arrays, static = eqx.partition(tree, eqx.is_array)
    return eqx.combine(jax.device_put(arrays, sharding), static)


def shard_batch(batch, mesh):
    """Split each array of ``batch`` (a pytree of host arrays, this process's share) along axis 0.

    Raises ValueError when the global batch size does not divide by the number of devices.
    """
    sharding = batch_sharding(mesh)
    num_devices = mesh.devices.size

    def put(leaf):
        leaf = np.asarray(leaf)
        global_size = leaf.shape[0] * jax.process_count()
        if global_size % num_devices:
            raise ValueError(
                f"batch size {global_size} does not divide by the number of devices {num_devices}; "
                "choose config.train.batch_size as a multiple of the device count"
            )
        if jax.process_count() == 1:
            return jax.device_put(leaf, sharding)
        return jax.make_array_from_process_local_data(sharding, leaf)

    return jax.tree_util.tree_map(put, batch)
