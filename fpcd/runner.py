"""One runner for every experiment: modes, stage training with resume, sampling, outputs.

An experiment is a subclass of :class:`Experiment` that supplies only what is its own (the
hooks): its data (:meth:`~Experiment.load_data`), the models of its stages and their training
batches (:meth:`~Experiment.stages`), how one sampler run generates samples through its stages
(:meth:`~Experiment.generate`), and its evaluators (:meth:`~Experiment.evaluators`, run as
``config.eval.evaluators`` names them, big_vision style; :meth:`~Experiment.format_results`). :func:`train_and_evaluate` does the rest for all of them:

* ``mode="train"``: validate the config, claim the workdir, train every stage in order, each
  resuming from its newest checkpoint (``checkpoints/<stage>``), logging to ``train_log.jsonl``,
  TensorBoard event files (``tensorboard/<stage>``) and ``loss_curves.png``.
* ``mode="distill"``: progressive distillation (:mod:`fpcd.distill`) of every stage's trained EMA
  model, ``config.distill.rounds`` rounds from ``config.distill.teacher_steps`` DDIM steps down,
  each round a checkpointed, resumable stage ``<stage>_student_<steps>`` trained like the others
  (data-parallel, EMA, log rows, ``distill_loss_curves.png``) and started from the previous
  round's student.
* ``mode="sample"``: restore every stage's EMA model and run every sampler of
  ``config.sampling.runs`` through :meth:`~Experiment.generate`, timed, for every sample group
  (e.g. jet type); with distillation rounds, also each student of ``config.distill.sample_steps``
  (run ``student_<k>``: DDIM in ``k`` steps through every stage's student) beside the teacher's
  own DDIM in ``k`` steps (run ``ddim_<k>``). Write ``samples.h5`` (or ``samples_<group>.h5``):
  each run's arrays under ``runs/<name>/``, the first run's also at the top level (the public
  layout of the data).
* ``mode="eval"``: read the samples back and evaluate; write ``metrics.json`` and print the
  experiment's console table. ``metrics.json`` is valid JSON: a NaN or inf value is written as
  ``null`` and listed under ``"nonfinite"`` with the reason (:func:`explain_nonfinite`).
* ``mode="all"``: train, distill (when the config has rounds), sample and evaluate.

One run per workdir: a run holds ``<workdir>/.lock`` (:class:`fpcd.io.WorkdirLock`) and a second
one is refused naming the holder; a mode that is refused writes nothing to the workdir. Expected
failures (a bad config, data or workdir, a non-finite loss, a full disk) are raised as exceptions;
:func:`expected_error_message` gives their one-line message.

Multi-process jobs (``jax.distributed``): every process runs the same code on the same host
data; each builds only its own rows of each training batch (:func:`process_rows`) and feeds them
with ``make_array_from_process_local_data``; sampling is data-parallel over every device of
every process and gathered back to every process; only process 0 writes files and prints.
"""

from __future__ import annotations

import abc
import dataclasses
import json
import os
import re
import time
from typing import Any, Callable

import equinox as eqx
import h5py
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from fpcd.checkpoint import Checkpointer, CheckpointMismatchError, UnreadableCheckpointError
from fpcd.config import (DISTILL_OPTIMISATION_FIELDS, ConfigError, loss_options, require_strings, student_steps,
                         validate_common)
from fpcd.distill import init_student_state, make_distill_step
from fpcd.io import (DiskFullError, WorkdirLock, WorkdirLockedError, atomic_write, disk_full_path, is_disk_full,
                     nonfinite_entries, write_json)
from fpcd.parallel import batch_sharding, replicate, shard_batch
from fpcd.sampling import sample
from fpcd.sde import VPSDE
from fpcd.train import fit, init_train_state, learning_rate_schedule, make_optimizer, make_train_step

CONFIG_FILE = "config.json"
TRAIN_LOG_FILE = "train_log.jsonl"
TRAIN_INFO_FILE = "train_info.json"
METRICS_FILE = "metrics.json"
MODES = ("train", "distill", "sample", "eval", "all")
DISTILL_CURVES_FILE = "distill_loss_curves.png"


def is_main_process() -> bool:
    """True on process 0, the only one that writes files and prints."""
    return jax.process_index() == 0


def say(message: str) -> None:
    """Print ``message`` on process 0 only."""
    if is_main_process():
        print(message, flush=True)


