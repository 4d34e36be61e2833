"""FPCD on JetNet jets: a two-stage class-conditional model, every sampler, the jet metrics.

Stage 1 (``"jet"``): a :class:`~fpcd.nets.ResMLP` score model of the standardised jet features
(pT, eta, mass, multiplicity) conditioned on the one-hot jet type. Stage 2 (``"particle"``): a
:class:`~fpcd.nets.SetTransformer` score model of the standardised constituents (eta_rel,
phi_rel, log pt_rel) conditioned on the jet features and the type, with the multiplicity as the
mask. Sampling draws jet features first, turns the multiplicity into the mask, then samples the
constituents; both are post-processed to JetNet units (:mod:`fpcd.data.jet_transforms`).

Outputs in the workdir: ``metrics.json`` (per type and sampler run: NFE of each stage, seconds,
jets/s, W1M, W1P, W1EFP, FPD, KPD with their errors, and the truth-vs-truth floor of each),
``samples_<type>.h5`` (JetNet layout: the first run at the top level, every run under
``runs/<name>/``), ``jets_<type>.png`` and ``nfe_vs_w1m.png`` / ``nfe_vs_w1p.png``. The metrics and
figures use each run's finite jets; a run with fewer than two gets NaN metrics (``null`` in
``metrics.json``, with the reason under ``"nonfinite"``) and is left out of the figures.
"""

from __future__ import annotations

import os
import warnings

import jax
import numpy as np

from fpcd.config import ConfigError, get_field, require_bool, require_float, require_int, require_strings
from fpcd.data import jet_transforms
from fpcd.data.jetnet import JET_TYPES, JetDataError, JetSet, cached_generate, load
from fpcd.data.standardisation import feature_bounds
from fpcd.metrics import jets as jet_metrics
from fpcd.experiments.jetnet_generation import JetNetGeneration
from fpcd.experiments.two_stage import TwoStageExperiment, array_stage, run_row, sample_global, sample_set, split
from fpcd.plots.common import nfe_vs_w1
from fpcd.plots.jets import compare
from fpcd.runner import main_process_first

NUM_JET_FEATURES = 4
NUM_PARTICLE_FEATURES = 3


def one_hot(jet_type: str, types: tuple[str, ...], n: int) -> np.ndarray:
    vector = np.zeros((n, len(types)), np.float32)
    vector[:, types.index(jet_type)] = 1.0
    return vector


class JetData:
    """Centred train/test jets per type, their standardisation and the stacked training arrays."""

    def __init__(self, types, jets_by_type: dict, test_fraction: float):
        self.types = types
        self.train, self.test, self.stats, self.bounds = {}, {}, {}, {}
        parts = {"jet": [], "particles": [], "mask": [], "type": []}
        for jet_type in types:
            jets = jets_by_type[jet_type]
            jets = JetSet(jet_type, jet_transforms.recenter(jets.particle_features), jets.jet_features)
            train, test = split(jets, test_fraction)
            self.train[jet_type], self.test[jet_type] = train, test
            self.stats[jet_type] = stats = jet_transforms.fit_standardisation(train)
            particles, mask, jet = jet_transforms.preprocess(train, stats)
            self.bounds[jet_type] = {"jet": feature_bounds(jet), "particle": feature_bounds(particles, mask)}
            for name, value in (("jet", jet), ("particles", particles), ("mask", mask),
                                ("type", one_hot(jet_type, types, len(train)))):
                parts[name].append(value)
        self.jet, self.particles, self.mask, self.type = (np.concatenate(parts[k]) for k in
                                                           ("jet", "particles", "mask", "type"))

    def __len__(self):
        return len(self.jet)


MIN_JETS = 2  # fewer generated jets: no metric (NaN, explained in metrics.json)


def finite_jets(jets: JetSet) -> JetSet:
    """The jets of ``jets`` whose particle and jet features are all finite."""
    keep = np.all(np.isfinite(jets.particle_features), axis=(1, 2)) & np.all(np.isfinite(jets.jet_features), axis=1)
    return jets if keep.all() else jets.take(np.flatnonzero(keep))


