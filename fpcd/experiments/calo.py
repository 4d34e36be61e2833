"""FPCD on calorimeter showers: a two-stage point-cloud model (or a voxel-image model), every
sampler, shower observables, a classifier AUC and the point-cloud vs image comparison.

Stage 1 (``"cluster"``): a :class:`~fpcd.nets.ResMLP` score model of the shower-level features
(log10 total deposited energy, number of hit cells), standardised, given the standardised
(log10 P_gen, theta_gen).

Stage 2, ``representation="cloud"`` (``"cells"``): a :class:`~fpcd.nets.SetTransformer` score
model of the hit cells given (log10 P, theta, log10 sum E, N_cells); N_cells sets the mask. Cell
features, digitisation and N_cells buckets are those of :mod:`fpcd.data.calo_transforms`; the
energies of generated cells are scaled so the cells sum to the stage-1 total.

Stage 2, ``representation="image"`` (``"image"``): a :class:`~fpcd.nets.UNet3D` score model of
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

import os
import resource

import jax
import numpy as np

from fpcd.config import (ConfigError, require_choice, require_classifier, require_float, require_increasing, require_int,
                         require_bool, require_ints, require_models, require_range)
from fpcd.data import calo_transforms as transforms
from fpcd.data.calo import EPIC_FORWARD_HCAL, CaloChallengeSet, CaloDataError, load, simulate, to_voxels, from_voxels
from fpcd.data.standardisation import Standardisation, feature_bounds
from fpcd.io import atomic_write, write_json
from fpcd.metrics import calo as calo_metrics
from fpcd.nets import ResMLP, SetTransformer, UNet3D, count_parameters, score_fn_from
from fpcd.plots.calo import observables_by_momentum, profiles_by_momentum
from fpcd.plots.common import nfe_vs_w1
from fpcd.runner import TRAIN_INFO_FILE, Experiment, Stage, is_student, read_json
from fpcd.train import batch_indices

REPRESENTATIONS = ("cloud", "image")
GROUP = 5  # cells per voxel along each axis
NUM_CELL_FEATURES = 4
LAYER = 3  # the layer's column in the cell features (log10 E, dx, dy, layer)


class PreparedData:
    """Train/test split, stage-1 targets and conditions (standardised), stage-2 inputs."""

    def __init__(self, cfg, showers):
        has_cells = showers.cluster[:, 3] >= 1
        self.num_empty = int(np.sum(~has_cells))
        showers = showers.take(np.nonzero(has_cells)[0])
        cut = int(round(len(showers) * (1.0 - cfg.data.test_fraction)))
        self.train, self.test = showers.take(slice(0, cut)), showers.take(slice(cut, None))
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
            self.lengths, self.buckets = transforms.training_buckets(
                counts[:cut], transforms.bucket_lengths(cfg.data.buckets, self.max_cells), cfg.train.batch_size)
        else:
            logs = transforms.image_to_log_fractions(to_voxels(self.train.cells, group=GROUP))
            self.image_stats = Standardisation.fit(logs.ravel())
            self.images = self.image_stats.apply(logs)
            self.bounds["image"] = (np.float32(self.images.min()), np.float32(self.images.max()))

    def stage2_cond(self, cluster_std, cond_std):
        return np.concatenate([cond_std, cluster_std], axis=1).astype(np.float32)

    def cloud_batch(self, seed: int, step: int, batch_size: int, rows: slice = slice(None), length=None):
        """Rows ``rows`` of the bucketed training batch at ``step`` (padded to ``length``, default
        its bucket's)."""
        bucket, idx = transforms.bucketed_batch(seed, step, self.buckets, batch_size)
        length = length or self.lengths[bucket]
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


class CaloExperiment(Experiment):
    KEY_NAMES = ("models", "train_cluster", "train", "sampling")
    IDENTITY_FIELDS = ("experiment", "seed", "representation", "data", "sde", "cluster_model", "cell_model",
                       "image_model", "train.prediction", "train_cluster.prediction")
    FIELDS_ADDED_LATER = {"cell_model.layer_embedding": False}  # runs saved before it had no layer embedding
    TRAIN_SECTIONS = ("train_cluster", "train")

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
        require_models(cfg, "cluster_model", "cell_model")
        require_bool(cfg, "cell_model.layer_embedding")
        require_bool(cfg, "sampling.clip_denoised")
        require_choice(cfg, "sampling.collision_metric", transforms.COLLISION_METRICS)
        require_ints(cfg, "image_model.channels")
        require_int(cfg, "image_model.context_width")
        require_increasing(cfg, "eval.momentum_bins", minimum_count=2)
        require_classifier(cfg)

    def load_data(self) -> PreparedData:
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
        data = PreparedData(cfg, showers)
        self.require_held_out(len(data.test), "held-out showers")
        return data

    def models(self, data: PreparedData | None = None):
        """(cluster model, stage-2 model) as initialised. With ``cell_model.layer_embedding`` the set
        model embeds each point's layer (:class:`fpcd.nets.GridEmbedding` over the 55 layers), which
        needs the layer's standardisation from ``data`` (without data, e.g. to count parameters, a
        unit one)."""
        cfg = self.cfg
        k_cluster, k_stage2 = jax.random.split(self.key("models"))
        cluster_model = ResMLP(2, width=cfg.cluster_model.width, depth=cfg.cluster_model.depth, cond_dim=2,
                               fourier_scale=cfg.cluster_model.fourier_scale, key=k_cluster)
        if cfg.representation == "cloud":
            m = cfg.cell_model
            grid = None
            if m.layer_embedding:
                mean, std = (0.0, 1.0) if data is None else (data.cell_stats.mean[LAYER], data.cell_stats.std[LAYER])
                grid = {"column": LAYER, "size": EPIC_FORWARD_HCAL.num_layers, "offset": mean, "scale": std}
            stage2 = SetTransformer(NUM_CELL_FEATURES, width=m.width, depth=m.depth, num_heads=m.num_heads,
                                    mlp_ratio=m.mlp_ratio, cond_dim=4, fourier_scale=m.fourier_scale, grid=grid,
                                    key=k_stage2)
        else:
            m = cfg.image_model
            shape = (EPIC_FORWARD_HCAL.num_layers // GROUP,) + (EPIC_FORWARD_HCAL.num_cells // GROUP,) * 2
            stage2 = UNet3D(shape, channels=tuple(m.channels), cond_dim=4, context_width=m.context_width,
                            fourier_scale=m.fourier_scale, key=k_stage2)
        return cluster_model, stage2

    def stages(self, data: PreparedData):
        cfg = self.cfg
        cluster_model, stage2_model = self.models(data)

        def cluster_batch(step, rows):
            idx = batch_indices(cfg.seed, step, len(data.cluster), cfg.train_cluster.batch_size)[rows]
            return {"x": data.cluster[idx], "cond": data.cond[idx]}

        if cfg.representation == "cloud":
            def stage2_batch(step, rows):
                return data.cloud_batch(cfg.seed + 1, step, cfg.train.batch_size, rows)

            def probe_batch(rows):  # the largest bucket sets the peak memory
                return data.cloud_batch(cfg.seed + 1, 0, cfg.train.batch_size, rows, length=data.lengths[-1])
        else:
            def stage2_batch(step, rows):
                idx = batch_indices(cfg.seed + 1, step, len(data.images), cfg.train.batch_size)[rows]
                return {"x": data.images[idx], "cond": data.stage2_cond(data.cluster[idx], data.cond[idx])}

            def probe_batch(rows):
                return stage2_batch(0, rows)

        return (Stage("cluster", cluster_model, cfg.train_cluster, self.key("train_cluster"), cluster_batch,
                      lambda rows: cluster_batch(0, rows)),
                Stage(self.stage2, stage2_model, cfg.train, self.key("train"), stage2_batch, probe_batch))

    def training_examples(self, data: PreparedData):
        return {"train_cluster": len(data.cluster),
                "train": len(data.cells) if self.cfg.representation == "cloud" else len(data.images)}

    def generate(self, data: PreparedData, models, group, run, key, sampler, momentum=None, theta=None):
        """One shower per held-out (momentum, theta) (or the given ones) through both stages."""
        cfg = self.cfg
        if momentum is None:
            truth = data.test.take(slice(0, cfg.sampling.num_samples))
            momentum, theta = truth.momentum, truth.theta
        n = len(momentum)
        k_cluster, k_stage2 = jax.random.split(key)
        cond_std = data.cond_stats.apply(transforms.conditions(momentum, theta))
        cluster_std, nfe_cluster, seconds_cluster = sampler(
            lambda cond, mask: score_fn_from(models["cluster"], self.sde, prediction=cfg.train_cluster.prediction,
                                             cond=cond, x0_bounds=self.x0_bounds(data, "cluster")),
            k_cluster, num_samples=n, batch_size=self.batch_size(n, sampler), sample_shape=(2,), run=run,
            description="sample cluster features", conditions=cond_std)
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

    def x0_bounds(self, data: PreparedData, stage: str):
        """The box a stage's denoised estimate is clipped to while sampling (the range of its
        standardised training data), or None without ``sampling.clip_denoised``."""
        return data.bounds[stage] if self.cfg.sampling.clip_denoised else None

    def _generate_cells(self, data, models, run, key, sampler, cond2, num_cells, theta, total_energy, finite):
        cfg, n = self.cfg, len(cond2)
        features = np.zeros((n, data.max_cells, NUM_CELL_FEATURES), np.float32)
        bucket = np.searchsorted(data.lengths, num_cells)
        seconds, nfe = 0.0, 0
        for b, length in enumerate(data.lengths):
            rows = np.nonzero(bucket == b)[0]
            if not len(rows):
                continue
            masks = (np.arange(length)[None, :] < num_cells[rows][:, None]).astype(np.float32)
            x, nfe_b, secs = sampler(
                lambda cond, mask: score_fn_from(models["cells"], self.sde, prediction=cfg.train.prediction,
                                                 mask=mask, cond=cond, x0_bounds=self.x0_bounds(data, "cells")),
                jax.random.fold_in(key, b), num_samples=len(rows), batch_size=self.batch_size(len(rows), sampler),
                sample_shape=(length, NUM_CELL_FEATURES), run=run, description=f"sample cells (<= {length})",
                conditions=cond2[rows], mask=masks)
            features[rows, :length] = x
            nfe, seconds = max(nfe, nfe_b), seconds + secs
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
            lambda cond, mask: score_fn_from(models["image"], self.sde, prediction=cfg.train.prediction, cond=cond,
                                             x0_bounds=self.x0_bounds(data, "image")),
            key, num_samples=n, batch_size=self.batch_size(n, sampler), sample_shape=data.images.shape[1:], run=run,
            description="sample voxel images", conditions=cond2)
        finite &= np.all(np.isfinite(x), axis=(1, 2, 3))
        logs = data.image_stats.invert(np.where(finite[:, None, None, None], x, -10.0))
        images = transforms.log_fractions_to_image(logs, total_energy)
        images = np.where(images > EPIC_FORWARD_HCAL.threshold_mev * 1e-3, images, 0.0).astype(np.float32)
        return from_voxels(images, group=GROUP), images, finite, seconds, nfe

    # --- evaluation ---------------------------------------------------------------------------

    def _classifier(self, truth, generated):
        c = self.cfg.eval.classifier
        return calo_metrics.classifier_auc(truth, generated, seed=int(self.cfg.eval.seed), hidden=tuple(c.hidden),
                                           epochs=c.epochs, batch_size=c.batch_size, learning_rate=c.learning_rate)

    def evaluators(self):
        return {"observables": self.evaluate_observables, "classifier": self.evaluate_classifier}

    def evaluate(self, data: PreparedData, samples, models, *, figures_dir):
        metrics = super().evaluate(data, samples, models, figures_dir=figures_dir)
        metrics["summary"] = self._summary(figures_dir, metrics)
        comparison = self._compare_with(figures_dir, metrics)
        if comparison is not None:
            metrics["comparison"] = comparison
        return metrics

    def _observables(self, data: PreparedData, samples):
        """Observables of two disjoint held-out halves (``truth``: level -> (a, b)) and of every run's
        finite showers (``generated``: run -> level -> observables), with the voxel images."""
        n = self.cfg.sampling.num_samples
        truth_a, truth_b = data.test.take(slice(0, n)), data.test.take(slice(n, 2 * n))
        levels = ("cell", "voxel") if self.cfg.representation == "cloud" else ("voxel",)
        images = (to_voxels(truth_a.cells, group=GROUP), to_voxels(truth_b.cells, group=GROUP))
        truth = {"voxel": (voxel_observables(images[0], truth_a.momentum),
                           voxel_observables(images[1], truth_b.momentum))}
        if "cell" in levels:
            truth["cell"] = (calo_metrics.shower_observables(truth_a.cells, truth_a.momentum),
                             calo_metrics.shower_observables(truth_b.cells, truth_b.momentum))
        generated = {}
        for name, r in samples[""].items():
            keep = np.asarray(r.arrays["finite"], bool)
            generated[name] = {"voxel": voxel_observables(r.arrays["voxels"][keep], truth_a.momentum[keep])}
            if "cell" in levels:
                generated[name]["cell"] = calo_metrics.shower_observables(r.arrays["hcal_cells"][keep],
                                                                          truth_a.momentum[keep])
        return levels, (truth_a, truth_b), images, truth, generated

    def evaluate_observables(self, data: PreparedData, samples, models, *, figures_dir):
        """W1 of every shower observable at each level against held-out showers, the truth-vs-truth
        floor, and the figures."""
        cfg = self.cfg
        levels, (truth_a, _), _, truth, generated = self._observables(data, samples)
        floors = {level: calo_metrics.observable_w1(*truth[level]) for level in levels}
        metrics = {"representation": cfg.representation, "num_samples": cfg.sampling.num_samples,
                   "num_empty_showers_dropped": data.num_empty, "floor": floors, "runs": {}}
        for name, r in samples[""].items():
            row = {"method": r.run["method"], "options": {k: v for k, v in r.run.items() if k != "method"}, **r.info}
            for level in levels:
                row[level] = w1_block(truth[level][0], generated[name][level], floors[level])
            metrics["runs"][name] = row
        if figures_dir is not None:
            self._figures(figures_dir, metrics, samples[""], truth, generated, truth_a.momentum, levels)
        return metrics

    def evaluate_classifier(self, data: PreparedData, samples, models, *, figures_dir):
        """AUC of an MLP separating generated from held-out showers, on high-level observables (each
        level) and on voxel images, and the same between two held-out halves."""
        levels, (truth_a, truth_b), images, truth, generated = self._observables(data, samples)
        features = calo_metrics.high_level_features
        metrics = {"classifier_floor": {
            "voxel_image": self._classifier(calo_metrics.voxel_features(images[0], truth_a.momentum),
                                            calo_metrics.voxel_features(images[1], truth_b.momentum))["auc"],
            **{f"high_level_{level}": self._classifier(
                features(truth[level][0], truth_a.momentum, truth_a.theta),
                features(truth[level][1], truth_b.momentum, truth_b.theta))["auc"] for level in levels},
        }, "runs": {}}
        for name, r in samples[""].items():
            keep = np.asarray(r.arrays["finite"], bool)
            p, th = truth_a.momentum[keep], truth_a.theta[keep]
            row = {}
            for level in levels:
                truth_kept = {k: v[keep] for k, v in truth[level][0].items()}
                real, fake = features(truth_kept, p, th), features(generated[name][level], p, th)
                names = calo_metrics.high_level_feature_names(truth_kept["energy_per_layer"].shape[1])
                row[level] = {"classifier_high_level": self._classifier(real, fake),
                              "separating_features": calo_metrics.separating_features(real, fake, names)}
            row["voxel"]["classifier_voxel_image"] = self._classifier(
                calo_metrics.voxel_features(images[0][keep], p), calo_metrics.voxel_features(r.arrays["voxels"][keep], p))
            metrics["runs"][name] = row
            if self.progress:
                print(f"[eval] {name}: AUC high-level {row[levels[0]]['classifier_high_level']['auc']:.3f}, "
                      f"voxels {row['voxel']['classifier_voxel_image']['auc']:.3f}", flush=True)
        return metrics

    def _figures(self, directory, metrics, samples, truth_obs, generated_obs, momentum, levels):
        bins = tuple(self.cfg.eval.momentum_bins)
        for level in levels:
            generated = {name: (obs[level], momentum[np.asarray(samples[name].arrays["finite"], bool)])
                         for name, obs in generated_obs.items()}
            title = f"{self.cfg.representation} model, {level} level"
            observables_by_momentum(truth_obs[level][0], momentum, generated, bins,
                                    os.path.join(directory, f"observables_{level}.png"),
                                    title=f"{title}: generated vs held-out truth")
            profiles_by_momentum(truth_obs[level][0], momentum, generated, bins,
                                 os.path.join(directory, f"profiles_{level}.png"), title=f"{title}: mean profiles")
        runs = {name: {"method": r["method"], "nfe": r["nfe"], "w1_over_floor": r["voxel"]["w1_over_floor_mean"],
                       "student": r.get("student", False)} for name, r in metrics["runs"].items()}
        nfe_vs_w1(runs, os.path.join(directory, "nfe_vs_w1.png"), floor=1.0, metric_key="w1_over_floor",
                  ylabel="voxel-level W1 / truth floor (mean over observables)")

    def _summary(self, workdir, metrics) -> dict:
        """The row of this run in the point-cloud vs image table (first sampler run); None where an
        evaluator did not run."""
        train_info = read_json(os.path.join(workdir, TRAIN_INFO_FILE)) if workdir else {}
        cluster_model, stage2_model = self.models()
        name, first = next(iter(metrics["runs"].items()))
        voxel = first.get("voxel", {})
        memory = train_info.get(self.stage2, {}).get("step_memory_bytes")
        return {
            "representation": self.cfg.representation, "run": name, "nfe": first["nfe"],
            "parameters_stage2": count_parameters(stage2_model),
            "parameters_total": count_parameters(cluster_model) + count_parameters(stage2_model),
            "train_step_memory_mb_stage2": None if memory is None else memory / 2**20,
            "process_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
            "training_seconds_stage2": train_info.get(self.stage2, {}).get("seconds"),
            "training_seconds_total": sum(v.get("seconds", 0.0) for k, v in train_info.items()
                                          if not is_student(k)) or None,
            "distillation_seconds_total": sum(v.get("seconds", 0.0) for k, v in train_info.items()
                                              if is_student(k)) or None,
            "ms_per_shower": first["ms_per_shower"],
            "auc_high_level": voxel.get("classifier_high_level", {}).get("auc"),
            "auc_voxel_image": voxel.get("classifier_voxel_image", {}).get("auc"),
            "w1_voxel": voxel.get("w1"), "w1_over_floor_voxel": voxel.get("w1_over_floor_mean"),
            "device": jax.devices()[0].device_kind, "num_devices": jax.device_count(),
        }

    def _compare_with(self, workdir, metrics):
        """Write ``comparison.{json,md}`` when ``eval.compare_with`` holds the other representation's run."""
        other_dir = self.cfg.eval.compare_with
        path = os.path.join(other_dir, "metrics.json") if other_dir else ""
        if not workdir or not path or not os.path.exists(path) or \
                os.path.abspath(other_dir) == os.path.abspath(workdir):
            return None
        other = read_json(path)
        if other.get("representation") == metrics["representation"] or "summary" not in other:
            return None
        rows = {metrics["representation"]: metrics["summary"], other["representation"]: other["summary"]}
        table = comparison_table(rows["cloud"], rows["image"])
        write_json(os.path.join(workdir, "comparison.json"), rows)
        atomic_write(os.path.join(workdir, "comparison.md"), lambda tmp: open(tmp, "w").write(table + "\n"))
        return {"table": table, "other_workdir": other_dir}

    def format_results(self, metrics: dict) -> str:
        levels = ("cell", "voxel") if metrics["representation"] == "cloud" else ("voxel",)
        lines = [f"{'run':<12}{'NFE':>6}{'ms/shower':>11}" + "".join(f"{'W1/floor ' + lv:>17}{'AUC ' + lv:>11}"
                                                                   for lv in levels) + f"{'AUC voxels':>12}"]

        def cell(value, width, digits):
            return f"{'-':>{width}}" if value is None else f"{value:>{width}.{digits}f}"

        for name, r in metrics["runs"].items():
            line = f"{name:<12}{r['nfe']:>6}{r['ms_per_shower']:>11.2f}"
            for level in levels:
                row = r.get(level, {})
                line += cell(row.get("w1_over_floor_mean"), 17, 2)
                line += cell(row.get("classifier_high_level", {}).get("auc"), 11, 3)
            lines.append(line + cell(r.get("voxel", {}).get("classifier_voxel_image", {}).get("auc"), 12, 3))
        if "classifier_floor" in metrics:
            lines.append("truth vs truth AUC: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics["classifier_floor"].items()))
        if "comparison" in metrics:
            lines += ["", metrics["comparison"]["table"]]
        return "\n".join(lines)


def voxel_observables(images, momentum):
    return calo_metrics.shower_observables(from_voxels(images, group=GROUP), momentum, group=GROUP)


def w1_block(truth_obs, generated_obs, floor):
    w1 = calo_metrics.observable_w1(truth_obs, generated_obs)
    ratios = [w1[k] / floor[k] for k in w1 if floor[k] > 0]
    return {"w1": w1, "w1_over_floor_mean": float(np.mean(ratios))}


COMPARISON_ROWS = (
    ("parameters_stage2", "parameters (stage 2)", "{:,.0f}"),
    ("train_step_memory_mb_stage2", "train-step memory, MB (XLA)", "{:.1f}"),
    ("process_peak_rss_mb", "process peak RSS, MB", "{:.0f}"),
    ("training_seconds_stage2", "training seconds (stage 2)", "{:.0f}"),
    ("ms_per_shower", "ms per generated shower", "{:.2f}"),
    ("auc_high_level", "classifier AUC, high-level", "{:.3f}"),
    ("auc_voxel_image", "classifier AUC, voxel image", "{:.3f}"),
    ("w1_over_floor_voxel", "voxel W1 / floor (mean)", "{:.2f}"),
)


def comparison_table(cloud: dict, image: dict) -> str:
    """Markdown table of two summary rows (point cloud, image) of ``metrics.json``."""
    lines = ["| quantity | point cloud | image |", "|---|---:|---:|"]
    for key, label, fmt in COMPARISON_ROWS:
        cells = [("n/a" if row.get(key) is None else fmt.format(row[key])) for row in (cloud, image)]
        lines.append(f"| {label} | {cells[0]} | {cells[1]} |")
    for obs in calo_metrics.SCALAR_OBSERVABLES + calo_metrics.VECTOR_OBSERVABLES:
        cells = ["n/a" if row.get("w1_voxel") is None else f"{row['w1_voxel'][obs]:.4g}" for row in (cloud, image)]
        lines.append(f"| W1 {obs} (voxel level) | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)
