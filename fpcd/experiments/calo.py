"""FPCD on calorimeter showers: a two-stage point-cloud model (or a voxel-image model), every
sampler, shower observables, a classifier AUC and the point-cloud vs image comparison.

Stage 1 (``"cluster"``): a :class:`~fpcd.nets.ResMLP` score model of the shower-level features
(log10 total deposited energy, number of hit cells), standardised, given the standardised
(log10 P_gen, theta_gen).

Stage 2, ``representation="cloud"`` (``"cells"``): a :class:`~fpcd.nets.SetTransformer` score
model of the hit cells given (log10 P, theta, log10 sum E, N_cells); N_cells sets the mask. Cell
features and digitisation are those of :mod:`fpcd.data.calo_transforms`, the N_cells buckets those
of :mod:`fpcd.data.buckets`; the energies of generated cells are scaled so the cells sum to the
stage-1 total.

Stage 2, ``representation="image"`` (``"image"``): a :class:`~fpcd.unet.UNet3D` score model of
the 11x11x11 voxel image (5x5x5 cells per voxel) as ``log10(voxel / sum + 1e-6)``, standardised,
given the same conditions. Generated images are mapped back, clipped at 0, renormalised, scaled to
the stage-1 total, and voxels below the cell threshold are zeroed.

Evaluation on held-out showers (the generated ones use the held-out showers' P_gen and theta):
observables of :mod:`fpcd.metrics.calo` at the cell level (point clouds only) and the voxel level
(both), their W1 and the truth-vs-truth floor, classifier AUCs on high-level observables and on
voxel images, NFE and wall time per sampler run, the parameters / train-step memory / training
seconds / ms per shower summary, and, when the other representation's run exists
(``eval.compare_with``), the comparison table. Outputs: ``metrics.json``, ``samples.h5``,
``observables_*.png``, ``profiles_*.png``, ``nfe_vs_w1.png``, ``comparison.{json,md}``.
"""

from __future__ import annotations

import jax
import numpy as np

from fpcd.config import (ConfigError, require_bool, require_choice, require_classifier, require_float,
                         require_increasing, require_int, require_ints, require_range)
from fpcd.data import buckets
from fpcd.data import calo_transforms as transforms
from fpcd.data.calo import EPIC_FORWARD_HCAL, CaloChallengeSet, CaloDataError, from_voxels, load, simulate, to_voxels
from fpcd.data.standardisation import Standardisation, feature_bounds
from fpcd.experiments.calo_evaluation import (GROUP, CaloEvaluation, comparison_table,  # noqa: F401 (public here)
                                              voxel_observables, w1_block)
from fpcd.experiments.calo_generation import CaloGeneration
from fpcd.experiments.two_stage import (TwoStageExperiment, array_stage, bucketed_stage, resmlp_from, sample_global,
                                        sample_set, split)
from fpcd.nets import score_fn_from
from fpcd.unet import UNet3D

REPRESENTATIONS = ("cloud", "image")
NUM_CELL_FEATURES = 4
LAYER = 3  # the layer's column in the cell features (log10 E, dx, dy, layer)


