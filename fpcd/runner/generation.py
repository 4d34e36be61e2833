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

import json
import os
import re
import shutil
import time

import h5py
import jax
import numpy as np

from fpcd.config import student_steps, validate_generate
from fpcd.data.common import save_hdf5
from fpcd.errors import ConfigError
from fpcd.io import write_json
from fpcd.runner.batching import BatchSampler
from fpcd.runner.distillation import restore_students
from fpcd.runner.experiment import Experiment
from fpcd.runner.processes import is_main_process, say
from fpcd.runner.training import restore_models

GENERATION_STATE_FILE = "generation_state.json"
DEFAULT_OUTPUT = "generated.h5"
GENERATE_KEY_INDEX = 2**20  # generate draws from fold_in(key("sampling"), GENERATE_KEY_INDEX + seed): no run's key
MANIFEST_FILE = "manifest.json"


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


def _manifest(cfg, name: str, run: dict) -> dict:
    g = cfg.generate.to_dict()
    return {"experiment": cfg.experiment, "sampler": name, "run": run,
            **{k: v for k, v in g.items() if k not in ("output", "overwrite")}}


def _chunk_path(parts: str, chunk: int) -> str:
    return os.path.join(parts, f"chunk_{chunk:06d}.h5")


def _prepare_output(output: str, parts: str, manifest: dict, overwrite: bool) -> None:
    """Refuse an existing output (unless ``overwrite``) or parts of other settings; start the parts."""
    if os.path.exists(output):
        if not overwrite:
            raise ConfigError(f"config.generate.output: {output} exists; set --config.generate.overwrite=True to "
                              "replace it, or choose another file")
        if is_main_process():
            os.remove(output)
    manifest_path = os.path.join(parts, MANIFEST_FILE)
    if os.path.exists(manifest_path):
        with open(manifest_path) as f:
            saved = json.load(f)
        if saved != json.loads(json.dumps(manifest)):
            if not overwrite:
                changed = sorted(k for k in set(saved) | set(manifest) if saved.get(k) != manifest.get(k))
                raise ConfigError(f"{parts} holds a part-finished generation with other settings ({', '.join(changed)}); "
                                  "rerun with its settings to finish it, or set --config.generate.overwrite=True")
            if is_main_process():
                shutil.rmtree(parts)
    if is_main_process():
        os.makedirs(parts, exist_ok=True)
        write_json(manifest_path, manifest)


def _join_parts(output: str, parts: str, num_chunks: int, attrs: dict) -> None:
    """Concatenate the chunks into ``output`` (atomically), then remove the parts (process 0)."""
    if not is_main_process():
        return
    arrays: dict[str, list] = {}
    for chunk in range(num_chunks):
        with h5py.File(_chunk_path(parts, chunk), "r") as f:
            for name in f:
                arrays.setdefault(name, []).append(f[name][()])
    datasets = {name: np.concatenate(values) for name, values in arrays.items()}
    save_hdf5(output, datasets, attrs, compressed=[n for n, a in datasets.items() if a.ndim >= 2])
    shutil.rmtree(parts)


def generate(experiment: Experiment, workdir: str, mesh) -> str:
    """``--mode=generate`` (module docstring) of a validated ``experiment`` in a workdir holding
    its trained run; returns the output path."""
    cfg = experiment.cfg
    validate_generate(cfg)
    experiment.validate_generate()
    g = cfg.generate
    data = experiment.generation_data(read_generation_state(workdir))
    stages = experiment.generation_stages(data)
    name, run, which = resolve_sampler(cfg)
    models = (restore_models(experiment, stages, mesh, workdir) if which == "teacher"
              else restore_students(experiment, stages, mesh, workdir, (which,))[which])
    output = os.path.abspath(g.output or os.path.join(workdir, DEFAULT_OUTPUT))
    if not os.path.isdir(os.path.dirname(output)):
        raise ConfigError(f"config.generate.output={g.output!r}: the directory {os.path.dirname(output)} does not exist")
    parts = output + ".parts"
    _prepare_output(output, parts, _manifest(cfg, name, run), bool(g.overwrite))
    n, size = int(g.num_events), int(g.chunk_size)
    conditions = experiment.generation_conditions(data, n, np.random.default_rng([int(g.seed), 0]))
    base_key = jax.random.fold_in(experiment.key("sampling"), GENERATE_KEY_INDEX + int(g.seed))
    num_chunks = -(-n // size)
    missing = [c for c in range(num_chunks) if not os.path.exists(_chunk_path(parts, c))]
    if jax.process_count() > 1:  # every process has listed the chunks before any is written
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("fpcd.runner.generation.missing")
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
        if is_main_process():
            save_hdf5(_chunk_path(parts, chunk), {k: np.asarray(v)[:count] for k, v in arrays.items()})
        generated += count
        done = min(n, done + count)
        say(f"[generate] {done}/{n} events ({generated / (time.perf_counter() - start):.1f} events/s, {name})")
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("fpcd.runner.generation.written")
    _join_parts(output, parts, num_chunks, {"experiment": cfg.experiment, "sampler": name, "options": json.dumps(run),
                                            "num_events": n, "workdir": os.path.abspath(workdir)})
    say(f"[generate] {n} events in {output}")
    return output
