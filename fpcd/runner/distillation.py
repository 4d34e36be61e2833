"""Progressive distillation rounds (Salimans & Ho 2022, :mod:`fpcd.distill`) of every stage.

Round ``r`` trains a ``teacher_steps / 2**r``-step student of the previous round's student
(round 1: of the trained EMA model) as a checkpointed, resumable stage ``<stage>_student_<steps>``
(:func:`student_stage`), trained like the others (data-parallel, EMA, log rows) and plotted to
``distill_loss_curves.png``.
"""

from __future__ import annotations

import dataclasses
import os
import re

import jax

from fpcd.checkpoint import Checkpointer
from fpcd.config import DISTILL_OPTIMISATION_FIELDS, student_steps
from fpcd.errors import ConfigError
from fpcd.runner.experiment import Experiment, Stage, Teacher
from fpcd.runner.processes import say
from fpcd.runner.training import TrainLog, plot_loss_curves, record_training, restore_stage, train_stage
from fpcd.runner.workdir import checkpoint_dir

DISTILL_CURVES_FILE = "distill_loss_curves.png"


def student_name(stage_name: str, steps: int) -> str:
    """The name of ``stage_name``'s ``steps``-step student (checkpoints, log rows, ``train_info.json``)."""
    return f"{stage_name}_student_{steps}"


def is_student(stage_name: str) -> bool:
    """True for the name of a distillation stage (:func:`student_name`)."""
    return re.fullmatch(r".+_student_\d+", stage_name) is not None


def student_stage(experiment: Experiment, stage: Stage, steps: int, teacher_model) -> Stage:
    """The distillation stage of ``stage``'s ``steps``-step student of ``teacher_model``: the stage's
    training batches and batch size, the optimisation fields of ``config.distill``, the stage's
    parametrisation; its key is ``fold_in(stage.key, steps)``."""
    d = experiment.cfg.distill
    train = dataclasses.replace(stage.train, **{field: d[field] for field in DISTILL_OPTIMISATION_FIELDS})
    provenance = experiment.TRAIN_SECTIONS + tuple(f"distill.{f}" for f in ("teacher_steps", "t_min",
                                                                            *DISTILL_OPTIMISATION_FIELDS)
                                                   if f not in ("log_every", "checkpoint_every", "keep_checkpoints"))
    return dataclasses.replace(stage, name=student_name(stage.name, steps), train=train,
                               key=jax.random.fold_in(stage.key, steps), probe_batch=None,
                               teacher=Teacher(teacher_model, int(steps), float(d.t_min), provenance))


def require_trained(stages, workdir: str) -> None:
    """Raise :class:`ConfigError` unless every stage has checkpointed all its training steps."""
    for stage in stages:
        directory = checkpoint_dir(workdir, stage.name)
        trained = 0
        if os.path.isdir(directory):  # opening a Checkpointer would create it
            with Checkpointer(directory, save_every=1) as checkpointer:
                trained = checkpointer.latest_step() or 0
        if trained < stage.train.num_steps:
            raise ConfigError(f"stage {stage.name!r} has trained {trained} of its {stage.train.num_steps} steps; "
                              "finish training (--mode=train) before distilling it")


def distill(experiment: Experiment, stages, teachers: dict, mesh, workdir: str) -> dict:
    """Every distillation round of every stage (``config.distill.rounds``), each resumed from its
    newest checkpoint; round 1 distils ``teachers[stage name]``, the trained EMA model. Returns
    ``student steps -> stage name -> the student's EMA model``."""
    cfg = experiment.cfg
    rounds = student_steps(cfg)
    require_trained(stages, workdir)
    students = {steps: {} for steps in rounds}
    log = TrainLog(workdir)
    try:
        for stage in stages:
            teacher = teachers[stage.name]
            for r, steps in enumerate(rounds, 1):
                student = student_stage(experiment, stage, steps, teacher)
                say(f"[distill] {stage.name}, round {r}/{len(rounds)}: DDIM {2 * steps} -> {steps} steps")
                state, info = train_stage(student, experiment.sde, mesh, workdir, config=cfg.to_dict(), log=log,
                                          progress=experiment.progress, added_later=experiment.FIELDS_ADDED_LATER,
                                          renamed=experiment.FIELDS_RENAMED)
                record_training(workdir, student.name, info)
                teacher = students[steps][stage.name] = state.ema_model
    finally:
        log.close()
    plot_loss_curves(workdir, {student_name(stage.name, k) for stage in stages for k in rounds}, DISTILL_CURVES_FILE)
    return students


def restore_students(experiment: Experiment, stages, mesh, workdir: str, steps: tuple[int, ...]) -> dict:
    """``student steps -> stage name -> EMA model`` of the students of ``steps``, from ``workdir``."""
    return {k: {stage.name: restore_stage(student_stage(experiment, stage, k, stage.model), experiment.sde, mesh,
                                          workdir, hint="run with --mode=distill (or all) first, or set "
                                                        "--config.distill.rounds=0").ema_model
                for stage in stages}
            for k in steps}


def sampled_students(cfg) -> tuple[int, ...]:
    """The student steps that are sampled and evaluated (``config.distill.sample_steps``; none
    without rounds)."""
    return tuple(cfg.distill.sample_steps) if student_steps(cfg) else ()