# --- the experiment interface ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Teacher:
    """What a distillation stage learns from (:mod:`fpcd.distill`).

    Attributes:
      model: the teacher network (the trained EMA model, or the previous round's student); it
        samples with deterministic DDIM in ``2 * student_steps`` steps.
      student_steps: the student's number of DDIM steps.
      t_min: the end of the DDIM grid.
      provenance: dotted config fields that made the teacher (its training sections, the
        distillation settings); a student checkpoint saved under other values is refused.
    """

    model: eqx.Module
    student_steps: int
    t_min: float
    provenance: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Stage:
    """One trained model of an experiment.

    Attributes:
      name: the stage's name (checkpoint directory, log rows, ``models[name]``).
      model: a freshly initialised model (the template of its checkpoints).
      train: the config section of its training (``config.train`` or another of the same fields).
      key: PRNG key of its train state.
      batch: ``(step, rows) -> dict of host arrays``: the rows ``rows`` (a slice of the global
        batch of ``train.batch_size``) of the training batch at ``step``; must depend only on
        ``(step, rows)`` so that a resumed or multi-process run sees the same data.
      probe_batch: optional ``rows -> batch`` of the largest shape the stage trains on; when
        given, the runner records the compiled train step's planned memory (``train_info.json``).
      teacher: None for a trained model; a :class:`Teacher` for a distillation student, which
        starts from a copy of the teacher and is trained on the distillation loss.
    """

    name: str
    model: eqx.Module
    train: Any
    key: jax.Array
    batch: Callable[[int, slice], dict]
    probe_batch: Callable[[slice], dict] | None = None
    teacher: Teacher | None = None


@dataclasses.dataclass(frozen=True)
class RunSamples:
    """What one sampler run produced for one sample group: host ``arrays``, its ``info`` (NFE,
    seconds, ...) and the ``run`` options (``{"method": ..., **options}``)."""

    arrays: dict
    info: dict
    run: dict


