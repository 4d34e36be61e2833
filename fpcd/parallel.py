"""Data parallelism over every device (of every process) with ``jit`` + ``NamedSharding`` (no ``pmap``).

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
    """Call ``jax.distributed.initialize`` when the environment describes a multi-process job.

    Recognised: ``JAX_COORDINATOR_ADDRESS`` with ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` (what
    ``launch.sh --local --processes N`` sets), SLURM with several tasks, Open MPI, a multi-worker
    TPU slice. CPU collectives use gloo, so a multi-process job also runs on CPUs. Returns True when
    it initialised. Must run before any other JAX computation.
    """
    env = os.environ
    multi_task_slurm = int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in env
    open_mpi = int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
    explicit = "JAX_COORDINATOR_ADDRESS" in env
    tpu_slice = len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1
    if not (multi_task_slurm or open_mpi or explicit or tpu_slice):
        return False
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit and "JAX_NUM_PROCESSES" in env:
        jax.distributed.initialize(env["JAX_COORDINATOR_ADDRESS"], int(env["JAX_NUM_PROCESSES"]),
                                   int(env["JAX_PROCESS_ID"]))
    else:
        jax.distributed.initialize()
    return True


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
    """Copy every array leaf of ``tree`` to every device of ``mesh`` (non-arrays pass through).

    The result never shares buffers with ``tree``. In a multi-process job every process must pass
    the same values; each fills its own devices.
    """
    sharding = replicated_sharding(mesh)
    arrays, static = eqx.partition(tree, eqx.is_array)
    if jax.process_count() == 1:  # fresh buffers, so that donating the result leaves ``tree`` intact
        return eqx.combine(jax.device_put(arrays, sharding, may_alias=False), static)

    def put(leaf):
        host = np.asarray(leaf)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return eqx.combine(jax.tree_util.tree_map(put, arrays), static)


def shard_batch(batch, mesh):
    """Split each array of ``batch`` (a pytree of host arrays: this process's rows of the global
    batch, see :func:`fpcd.runner.process_rows`) along axis 0 over ``mesh``.

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
