"""Stage training with resume: each stage from its newest readable checkpoint to its number of
steps, logged to ``train_log.jsonl``, TensorBoard event files (``tensorboard/<stage>``),
``train_info.json`` (time, steps, final loss, planned memory) and a loss-curves figure.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Mapping

from fpcd.checkpoint import Checkpointer
from fpcd.distill import init_student_state, make_distill_step
from fpcd.errors import ConfigError
from fpcd.io import DiskFullError, atomic_write, is_disk_full, write_json
from fpcd.parallel import replicate, shard_batch
from fpcd.runner.experiment import Experiment, Stage
from fpcd.runner.processes import is_main_process, process_rows, say
from fpcd.runner.workdir import checkpoint_dir, config_differences, read_json
from fpcd.sde import VPSDE
from fpcd.train import fit, init_train_state

TRAIN_LOG_FILE = "train_log.jsonl"
TRAIN_INFO_FILE = "train_info.json"
LOSS_CURVES_FILE = "loss_curves.png"


def check_batch_sizes(experiment: Experiment, data) -> None:
    """Raise :class:`ConfigError` naming the field when a training section's ``batch_size`` exceeds
    the training examples its batches draw from (:meth:`Experiment.training_examples`)."""
    for section, count in experiment.training_examples(data).items():
        batch_size = int(experiment.cfg[section].batch_size)
        if batch_size > int(count):
            raise ConfigError(f"config.{section}.batch_size={batch_size} exceeds the {int(count)} training examples "
                              f"it draws from; lower config.{section}.batch_size or use more training data")


def make_stage_state(stage: Stage, sde: VPSDE, mesh):
    """(fresh train state replicated on ``mesh``, jitted train step) of ``stage``: the denoising
    score-matching step of its :class:`~fpcd.train.TrainSettings`, or for a student
    (``stage.teacher``) the distillation step, whose state starts as a copy of the teacher."""
    t = stage.train
    optimizer = t.optimizer()
    if stage.teacher is None:
        state = replicate(init_train_state(stage.model, optimizer, stage.key), mesh)
        return state, t.train_step(sde, mesh, optimizer)
    teacher = stage.teacher
    state = replicate(init_student_state(teacher.model, optimizer, stage.key), mesh)
    step_fn = make_distill_step(sde, optimizer, replicate(teacher.model, mesh), steps=teacher.student_steps,
                                t_min=teacher.t_min, teacher_prediction=t.prediction, prediction=t.prediction,
                                ema_decay=t.ema_decay, mesh=mesh)
    return state, step_fn


def train_step_memory_bytes(step_fn, state, batch) -> int | None:
    """Peak memory of one compiled training step as XLA plans it (arguments, outputs, temporaries)."""
    compiled = step_fn.lower(state, batch).compile().compiled  # Equinox's Compiled wraps JAX's
    try:
        stats = compiled.memory_analysis()
    except NotImplementedError:  # a backend without memory analysis
        return None
    if stats is None:
        return None
    peak = getattr(stats, "peak_memory_in_bytes", 0)
    return int(peak or (stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
                        - stats.alias_size_in_bytes))


class TrainLog:
    """Process 0's training log: ``train_log.jsonl`` (appended across resumes) and TensorBoard
    event files under ``tensorboard/<stage>`` of the workdir."""

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.enabled = is_main_process()
        self._writers = {}
        self._resumed_at = {}

    def resume(self, stage: str, step: int) -> None:
        """Drop ``stage``'s rows after ``step`` (logged by a run killed before its next checkpoint, which
        the resumed run repeats) from ``train_log.jsonl``, and the same steps from TensorBoard."""
        self._resumed_at[stage] = step
        if not self.enabled:
            return
        path = os.path.join(self.workdir, TRAIN_LOG_FILE)
        rows = read_train_log(self.workdir)
        kept = [r for r in rows if r["stage"] != stage or r["step"] <= step]
        if len(kept) != len(rows):
            atomic_write(path, lambda tmp: open(tmp, "w").writelines(json.dumps(r) + "\n" for r in kept))

    def write(self, stage: str, row: dict) -> None:
        if not self.enabled:
            return
        record = {"stage": stage, **row, "time": time.time()}
        path = os.path.join(self.workdir, TRAIN_LOG_FILE)
        try:
            with open(path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as err:
            if is_disk_full(err):
                raise DiskFullError(path, "the checkpoints written before are intact: free some space and run "
                                          "again to resume from the newest") from err
            raise
        writer = self._writer(stage)
        if writer is not None:
            for name in ("loss", "grad_norm", "learning_rate", "steps_per_second"):
                if row.get(name) is not None:
                    writer.add_scalar(f"train/{name}", row[name], row["step"])
            writer.flush()

    def _writer(self, stage: str):
        if stage not in self._writers:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:  # the JSON log is complete without it
                self._writers[stage] = None
            else:
                resumed = self._resumed_at.get(stage)
                self._writers[stage] = SummaryWriter(os.path.join(self.workdir, "tensorboard", stage),
                                                     purge_step=None if not resumed else resumed + 1)
        return self._writers[stage]

    def close(self) -> None:
        for writer in self._writers.values():
            if writer is not None:
                writer.close()
        self._writers.clear()


def read_train_log(workdir: str) -> list[dict]:
    """The rows of ``train_log.jsonl`` (empty when there is none)."""
    path = os.path.join(workdir, TRAIN_LOG_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def train_stage(stage: Stage, sde: VPSDE, mesh, workdir: str, *, config: dict, log: TrainLog,
                progress: bool = True, measure_memory: bool = False,
                added_later: Mapping[str, Any] | None = None, renamed: Mapping[str, str] | None = None):
    """Train ``stage`` from its newest readable checkpoint to ``stage.train.num_steps`` (newer unreadable
    steps are set aside as ``<step>.unreadable``). Returns ``(state, info)``; with ``measure_memory``
    (and a ``stage.probe_batch``) ``info`` has the step's planned memory.

    A student's checkpoint saved under another teacher (``stage.teacher.provenance`` compared as in
    :func:`fpcd.runner.workdir.config_differences`, with ``added_later`` and ``renamed``) is refused.
    """
    state, step_fn = make_stage_state(stage, sde, mesh)
    rows = process_rows(mesh, stage.train.batch_size)
    schedule = stage.train.schedule_fn()

    def batch_fn(step):
        return shard_batch(stage.batch(step, rows), mesh)

    t = stage.train
    with Checkpointer(checkpoint_dir(workdir, stage.name), save_every=t.checkpoint_every,
                      max_to_keep=t.keep_checkpoints, config=config) as checkpointer:
        restored = checkpointer.restore(state, set_aside_unreadable=True)
        if restored is not None and stage.teacher is not None and stage.teacher.provenance:
            saved = checkpointer.saved_config()
            details = ("" if saved is None else
                       config_differences(saved, config, stage.teacher.provenance, added_later, renamed))
            if details:
                raise ConfigError(f"{checkpoint_dir(workdir, stage.name)} holds a student distilled from another "
                                  f"teacher or with other settings ({details}); remove the checkpoints/*_student_* "
                                  "directories to distil again, or use another --workdir")
        if restored is not None:
            state = restored
            say(f"[{stage.name}] resuming from checkpoint at step {int(state.step)}")
        log.resume(stage.name, int(state.step))
        memory = None
        if measure_memory and stage.probe_batch is not None:
            memory = train_step_memory_bytes(step_fn, state, shard_batch(stage.probe_batch(rows), mesh))
        start = time.perf_counter()
        state, history = fit(state, step_fn=step_fn, batch_fn=batch_fn, num_steps=t.num_steps,
                             checkpointer=checkpointer, log_every=t.log_every, description=f"train {stage.name}",
                             progress=progress, learning_rate_fn=schedule,
                             on_log=lambda row: log.write(stage.name, row))
        seconds = time.perf_counter() - start
    return state, {"steps": int(state.step), "seconds_this_invocation": seconds, "history": history,
                   "step_memory_bytes": memory}


def restore_stage(stage: Stage, sde: VPSDE, mesh, workdir: str, *, hint: str = "run with --mode=train first"):
    """The newest readable checkpointed train state of ``stage`` (unreadable newer steps are skipped
    with a note, :meth:`fpcd.checkpoint.Checkpointer.restore`); :class:`ConfigError` (ending in
    ``hint``) when there is none."""
    if not os.path.isdir(checkpoint_dir(workdir, stage.name)):  # opening a Checkpointer would create it
        raise ConfigError(f"no checkpoint of stage {stage.name!r} in {workdir}; {hint}")
    state, _ = make_stage_state(stage, sde, mesh)
    t = stage.train
    with Checkpointer(checkpoint_dir(workdir, stage.name), save_every=t.checkpoint_every,
                      max_to_keep=t.keep_checkpoints) as checkpointer:
        restored = checkpointer.restore(state)
    if restored is None:
        raise ConfigError(f"no checkpoint of stage {stage.name!r} in {workdir}; {hint}")
    return restored


def restore_models(experiment: Experiment, stages, mesh, workdir: str) -> dict:
    """``stage name -> EMA model`` restored from ``workdir``'s newest checkpoints."""
    return {stage.name: restore_stage(stage, experiment.sde, mesh, workdir).ema_model for stage in stages}


