"""FPCD on CaloChallenge 2022 showers (datasets 2 and 3): a two-stage point-cloud model of the hit
voxels, every sampler, the challenge's evaluation, and ``--mode=generate`` in the challenge's layout.

Stage 1 (``"shower"``): a :class:`~fpcd.nets.ResMLP` score model of the per-shower globals given
the standardised log10 incident energy: log10(E_dep / E_inc), the number of hit voxels and, with
``data.layer_energies``, each layer's share of the deposited energy (standardised).

Stage 2 (``"voxels"``): a :class:`~fpcd.nets.SetTransformer` score model of the hit voxels as
points (log10 E, layer, angle, radial bin) (:mod:`fpcd.data.calochallenge_transforms`: the
indices carry a dequantisation jitter; the angle written as (cos, sin), :func:`model_points`),
standardised, each training shower turned about the axis by a random number of angular bins
(``data.rotate``), given (log10 E_inc, the globals); the number
of hits sets the mask, batches are padded to their multiplicity bucket (``data.buckets``), and with
``point_model.layer_embedding`` the model embeds the layer on its grid. Generated points are
decoded to voxels (rounded, colliding points moved to free neighbours so that a shower keeps its
number of hits), rescaled to the sampled deposited energy (and layer energies) and cut at the
readout threshold, giving ``(N, voxels)`` showers in MeV.

Evaluation (:mod:`fpcd.experiments.calochallenge_evaluation`): the challenge's high-level features,
their separation powers, FPD/KPD and classifier AUCs on high- and low-level features, each with
the truth-vs-truth floor, and the figures.
"""

from __future__ import annotations


import jax
import numpy as np

from fpcd.config import (ConfigError, require_bool, require_choice, require_float, require_int, require_ints,
                         require_range)
from fpcd.data import buckets
from fpcd.data import calochallenge as cc
from fpcd.data import calochallenge_transforms as transforms
from fpcd.data.calo import CaloChallengeSet, CaloDataError
from fpcd.data.standardisation import Standardisation
from fpcd.experiments.calochallenge_evaluation import CaloChallengeEvaluation
from fpcd.experiments.calochallenge_generation import (MIN_LAYER_SHARE, CaloChallengeGeneration, GenerationState,
                                                       rescale)
from fpcd.experiments.calochallenge_generation import read_incident_energies  # noqa: F401 (public here)
from fpcd.experiments.two_stage import TwoStageExperiment, bucketed_stage, sample_global, sample_set, split
from fpcd.runner import main_process_first

NUM_POINT_FEATURES = 5  # (log10 E, layer, cos phi, sin phi, radial): the angle as a point on the circle
LAYER_COLUMN = 1


def model_points(points, num_alpha: int, rotation=None) -> np.ndarray:
    """The model's points from voxel points ``(log10 E, layer, alpha, radial)``: the (jittered)
    angular index becomes the angle ``phi = 2 pi (alpha + 1/2) / num_alpha`` written as
    ``(cos phi, sin phi)``, so that the model sees the angle's periodicity (the first and last bins
    are neighbours). ``rotation (N,)``, in angular bins, turns each shower about the axis."""
    points = np.asarray(points, np.float64)
    alpha = points[..., 2] + (0.0 if rotation is None else np.asarray(rotation, np.float64)[:, None])
    phi = 2.0 * np.pi * (alpha + 0.5) / num_alpha
    return np.stack([points[..., 0], points[..., 1], np.cos(phi), np.sin(phi), points[..., 3]], axis=-1)


def voxel_points_of(x, num_alpha: int) -> np.ndarray:
    """Inverse of :func:`model_points` (without rotation): ``(log10 E, layer, alpha, radial)``, the
    angle taken from the direction of ``(cos, sin)`` whatever its length."""
    x = np.asarray(x, np.float64)
    phi = np.mod(np.arctan2(x[..., 3], x[..., 2]), 2.0 * np.pi)
    return np.stack([x[..., 0], x[..., 1], phi * num_alpha / (2.0 * np.pi) - 0.5, x[..., 4]], axis=-1)
DATASETS = ("2", "3")