class CaloData:
    """Train/test split, stage-1 targets and conditions (standardised), stage-2 inputs."""

    def __init__(self, cfg, showers):
        has_cells = showers.cluster[:, 3] >= 1
        self.num_empty = int(np.sum(~has_cells))
        showers = showers.take(np.nonzero(has_cells)[0])
        self.train, self.test = split(showers, cfg.data.test_fraction)
        cut = len(self.train)
        counts = showers.mask.sum(axis=1)
        largest = int(counts.max())
        self.max_cells = int(cfg.data.max_cells) or -(-largest // 8) * 8
        if largest > self.max_cells:
            raise ConfigError(f"config.data.max_cells={cfg.data.max_cells} is below the largest shower "
                              f"({largest} cells); use 0 (automatic) or a larger value")
        self.phi = float(cfg.data.phi)
        self.dequantisation = float(cfg.data.dequantisation)
        self.cluster_stats = Standardisation.fit(transforms.cluster_targets(self.train))
        self.cond_stats = Standardisation.fit(transforms.conditions(self.train.momentum, self.train.theta))
        self.cluster = self.cluster_stats.apply(transforms.cluster_targets(self.train))
        self.cond = self.cond_stats.apply(transforms.conditions(self.train.momentum, self.train.theta))
        self.bounds = {"cluster": feature_bounds(self.cluster)}  # the boxes of sampling.clip_denoised
        cells = self.train.cells[:, :self.max_cells]
        self.cells = np.pad(cells, ((0, 0), (0, self.max_cells - cells.shape[1]), (0, 0)))
        if cfg.representation == "cloud":
            noise = np.random.default_rng([cfg.seed, 7]).random(self.cells.shape[:2] + (3,))
            raw = transforms.cell_features(self.cells, self.train.theta, noise, phi_deg=self.phi,
                                           dequantisation=self.dequantisation)
            self.cell_stats = Standardisation.fit(raw[self.cells[..., 4] > 0.5])
            self.bounds["cells"] = feature_bounds(self.cell_stats.apply(raw), self.cells[..., 4])
            self.lengths, self.buckets = buckets.training_buckets(
                counts[:cut], buckets.bucket_lengths(cfg.data.buckets, self.max_cells), cfg.train_set.batch_size)
        else:
            logs = transforms.image_to_log_fractions(to_voxels(self.train.cells, group=GROUP))
            self.image_stats = Standardisation.fit(logs.ravel())
            self.images = self.image_stats.apply(logs)
            self.image_shape = self.images.shape[1:]
            self.bounds["image"] = (np.float32(self.images.min()), np.float32(self.images.max()))

    def stage2_cond(self, cluster_std, cond_std):
        return np.concatenate([cond_std, cluster_std], axis=1).astype(np.float32)

    def cloud_batch(self, seed: int, idx, rows: slice, length: int, step: int):
        """Rows ``rows`` of the bucketed training batch of events ``idx`` at ``step``, padded to
        ``length``; the dequantisation noise is drawn for the whole batch from ``(seed, step)``."""
        noise = np.random.default_rng([seed, 11, step]).random((len(idx), length, 3))[rows]
        idx = idx[rows]
        cells = self.cells[idx, :length]
        if cells.shape[1] < length:
            cells = np.pad(cells, ((0, 0), (0, length - cells.shape[1]), (0, 0)))
        raw = transforms.cell_features(cells, self.train.theta[idx], noise, phi_deg=self.phi,
                                       dequantisation=self.dequantisation)
        mask = cells[..., 4].astype(np.float32)
        x = np.where(mask[..., None] > 0, self.cell_stats.apply(raw), 0.0).astype(np.float32)
        return {"x": x, "mask": mask, "cond": self.stage2_cond(self.cluster[idx], self.cond[idx])}


class CaloExperiment(CaloEvaluation, CaloGeneration, TwoStageExperiment):
    GLOBAL_STAGE, SET_STAGE = "cluster", "cells"
    GLOBAL_MODEL, SET_MODEL = "cluster_model", "cell_model"
    IDENTITY_FIELDS = ("experiment", "seed", "representation", "data", "sde", "cluster_model", "cell_model",
                       "image_model", "train_set.prediction", "train_global.prediction")
    FIELDS_ADDED_LATER = {"cell_model.layer_embedding": False}  # runs saved before it had no layer embedding
    FIELDS_RENAMED = {"train_cluster": "train_global", "train": "train_set"}  # the stage sections' old names

    @property
    def stage2(self) -> str:
        return "cells" if self.cfg.representation == "cloud" else "image"

    def validate(self, num_devices: int) -> None:
        super().validate(num_devices)
        cfg = self.cfg
        require_choice(cfg, "representation", REPRESENTATIONS)
        if not cfg.data.path:
            require_int(cfg, "data.num_showers", minimum=20)
        require_range(cfg, "data.momentum_range", low=0.0, high=float("inf"), unit="GeV", open_low=True)
        require_range(cfg, "data.theta_range", low=0.0, high=60.0, unit="deg")
        require_float(cfg, "data.test_fraction", low=0.05, high=0.9)
        require_int(cfg, "data.max_cells", minimum=0)
        require_float(cfg, "data.dequantisation", low=0.0, high=1.0)
        require_ints(cfg, "data.buckets", minimum_count=0)
        require_bool(cfg, "cell_model.layer_embedding")
        require_bool(cfg, "sampling.clip_denoised")
        require_choice(cfg, "sampling.collision_metric", transforms.COLLISION_METRICS)
        require_ints(cfg, "image_model.channels")
        require_int(cfg, "image_model.context_width")
        require_increasing(cfg, "eval.momentum_bins", minimum_count=2)
        require_classifier(cfg)

    def load_data(self) -> CaloData:
        """The real file when ``data.path`` is set (point-cloud layout), else simulated showers."""
        cfg = self.cfg
        if cfg.data.path:
            try:
                showers = load(cfg.data.path)
            except CaloDataError as err:
                raise ConfigError(str(err)) from None
            if isinstance(showers, CaloChallengeSet):
                raise ConfigError(f"{cfg.data.path}: a CaloChallenge file (incident_energies, showers); "
                                  "fpcd.data.calo.load reads it, but the calo experiment needs the point-cloud "
                                  "layout (hcal_cells, cluster)")
        else:
            showers = simulate(cfg.data.num_showers, momentum_range=tuple(cfg.data.momentum_range),
                               theta_range=tuple(cfg.data.theta_range), phi=cfg.data.phi, seed=cfg.seed,
                               progress=self.progress)
        data = CaloData(cfg, showers)
        self.require_held_out(len(data.test), "held-out showers")
        return data

    def model_dims(self, data):
        return {"global": (2, 2), "set": (NUM_CELL_FEATURES, 4)}

    def set_grid(self, data: CaloData | None):
        """With ``cell_model.layer_embedding`` the set model embeds each point's layer
        (:class:`fpcd.nets.GridEmbedding` over the 55 layers), which needs the layer's
        standardisation from ``data`` (without data, e.g. to count parameters, a unit one)."""
        if not self.cfg.cell_model.layer_embedding:
            return None
        mean, std = (0.0, 1.0) if data is None else (data.cell_stats.mean[LAYER], data.cell_stats.std[LAYER])
        return {"column": LAYER, "size": EPIC_FORWARD_HCAL.num_layers, "offset": mean, "scale": std}

    def models(self, data: CaloData | None = None):
        """(cluster model, stage-2 model) as initialised: the set model of the point cloud, or the
        3-D U-Net of the voxel image."""
        if self.cfg.representation == "cloud":
            return super().models(data)
        k_cluster, k_stage2 = jax.random.split(self.key("models"))
        m = self.cfg.image_model
        shape = (EPIC_FORWARD_HCAL.num_layers // GROUP,) + (EPIC_FORWARD_HCAL.num_cells // GROUP,) * 2
        return (resmlp_from(self.cfg.cluster_model, 2, cond_dim=2, key=k_cluster),
                UNet3D(shape, channels=tuple(m.channels), cond_dim=4, context_width=m.context_width,
                       fourier_scale=m.fourier_scale, key=k_stage2))

    def global_arrays(self, data: CaloData):
        return {"x": data.cluster, "cond": data.cond}

    def set_stage(self, data: CaloData, model):
        s = self.stage_settings("set")
        if self.cfg.representation == "cloud":
            return bucketed_stage(s["name"], model, s["section"], s["key"], seed=s["seed"], bucket_of=data.buckets,
                                  lengths=data.lengths,
                                  rows_batch=lambda idx, rows, length, step: data.cloud_batch(s["seed"], idx, rows,
                                                                                              length, step))
        return array_stage("image", model, s["section"], s["key"], seed=s["seed"],
                           arrays={"x": data.images, "cond": data.stage2_cond(data.cluster, data.cond)})

    def training_examples(self, data: CaloData):
        return {"train_global": len(data.cluster),
                "train_set": len(data.cells) if self.cfg.representation == "cloud" else len(data.images)}

    def generate(self, data: CaloData, models, group, run, key, sampler, momentum=None, theta=None):
        """One shower per held-out (momentum, theta) (or the given ones) through both stages."""
        cfg = self.cfg
        if momentum is None:
            truth = data.test.take(slice(0, cfg.sampling.num_samples))
            momentum, theta = truth.momentum, truth.theta
        n = len(momentum)
        k_cluster, k_stage2 = jax.random.split(key)
        cond_std = data.cond_stats.apply(transforms.conditions(momentum, theta))
        cluster_std, nfe_cluster, seconds_cluster = sample_global(
            sampler, models["cluster"], self.sde, run, k_cluster, prediction=cfg.train_global.prediction,
            num_samples=n, batch_size=self.batch_size(n, sampler), num_features=2,
            description="sample cluster features", conditions=cond_std, x0_bounds=self.x0_bounds(data, "cluster"))
        finite = np.all(np.isfinite(cluster_std), axis=1)
        cluster = data.cluster_stats.invert(np.where(finite[:, None], cluster_std, 0.0))
        total_energy = 10.0 ** np.clip(cluster[:, 0], -6, 3)
        num_cells = np.clip(np.rint(cluster[:, 1]), 1, data.max_cells).astype(np.int64)
        cluster[:, 1] = num_cells
        cond2 = data.stage2_cond(data.cluster_stats.apply(cluster), cond_std)
        if cfg.representation == "cloud":
            cells, images, finite, seconds, nfe = self._generate_cells(data, models, run, k_stage2, sampler, cond2,
                                                                       num_cells, theta, total_energy, finite)
        else:
            cells, images, finite, seconds, nfe = self._generate_images(data, models, run, k_stage2, sampler, cond2,
                                                                        total_energy, finite)
        cells[~finite] = 0.0
        images[~finite] = 0.0
        total = seconds + seconds_cluster
        info = {"nfe": nfe, "nfe_cluster_stage": nfe_cluster, "seconds_cluster_stage": seconds_cluster,
                "seconds": total, "seconds_stage2": seconds, "ms_per_shower": 1000.0 * total / n,
                "num_nonfinite": int(np.sum(~finite))}
        arrays = {"hcal_cells": cells, "cluster": transforms.cells_to_cluster(cells, momentum, theta),
                  "voxels": images, "finite": finite}
        return arrays, info

    def x0_bounds(self, data: CaloData, stage: str):
        """The box a stage's denoised estimate is clipped to while sampling (the range of its
        standardised training data), or None without ``sampling.clip_denoised``."""
        return data.bounds[stage] if self.cfg.sampling.clip_denoised else None

    def _generate_cells(self, data, models, run, key, sampler, cond2, num_cells, theta, total_energy, finite):
        cfg = self.cfg
        features, nfe, seconds = sample_set(
            sampler, models["cells"], self.sde, run, key, prediction=cfg.train_set.prediction, counts=num_cells,
            max_length=data.max_cells, num_features=NUM_CELL_FEATURES, conditions=cond2,
            batch_size=lambda rows: self.batch_size(rows, sampler), description="sample cells",
            lengths=data.lengths, x0_bounds=self.x0_bounds(data, "cells"))
        finite &= np.all(np.isfinite(features), axis=(1, 2))
        features = np.where(finite[:, None, None], features, 0.0)
        mask = np.arange(data.max_cells)[None, :] < num_cells[:, None]
        cells = transforms.cells_from_features(data.cell_stats.invert(features), mask & finite[:, None], theta,
                                               total_energy, data.max_cells, phi_deg=data.phi,
                                               resolve_collisions=cfg.sampling.resolve_collisions,
                                               collision_metric=cfg.sampling.collision_metric)
        return cells, to_voxels(cells, group=GROUP), finite, seconds, nfe

    def _generate_images(self, data, models, run, key, sampler, cond2, total_energy, finite):
        cfg, n = self.cfg, len(cond2)
        x, nfe, seconds = sampler(
            lambda cond, mask: score_fn_from(models["image"], self.sde, prediction=cfg.train_set.prediction, cond=cond,
                                             x0_bounds=self.x0_bounds(data, "image")),
            key, num_samples=n, batch_size=self.batch_size(n, sampler), sample_shape=data.image_shape, run=run,
            description="sample voxel images", conditions=cond2)
        finite &= np.all(np.isfinite(x), axis=(1, 2, 3))
        logs = data.image_stats.invert(np.where(finite[:, None, None, None], x, -10.0))
        images = transforms.log_fractions_to_image(logs, total_energy)
        images = np.where(images > EPIC_FORWARD_HCAL.threshold_mev * 1e-3, images, 0.0).astype(np.float32)
        return from_voxels(images, group=GROUP), images, finite, seconds, nfe
