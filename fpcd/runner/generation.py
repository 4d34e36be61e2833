"""``--mode=generate``: events from a trained workdir alone, written in the data's own file layout.

Every mode that reads the training data (train, distill, sample, eval, all) saves what the
experiment needs to generate without it, ``generation_state.json`` (the experiment's
:meth:`~fpcd.runner.Experiment.generation_state`: standardisations, geometry, padded lengths,
the training range of the conditions). ``--mode=generate`` then

1. rebuilds the models from that state (:meth:`~fpcd.runner.Experiment.generation_data`,
   :meth:`~fpcd.runner.Experiment.generation_stages`) and restores the EMA models, or a distilled
   student's (``generate.sampler=student_<k>``);
2. draws every event's conditions once (:meth:`~fpcd.runner.Experiment.generation_conditions`,
   seeded by ``generate.seed``);
3. generates chunk after chunk of ``generate.chunk_size`` events, chunk ``c`` with the key
   ``fold_in(fold_in(key("sampling"), GENERATE_KEY_INDEX + seed), c)``, each written atomically to
   ``<output>.parts/chunk_<c>.h5`` (process 0), with a progress line and events/s;
4. joins the chunks into ``generate.output`` (atomically) and removes the parts.

A killed generation reruns from its first missing chunk: every chunk depends only on its index,
so the file equals an uninterrupted generation's bit for bit; a full disk leaves the chunks
written so far intact. The parts directory records the settings it was made with
(``manifest.json``); a rerun with other settings is refused unless ``generate.overwrite``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import warnings

import equinox as eqx
import h5py
import jax
import numpy as np

from fpcd.config import student_steps, validate_generate
from fpcd.data.common import save_hdf5
from fpcd.errors import ConfigError
from fpcd.io import atomic_write, write_json
from fpcd.runner.batching import BatchSampler
from fpcd.runner.distillation import restore_students
from fpcd.runner.experiment import Experiment
from fpcd.runner.processes import is_main_process, say
from fpcd.runner.training import restore_models

GENERATION_STATE_FILE = "generation_state.json"
DEFAULT_OUTPUT = "generated.h5"
GENERATE_KEY_INDEX = 2**20  # generate draws from fold_in(key("sampling"), GENERATE_KEY_INDEX + seed): no run's key
MANIFEST_FILE = "manifest.json"
KEEP = "keep"  # generate_chunk may return this (N,) bool: the events to write (False: non-finite output)


def save_generation_state(experiment: Experiment, data, workdir: str) -> None:
    """Write the experiment's generation state of ``data`` to ``<workdir>/generation_state.json``
    (process 0); nothing for an experiment without a generate mode."""
    state = experiment.generation_state(data)
    if state is not None and is_main_process():
        write_json(os.path.join(workdir, GENERATION_STATE_FILE), {"experiment": experiment.cfg.experiment,
                                                                   "state": state})


def read_generation_state(workdir: str) -> dict:
    path = os.path.join(workdir, GENERATION_STATE_FILE)
    if not os.path.exists(path):
        raise ConfigError(f"workdir {workdir} has no {GENERATION_STATE_FILE} (what generate needs besides the models); "
                          "it is written whenever a mode reads the training data: run --mode=sample (or train) once")
    with open(path) as f:
        return json.load(f)["state"]


def warn_beyond_training(what: str, asked, trained, unit: str = "") -> None:
    """Warn, naming both ranges, when the ``asked`` (min, max) of a condition reaches beyond its
    ``trained`` range (relative tolerance 1e-6): the model extrapolates there."""
    (lo, hi), (t_lo, t_hi) = (tuple(float(v) for v in asked), tuple(float(v) for v in trained))
    if lo < t_lo * (1 - 1e-6) or hi > t_hi * (1 + 1e-6):
        unit = f" {unit}" if unit else ""
        warnings.warn(f"generate: {what} {lo:.4g}-{hi:.4g}{unit} reaches outside the training range "
                      f"{t_lo:.4g}-{t_hi:.4g}{unit}; the model extrapolates there", stacklevel=3)


def resolve_sampler(cfg) -> tuple[str, dict, str | int]:
    """``(name, run, models)`` of ``generate.sampler``: a run of ``sampling.runs`` with the
    teacher's models (``"teacher"``), or ``student_<k>`` (the ``k``-step student's DDIM, models ``k``)."""
    runs = dict(cfg.sampling.runs)
    name = cfg.generate.sampler or next(iter(runs))
    if name in runs:
        return name, dict(runs[name]), "teacher"
    match = re.fullmatch(r"student_(\d+)", name)
    students = student_steps(cfg)
    if match and int(match.group(1)) in students:
        k = int(match.group(1))
        return name, {"method": "ddim", "steps": k, "t_min": float(cfg.distill.t_min)}, k
    offered = list(runs) + [f"student_{k}" for k in students]
    if match:
        raise ConfigError(f"config.generate.sampler={name!r}: no such student; the distillation of this config makes "
                          f"{[f'student_{k}' for k in students] or 'none (distill.rounds is 0)'}")
    raise ConfigError(f"config.generate.sampler={name!r} is not a run of this config; choose one of {offered}")


def _digest(value) -> str:
    """sha256 of a JSON-able value, or of the array leaves of a pytree of models."""
    h = hashlib.sha256()
    if isinstance(value, dict) and all(isinstance(v, eqx.Module) for v in value.values()):
        for name in sorted(value):
            for leaf in jax.tree_util.tree_leaves(eqx.filter(value[name], eqx.is_array)):
                h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
    else:
        h.update(json.dumps(value, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _manifest(cfg, name: str, run: dict, *, state: dict, models: dict, devices: int) -> dict:
    """Everything a chunk depends on: the generate settings, the sampling and data sections, the
    number of devices, and digests of the generation state and of the models' parameters (a model
    trained further since, or another state, is another generation)."""
    g = {k: v for k, v in cfg.generate.to_dict().items() if k not in ("output", "overwrite")}
    return {"experiment": cfg.experiment, **g, "sampler": name, "run": run, "sampling": cfg.sampling.to_dict(),
            "data": cfg.data.to_dict(), "devices": devices, "state": _digest(state), "models": _digest(models)}


def _chunk_path(parts: str, chunk: int) -> str:
    return os.path.join(parts, f"chunk_{chunk:06d}.h5")


def _prepare_output(output: str, parts: str, manifest: dict, overwrite: bool) -> None:
    """Refuse an existing output (unless ``overwrite``) or parts of other settings, then (process 0,
    after every process has checked) clear what ``overwrite`` replaces and start the parts."""
    remove_output = remove_parts = False
    if os.path.exists(output):
        if not overwrite:
            raise ConfigError(f"config.generate.output: {output} exists; set --config.generate.overwrite=True to "
                              "replace it, or choose another file")
        remove_output = True
    manifest_path = os.path.join(parts, MANIFEST_FILE)
    if os.path.exists(manifest_path):
        with open(manifest_path) as f:
            saved = json.load(f)
        wanted = json.loads(json.dumps(manifest))  # as it reads back (tuples are lists)
        if saved != wanted:
            if not overwrite:
                changed = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
                raise ConfigError(f"{parts} holds a part-finished generation with other settings ({', '.join(changed)}); "
                                  "rerun with its settings to finish it, or set --config.generate.overwrite=True")
            remove_parts = True
    elif os.path.isdir(parts):  # chunks without their manifest: of unknown settings
        remove_parts = True
    _barrier("checked")
    if is_main_process():
        if remove_output:
            os.remove(output)
        if remove_parts:
            shutil.rmtree(parts)
        os.makedirs(parts, exist_ok=True)
        if not os.path.exists(manifest_path):
            write_json(manifest_path, manifest)


def _join_parts(output: str, parts: str, num_chunks: int, attrs: dict) -> int:
    """Copy the chunks, in order, into ``output`` (written atomically, one chunk in memory at a
    time), then remove the parts (renamed first, so that a kill while removing them leaves no
    manifest-less chunks behind); process 0. Returns the number of events written."""
    if not is_main_process():
        return 0
    with h5py.File(_chunk_path(parts, 0), "r") as f:
        layout = {name: (f[name].shape[1:], f[name].dtype) for name in f}
    lengths = []
    for chunk in range(num_chunks):
        with h5py.File(_chunk_path(parts, chunk), "r") as f:
            lengths.append(len(f[next(iter(layout))]))
    total = int(sum(lengths))

    def write(tmp):
        with h5py.File(tmp, "w") as out:
            for name, (shape, dtype) in layout.items():
                out.create_dataset(name, shape=(total,) + shape, dtype=dtype,
                                   compression="gzip" if len(shape) >= 1 else None)
            start = 0
            for chunk, length in enumerate(lengths):
                with h5py.File(_chunk_path(parts, chunk), "r") as f:
                    for name in layout:
                        out[name][start:start + length] = f[name][()]
                start += length
            for key, value in {**attrs, "num_events": total}.items():
                out.attrs[key] = value

    atomic_write(output, write)
    removed = parts + ".removed"
    os.replace(parts, removed)
    shutil.rmtree(removed)
    return total


def _missing_chunks(parts: str, num_chunks: int) -> list[int]:
    """The chunks not yet written, as process 0 sees them (broadcast to every process)."""
    missing = np.array([not os.path.exists(_chunk_path(parts, c)) for c in range(num_chunks)], np.int32)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        missing = np.asarray(multihost_utils.broadcast_one_to_all(missing))
    return [int(c) for c in np.flatnonzero(missing)]


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"fpcd.runner.generation.{name}")


def generate(experiment: Experiment, workdir: str, mesh) -> str:
    """``--mode=generate`` (module docstring) of a validated ``experiment`` in a workdir holding
    its trained run; returns the output path."""
    cfg = experiment.cfg
    validate_generate(cfg)
    experiment.validate_generate()
    g = cfg.generate
    state = read_generation_state(workdir)
    data = experiment.generation_data(state)
    stages = experiment.generation_stages(data)
    name, run, which = resolve_sampler(cfg)
    models = (restore_models(experiment, stages, mesh, workdir) if which == "teacher"
              else restore_students(experiment, stages, mesh, workdir, (which,))[which])
    output = os.path.abspath(g.output or os.path.join(workdir, DEFAULT_OUTPUT))
    if not os.path.isdir(os.path.dirname(output)):
        raise ConfigError(f"config.generate.output={g.output!r}: the directory {os.path.dirname(output)} does not exist")
    parts = output + ".parts"
    n = int(g.num_events)
    size = min(int(g.chunk_size), n)
    # Every request is checked (the conditions drawn) before the output or its parts are touched.
    conditions = experiment.generation_conditions(data, n, np.random.default_rng([int(g.seed), 0]))
    _prepare_output(output, parts, _manifest(cfg, name, run, state=state, models=models, devices=mesh.devices.size),
                    bool(g.overwrite))
    _barrier("prepared")
    base_key = jax.random.fold_in(experiment.key("sampling"), GENERATE_KEY_INDEX + int(g.seed))
    num_chunks = -(-n // size)
    missing = _missing_chunks(parts, num_chunks)
    sampler = BatchSampler(experiment.sde, mesh, False)
    done, start = (num_chunks - len(missing)) * size, time.perf_counter()
    if done:
        say(f"[generate] resuming: {min(done, n)}/{n} events already in {parts}")
    generated = 0
    for chunk in missing:
        # Every chunk is generated at full size (the last one's rows wrap around and are dropped):
        # one compiled shape for all of them.
        rows = np.arange(chunk * size, (chunk + 1) * size) % n
        count = min(n, (chunk + 1) * size) - chunk * size
        arrays = experiment.generate_chunk(data, models, run, jax.random.fold_in(base_key, chunk), sampler, size,
                                           {k: np.asarray(v)[rows] for k, v in conditions.items()})
        keep = np.arange(size) < count
        if KEEP in arrays:  # events whose model output was not finite are left out
            keep &= np.asarray(arrays.pop(KEEP), bool)
        if is_main_process():
            save_hdf5(_chunk_path(parts, chunk), {k: np.asarray(v)[keep] for k, v in arrays.items()})
        generated += count
        done = min(n, done + count)
        say(f"[generate] {done}/{n} events ({generated / (time.perf_counter() - start):.1f} events/s, {name})")
    _barrier("written")
    total = _join_parts(output, parts, num_chunks, {"experiment": cfg.experiment, "sampler": name,
                                                     "options": json.dumps(run), "requested_events": n,
                                                     "workdir": os.path.abspath(workdir)})
    if is_main_process() and total < n:
        warnings.warn(f"generate: {n - total} of {n} events had non-finite model output and were left out", stacklevel=2)
    say(f"[generate] {total} events in {output}")
    return output
