"""The two-stage layer that the point-cloud experiments share (FPCD, Mikuni, Nachman, Pettee 2023).

A two-stage model generates one event (a jet, a shower, a collision) in two steps:

1. the **global stage**: a :class:`~fpcd.nets.ResMLP` score model of a few per-event features
   (jet pT, mass and multiplicity; shower energy and number of cells; the scattered electron),
   optionally conditioned (jet type, beam momentum and angle);
2. the **set stage**: a :class:`~fpcd.nets.SetTransformer` score model of the event's points
   (particles, cells) conditioned on the global features, whose multiplicity sets the mask of
   padded points. With *buckets* every batch is padded only to the smallest bucket length that
   holds its events, in training and in sampling.

This module holds the pieces every two-stage experiment composes, so that an experiment module
keeps only what is its own physics (its data, its features, its evaluators):

* :class:`TwoStageExperiment`: the base class. It names the two stages and their config sections
  (``train_global`` / ``train_set``, models ``global_model`` / ``set_model`` unless a subclass
  names them after its physics), builds both models from their config sections, checks them, and
  builds the runner's :class:`~fpcd.runner.Stage` objects from the hooks :meth:`global_arrays` and
  :meth:`set_batch`.
* :func:`array_stage` and :func:`bucketed_stage`: a runner :class:`~fpcd.runner.Stage` whose
  batches are rows of arrays, or bucketed rows of variable-length sets.
* :func:`sample_global` and :func:`sample_set`: one sampler run through each stage, on every
  device, bucketed or not.
* :func:`split`, :func:`run_row`, :func:`classifier`, :func:`table_cell`, :func:`resmlp_from`,
  :func:`set_transformer_from`: the train/test split, the metrics row of a sampler run, the
  classifier AUC of ``config.eval.classifier``, a console table cell, models from config sections.

Adding an experiment: see ``README.md`` ("Adding an experiment") and ``tests/toy_experiment.py``.
"""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np

from fpcd.config import require_models
from fpcd.data import buckets
from fpcd.metrics.classifier import classifier_auc
from fpcd.nets import ResMLP, SetTransformer, score_fn_from
from fpcd.runner import Experiment, Stage
from fpcd.train import batch_indices


# --- small shared pieces --------------------------------------------------------------------------


def split(items, test_fraction: float):
    """``(train, test)`` of anything with ``len`` and ``take(slice)``: the last ``test_fraction``
    of the items (rounded) is the test split, as in FPCD."""
    cut = int(round(len(items) * (1.0 - test_fraction)))
    return items.take(slice(0, cut)), items.take(slice(cut, None))


def run_row(samples) -> dict:
    """The first fields of a sampler run's row in ``metrics.json``: its method, its options and
    its info (NFE, seconds, ...), from a :class:`~fpcd.runner.RunSamples`."""
    return {"method": samples.run["method"], "options": {k: v for k, v in samples.run.items() if k != "method"},
            **samples.info}


def classifier(cfg, truth, generated) -> dict:
    """:func:`fpcd.metrics.classifier.classifier_auc` of ``truth`` vs ``generated`` (rows of
    features) with the settings of ``config.eval.classifier`` and the seed ``config.eval.seed``."""
    c = cfg.eval.classifier
    return classifier_auc(truth, generated, seed=int(cfg.eval.seed), hidden=tuple(c.hidden), epochs=c.epochs,
                          batch_size=c.batch_size, learning_rate=c.learning_rate)


def table_cell(value, width: int, digits: int) -> str:
    """A right-aligned console table cell: ``value`` with ``digits`` decimals, ``-`` for None."""
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.{digits}f}"


def resmlp_from(section, num_features: int, *, cond_dim: int = 0, key) -> ResMLP:
    """A :class:`~fpcd.nets.ResMLP` from a model config section (``width``, ``depth``, ``fourier_scale``)."""
    return ResMLP(num_features, width=section.width, depth=section.depth, cond_dim=cond_dim,
                  fourier_scale=section.fourier_scale, key=key)


def set_transformer_from(section, num_features: int, *, cond_dim: int, key, grid=None) -> SetTransformer:
    """A :class:`~fpcd.nets.SetTransformer` from a model config section (``width``, ``depth``,
    ``num_heads``, ``mlp_ratio``, ``fourier_scale``); ``grid`` as in the SetTransformer."""
    return SetTransformer(num_features, width=section.width, depth=section.depth, num_heads=section.num_heads,
                          mlp_ratio=section.mlp_ratio, cond_dim=cond_dim, fourier_scale=section.fourier_scale,
                          grid=grid, key=key)


def lengths_mask(counts, length: int) -> np.ndarray:
    """``(N, length)`` float32 mask whose row ``i`` has its first ``counts[i]`` entries set."""
    return (np.arange(length)[None, :] < np.asarray(counts)[:, None]).astype(np.float32)


