"""The whole job: :func:`train_and_evaluate` runs one mode of an experiment in a workdir."""

from __future__ import annotations

import os

from fpcd.config import student_steps
from fpcd.errors import ConfigError
from fpcd.io import write_json
from fpcd.runner.distillation import distill, require_trained, restore_students, sampled_students
from fpcd.runner.errors import explain_nonfinite
from fpcd.runner.experiment import Experiment
from fpcd.runner.generation import generate, save_generation_state
from fpcd.runner.processes import is_main_process, say
from fpcd.runner.runs import generate_all, read_samples, write_samples
from fpcd.runner.training import TRAIN_INFO_FILE, check_batch_sizes, restore_models, train
from fpcd.runner.workdir import check_checkpoints, check_workdir, lock_workdir, prepare_workdir, read_json

METRICS_FILE = "metrics.json"
MODES = ("train", "distill", "sample", "eval", "all", "generate")


def train_and_evaluate(experiment: Experiment, workdir: str, mode: str, mesh) -> dict | None:
    """Run ``mode`` (``train``, ``distill``, ``sample``, ``eval``, ``all`` or ``generate``) of
    ``experiment`` in ``workdir``.

    Returns the metrics (``eval`` and ``all``) or None. ``generate`` writes ``config.generate.num_events``
    events from the trained workdir alone (:mod:`fpcd.runner.generation`). Raises :class:`ConfigError` for a bad
    config, a workdir of another run (its ``config.json`` or its checkpoints), a training batch
    larger than the training data, or a mode that needs a run the workdir does not hold;
    :class:`fpcd.io.WorkdirLockedError` while another run holds the workdir; the data errors of the
    experiment, :class:`~fpcd.train.NonFiniteLossError` and :class:`~fpcd.io.DiskFullError` as they
    happen. A refused mode writes nothing to the workdir.
    """
    if mode not in MODES:
        raise ConfigError(f"--mode={mode!r} is not one of {MODES}")
    cfg = experiment.cfg
    experiment.validate(mesh.devices.size)
    if mode == "distill" and not student_steps(cfg):
        raise ConfigError("--mode=distill: config.distill.rounds is 0; set e.g. --config.distill.rounds=3"
                          if "distill" in cfg else "--mode=distill: this config has no distill section")
    config = cfg.to_dict()
    if mode in ("distill", "sample", "eval", "generate") and not check_workdir(workdir, config, *_identity(experiment)):
        raise ConfigError(f"workdir {workdir} holds no run; run with --mode=train (or all) first")
    lock = lock_workdir(workdir)
    try:
        if mode == "generate":  # from the workdir alone: no training data, config.json unchanged
            check_checkpoints(workdir, config, *_identity(experiment))
            generate(experiment, workdir, mesh)
            return None
        return _run_mode(experiment, workdir, mode, mesh, config)
    finally:
        lock.release()


def _identity(experiment: Experiment) -> tuple:
    """The arguments after ``config`` of the workdir checks: what makes two configs the same run."""
    return experiment.IDENTITY_FIELDS, experiment.FIELDS_ADDED_LATER, experiment.FIELDS_RENAMED


def _run_mode(experiment: Experiment, workdir: str, mode: str, mesh, config: dict) -> dict | None:
    """:func:`train_and_evaluate` once the workdir is locked. What the mode needs from earlier
    invocations (trained checkpoints, students, samples) is read first, so that a mode refused for
    lack of it writes nothing; then ``config.json`` is written and the mode runs."""
    cfg = experiment.cfg
    identity = _identity(experiment)
    check_workdir(workdir, config, *identity)
    check_checkpoints(workdir, config, *identity)
    data = experiment.load_data()
    if mode in ("train", "distill", "all"):
        check_batch_sizes(experiment, data)
    stages = experiment.stages(data)
    groups = experiment.sample_groups(data)

    models = students = samples = None
    if mode in ("distill", "sample", "eval"):
        models = restore_models(experiment, stages, mesh, workdir)
    if mode == "distill":
        require_trained(stages, workdir)
    elif mode == "sample":
        students = restore_students(experiment, stages, mesh, workdir, sampled_students(cfg))
    elif mode == "eval":
        samples = {group: read_samples(os.path.join(workdir, experiment.samples_file(group))) for group in groups}
    prepare_workdir(workdir, config, *identity)
    save_generation_state(experiment, data, workdir)

    if mode in ("train", "all"):
        models = train(experiment, stages, mesh, workdir)
    if mode == "distill" or (mode == "all" and student_steps(cfg)):
        students = distill(experiment, stages, models, mesh, workdir)
    if mode in ("train", "distill"):
        return None
    if mode == "all":
        students = {k: students[k] for k in sampled_students(cfg)} if students is not None else {}
    if mode in ("sample", "all"):
        samples = generate_all(experiment, data, models, mesh, students=students)
        for group in groups:
            write_samples(os.path.join(workdir, experiment.samples_file(group)), samples[group],
                          experiment.samples_attrs(group))
        if mode == "sample":
            return None
    metrics = experiment.evaluate(data, samples, models, figures_dir=workdir if is_main_process() else None)
    train_info = read_json(os.path.join(workdir, TRAIN_INFO_FILE))
    if train_info:
        metrics["train"] = train_info
    explain_nonfinite(metrics)
    if is_main_process():
        write_json(os.path.join(workdir, METRICS_FILE), metrics)
    say(f"results in {os.path.abspath(workdir)}")
    say(experiment.format_results(metrics))
    return metrics
