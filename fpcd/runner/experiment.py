"""The experiment contract: what an experiment supplies to the runner (vdm's ``Experiment``).

An experiment is a subclass of :class:`Experiment` holding only what is its own (the hooks): its
data (:meth:`~Experiment.load_data`), the models of its stages and their training batches
(:meth:`~Experiment.stages`, each a :class:`Stage`), how one sampler run generates samples
through its stages (:meth:`~Experiment.generate`), and its evaluators
(:meth:`~Experiment.evaluators`, run as ``config.eval.evaluators`` names them, big_vision style;
:meth:`~Experiment.format_results`). Class attributes declare its keys, the config fields that
make a run, and its training sections.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, Callable, ClassVar, Mapping

import equinox as eqx
import jax

from fpcd.config import require_strings, validate_common
from fpcd.errors import ConfigError
from fpcd.runner.processes import is_main_process
from fpcd.sde import VPSDE
from fpcd.train import TrainSettings


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
      train: its training settings, a :class:`fpcd.train.TrainSettings` (a config section of the
        same fields, e.g. ``config.train_set``, is read into one).
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
    train: TrainSettings
    key: jax.Array
    batch: Callable[[int, slice], dict]
    probe_batch: Callable[[slice], dict] | None = None
    teacher: Teacher | None = None

    def __post_init__(self):
        if not isinstance(self.train, TrainSettings):
            object.__setattr__(self, "train", TrainSettings.from_config(self.train))


@dataclasses.dataclass(frozen=True)
class RunSamples:
    """What one sampler run produced for one sample group: host ``arrays``, its ``info`` (NFE,
    seconds, ...) and the ``run`` options (``{"method": ..., **options}``)."""

    arrays: dict
    info: dict
    run: dict


class Experiment(abc.ABC):
    """Base class of experiments run by :func:`fpcd.runner.train_and_evaluate`.

    Subclasses set ``KEY_NAMES`` (names of the root key's ``fold_in`` children, in order; it must
    contain ``"sampling"``), ``IDENTITY_FIELDS`` (config fields that make two configs the same run),
    ``FIELDS_ADDED_LATER`` and ``FIELDS_RENAMED`` (see below) and ``TRAIN_SECTIONS`` (config
    sections of training fields), and implement the hooks.
    """

    KEY_NAMES: ClassVar[tuple[str, ...]] = ("models", "train", "sampling")
    IDENTITY_FIELDS: ClassVar[tuple[str, ...]] = ("experiment", "seed", "data", "sde")
    # Config fields added after a run may have been saved, with the value an older saved config
    # means (dotted field -> value): a workdir or checkpoint recorded without the field is still
    # the same run when the config holds that value.
    FIELDS_ADDED_LATER: ClassVar[Mapping[str, Any]] = {}
    # Config fields renamed after a run may have been saved (old dotted prefix -> new one): a
    # workdir or checkpoint recorded under the old names is the same run, read under the new names.
    FIELDS_RENAMED: ClassVar[Mapping[str, str]] = {}
    TRAIN_SECTIONS: ClassVar[tuple[str, ...]] = ("train",)

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
        """Raise :class:`~fpcd.errors.ConfigError` naming the field of a bad config value."""
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
        (:func:`fpcd.runner.training.check_batch_sizes`). Default: no check."""
        return {}

    def sample_groups(self, data) -> tuple[str, ...]:
        """Names of the groups sampled separately (e.g. jet types); ``("",)``: one group."""
        return ("",)

    @abc.abstractmethod
    def generate(self, data, models: dict, group: str, run: dict, key, sampler) -> tuple[dict, dict]:
        """Generate the samples of ``group`` with one sampler ``run`` through every stage.

        Args:
          models: ``stage name -> EMA model``.
          run: ``{"method": ..., **options}``.
          sampler: draws batches of one stage (:class:`fpcd.runner.BatchSampler`), timed, on every
            device.

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
        (:func:`fpcd.runner.explain_nonfinite`).
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

    # hooks of --mode=generate (fpcd.runner.generation) -----------------------------------------

    def generation_state(self, data) -> dict | None:
        """What generating needs besides the trained models, from the training ``data``, as JSON
        (standardisations, geometry, padded lengths, the conditions' training range); saved with
        the workdir. None (the default): the experiment has no generate mode."""
        return None

    def generation_data(self, state: dict):
        """The ``data`` that :meth:`generation_stages`, :meth:`generation_conditions` and
        :meth:`generate_chunk` read, rebuilt from a saved :meth:`generation_state`."""
        raise ConfigError(f"--mode=generate: the {self.cfg.experiment} experiment has no generate mode")

    def generation_stages(self, data) -> tuple[Stage, ...]:
        """The stages (as model templates to restore into) from :meth:`generation_data`'s ``data``."""
        return self.stages(data)

    def validate_generate(self) -> None:
        """Check the experiment's own fields of ``config.generate``."""

    def generation_conditions(self, data, num_events: int, rng) -> dict:
        """Per-event conditions of ``num_events`` events (``name -> (num_events, ...)``), drawn once
        with the numpy ``rng``; ``{}`` (the default) when events are unconditional."""
        return {}

    def generate_chunk(self, data, models: dict, run: dict, key, sampler, num_events: int, conditions: dict) -> dict:
        """``num_events`` events at ``conditions`` (their rows of :meth:`generation_conditions`)
        with one sampler ``run``: host arrays named and shaped as the data's own files, so that the
        joined output is a file of the community layout."""
        raise ConfigError(f"--mode=generate: the {self.cfg.experiment} experiment has no generate mode")

    # helpers for the hooks ---------------------------------------------------------------------

    def require_held_out(self, available: int, what: str) -> None:
        """Raise :class:`~fpcd.errors.ConfigError` unless ``available`` held-out ``what`` hold two
        disjoint sets of ``sampling.num_samples`` (the truth and the truth-vs-truth floor)."""
        n = self.cfg.sampling.num_samples
        if available < 2 * n:
            raise ConfigError(f"config.sampling.num_samples={n} needs at least {2 * n} {what} (two disjoint subsets "
                              f"for the floor), found {available}")

    def batch_size(self, n: int, sampler) -> int:
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