# --- training stages ------------------------------------------------------------------------------


def array_stage(name: str, model, section, key, *, seed: int, arrays: dict, transform: Callable | None = None,
                probe: bool = True) -> Stage:
    """A :class:`~fpcd.runner.Stage` whose batch at ``step`` is the rows
    ``batch_indices(seed, step, N, section.batch_size)`` of every array of ``arrays`` (``"x"``,
    and optionally ``"mask"``, ``"cond"``; all of ``N`` rows).

    Args:
      transform: ``(batch, step, rows) -> batch`` applied to the rows ``rows`` of the batch (e.g.
        dequantisation noise drawn from ``(seed, step)``).
      probe: give the stage a probe batch (the batch of step 0), so that the runner records the
        compiled train step's memory.
    """
    num_examples = len(arrays["x"])

    def batch(step, rows):
        idx = batch_indices(seed, step, num_examples, section.batch_size)[rows]
        out = {k: a[idx] for k, a in arrays.items()}
        return out if transform is None else transform(out, step, rows)

    return Stage(name, model, section, key, batch, (lambda rows: batch(0, rows)) if probe else None)


def bucketed_stage(name: str, model, section, key, *, seed: int, bucket_of: np.ndarray, lengths: tuple,
                   rows_batch: Callable) -> Stage:
    """A :class:`~fpcd.runner.Stage` of variable-length sets trained bucket by bucket: the batch at
    ``step`` is ``rows_batch(indices, rows, length, step)``, where ``indices`` are the events of
    :func:`~fpcd.data.buckets.bucketed_batch` (all of the global batch, so that noise drawn
    per batch is the same on every process), ``rows`` this process's rows of them and ``length``
    the bucket's padded length. Its probe batch is padded to the longest bucket (the peak memory)."""

    def batch(step, rows, length=None):
        bucket, idx = buckets.bucketed_batch(seed, step, bucket_of, section.batch_size)
        return rows_batch(idx, rows, length or lengths[bucket], step)

    return Stage(name, model, section, key, batch, lambda rows: batch(0, rows, lengths[-1]))


# --- sampling -------------------------------------------------------------------------------------


def sample_global(sampler, model, sde, run: dict, key, *, prediction: str, num_samples: int, batch_size: int,
                  num_features: int, description: str, conditions=None, x0_bounds=None):
    """One sampler ``run`` of the global stage: ``(x (num_samples, num_features), nfe, seconds)``
    (the runner's :class:`~fpcd.runner.BatchSampler`), conditioned on the rows of ``conditions``."""
    return sampler(lambda cond, mask: score_fn_from(model, sde, prediction=prediction, cond=cond, x0_bounds=x0_bounds),
                   key, num_samples=num_samples, batch_size=batch_size, sample_shape=(num_features,), run=run,
                   description=description, conditions=conditions)


def sample_set(sampler, model, sde, run: dict, key, *, prediction: str, counts, max_length: int, num_features: int,
               conditions, batch_size: Callable[[int], int], description: str, lengths: tuple | None = None,
               x0_bounds=None):
    """One sampler ``run`` of the set stage for events of ``counts`` points each.

    Without ``lengths`` every event is padded to ``max_length`` and drawn with ``key``; with
    bucket ``lengths`` (increasing, the last ``>= counts.max()``) the events of bucket ``b`` are
    padded to ``lengths[b]`` and drawn with ``fold_in(key, b)``.

    Args:
      conditions: ``(N, C)`` host array, the set model's condition of each event.
      batch_size: ``number of events -> sampling batch`` (e.g. :meth:`~fpcd.runner.Experiment.batch_size`).

    Returns:
      ``(x (N, max_length, num_features) with zeros past each length, nfe, seconds)``: the largest
      NFE of a bucket and the sampling seconds of all buckets.
    """
    counts = np.asarray(counts)

    def draw(rows, length, k, label):
        return sampler(lambda cond, mask: score_fn_from(model, sde, prediction=prediction, mask=mask, cond=cond,
                                                        x0_bounds=x0_bounds),
                       k, num_samples=len(rows), batch_size=batch_size(len(rows)),
                       sample_shape=(length, num_features), run=run, description=label,
                       conditions=conditions[rows], mask=lengths_mask(counts[rows], length))

    if lengths is None:
        return draw(np.arange(len(counts)), max_length, key, description)
    x = np.zeros((len(counts), max_length, num_features), np.float32)
    bucket = np.searchsorted(lengths, counts)
    seconds, nfe = 0.0, 0
    for b, length in enumerate(lengths):
        rows = np.flatnonzero(bucket == b)
        if not len(rows):
            continue
        x_b, nfe_b, seconds_b = draw(rows, length, jax.random.fold_in(key, b), f"{description} (<= {length})")
        x[rows, :length] = x_b
        nfe, seconds = max(nfe, nfe_b), seconds + seconds_b
    return x, nfe, seconds