class Experiment(abc.ABC):
    """Base class of experiments run by :func:`train_and_evaluate` (vdm's ``Experiment``).

    Subclasses set ``KEY_NAMES`` (names of the root key's ``fold_in`` children, in order; it must
    contain ``"sampling"``), ``IDENTITY_FIELDS`` (config fields that make two configs the same run)
    and ``TRAIN_SECTIONS`` (config sections of training fields), and implement the hooks.
    """

    KEY_NAMES: tuple[str, ...] = ("models", "train", "sampling")
    IDENTITY_FIELDS: tuple[str, ...] = ("experiment", "seed", "data", "sde")
    TRAIN_SECTIONS: tuple[str, ...] = ("train",)

    def __init__(self, cfg, *, progress: bool = True):
        self.cfg = cfg
        self.progress = bool(progress) and is_main_process()

    @property
    def sde(self) -> VPSDE:
        """The VP SDE of ``config.sde`` (built on use, so that :meth:`validate` reports bad values first)."""
        s = self.cfg.sde
        return VPSDE(beta_min=float(s.beta_min), beta_max=float(s.beta_max), schedule=s.schedule)

    def key(self, name: str):
        """The experiment's key called ``name``: ``fold_in(key(seed), KEY_NAMES.index(name))``."""
        return jax.random.fold_in(jax.random.key(self.cfg.seed), self.KEY_NAMES.index(name))

    # hooks ------------------------------------------------------------------------------------

    def validate(self, num_devices: int) -> None:
        """Raise :class:`~fpcd.config.ConfigError` naming the field of a bad config value."""
        validate_common(self.cfg, num_devices=num_devices, train_sections=self.TRAIN_SECTIONS)
        names = require_strings(self.cfg, "eval.evaluators")
        unknown = [name for name in names if name not in self.evaluators()]
        if unknown or len(set(names)) != len(names):
            raise ConfigError(f"config.eval.evaluators={names!r}: unknown or repeated evaluator(s) {unknown}; "
                              f"this experiment has {tuple(self.evaluators())}")

    @abc.abstractmethod
    def load_data(self):
        """Load or generate, split and preprocess the data (any object the other hooks understand)."""

    @abc.abstractmethod
    def stages(self, data) -> tuple[Stage, ...]:
        """The trained models, in training order."""

    def training_examples(self, data) -> dict[str, int]:
        """``training section -> number of training examples`` its batches draw from (e.g.
        ``{"train": 20000}``); a ``batch_size`` above it is refused before any training
        (:func:`check_batch_sizes`). Default: no check."""
        return {}

    def sample_groups(self, data) -> tuple[str, ...]:
        """Names of the groups sampled separately (e.g. jet types); ``("",)``: one group."""
        return ("",)

    @abc.abstractmethod
    def generate(self, data, models: dict, group: str, run: dict, key, sampler: "BatchSampler") -> tuple[dict, dict]:
        """Generate the samples of ``group`` with one sampler ``run`` through every stage.

        Args:
          models: ``stage name -> EMA model``.
          run: ``{"method": ..., **options}``.
          sampler: draws batches of one stage (:class:`BatchSampler`), timed, on every device.

        Returns:
          ``(arrays, info)``: host arrays to write (the public layout of the data) and a JSON-able
          dict holding at least ``nfe`` and ``seconds``.
        """

    @abc.abstractmethod
    def evaluators(self) -> dict[str, Callable]:
        """The experiment's evaluators by name (big_vision style): each is
        ``(data, samples, models, *, figures_dir) -> dict`` and returns its part of the metrics;
        ``config.eval.evaluators`` names the ones that run, in order.

        ``samples`` is ``group -> run name -> RunSamples``. Evaluators run on every process; figures
        are written to ``figures_dir`` when it is not None (process 0). An evaluator may say why a
        value is NaN or inf with a ``"nonfinite"`` entry ``{dotted path or its prefix: reason}``
        (:func:`explain_nonfinite`).
        """

    def evaluate(self, data, samples: dict, models: dict, *, figures_dir: str | None) -> dict:
        """The metrics of the evaluators named in ``config.eval.evaluators``, merged into one dict."""
        evaluators = self.evaluators()
        metrics = {"experiment": self.cfg.experiment, "evaluators": list(self.cfg.eval.evaluators)}
        for name in self.cfg.eval.evaluators:
            merge_metrics(metrics, evaluators[name](data, samples, models, figures_dir=figures_dir))
        return metrics

    @abc.abstractmethod
    def format_results(self, metrics: dict) -> str:
        """The console table of ``metrics``."""

    def samples_file(self, group: str) -> str:
        return f"samples_{group}.h5" if group else "samples.h5"

    # helpers for the hooks ---------------------------------------------------------------------

    def require_held_out(self, available: int, what: str) -> None:
        """Raise :class:`~fpcd.config.ConfigError` unless ``available`` held-out ``what`` hold two
        disjoint sets of ``sampling.num_samples`` (the truth and the truth-vs-truth floor)."""
        n = self.cfg.sampling.num_samples
        if available < 2 * n:
            raise ConfigError(f"config.sampling.num_samples={n} needs at least {2 * n} {what} (two disjoint subsets "
                              f"for the floor), found {available}")

    def batch_size(self, n: int, sampler: "BatchSampler") -> int:
        """The sampling batch for ``n`` samples: ``sampling.batch_size`` or less, a multiple of the devices."""
        devices = 1 if sampler.mesh is None else sampler.mesh.devices.size
        return max(devices, min(int(self.cfg.sampling.batch_size), -(-n // devices) * devices))

    def samples_attrs(self, group: str) -> dict:
        """Attributes of the root group of ``group``'s samples file."""
        return {}


def merge_metrics(metrics: dict, part: dict) -> dict:
    """Merge ``part`` into ``metrics`` in place, recursing into dicts both hold."""
    for key, value in part.items():
        if isinstance(value, dict) and isinstance(metrics.get(key), dict):
            merge_metrics(metrics[key], value)
        else:
            metrics[key] = value
    return metrics


# --- multi-process helpers -----------------------------------------------------------------------


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


# --- workdir ---------------------------------------------------------------------------------------


def _flatten(tree, prefix=""):
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


# Identity fields added to a config after runs of it existed, with the value those runs had (so
# that their workdirs are still recognised as the same run).
FIELDS_ADDED_LATER = {"cell_model.layer_embedding": False}


def check_workdir(workdir: str, config: dict, identity_fields: tuple[str, ...]) -> bool:
    """Refuse a workdir holding a run of a different config; True when it holds one of this config.

    Two configs are the same run when they agree on every field under ``identity_fields``
    (dotted prefixes such as ``"model"`` or ``"train.prediction"``); other fields (number of
    steps, sampling runs) may change between invocations so a run can be extended or resampled.
    """
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        return False
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError) as err:
        raise ConfigError(f"workdir {workdir}: {path} cannot be read ({err}); choose another --workdir") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"workdir {workdir}: {path} does not hold a config; choose another --workdir")
    compare_run(saved, config, identity_fields, f"workdir {workdir}")
    return True


def compare_run(saved: dict, config: dict, identity_fields: tuple[str, ...], where: str) -> None:
    """Raise :class:`ConfigError` (``"<where> holds a run of ..."``) unless the recorded config ``saved``
    is a run of ``config``: the same experiment and the same values under ``identity_fields``."""
    if saved.get("experiment") != config.get("experiment"):
        raise ConfigError(f"{where} holds a run of experiment {saved.get('experiment')!r}, not "
                          f"{config.get('experiment')!r}; choose another --workdir")
    details = config_differences(saved, config, identity_fields)
    if details:
        raise ConfigError(f"{where} holds a run of a different config ({details}); "
                          "choose another --workdir or remove that one")


def check_checkpoints(workdir: str, config: dict, identity_fields: tuple[str, ...]) -> None:
    """Refuse a workdir whose checkpoints were saved by a run of another config (compared as in
    :func:`check_workdir`, on the config stored with each stage's newest readable step), before
    restoring them would fail on the arrays' shapes; e.g. a workdir whose ``config.json`` was
    removed."""
    root = os.path.join(os.path.abspath(workdir), "checkpoints")
    if not os.path.isdir(root):
        return
    for name in sorted(os.listdir(root)):
        directory = os.path.join(root, name)
        if not os.path.isdir(directory):
            continue
        with Checkpointer(directory, save_every=1) as checkpointer:
            for step in sorted(checkpointer.all_steps(), reverse=True):
                saved = checkpointer.saved_config(step)
                if saved is not None:
                    compare_run(saved, config, identity_fields, f"workdir {workdir} (checkpoints/{name}/{step})")
                    break


def config_differences(saved: dict, config: dict, fields: tuple[str, ...]) -> str:
    """The fields under the dotted prefixes ``fields`` where ``saved`` and ``config`` differ, as
    ``"field: old -> new, ..."`` (at most five), or ``""``."""
    previous, current = _flatten(saved), _flatten(json.loads(json.dumps(config)))
    for k, value in FIELDS_ADDED_LATER.items():  # a run recorded before the field existed had this value
        if k in current and k not in previous:
            previous[k] = value
    keys = sorted(k for k in set(previous) | set(current) if any(k == p or k.startswith(p + ".") for p in fields))
    differing = [k for k in keys if previous.get(k) != current.get(k)]
    return ", ".join(f"{k}: {previous.get(k)!r} -> {current.get(k)!r}" for k in differing[:5])


def prepare_workdir(workdir: str, config: dict, identity_fields: tuple[str, ...]) -> None:
    """Create ``workdir`` and record ``config`` there (process 0); refuse a workdir of another run."""
    check_workdir(workdir, config, identity_fields)
    if is_main_process():
        os.makedirs(workdir, exist_ok=True)
        write_json(os.path.join(workdir, CONFIG_FILE), config)


def lock_workdir(workdir: str) -> WorkdirLock:
    """Take ``workdir``'s lock (:class:`fpcd.io.WorkdirLock`) on process 0; collective. Every process
    raises :class:`fpcd.io.WorkdirLockedError` when another run holds it. Release it with
    ``.release()``."""
    lock, error = WorkdirLock(workdir), None
    if is_main_process():
        try:
            lock.acquire()
        except Exception as err:  # noqa: BLE001 - re-raised below, after telling the other processes
            error = err
    if jax.process_count() > 1:
        refused = bool(multihost_utils.broadcast_one_to_all(np.int32(error is not None)))
        if refused and error is None:
            error = WorkdirLockedError(f"workdir {workdir} is in use by another run (process 0 could not lock it)")
    if error is not None:
        raise error
    return lock


def check_batch_sizes(experiment: "Experiment", data) -> None:
    """Raise :class:`ConfigError` naming the field when a training section's ``batch_size`` exceeds
    the training examples its batches draw from (:meth:`Experiment.training_examples`)."""
    for section, count in experiment.training_examples(data).items():
        batch_size = int(experiment.cfg[section].batch_size)
        if batch_size > int(count):
            raise ConfigError(f"config.{section}.batch_size={batch_size} exceeds the {int(count)} training examples "
                              f"it draws from; lower config.{section}.batch_size or use more training data")


def checkpoint_dir(workdir: str, stage: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints", stage)


def read_json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


# --- training --------------------------------------------------------------------------------------


def _optimizer_options(train_cfg) -> dict:
    return {"learning_rate": train_cfg.learning_rate, "num_steps": train_cfg.num_steps,
            "warmup_steps": train_cfg.warmup_steps, "schedule": train_cfg.schedule}


def make_stage_state(stage: Stage, sde: VPSDE, mesh):
    """(fresh train state replicated on ``mesh``, jitted train step) of ``stage``: the denoising
    score-matching step, or for a student (``stage.teacher``) the distillation step, whose state
    starts as a copy of the teacher."""
    t = stage.train
    optimizer = make_optimizer(**_optimizer_options(t), grad_clip=t.grad_clip or None, weight_decay=t.weight_decay)
    if stage.teacher is None:
        state = replicate(init_train_state(stage.model, optimizer, stage.key), mesh)
        step_fn = make_train_step(sde, optimizer, prediction=t.prediction, ema_decay=t.ema_decay, t_min=t.t_min,
                                  mesh=mesh, **loss_options(t))
        return state, step_fn
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
                progress: bool = True, measure_memory: bool = False):
    """Train ``stage`` from its newest readable checkpoint to ``stage.train.num_steps`` (newer unreadable
    steps are set aside as ``<step>.unreadable``). Returns ``(state, info)``; with ``measure_memory``
    (and a ``stage.probe_batch``) ``info`` has the step's planned memory."""
    state, step_fn = make_stage_state(stage, sde, mesh)
    rows = process_rows(mesh, stage.train.batch_size)
    schedule = learning_rate_schedule(**_optimizer_options(stage.train))

    def batch_fn(step):
        return shard_batch(stage.batch(step, rows), mesh)

    t = stage.train
    with Checkpointer(checkpoint_dir(workdir, stage.name), save_every=t.checkpoint_every,
                      max_to_keep=t.keep_checkpoints, config=config) as checkpointer:
        restored = checkpointer.restore(state, set_aside_unreadable=True)
        if restored is not None and stage.teacher is not None and stage.teacher.provenance:
            saved = checkpointer.saved_config()
            details = "" if saved is None else config_differences(saved, config, stage.teacher.provenance)
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


def _record_training(workdir: str, name: str, info: dict) -> dict:
    """Add one invocation's training of stage ``name`` to ``train_info.json`` (process 0)."""
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


def train(experiment: Experiment, stages, mesh, workdir: str) -> dict:
    """Train every stage in order; returns ``stage name -> EMA model``."""
    models, log = {}, TrainLog(workdir)
    recorded = read_json(os.path.join(workdir, TRAIN_INFO_FILE))
    try:
        for stage in stages:
            state, info = train_stage(stage, experiment.sde, mesh, workdir, config=experiment.cfg.to_dict(),
                                      log=log, progress=experiment.progress,
                                      measure_memory="step_memory_bytes" not in recorded.get(stage.name, {}))
            _record_training(workdir, stage.name, info)
            models[stage.name] = state.ema_model
    finally:
        log.close()
    _plot_losses(workdir, {stage.name for stage in stages}, "loss_curves.png")
    return models


def _plot_losses(workdir: str, stage_names: set, filename: str) -> None:
    if is_main_process():
        from fpcd.plots.common import loss_curves

        loss_curves([r for r in read_train_log(workdir) if r["stage"] in stage_names], os.path.join(workdir, filename))


# --- progressive distillation ----------------------------------------------------------------------


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
    train = {**stage.train.to_dict(), **{field: d[field] for field in DISTILL_OPTIMISATION_FIELDS}}
    provenance = experiment.TRAIN_SECTIONS + tuple(f"distill.{f}" for f in ("teacher_steps", "t_min",
                                                                            *DISTILL_OPTIMISATION_FIELDS)
                                                   if f not in ("log_every", "checkpoint_every", "keep_checkpoints"))
    return dataclasses.replace(stage, name=student_name(stage.name, steps), train=ml_collections.ConfigDict(train),
                               key=jax.random.fold_in(stage.key, steps), probe_batch=None,
                               teacher=Teacher(teacher_model, int(steps), float(d.t_min), provenance))


def distill(experiment: Experiment, stages, teachers: dict, mesh, workdir: str) -> dict:
    """Progressive distillation of every stage (Salimans & Ho 2022) through ``config.distill.rounds``
    rounds: round ``r`` trains a ``teacher_steps / 2**r``-step student of the previous round's
    student (round 1: of ``teachers[stage]``, the trained EMA model), each round a checkpointed
    stage resumed from its newest checkpoint. Returns ``student steps -> stage name -> the
    student's EMA model``."""
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
                                          progress=experiment.progress)
                _record_training(workdir, student.name, info)
                teacher = students[steps][stage.name] = state.ema_model
    finally:
        log.close()
    _plot_losses(workdir, {student_name(stage.name, k) for stage in stages for k in rounds}, DISTILL_CURVES_FILE)
    return students


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