def record_training(workdir: str, name: str, info: dict) -> dict:
    """Add one invocation's training of stage ``name`` (:func:`train_stage`'s ``info``) to
    ``train_info.json`` (written by process 0); returns the whole table."""
    path = os.path.join(workdir, TRAIN_INFO_FILE)
    table = read_json(path)
    row = table.get(name, {"seconds": 0.0})
    row["seconds"] = row.get("seconds", 0.0) + info["seconds_this_invocation"]
    row["steps"] = info["steps"]
    if info["history"]:
        row["final_loss"] = info["history"][-1]["loss"]
    if info.get("step_memory_bytes") is not None:
        row["step_memory_bytes"] = info["step_memory_bytes"]
    table[name] = row
    if is_main_process():
        write_json(path, table)
    return table


def plot_loss_curves(workdir: str, stage_names: set, filename: str) -> None:
    """Plot the logged losses of ``stage_names`` to ``<workdir>/<filename>`` (process 0)."""
    if is_main_process():
        from fpcd.plots.common import loss_curves

        loss_curves([r for r in read_train_log(workdir) if r["stage"] in stage_names], os.path.join(workdir, filename))


def train(experiment: Experiment, stages, mesh, workdir: str) -> dict:
    """Train every stage in order; returns ``stage name -> EMA model``."""
    models, log = {}, TrainLog(workdir)
    recorded = read_json(os.path.join(workdir, TRAIN_INFO_FILE))
    try:
        for stage in stages:
            state, info = train_stage(stage, experiment.sde, mesh, workdir, config=experiment.cfg.to_dict(),
                                      log=log, progress=experiment.progress,
                                      measure_memory="step_memory_bytes" not in recorded.get(stage.name, {}),
                                      added_later=experiment.FIELDS_ADDED_LATER, renamed=experiment.FIELDS_RENAMED)
            record_training(workdir, stage.name, info)
            models[stage.name] = state.ema_model
    finally:
        log.close()
    plot_loss_curves(workdir, {stage.name for stage in stages}, LOSS_CURVES_FILE)
    return models
