"""FPCD on EIC deep-inelastic scattering events: the scattered electron, then the particles.

Stage 1 (``"event"``): a :class:`~fpcd.nets.ResMLP` score model of the event vector (pT_e, eta_e,
N) of the scattered electron and the number of other particles, written as the standardised
(log Q^2, logit y, N) (an exact bijection; :mod:`fpcd.data.eic_transforms`).

Stage 2 (``"particle"``): a :class:`~fpcd.nets.SetTransformer` score model of the particles given
the event vector, N setting the mask. Each particle is 14 numbers (:mod:`fpcd.data.eic_transforms`):
eta_i + eta_e and log pT_i / pT_e standardised, the azimuth from the recoil as (cos, sin), the
charge in {-1, 0, 1} and the 9-class species one-hot mapped to {-1, +1}. Generated species are the
argmax class with a charge consistent with it; the fraction of generated particles that already
sit at a one-hot vertex before that decoding (``sharp_fraction``) is reported. Training and
sampling pad each batch only to its multiplicity bucket (``data.buckets``).

Evaluation against held-out events (``metrics.json``, ``eic_observables.png``,
``eic_species.png``, ``nfe_vs_w1.png``): W1 of the electron pT and eta, the multiplicity, the DIS
variables of the generated electron (log Q^2, log x, y) and the pooled particle eta, phi and log
pT ratio, with the truth-vs-truth floor beside each; per-species fractions and W1 of their
spectra; charge conservation, the z sum and the transverse-momentum balance; a classifier AUC
(generated vs held-out, with and without those three sums among its inputs, and the
truth-vs-truth AUCs); NFE and ms per event of every sampler run.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import jax
import numpy as np

from fpcd.config import ConfigError, require_classifier, require_float, require_int, require_ints
from fpcd.data import buckets
from fpcd.data import eic
from fpcd.data import eic_transforms as transforms
from fpcd.experiments.two_stage import (TwoStageExperiment, bucketed_stage, classifier, run_row, sample_global,
                                        sample_set, split, table_cell)
from fpcd.metrics import eic as eic_metrics
from fpcd.plots.common import nfe_vs_w1
from fpcd.plots.eic import compare, species_spectra
from fpcd.runner import main_process_first

MAX_OTHER = eic.MAX_PARTICLES - 1  # particles after the electron
GOAL_W1_OVER_FLOOR = 2.0


class EicData:
    """Train/test split (the last ``data.test_fraction`` is held out), standardisation, model arrays
    and multiplicity buckets of the training events."""

    def __init__(self, cfg, events: eic.EventSet, num_empty: int = 0):
        self.num_empty = num_empty  # events without particles besides the electron, dropped
        self.train, self.test = split(events, cfg.data.test_fraction)
        self.stats = transforms.fit_standardisation(self.train)
        self.event, self.particles, self.mask, _ = transforms.to_model(self.train, self.stats)
        self.lengths, self.buckets = buckets.training_buckets(
            self.train.multiplicity, buckets.bucket_lengths(cfg.data.buckets, MAX_OTHER), cfg.train_set.batch_size)


class EicExperiment(TwoStageExperiment):
    GLOBAL_STAGE, SET_STAGE = "event", "particle"
    GLOBAL_MODEL, SET_MODEL = "event_model", "particle_model"
    # data.cache_dir and data.workers do not change the events: another cache is the same run.
    IDENTITY_FIELDS = ("experiment", "seed", "data.path", "data.num_events", "data.q2_min", "data.test_fraction",
                       "data.buckets", "sde", "event_model", "particle_model", "train_set.prediction",
                       "train_global.prediction")
    FIELDS_RENAMED = {"train_event": "train_global", "train": "train_set"}  # the stage sections' old names

    def validate(self, num_devices: int) -> None:
        super().validate(num_devices)
        cfg = self.cfg
        if not cfg.data.path:
            require_int(cfg, "data.num_events", minimum=20)
        require_float(cfg, "data.q2_min", low=0.0, open_low=True)
        require_float(cfg, "data.test_fraction", low=0.05, high=0.9)
        require_int(cfg, "data.workers", minimum=0)
        require_ints(cfg, "data.buckets", minimum_count=0)
        require_classifier(cfg)

    def load_events(self) -> eic.EventSet:
        """The real file when ``data.path`` is set, else generated with Pythia 8 (cached)."""
        cfg = self.cfg
        if cfg.data.path:
            return eic.load(cfg.data.path)
        return eic.cached_generate(cfg.data.num_events, q2_min=cfg.data.q2_min, seed=cfg.seed,
                                   cache_dir=cfg.data.cache_dir or None, workers=cfg.data.workers or None,
                                   progress=self.progress)

    def load_data(self) -> EicData:
        try:  # process 0 generates and caches, the others then read the cache
            events = main_process_first(self.load_events)
        except eic.EicDataError as err:
            raise ConfigError(str(err)) from None
        if events.particles.shape[1] != eic.MAX_PARTICLES:
            raise ConfigError(f"{self.cfg.data.path}: holds {events.particles.shape[1]} rows per event; the EIC "
                              f"experiment needs {eic.MAX_PARTICLES} (the electron and 49 particles)")
        empty = events.multiplicity < 1
        if empty.any():
            events = events.take(np.flatnonzero(~empty))
        data = EicData(self.cfg, events, num_empty=int(empty.sum()))
        self.require_held_out(len(data.test), "held-out events")
        return data

    def model_dims(self, data):
        return {"global": (transforms.NUM_EVENT_FEATURES, 0),
                "set": (transforms.NUM_MODEL_FEATURES, transforms.NUM_EVENT_FEATURES)}

    def global_arrays(self, data: EicData):
        return {"x": data.event}

    def set_stage(self, data: EicData, model):
        def rows_batch(idx, rows, length, step):
            idx = idx[rows]
            return {"x": data.particles[idx, :length], "mask": data.mask[idx, :length], "cond": data.event[idx]}

        s = self.stage_settings("set")
        return bucketed_stage(s["name"], model, s["section"], s["key"], seed=s["seed"], bucket_of=data.buckets,
                              lengths=data.lengths, rows_batch=rows_batch)

    def training_examples(self, data: EicData):
        return {"train_global": len(data.event), "train_set": len(data.particles)}

    def generate(self, data: EicData, models, group, run, key, sampler, num_samples=None):
        """Events through both stages; ``num_samples`` defaults to ``sampling.num_samples``."""
        cfg = self.cfg
        n = num_samples or cfg.sampling.num_samples
        k_event, k_particle, k_phi = jax.random.split(key, 3)
        event_std, nfe_event, seconds_event = sample_global(
            sampler, models["event"], self.sde, run, k_event, prediction=cfg.train_global.prediction, num_samples=n,
            batch_size=self.batch_size(n, sampler), num_features=transforms.NUM_EVENT_FEATURES,
            description="sample event vectors")
        finite = np.all(np.isfinite(event_std), axis=1)
        event_std = np.where(finite[:, None], event_std, 0.0)
        multiplicity = transforms.multiplicity_from_model(event_std, data.stats, MAX_OTHER)
        # The particle stage sees the rounded multiplicity, as in training.
        event_std = event_std.copy()
        event_std[:, 2] = (multiplicity - data.stats.event.mean[2]) / data.stats.event.std[2]
        event_std = event_std.astype(np.float32)
        particles, nfe, seconds = sample_set(
            sampler, models["particle"], self.sde, run, k_particle, prediction=cfg.train_set.prediction,
            counts=multiplicity, max_length=MAX_OTHER, num_features=transforms.NUM_MODEL_FEATURES,
            conditions=event_std, batch_size=lambda rows: self.batch_size(rows, sampler),
            description="sample particles", lengths=data.lengths)
        mask = (np.arange(MAX_OTHER)[None, :] < multiplicity[:, None]).astype(np.float32)
        finite &= np.all(np.isfinite(particles), axis=(1, 2))
        particles = np.where(finite[:, None, None], particles, 0.0) * mask[..., None]
        # The physics is symmetric in the electron azimuth: draw it uniformly (a fixed key per run).
        phi_e = np.asarray(jax.random.uniform(k_phi, (n,), minval=-np.pi, maxval=np.pi), np.float64)
        events = transforms.from_model(event_std, particles, mask, phi_e, data.stats)
        total = seconds + seconds_event
        info = {"nfe": nfe, "nfe_event_stage": nfe_event, "seconds_event_stage": seconds_event,
                "seconds": total, "ms_per_event": 1000.0 * total / n, "num_nonfinite": int(np.sum(~finite)),
                "sharp_fraction": transforms.sharp_fraction(particles, mask)}
        return {"particles": events.particles, "kinematics": events.kinematics, "finite": finite}, info

    # --- generate mode ------------------------------------------------------------------------

    def generation_state(self, data: EicData) -> dict:
        return {"stats": data.stats.to_dict(), "lengths": list(data.lengths)}

    def generation_data(self, state: dict):
        """What :meth:`generate` reads of the data (the standardisation, the bucket lengths)."""
        return SimpleNamespace(stats=transforms.EicStandardisation.from_dict(state["stats"]),
                               lengths=tuple(state["lengths"]))

    def generate_chunk(self, data, models, run, key, sampler, num_events, conditions):
        """Events in the raw EIC layout (:func:`fpcd.data.eic.load` reads it): ``particles (N, 50, 5)``
        and ``kinematics``; events whose model output was not finite are left out (``keep``)."""
        arrays, _ = self.generate(data, models, "", run, key, sampler, num_samples=num_events)
        return {"particles": arrays["particles"], "kinematics": arrays["kinematics"], "keep": arrays["finite"]}

    # --- evaluation ---------------------------------------------------------------------------

    def evaluators(self):
        return {"observables": self.evaluate_observables, "classifier": self.evaluate_classifier}

    def _truth_halves(self, data: EicData):
        n = self.cfg.sampling.num_samples
        return data.test.take(slice(0, n)), data.test.take(slice(n, 2 * n))

    @staticmethod
    def _generated(r) -> eic.EventSet:
        keep = np.asarray(r.arrays["finite"], bool)
        return eic.EventSet(r.arrays["particles"][keep], r.arrays["kinematics"][keep])

    def evaluate_observables(self, data: EicData, samples, models, *, figures_dir):
        """W1 of every observable and per-species quantity against held-out events with the
        truth-vs-truth floor, the conservation checks, and the figures."""
        truth_a, truth_b = self._truth_halves(data)
        obs_a, obs_b = eic_metrics.observables(truth_a), eic_metrics.observables(truth_b)
        floor = eic_metrics.w1_block(obs_a, obs_b)
        metrics = {"num_samples": self.cfg.sampling.num_samples, "num_empty_events_dropped": data.num_empty,
                   "floor": floor, "truth_conservation": eic_metrics.conservation(truth_a), "runs": {}}
        generated = {}
        for name, r in samples[""].items():
            generated[name] = events = self._generated(r)
            block = eic_metrics.w1_block(obs_a, eic_metrics.observables(events))
            ratios = eic_metrics.ratios_to_floor(block, floor)
            row = {**run_row(r), **block, **ratios, "conservation": eic_metrics.conservation(events)}
            row["goal_every_w1_within_2x_floor"] = bool(ratios["w1_over_floor_max"] is not None
                                                        and ratios["w1_over_floor_max"] <= GOAL_W1_OVER_FLOOR)
            metrics["runs"][name] = row
        if figures_dir is not None:
            compare(truth_a, generated, os.path.join(figures_dir, "eic_observables.png"),
                    title="EIC DIS events: generated vs held-out truth")
            species_spectra(truth_a, generated, os.path.join(figures_dir, "eic_species.png"),
                            title="per-species spectra (normalised to the species fraction)")
            runs = {name: {"method": r["method"], "nfe": r["nfe"], "w1_over_floor": r["w1_over_floor_mean"],
                           "student": r.get("student", False)} for name, r in metrics["runs"].items()}
            nfe_vs_w1(runs, os.path.join(figures_dir, "nfe_vs_w1.png"), floor=1.0, metric_key="w1_over_floor",
                      ylabel="W1 / truth floor (mean over observables)")
        return metrics

    def _classifier(self, truth, generated):
        return classifier(self.cfg, truth, generated)

    def evaluate_classifier(self, data: EicData, samples, models, *, figures_dir):
        """AUC of an MLP separating generated from held-out events on :func:`fpcd.metrics.eic.classifier_features`
        (``classifier``), the same without the conservation sums (charge, z, transverse momentum:
        ``classifier_without_sums``, what else gives the events away), and both between the two
        held-out halves (the floors). Events with non-finite model output are left out (``finite``)."""
        truth_a, truth_b = self._truth_halves(data)
        features = {sums: (eic_metrics.classifier_features(truth_a, sums=sums),
                           eic_metrics.classifier_features(truth_b, sums=sums)) for sums in (True, False)}
        metrics = {"classifier_floor": self._classifier(*features[True])["auc"],
                   "classifier_without_sums_floor": self._classifier(*features[False])["auc"], "runs": {}}
        for name, r in samples[""].items():
            keep = np.asarray(r.arrays["finite"], bool)
            row = {}
            for sums, key in ((True, "classifier"), (False, "classifier_without_sums")):
                generated = eic_metrics.classifier_features(self._generated(r), sums=sums)
                row[key] = self._classifier(features[sums][0][keep], generated)
            metrics["runs"][name] = row
            if self.progress:
                print(f"[eval] {name}: classifier AUC {row['classifier']['auc']:.3f} (without the conservation sums "
                      f"{row['classifier_without_sums']['auc']:.3f})", flush=True)
        return metrics

    def format_results(self, metrics: dict) -> str:
        cell = table_cell
        short = {"electron_pt": "pTe", "electron_eta": "etae", "multiplicity": "N", "log10_q2": "Q2",
                 "log10_x": "x", "y": "y", "eta": "eta", "phi_recoil": "phi", "log_pt_ratio": "pTrel"}
        lines = [f"{'run':<12}{'NFE':>5}{'ms/ev':>7}" + "".join(f"{v:>6}" for v in short.values())
                 + f"{'max':>6}{'Q=0':>6}{'z~2':>6}{'sharp':>6}{'AUC':>7}{'AUC-':>7}"]
        for name, r in metrics.get("runs", {}).items():
            ratios = r.get("w1_over_floor", {})
            line = f"{name:<12}{r.get('nfe', 0):>5}" + cell(r.get("ms_per_event"), 7, 2)
            line += "".join(cell(ratios.get(k), 6, 2) for k in short) + cell(r.get("w1_over_floor_max"), 6, 2)
            cons = r.get("conservation", {})
            line += cell(cons.get("fraction_charge_conserved"), 6, 2)
            line += cell(cons.get("fraction_z_sum_within_5_percent"), 6, 2)
            line += cell(r.get("sharp_fraction"), 6, 2) + cell(r.get("classifier", {}).get("auc"), 7, 3)
            line += cell(r.get("classifier_without_sums", {}).get("auc"), 7, 3)
            lines.append(line)
        if "truth_conservation" in metrics:
            t = metrics["truth_conservation"]
            lines.append(f"truth: charge conserved {t['fraction_charge_conserved']:.3f}, z sum within 5 % "
                         f"{t['fraction_z_sum_within_5_percent']:.3f}"
                         + (f", truth vs truth AUC {metrics['classifier_floor']:.3f} / "
                            f"{metrics['classifier_without_sums_floor']:.3f}" if "classifier_floor" in metrics else ""))
            lines.append("pTe ... pTrel: W1 / truth floor; max: the largest; Q=0: fraction of events whose charges sum "
                         "to 0; z~2: fraction with sum z within 5 % of 2; sharp: fraction of particles at a species "
                         "vertex; AUC / AUC-: classifier with / without the charge, z and transverse-momentum sums")
        return "\n".join(lines)