def jet_metric_row(truth: JetSet, jets: JetSet, *, num_batches: int, seed: int) -> dict:
    """W1M, W1P (mean of 3), W1EFP (mean of 5), FPD and KPD of the finite jets of ``jets`` against
    ``truth`` (``num_nonfinite_jets_excluded`` counts the others when there are any); every value
    NaN when fewer than ``MIN_JETS`` jets are finite."""
    finite = finite_jets(jets)
    excluded = {"num_nonfinite_jets_excluded": len(jets) - len(finite)} if len(finite) < len(jets) else {}
    jets = finite
    if len(jets) < MIN_JETS:
        nan = float("nan")
        return {"w1m": nan, "w1m_std": nan, "w1p": nan, "w1p_std": nan, "w1p_per_feature": [nan] * 3,
                "w1efp": nan, "w1efp_std": nan, "fpd": nan, "fpd_err": nan, "kpd": nan, "kpd_err": nan, **excluded}
    n = min(len(truth), len(jets))
    kw = {"num_eval_samples": n, "num_batches": num_batches, "seed": seed}
    a, b = truth.particle_features, jets.particle_features
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        w1m = jet_metrics.w1m(a, b, **kw)
        w1p = jet_metrics.w1p(a, b, **kw)
        w1efp = jet_metrics.w1efp(a, b, **kw)
        fa, fb = jet_metrics.get_fpd_kpd_jet_features(a), jet_metrics.get_fpd_kpd_jet_features(b)
        fpd = jet_metrics.fpd(fa, fb, min_samples=max(n // 2, 2), max_samples=n, num_batches=10, num_points=5,
                              seed=seed)
        kpd = jet_metrics.kpd(fa, fb, batch_size=min(5000, n), seed=seed)
    return {
        "w1m": w1m[0], "w1m_std": w1m[1],
        "w1p": float(np.mean(w1p[0])), "w1p_std": float(np.mean(w1p[1])), "w1p_per_feature": np.asarray(w1p[0]).tolist(),
        "w1efp": float(np.mean(w1efp[0])), "w1efp_std": float(np.mean(w1efp[1])),
        "fpd": fpd[0], "fpd_err": fpd[1], "kpd": kpd[0], "kpd_err": kpd[1], **excluded,
    }


def validate_jet_data(cfg) -> tuple[str, ...]:
    """Check ``config.data`` of a jets config (the jets and anomaly experiments); return the jet types."""
    types = require_strings(cfg, "data.jet_types")
    unknown = [t for t in types if t not in JET_TYPES]
    if unknown or len(set(types)) != len(types):
        raise ConfigError(f"config.data.jet_types={types!r}: unknown or repeated jet type(s) {unknown}; use a "
                          f"tuple of distinct types from {JET_TYPES}")
    num_particles = require_int(cfg, "data.num_particles")
    if cfg.data.path_pattern and num_particles not in (30, 150):
        raise ConfigError(f"config.data.num_particles={num_particles}: the real JetNet files hold 30 or 150 "
                          "particles per jet")
    if cfg.data.path_pattern and "{type}" not in cfg.data.path_pattern:
        raise ConfigError(f"config.data.path_pattern={cfg.data.path_pattern!r} must contain '{{type}}'")
    require_int(cfg, "data.num_jets", minimum=10)
    require_float(cfg, "data.test_fraction", low=0.05, high=0.9)
    require_int(cfg, "data.workers", minimum=0)
    return types


class JetNetExperiment(JetNetGeneration, TwoStageExperiment):
    GLOBAL_STAGE, SET_STAGE = "jet", "particle"
    GLOBAL_MODEL, SET_MODEL = "jet_model", "particle_model"
    RECORD_MEMORY = False
    IDENTITY_FIELDS = ("experiment", "seed", "data", "sde", "jet_model", "particle_model", "train_set.prediction",
                       "train_global.prediction")
    FIELDS_RENAMED = {"train_jet": "train_global", "train": "train_set"}  # the stage sections' old names

    def validate(self, num_devices: int) -> None:
        super().validate(num_devices)
        cfg = self.cfg
        validate_jet_data(cfg)
        require_bool(cfg, "sampling.clip_denoised")
        require_int(cfg, "eval.num_batches")
        get_field(cfg, "eval.seed")

    @property
    def types(self) -> tuple[str, ...]:
        return tuple(self.cfg.data.jet_types)

    def load_jets(self, jet_type: str) -> JetSet:
        """All jets of one type: the real file when ``data.path_pattern`` is set, else generated (cached)."""
        cfg = self.cfg
        if cfg.data.path_pattern:
            suffix = "" if cfg.data.num_particles == 30 else "150"
            path = cfg.data.path_pattern.format(type=jet_type + suffix)
            return load(path, jet_type=jet_type, num_particles=cfg.data.num_particles)
        return cached_generate(jet_type, cfg.data.num_jets, num_particles=cfg.data.num_particles,
                               seed=cfg.seed + 1000 * JET_TYPES.index(jet_type), cache_dir=cfg.data.cache_dir or None,
                               workers=cfg.data.workers or None, progress=self.progress)

    def load_data(self) -> JetData:
        try:  # process 0 generates and caches, the others then read the cache
            jets = main_process_first(lambda: {jet_type: self.load_jets(jet_type) for jet_type in self.types})
        except JetDataError as err:
            raise ConfigError(str(err)) from None
        data = JetData(self.types, jets, self.cfg.data.test_fraction)
        for jet_type in self.types:
            self.require_held_out(len(data.test[jet_type]), f"test jets of type {jet_type!r}")
        return data

    def model_dims(self, data: JetData | None):
        num_types = len(self.types)
        return {"global": (NUM_JET_FEATURES, num_types), "set": (NUM_PARTICLE_FEATURES, NUM_JET_FEATURES + num_types)}

    def global_arrays(self, data: JetData):
        return {"x": data.jet, "cond": data.type}

    def set_stage(self, data: JetData, model):
        s = self.stage_settings("set")
        arrays = {"x": data.particles, "mask": data.mask, "cond": np.concatenate([data.jet, data.type], axis=1)}
        return array_stage(s["name"], model, s["section"], s["key"], seed=s["seed"], arrays=arrays, probe=False)

    def training_examples(self, data: JetData):
        return {"train_global": len(data), "train_set": len(data)}

    def sample_groups(self, data):
        return data.types

    def samples_attrs(self, group):
        return {"jet_type": group}

    def generate(self, data: JetData, models, jet_type, run, key, sampler, num_samples=None):
        """Jets of one type through both stages; ``num_samples`` defaults to ``sampling.num_samples``."""
        cfg = self.cfg
        n = num_samples or cfg.sampling.num_samples
        batch, num_particles, stats = cfg.sampling.batch_size, cfg.data.num_particles, data.stats[jet_type]
        types = one_hot(jet_type, data.types, n)
        k_jet, k_particle = jax.random.split(key)
        bounds = data.bounds[jet_type] if cfg.sampling.clip_denoised else {"jet": None, "particle": None}
        jet_std, jet_nfe, jet_seconds = sample_global(
            sampler, models["jet"], self.sde, run, k_jet, prediction=cfg.train_global.prediction, num_samples=n,
            batch_size=batch, num_features=NUM_JET_FEATURES, description=f"sample {jet_type} jets", conditions=types,
            x0_bounds=bounds["jet"])
        # The multiplicity sets the mask; the particle stage sees the jet features it was trained on.
        multiplicity = np.clip(np.rint(stats.jet.invert(jet_std)[:, 3]), 1, num_particles)
        jet_std = jet_std.copy()
        jet_std[:, 3] = (multiplicity - stats.jet.mean[3]) / stats.jet.std[3]
        mask = jet_transforms.multiplicity_mask(multiplicity, num_particles)
        particles, particle_nfe, particle_seconds = sample_set(
            sampler, models["particle"], self.sde, run, k_particle, prediction=cfg.train_set.prediction,
            counts=multiplicity, max_length=num_particles, num_features=NUM_PARTICLE_FEATURES,
            conditions=np.concatenate([jet_std, types], axis=1), batch_size=lambda rows: batch,
            description=f"sample {jet_type} particles", x0_bounds=bounds["particle"])
        finite = np.all(np.isfinite(particles), axis=(1, 2)) & np.all(np.isfinite(jet_std), axis=1)
        jets = jet_transforms.postprocess(particles[finite], mask[finite], jet_std[finite], stats, jet_type)
        seconds = jet_seconds + particle_seconds
        info = {"nfe": particle_nfe, "nfe_jet_stage": jet_nfe, "seconds": seconds,
                "num_nonfinite_dropped": int(np.sum(~finite)), "seconds_jet_stage": jet_seconds,
                "jets_per_second": n / seconds if seconds > 0 else None}
        return {"particle_features": jets.particle_features, "jet_features": jets.jet_features}, info

    def evaluators(self):
        return {"jet_metrics": self.evaluate_jet_metrics}

    def evaluate_jet_metrics(self, data: JetData, samples, models, *, figures_dir):
        """W1M, W1P, W1EFP, FPD and KPD per type and run against held-out jets, with the
        truth-vs-truth floors, and the figures; a run without finite jets gets NaN metrics and a
        ``"nonfinite"`` reason, and stays out of the figures."""
        cfg = self.cfg
        n = cfg.sampling.num_samples
        kw = {"num_batches": cfg.eval.num_batches, "seed": cfg.eval.seed}
        metrics = {"num_samples": n, "types": {}}
        reasons = {}  # why a metric is NaN (metrics.json's "nonfinite")
        for jet_type in data.types:
            test = data.test[jet_type]
            truth, other = test.take(slice(0, n)), test.take(slice(n, 2 * n))
            row = {"floor": jet_metric_row(truth, other, **kw), "runs": {}}
            generated = {}
            for name, r in samples[jet_type].items():
                generated[name] = JetSet(jet_type, r.arrays["particle_features"], r.arrays["jet_features"])
                row["runs"][name] = {**run_row(r), **jet_metric_row(truth, generated[name], **kw)}
                finite = len(finite_jets(generated[name]))
                if finite < MIN_JETS:
                    dropped = int(r.info.get("num_nonfinite_dropped") or 0) + len(generated[name]) - finite
                    reasons[f"types.{jet_type}.runs.{name}"] = (
                        f"{finite} of the {finite + dropped} generated {jet_type} jets are finite; the jet metrics "
                        f"need at least {MIN_JETS}")
            metrics["types"][jet_type] = row
            if figures_dir is not None:
                self._compare_figure(truth, generated, os.path.join(figures_dir, f"jets_{jet_type}.png"),
                                     title=f"{jet_type} jets: generated vs truth")
        if figures_dir is not None:
            for key, label in (("w1m", "W1M"), ("w1p", "W1P (mean of 3)")):
                runs = {f"{t}:{name}": {"method": f"{t} {r['method']}", "nfe": r["nfe"], key: r[key],
                                        "student": r.get("student", False)}
                        for t, row in metrics["types"].items() for name, r in row["runs"].items()
                        if np.isfinite(r[key]) and r[key] > 0}  # a log axis: runs without a value are left out
                floor = float(np.mean([row["floor"][key] for row in metrics["types"].values()]))
                if runs:
                    nfe_vs_w1(runs, os.path.join(figures_dir, f"nfe_vs_{key}.png"),
                              floor=floor if np.isfinite(floor) and floor > 0 else None, metric_key=key, ylabel=label)
        if reasons:
            metrics["nonfinite"] = reasons
        return metrics

    @staticmethod
    def _compare_figure(truth: JetSet, generated: dict, path: str, *, title: str) -> None:
        """:func:`fpcd.plots.jets.compare` of each run's finite jets (runs without any are left out)."""
        finite = {name: finite_jets(jets) for name, jets in generated.items()}
        compare(truth, {name: jets for name, jets in finite.items() if len(jets)}, path, title=title)

    def format_results(self, metrics):
        lines = [f"{'type':<5}{'run':<12}{'NFE':>6}{'jets/s':>9}{'W1M':>10}{'W1P':>10}{'W1EFP':>11}{'FPD':>10}"
                 f"{'KPD':>11}"]
        for jet_type, row in metrics["types"].items():
            for name, r in [("floor", {**row["floor"], "nfe": 0, "jets_per_second": 0.0}), *row["runs"].items()]:
                lines.append(f"{jet_type:<5}{name:<12}{r['nfe']:>6}{r['jets_per_second'] or 0:>9.1f}{r['w1m']:>10.5f}"
                             f"{r['w1p']:>10.5f}{r['w1efp']:>11.2e}{r['fpd']:>10.4f}{r['kpd']:>11.2e}")
        return "\n".join(lines)