def global_targets(showers: CaloChallengeSet, geometry, layer_energies: bool, *, max_points: int) -> np.ndarray:
    """``(N, 2 [+ layers])``: log10(E_dep / E_inc), the number of hit voxels (at most
    ``max_points``: the points a shower is modelled with) and, with ``layer_energies``, log10 of
    each layer's share of E_dep (floored at :data:`MIN_LAYER_SHARE`)."""
    total = showers.showers.astype(np.float64).sum(axis=1)
    hits = np.minimum((showers.showers > 0).sum(axis=1), max_points)
    columns = [np.log10(total / showers.incident_energies.astype(np.float64)), hits]
    out = np.stack(columns, axis=1)
    if layer_energies:
        shares = geometry.layer_energies(showers.showers.astype(np.float64)) / total[:, None]
        out = np.concatenate([out, np.log10(np.maximum(shares, MIN_LAYER_SHARE))], axis=1)
    return out


class CaloChallengeData:
    """Train/test split (the last ``data.test_fraction`` held out), the standardised stage-1 targets
    and conditions, the training showers as voxel points and their multiplicity buckets."""

    def __init__(self, cfg, showers: CaloChallengeSet, *, num_empty: int = 0):
        self.num_empty = num_empty  # showers without a hit voxel, dropped
        geometry = cc.dataset_geometry(cfg.data.dataset)
        self.train, self.test = split(showers, cfg.data.test_fraction)
        train = self.train
        counts = (train.showers > 0).sum(axis=1)
        largest = int((showers.showers > 0).sum(axis=1).max())
        max_points = int(cfg.data.max_points) or -(-largest // 8) * 8  # below the most hits: the most energetic
        counts = np.minimum(counts, max_points)
        targets = global_targets(train, geometry, bool(cfg.data.layer_energies), max_points=max_points)
        log_energy = np.log10(train.incident_energies.astype(np.float64)).reshape(-1, 1)
        noise = np.random.default_rng([cfg.seed, 7]).random((len(train), max_points, 3))
        points, mask, _ = transforms.voxel_points(train.showers, geometry, noise,
                                                  dequantisation=float(cfg.data.dequantisation), max_points=max_points)
        self.num_alpha = transforms.grid_shape(geometry)[1]
        self.raw_points = points  # voxel points: each batch turns its showers (data.rotate) before standardising
        self.rotate = bool(cfg.data.rotate)
        points = model_points(points, self.num_alpha)
        point_stats = Standardisation.fit(points[mask > 0.5])
        lengths, self.buckets = buckets.training_buckets(counts, buckets.bucket_lengths(cfg.data.buckets, max_points),
                                                         cfg.train_set.batch_size)
        self.state = GenerationState(
            dataset=cfg.data.dataset, layer_energies=bool(cfg.data.layer_energies),
            cond_stats=Standardisation.fit(log_energy), global_stats=Standardisation.fit(targets),
            point_stats=point_stats, max_points=max_points, lengths=lengths,
            energy_range_mev=(float(train.incident_energies.min()), float(train.incident_energies.max())),
            threshold_mev=float(cfg.data.threshold_mev))
        self.cond = self.state.cond_stats.apply(log_energy)
        self.globals = self.state.global_stats.apply(targets)
        self.points = np.where(mask[..., None] > 0.5, point_stats.apply(points), 0.0).astype(np.float32)
        self.mask = mask
        self.state.bounds = {"shower": (self.globals.min(axis=0), self.globals.max(axis=0)),
                             "voxels": (self.points[mask > 0.5].min(axis=0), self.points[mask > 0.5].max(axis=0))}


class CaloChallengeExperiment(CaloChallengeEvaluation, CaloChallengeGeneration, TwoStageExperiment):
    GLOBAL_STAGE, SET_STAGE = "shower", "voxels"
    GLOBAL_MODEL, SET_MODEL = "shower_model", "point_model"
    IDENTITY_FIELDS = ("experiment", "seed", "data.dataset", "data.path", "data.num_showers", "data.energy_range",
                       "data.test_fraction", "data.max_points", "data.dequantisation", "data.layer_energies", "data.rotate",
                       "data.buckets", "sde", "shower_model", "point_model", "train_set.prediction",
                       "train_global.prediction")

    def validate(self, num_devices: int) -> None:
        super().validate(num_devices)
        cfg = self.cfg
        require_choice(cfg, "data.dataset", DATASETS)
        if not cfg.data.path:
            require_int(cfg, "data.num_showers", minimum=20)
        require_range(cfg, "data.energy_range", low=0.0, high=float("inf"), unit="MeV", open_low=True)
        require_float(cfg, "data.test_fraction", low=0.05, high=0.9)
        require_int(cfg, "data.max_points", minimum=0)
        require_float(cfg, "data.dequantisation", low=0.0, high=1.0)
        require_float(cfg, "data.threshold_mev", low=0.0)
        require_bool(cfg, "data.layer_energies")
        require_bool(cfg, "data.rotate")
        require_ints(cfg, "data.buckets", minimum_count=0)
        require_bool(cfg, "point_model.layer_embedding")
        require_bool(cfg, "sampling.clip_denoised")
        require_bool(cfg, "sampling.resolve_collisions")
        self.validate_evaluation()

    # --- data ---------------------------------------------------------------------------------

    def load_showers(self) -> CaloChallengeSet:
        """The file of ``data.path`` (checked against the dataset's binning), else the built-in
        electron showers in the dataset's readout."""
        cfg = self.cfg
        geometry = cc.dataset_geometry(cfg.data.dataset)
        if cfg.data.path:
            data = cc.load(cfg.data.path, geometry)
            if float(np.median(data.incident_energies)) < 50.0:
                raise ConfigError(f"{cfg.data.path}: median incident energy {np.median(data.incident_energies):.3g}; "
                                  "CaloChallenge files are in MeV (this looks like GeV)")
            return data
        return cc.simulate(int(cfg.data.num_showers), dataset=cfg.data.dataset,
                           energy_range_mev=tuple(cfg.data.energy_range), seed=cfg.seed, progress=self.progress)

    def load_data(self) -> CaloChallengeData:
        try:
            showers = main_process_first(self.load_showers)
        except CaloDataError as err:  # the file's layout or values (CaloChallengeError among them)
            raise ConfigError(str(err)) from None
        hit = (showers.showers > 0).any(axis=1)
        if not hit.all():
            showers = showers.take(np.flatnonzero(hit))
        data = CaloChallengeData(self.cfg, showers, num_empty=int(np.sum(~hit)))
        self.require_held_out(len(data.test), "held-out showers")
        return data

    # --- models and stages --------------------------------------------------------------------

    def model_dims(self, data):
        num_global = 2 + (cc.dataset_geometry(self.cfg.data.dataset).num_layers if self.cfg.data.layer_energies else 0)
        return {"global": (num_global, 1), "set": (NUM_POINT_FEATURES, 1 + num_global)}

    def set_grid(self, data):
        """The layer's :class:`fpcd.nets.GridEmbedding` (with ``point_model.layer_embedding``); it
        undoes the layer's standardisation (a unit one without data, e.g. to count parameters)."""
        if not self.cfg.point_model.layer_embedding:
            return None
        state = None if data is None else data.state
        mean, std = (0.0, 1.0) if state is None else (state.point_stats.mean[LAYER_COLUMN],
                                                      state.point_stats.std[LAYER_COLUMN])
        return {"column": LAYER_COLUMN, "size": cc.dataset_geometry(self.cfg.data.dataset).num_layers,
                "offset": mean, "scale": std}

    def global_arrays(self, data: CaloChallengeData):
        return {"x": data.globals, "cond": data.cond}

    def set_stage(self, data: CaloChallengeData, model):
        s = self.stage_settings("set")

        def rows_batch(idx, rows, length, step):
            """With ``data.rotate`` each shower of the batch turns about the axis by a whole number
            of angular bins, drawn for the whole batch from ``(seed, step)``: the readout is
            symmetric under it, and the model learns a distribution that is too."""
            turns = np.random.default_rng([s["seed"], 13, step]).integers(0, data.num_alpha, len(idx))[rows]
            idx = idx[rows]
            mask = data.mask[idx, :length]
            if data.rotate:
                x = data.state.point_stats.apply(model_points(data.raw_points[idx, :length], data.num_alpha, turns))
                x = np.where(mask[..., None] > 0.5, x, 0.0).astype(np.float32)
            else:
                x = data.points[idx, :length]
            return {"x": x, "mask": mask, "cond": np.concatenate([data.cond[idx], data.globals[idx]], axis=1)}

        return bucketed_stage(s["name"], model, s["section"], s["key"], seed=s["seed"], bucket_of=data.buckets,
                              lengths=data.state.lengths, rows_batch=rows_batch)

    def training_examples(self, data: CaloChallengeData):
        return {"train_global": len(data.globals), "train_set": len(data.points)}

    # --- generation ---------------------------------------------------------------------------

    def generate(self, data, models, group, run, key, sampler, incident_energies=None):
        """Showers at the first ``sampling.num_samples`` held-out incident energies (or the given ones)."""
        if incident_energies is None:
            incident_energies = data.test.incident_energies[:self.cfg.sampling.num_samples]
        return self.generate_showers(data.state, models, run, key, sampler, incident_energies)

    def generate_showers(self, state: GenerationState, models, run, key, sampler, incident_energies):
        """``(arrays, info)``: showers at ``incident_energies`` (MeV) through both stages, in the
        challenge's layout (``incident_energies (N, 1)``, ``showers (N, voxels)``, float32 MeV) with
        ``finite`` (False where a stage's output was not finite: an empty shower)."""
        cfg = self.cfg
        energies = np.asarray(incident_energies, np.float64).reshape(-1)
        n = len(energies)
        k_global, k_set = jax.random.split(key)
        clip = cfg.sampling.clip_denoised
        cond = state.conditions(energies)
        global_std, nfe_global, seconds_global = sample_global(
            sampler, models[self.GLOBAL_STAGE], self.sde, run, k_global, prediction=cfg.train_global.prediction,
            num_samples=n, batch_size=self.batch_size(n, sampler), num_features=state.num_global,
            description="sample shower globals", conditions=cond,
            x0_bounds=state.bounds.get("shower") if clip else None)
        finite = np.all(np.isfinite(global_std), axis=1)
        globals_ = state.global_stats.invert(np.where(finite[:, None], global_std, 0.0))
        total = energies * 10.0 ** np.clip(globals_[:, 0], -3.0, 0.5)
        counts = np.clip(np.rint(globals_[:, 1]), 1, state.max_points).astype(np.int64)
        globals_[:, 1] = counts  # the set stage sees the rounded multiplicity, as in training
        cond2 = np.concatenate([cond, state.global_stats.apply(globals_)], axis=1).astype(np.float32)
        points, nfe, seconds = sample_set(
            sampler, models[self.SET_STAGE], self.sde, run, k_set, prediction=cfg.train_set.prediction, counts=counts,
            max_length=state.max_points, num_features=NUM_POINT_FEATURES, conditions=cond2,
            batch_size=lambda rows: self.batch_size(rows, sampler), description="sample voxels",
            lengths=state.lengths, x0_bounds=state.bounds.get("voxels") if clip else None)
        finite &= np.all(np.isfinite(points), axis=(1, 2))
        points = voxel_points_of(state.point_stats.invert(np.where(finite[:, None, None], points, 0.0)),
                                 transforms.grid_shape(state.geometry)[1])
        mask = (np.arange(state.max_points)[None, :] < counts[:, None]) & finite[:, None]
        showers = transforms.voxels_from_points(points, mask, state.geometry,
                                                resolve_collisions=bool(cfg.sampling.resolve_collisions))
        showers = rescale(showers, state, total, globals_ if state.layer_energies else None)
        showers[~finite] = 0.0
        seconds_total = seconds + seconds_global
        info = {"nfe": nfe, "nfe_shower_stage": nfe_global, "seconds_shower_stage": seconds_global,
                "seconds": seconds_total, "seconds_voxel_stage": seconds, "ms_per_shower": 1000.0 * seconds_total / n,
                "num_nonfinite": int(np.sum(~finite))}
        return {"incident_energies": energies.astype(np.float32).reshape(-1, 1), "showers": showers,
                "finite": finite}, info