# --- sampling --------------------------------------------------------------------------------------


def warmup_options(method: str, options: dict) -> dict:
    """Options compiling the same sampler as ``options`` but running almost no steps."""
    if method == "ode":
        return {**options, "rtol": 0.5, "atol": 0.5}
    return {**options, "steps": 1}


def batch_rows(index: int, batch_size: int, num_samples: int) -> np.ndarray:
    """Rows of batch ``index``: ``index * batch_size + arange(batch_size)`` modulo ``num_samples``
    (the last batch wraps around; its extra rows are dropped)."""
    return np.arange(index * batch_size, (index + 1) * batch_size) % num_samples


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
        """Sample ``num_samples`` in batches of ``batch_size``.

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
        num_batches = -(-num_samples // batch_size)
        shape = (batch_size,) + tuple(sample_shape)
        devices = 1 if self.mesh is None else self.mesh.devices.size
        sharding = (batch_sharding(self.mesh) if self.sample_fn is sample and devices > 1
                    and batch_size % devices == 0 else None)

        def place(array, rows):
            if array is None:
                return None
            return jnp.asarray(array[rows]) if sharding is None else place_rows(array[rows], sharding)

        def draw(index, opts, k):
            rows = batch_rows(index, batch_size, num_samples)
            cond_b, mask_b = place(conditions, rows), place(mask, rows)
            extra = {} if sharding is None else {"sharding": sharding}
            x, nfe = self.sample_fn(make_score_fn(cond_b, mask_b), self.sde, k, shape, method=method, mask=mask_b,
                                    **extra, **opts)
            return jax.block_until_ready(x), nfe

        draw(0, warmup_options(method, options), jax.random.fold_in(key, 10**6))  # compile
        outputs, nfes = [], []
        start = time.perf_counter()
        for index in tqdm(range(num_batches), desc=description, disable=not self.progress, dynamic_ncols=True,
                          leave=False):
            x, nfe = draw(index, options, jax.random.fold_in(key, index))
            outputs.append(to_host(x))
            nfes.append(int(nfe))
        seconds = time.perf_counter() - start
        return np.concatenate(outputs)[:num_samples], max(nfes), seconds


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


# --- the whole job ---------------------------------------------------------------------------------


NONFINITE_REASON = ("it could not be computed from the samples (e.g. generated values are non-finite, or too few "
                    "are finite)")


def explain_nonfinite(metrics: dict) -> dict:
    """Replace ``metrics["nonfinite"]`` (the evaluators' reasons: ``{dotted path or prefix: reason}``)
    by the table of every NaN or inf value in ``metrics``: ``{dotted path: "nan, written as null:
    <reason>"}``, the reason of the longest given prefix of the path or a generic one; dropped when
    every value is finite. Returns ``metrics`` (changed in place); :func:`fpcd.io.write_json` writes
    the values themselves as ``null``."""
    given = metrics.pop("nonfinite", None) or {}
    table = {}
    for path, value in nonfinite_entries(metrics).items():
        parts = path.split(".")
        prefixes = (".".join(parts[:n]) for n in range(len(parts), 0, -1))
        reason = next((given[p] for p in prefixes if p in given), NONFINITE_REASON)
        table[path] = f"{value}, written as null: {reason}"
    if table:
        metrics["nonfinite"] = table
    return metrics


def expected_error_message(err: BaseException, workdir: str | None = None) -> str | None:
    """The one-line message of an expected failure, or None for any other exception (a bug, whose
    traceback should show).

    Expected: :class:`~fpcd.config.ConfigError`, the data errors (``CaloDataError``,
    ``EicDataError``, ``JetDataError``), :class:`~fpcd.train.NonFiniteLossError`, a refused or busy
    workdir (:class:`~fpcd.io.WorkdirLockedError`), a checkpoint of another model or with no
    readable step, and a full disk (any error caused by ``ENOSPC``; the message says "no space left
    on device" and names the path, or ``workdir`` when the error names none).
    """
    from fpcd.data.calo import CaloDataError
    from fpcd.data.eic import EicDataError
    from fpcd.data.jetnet import JetDataError
    from fpcd.train import NonFiniteLossError

    if is_disk_full(err):
        full = err if isinstance(err, DiskFullError) else None
        cause = err
        while full is None and cause is not None:  # a DiskFullError further down the chain names the file
            cause = cause.__cause__ or cause.__context__
            full = cause if isinstance(cause, DiskFullError) else None
        message = str(full) if full is not None else \
            f"no space left on device writing {disk_full_path(err) or workdir or 'the output'}: free some space and " \
            "run again (files written before are intact)"
    elif isinstance(err, (ConfigError, CaloDataError, EicDataError, JetDataError, NonFiniteLossError,
                          WorkdirLockedError, CheckpointMismatchError, UnreadableCheckpointError)):
        message = str(err)
    else:
        return None
    return " ".join(line.strip() for line in message.splitlines() if line.strip())


def train_and_evaluate(experiment: Experiment, workdir: str, mode: str, mesh) -> dict | None:
    """Run ``mode`` (``train``, ``distill``, ``sample``, ``eval`` or ``all``) of ``experiment`` in ``workdir``.

    Returns the metrics (``eval`` and ``all``) or None. Raises :class:`ConfigError` for a bad
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
    if mode in ("distill", "sample", "eval") and not check_workdir(workdir, config, experiment.IDENTITY_FIELDS):
        raise ConfigError(f"workdir {workdir} holds no run; run with --mode=train (or all) first")
    lock = lock_workdir(workdir)
    try:
        return _run_mode(experiment, workdir, mode, mesh, config)
    finally:
        lock.release()


def _run_mode(experiment: Experiment, workdir: str, mode: str, mesh, config: dict) -> dict | None:
    """:func:`train_and_evaluate` once the workdir is locked: config.json is written only once the
    mode has what it needs (checkpoints, samples)."""
    cfg = experiment.cfg
    check_workdir(workdir, config, experiment.IDENTITY_FIELDS)
    check_checkpoints(workdir, config, experiment.IDENTITY_FIELDS)
    data = experiment.load_data()
    if mode in ("train", "distill", "all"):
        check_batch_sizes(experiment, data)
    stages = experiment.stages(data)
    models = students = None
    if mode in ("train", "all"):
        prepare_workdir(workdir, config, experiment.IDENTITY_FIELDS)
        models = train(experiment, stages, mesh, workdir)
        if mode == "train":
            return None
    if models is None:
        models = restore_models(experiment, stages, mesh, workdir)
    if mode == "distill" or (mode == "all" and student_steps(cfg)):
        if mode == "distill":
            require_trained(stages, workdir)
            prepare_workdir(workdir, config, experiment.IDENTITY_FIELDS)
        students = distill(experiment, stages, models, mesh, workdir)
        if mode == "distill":
            return None
    groups = experiment.sample_groups(data)
    if mode in ("sample", "all"):
        wanted = sampled_students(cfg)
        students = ({k: students[k] for k in wanted} if students is not None
                    else restore_students(experiment, stages, mesh, workdir, wanted))
        if mode == "sample":
            prepare_workdir(workdir, config, experiment.IDENTITY_FIELDS)
        samples = generate_all(experiment, data, models, mesh, students=students)
        for group in groups:
            write_samples(os.path.join(workdir, experiment.samples_file(group)), samples[group],
                          experiment.samples_attrs(group))
        if mode == "sample":
            return None
    else:
        samples = {group: read_samples(os.path.join(workdir, experiment.samples_file(group))) for group in groups}
        prepare_workdir(workdir, config, experiment.IDENTITY_FIELDS)
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
