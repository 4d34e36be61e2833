"""Sample runs: every sampler run of ``config.sampling.runs`` (and of the distilled students) for
every sample group, their keys, and the samples files.

A samples file (``samples.h5``, ``samples_<group>.h5`` or the experiment's name) holds each run's
arrays under ``runs/<name>/`` with its ``options`` and ``info`` as JSON attributes, the first
run's arrays also at the top level (the public layout of the data).
"""

from __future__ import annotations

import json
import os
import time
from typing import Callable

import h5py
import jax
import numpy as np

from fpcd.errors import ConfigError
from fpcd.io import atomic_write
from fpcd.runner.batching import BatchSampler
from fpcd.runner.distillation import sampled_students
from fpcd.runner.experiment import Experiment, RunSamples
from fpcd.runner.processes import is_main_process, say
from fpcd.sampling import sample


def run_key(sampling_key, groups: tuple[str, ...], group_index: int, run_index: int):
    """Key of run ``run_index`` of group ``group_index``: ``fold_in(fold_in(k, group), run)``, or
    ``fold_in(k, run)`` when the experiment has one unnamed group."""
    if groups == ("",):
        return jax.random.fold_in(sampling_key, run_index)
    return jax.random.fold_in(jax.random.fold_in(sampling_key, group_index), run_index)


def student_runs(cfg, runs: dict, students) -> list[tuple[str, dict, str | int, int, dict]]:
    """``(name, run, models, key index, info)`` of every run: ``runs`` with the teacher's models
    (``"teacher"``), then for each student steps ``k`` of ``students`` the teacher's own DDIM in
    ``k`` steps (``ddim_<k>``, unless ``runs`` has it) and the student (``student_<k>``, models
    ``k``, ``info`` naming its teachers). A student draws with the key of the teacher's
    ``ddim_<k>``: the same prior noise, so that the two differ by the distillation alone."""
    entries = [(name, dict(run), "teacher", i, {}) for i, (name, run) in enumerate(runs.items())]
    key_index = {name: i for i, name in enumerate(runs)}
    for steps in students:
        ddim = {"method": "ddim", "steps": int(steps), "t_min": float(cfg.distill.t_min)}
        if f"ddim_{steps}" not in key_index:
            key_index[f"ddim_{steps}"] = len(entries)
            entries.append((f"ddim_{steps}", ddim, "teacher", len(entries), {}))
        entries.append((f"student_{steps}", ddim, steps, key_index[f"ddim_{steps}"],
                        {"student": True, "teacher_steps": 2 * int(steps),
                         "distilled_from_steps": int(cfg.distill.teacher_steps)}))
    return entries


def run_names(cfg) -> list[str]:
    """Names of every run ``--mode=sample`` makes: ``config.sampling.runs`` then, with distillation
    rounds, ``ddim_<k>`` (unless already a run) and ``student_<k>`` for each sampled student."""
    return [entry[0] for entry in student_runs(cfg, dict(cfg.sampling.runs), sampled_students(cfg))]


def generate_all(experiment: Experiment, data, models: dict, mesh, *, sample_fn: Callable = sample,
                 runs: dict | None = None, students: dict | None = None) -> dict:
    """Every sampler run of ``runs`` (default ``config.sampling.runs``) for every sample group, and
    the runs of ``students`` (``steps -> stage name -> model``, see :func:`student_runs`):
    ``group -> run name -> RunSamples``."""
    runs = dict(experiment.cfg.sampling.runs if runs is None else runs)
    entries = student_runs(experiment.cfg, runs, students or {})
    groups = experiment.sample_groups(data)
    sampler = BatchSampler(experiment.sde, mesh, experiment.progress, sample_fn)
    samples = {}
    for g_index, group in enumerate(groups):
        samples[group] = {}
        for name, run, which, key_index, extra in entries:
            start = time.perf_counter()
            arrays, info = experiment.generate(data, models if which == "teacher" else students[which], group,
                                               dict(run), run_key(experiment.key("sampling"), groups, g_index, key_index),
                                               sampler)
            label = f"{group} {name}" if group else name
            say(f"[sample] {label}: NFE {info['nfe']}, {info['seconds']:.2f} s sampling, "
                f"{time.perf_counter() - start:.1f} s with compilation")
            samples[group][name] = RunSamples(arrays, {**info, **extra}, run)
    return samples


def write_samples(path: str, runs: dict, attrs: dict | None = None) -> None:
    """Write ``run name -> RunSamples`` to ``path`` (process 0): arrays under ``runs/<name>/``
    (with ``options`` and ``info`` as JSON attributes), the first run's also at the top level."""
    if not is_main_process():
        return

    def write(tmp):
        with h5py.File(tmp, "w") as f:
            for i, (name, r) in enumerate(runs.items()):
                groups = [f.require_group(f"runs/{name}")] + ([f] if i == 0 else [])
                for g in groups:
                    for key, array in r.arrays.items():
                        array = np.asarray(array)
                        g.create_dataset(key, data=array, compression="gzip" if array.ndim >= 2 else None)
                f[f"runs/{name}"].attrs["options"] = json.dumps(r.run)
                f[f"runs/{name}"].attrs["info"] = json.dumps(r.info)
            f.attrs["run"] = next(iter(runs))
            for key, value in (attrs or {}).items():
                f.attrs[key] = value

    atomic_write(path, write)


def read_samples(path: str) -> dict:
    """Inverse of :func:`write_samples`: ``run name -> RunSamples``."""
    if not os.path.exists(path):
        raise ConfigError(f"{path} does not exist; run with --mode=sample first")
    with h5py.File(path, "r") as f:
        return {name: RunSamples({key: d[()] for key, d in g.items()}, json.loads(g.attrs["info"]),
                                 json.loads(g.attrs["options"]))
                for name, g in f["runs"].items()}