# --- the base class -------------------------------------------------------------------------------


class TwoStageExperiment(Experiment):
    """An experiment of one global stage and one set stage (see the module docstring).

    A subclass names its stages and sections (class attributes below), implements the hooks
    :meth:`model_dims`, :meth:`global_arrays` and :meth:`set_stage` besides the runner's
    (:meth:`~fpcd.runner.Experiment.load_data`, :meth:`~fpcd.runner.Experiment.generate`,
    :meth:`~fpcd.runner.Experiment.evaluators`, :meth:`~fpcd.runner.Experiment.format_results`),
    and samples with :func:`sample_global` and :func:`sample_set`.

    Attributes:
      GLOBAL_STAGE, SET_STAGE: the stages' names (checkpoint directories, ``models[name]``).
      GLOBAL_MODEL, SET_MODEL: their model config sections.
      GLOBAL_TRAIN, SET_TRAIN: their training config sections (``TRAIN_SECTIONS``; the root key's
        ``KEY_NAMES`` hold them at indices 1 and 2).
      GLOBAL_SEED_OFFSET, SET_SEED_OFFSET: each stage's data order is seeded by
        ``config.seed + offset``.
      RECORD_MEMORY: give the stages built here probe batches, so that the runner records each
        compiled train step's memory in ``train_info.json``.
    """

    GLOBAL_STAGE = "global"
    SET_STAGE = "set"
    GLOBAL_MODEL = "global_model"
    SET_MODEL = "set_model"
    GLOBAL_TRAIN = "train_global"
    SET_TRAIN = "train_set"
    KEY_NAMES = ("models", "train_global", "train_set", "sampling")
    TRAIN_SECTIONS = ("train_global", "train_set")
    GLOBAL_SEED_OFFSET = 0
    SET_SEED_OFFSET = 1
    RECORD_MEMORY = True

    def validate(self, num_devices: int) -> None:
        super().validate(num_devices)
        require_models(self.cfg, self.GLOBAL_MODEL, self.SET_MODEL)

    # hooks ------------------------------------------------------------------------------------

    def model_dims(self, data) -> dict:
        """``{"global": (num_features, cond_dim), "set": (num_features, cond_dim)}`` of the two models;
        ``data`` may be None (e.g. to count parameters)."""
        raise NotImplementedError

    def set_grid(self, data):
        """The set model's ``grid`` (:class:`fpcd.nets.GridEmbedding` settings) or None."""
        return None

    def global_arrays(self, data) -> dict:
        """The global stage's training arrays: ``{"x": (N, D)}`` and optionally ``"cond"``."""
        raise NotImplementedError

    def set_stage(self, data, model) -> Stage:
        """The set stage (:func:`bucketed_stage` or :func:`array_stage` named :attr:`SET_STAGE`)."""
        raise NotImplementedError

    # built from the hooks ---------------------------------------------------------------------

    def stage_settings(self, which: str) -> dict:
        """``name, section, key, seed`` of the ``"global"`` or ``"set"`` stage, for the Stage builders."""
        stage, train, offset = ((self.GLOBAL_STAGE, self.GLOBAL_TRAIN, self.GLOBAL_SEED_OFFSET) if which == "global"
                                else (self.SET_STAGE, self.SET_TRAIN, self.SET_SEED_OFFSET))
        return {"name": stage, "section": self.cfg[train], "key": self.key(train), "seed": self.cfg.seed + offset}

    def models(self, data=None):
        """``(global model, set model)`` as initialised from ``key("models")``."""
        dims = self.model_dims(data)
        k_global, k_set = jax.random.split(self.key("models"))
        global_model = resmlp_from(self.cfg[self.GLOBAL_MODEL], dims["global"][0], cond_dim=dims["global"][1],
                                   key=k_global)
        set_model = set_transformer_from(self.cfg[self.SET_MODEL], dims["set"][0], cond_dim=dims["set"][1],
                                         grid=self.set_grid(data), key=k_set)
        return global_model, set_model

    def global_stage(self, data, model) -> Stage:
        """The global stage: rows of :meth:`global_arrays` (:func:`array_stage`)."""
        s = self.stage_settings("global")
        return array_stage(s["name"], model, s["section"], s["key"], seed=s["seed"], arrays=self.global_arrays(data),
                           probe=self.RECORD_MEMORY)

    def stages(self, data):
        global_model, set_model = self.models(data)
        return self.global_stage(data, global_model), self.set_stage(data, set_model)

    def generation_stages(self, data):
        """Both stages as model templates, from the data of ``--mode=generate`` (no training batches)."""
        global_model, set_model = self.models(data)

        def no_batches(step, rows):
            raise RuntimeError("--mode=generate has no training data")

        return tuple(Stage(s["name"], model, s["section"], s["key"], no_batches)
                     for s, model in ((self.stage_settings("global"), global_model),
                                      (self.stage_settings("set"), set_model)))
