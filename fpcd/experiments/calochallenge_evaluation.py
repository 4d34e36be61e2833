"""The CaloChallenge experiment's evaluation, in the challenge's terms (arXiv 2410.21611).

For every sampler run, against the first ``sampling.num_samples`` held-out showers (the generated
showers are drawn at their incident energies), with the same numbers between two disjoint held-out
halves beside them (the truth-vs-truth floors):

* the separation power (the challenge's histogram distance, :func:`fpcd.metrics.calochallenge.separation_power`,
  on the challenge's bins) of every high-level feature (:func:`~fpcd.metrics.calochallenge.high_level_features`)
  and of the number of hit voxels (not a challenge feature; left out of the overall mean), with the
  mean per feature family;
* FPD and KPD on the high-level vector (:func:`~fpcd.metrics.calochallenge.physics_distances`);
* the classifier AUC on the high-level vector and on the low-level (voxel) input (voxel energies
  over the incident energy, with log10 E_inc: the challenge's low-level classifier input);
* the mean E_dep / E_inc and the hits per shower;
* figures: ``calochallenge_features.png`` (histograms of generated vs held-out features with ratio
  panels), ``calochallenge_profiles.png`` (mean energy per layer and per radial bin) and
  ``nfe_vs_separation.png``.

:class:`CaloChallengeEvaluation` is a mixin of :class:`fpcd.experiments.calochallenge.CaloChallengeExperiment`.
"""

from __future__ import annotations

import os
import warnings

import numpy as np

from fpcd.config import require_classifier, require_int, require_ints
from fpcd.experiments.two_stage import classifier, run_row, table_cell
from fpcd.metrics import calochallenge as cc_metrics

FAMILIES = ("E_ratio", "E_layer_", "EC_eta_", "EC_phi_", "width_eta_", "width_phi_", "num_hits")


def feature_table(showers, incident_energies, geometry) -> dict:
    """The high-level features of ``showers`` plus ``num_hits`` (hit voxels per shower)."""
    features = cc_metrics.high_level_features(showers, incident_energies, geometry)
    features["num_hits"] = (np.asarray(showers) > 0).sum(axis=1).astype(np.float64)
    return features


# The challenge's histograms (its evaluate.py, datasets 2 and 3): E_ratio on 100 bins in [0.5, 1.5],
# layer energies on 39 log bins from 0.5 keV / 0.033 (the 15.15 keV threshold) to the reference's
# maximum, centres of energy on 100 bins in [-30, 30] mm and widths in [0, 30] mm; entries beyond
# the bins are dropped, as np.histogram does.
MIN_LAYER_ENERGY_MEV = 0.5e-3 / 0.033


def feature_bins(name: str, reference, num_bins: int) -> np.ndarray:
    """The bin edges of a feature: the challenge's (above) for its high-level features; for
    ``num_hits`` (not one of them) ``num_bins`` equal bins over the reference's 0.1-99.9 % range."""
    reference = np.asarray(reference, np.float64)
    if name == "E_ratio":
        return np.linspace(0.5, 1.5, 101)
    if name.startswith("E_layer_"):
        high = float(reference.max()) if len(reference) else 1.0
        return np.logspace(np.log10(MIN_LAYER_ENERGY_MEV), np.log10(max(high, 10 * MIN_LAYER_ENERGY_MEV)), 40)
    if name.startswith("EC_"):
        return np.linspace(-30.0, 30.0, 101)
    if name.startswith("width_"):
        return np.linspace(0.0, 30.0, 101)
    low, high = np.quantile(reference, [0.001, 0.999]) if len(reference) else (0.0, 1.0)
    if not high > low:
        low, high = low - 0.5, high + 0.5
    return np.linspace(low, high, num_bins + 1)


def histogram_view(name: str, values) -> np.ndarray:
    """The variable a feature is drawn in: log10 of layer energies (MeV), else the feature itself."""
    values = np.asarray(values, np.float64)
    return np.log10(np.maximum(values, 1e-12)) if name.startswith("E_layer_") else values


def separation_powers(reference: dict, generated: dict, num_bins: int) -> dict:
    """``feature -> separation power`` of ``generated`` against ``reference`` (both from
    :func:`feature_table`) on :func:`feature_bins` (the challenge's bins; entries outside them
    dropped, as in the challenge)."""
    return {name: cc_metrics.separation_power(ref, generated[name], feature_bins(name, ref, num_bins))
            for name, ref in reference.items()}


def family_means(powers: dict) -> dict:
    """Mean separation power per feature family (:data:`FAMILIES`) and over the challenge's
    high-level features (``all``: every feature but ``num_hits``)."""
    out = {}
    for family in FAMILIES:
        values = [v for k, v in powers.items() if k == family or (family.endswith("_") and k.startswith(family))]
        if values:
            out[family.rstrip("_")] = float(np.mean(values))
    out["all"] = float(np.mean([v for k, v in powers.items() if k != "num_hits"]))  # the challenge's features
    return out


def low_level_input(showers, incident_energies) -> np.ndarray:
    """The challenge's low-level classifier input: voxel energies over E_inc, then log10 E_inc."""
    energies = np.asarray(incident_energies, np.float64).reshape(-1, 1)
    return np.concatenate([np.asarray(showers, np.float64) / energies, np.log10(energies)], axis=1)


class CaloChallengeEvaluation:
    """The evaluators ``features`` and ``classifier`` and the console table."""

    def validate_evaluation(self) -> None:
        require_int(self.cfg, "eval.num_bins", minimum=2)
        require_int(self.cfg, "eval.fpd_batches")
        require_int(self.cfg, "eval.fpd_points", minimum=2)
        require_ints(self.cfg, "eval.figure_layers", minimum=0, minimum_count=0)
        require_classifier(self.cfg)

    def evaluators(self):
        return {"features": self.evaluate_features, "classifier": self.evaluate_classifier}

    def _halves(self, data):
        n = self.cfg.sampling.num_samples
        return data.test.take(slice(0, n)), data.test.take(slice(n, 2 * n))

    @staticmethod
    def _finite(r):
        keep = np.asarray(r.arrays["finite"], bool)
        return r.arrays["showers"][keep], np.asarray(r.arrays["incident_energies"]).reshape(-1)[keep]

    def evaluate_features(self, data, samples, models, *, figures_dir):
        """Separation powers, FPD/KPD and the energy response of every run, with the floors."""
        cfg, geometry = self.cfg, data.state.geometry
        truth_a, truth_b = self._halves(data)
        ref, other = (feature_table(t.showers, t.incident_energies, geometry) for t in (truth_a, truth_b))
        bins = int(cfg.eval.num_bins)
        ref_vector = cc_metrics.high_level_vector({k: v for k, v in ref.items() if k != "num_hits"},
                                                  truth_a.incident_energies)

        def distances(features, energies):
            vector = cc_metrics.high_level_vector({k: v for k, v in features.items() if k != "num_hits"}, energies)
            n = min(len(vector), len(ref_vector))
            # Known and shown by the floor beside it: fewer than the recommended 50,000 showers, and
            # covariances singular where a layer is always empty (its features are constant).
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Recommended number of jets")
                warnings.filterwarnings("ignore", message="Matrix is singular")
                return cc_metrics.physics_distances(ref_vector, vector, min_samples=max(2, n // 2), max_samples=n,
                                                    kpd_batch_size=max(2, min(5000, n)), seed=int(cfg.eval.seed),
                                                    fpd_batches=int(cfg.eval.fpd_batches),
                                                    fpd_points=int(cfg.eval.fpd_points))

        floor_powers = separation_powers(ref, other, bins)
        metrics = {"dataset": data.state.dataset, "num_samples": cfg.sampling.num_samples,
                   "num_empty_showers_dropped": data.num_empty,
                   "floor": {"separation_power": family_means(floor_powers),
                             **distances(other, truth_b.incident_energies),
                             "e_ratio_mean": float(np.mean(other["E_ratio"])),
                             "num_hits_mean": float(np.mean(other["num_hits"]))},
                   "truth": {"e_ratio_mean": float(np.mean(ref["E_ratio"])), "num_hits_mean": float(np.mean(ref["num_hits"]))},
                   "runs": {}}
        generated = {}
        for name, r in samples[""].items():
            showers, energies = self._finite(r)
            generated[name] = features = feature_table(showers, energies, geometry)
            powers = separation_powers(ref, features, bins)
            row = {**run_row(r), "separation_power": family_means(powers),
                   "separation_power_per_feature": powers,
                   "most_separating": sorted(powers, key=powers.get, reverse=True)[:5],
                   "e_ratio_mean": float(np.mean(features["E_ratio"])),
                   "num_hits_mean": float(np.mean(features["num_hits"]))}
            row.update(distances(features, energies))
            metrics["runs"][name] = row
        if figures_dir is not None:
            self._figures(figures_dir, data, truth_a, ref, generated, samples, metrics)
        return metrics

    def evaluate_classifier(self, data, samples, models, *, figures_dir):
        """Classifier AUCs, generated vs held-out, on the high-level vector and the low-level
        (voxel) input, with both floors (held-out half vs held-out half)."""
        geometry = data.state.geometry
        truth_a, truth_b = self._halves(data)

        def inputs(showers, energies):
            features = cc_metrics.high_level_features(showers, energies, geometry)
            return cc_metrics.high_level_vector(features, energies), low_level_input(showers, energies)

        a, b = inputs(truth_a.showers, truth_a.incident_energies), inputs(truth_b.showers, truth_b.incident_energies)
        metrics = {"classifier_floor": {"high_level": classifier(self.cfg, a[0], b[0])["auc"],
                                        "low_level": classifier(self.cfg, a[1], b[1])["auc"]}, "runs": {}}
        for name, r in samples[""].items():
            keep = np.asarray(r.arrays["finite"], bool)
            generated = inputs(*self._finite(r))
            row = {"classifier_high_level": classifier(self.cfg, a[0][keep], generated[0]),
                   "classifier_low_level": classifier(self.cfg, a[1][keep], generated[1])}
            metrics["runs"][name] = row
            if self.progress:
                print(f"[eval] {name}: classifier AUC high-level {row['classifier_high_level']['auc']:.3f}, "
                      f"low-level {row['classifier_low_level']['auc']:.3f}", flush=True)
        return metrics

    def _figures(self, figures_dir, data, truth, ref, generated, samples, metrics):
        from fpcd.plots.calochallenge import feature_histograms, shower_profiles
        from fpcd.plots.common import nfe_vs_w1

        layers = [int(v) for v in self.cfg.eval.figure_layers if int(v) < data.state.geometry.num_layers]
        names = ["E_ratio", "num_hits"] + [f"E_layer_{l}" for l in layers] + \
                [f"{kind}_{l}" for kind in ("EC_eta", "width_eta") for l in layers[len(layers) // 2:][:1]]
        names = [n for n in names if n in ref]
        bins = {n: histogram_view(n, feature_bins(n, ref[n], int(self.cfg.eval.num_bins))) for n in names}
        feature_histograms(ref, generated, names, bins, histogram_view,
                           os.path.join(figures_dir, "calochallenge_features.png"),
                           title=f"CaloChallenge dataset {data.state.dataset}: generated vs held-out showers")
        shower_profiles(truth.showers, {n: self._finite(r)[0] for n, r in samples[""].items()}, data.state.geometry,
                        os.path.join(figures_dir, "calochallenge_profiles.png"))
        runs = {n: {"method": r["method"], "nfe": r["nfe"], "sep": r["separation_power"]["all"],
                    "student": r.get("student", False)} for n, r in metrics["runs"].items()}
        nfe_vs_w1(runs, os.path.join(figures_dir, "nfe_vs_separation.png"),
                  floor=metrics["floor"]["separation_power"]["all"], metric_key="sep",
                  ylabel="mean separation power over the high-level features")

    def format_results(self, metrics: dict) -> str:
        cell = table_cell
        families = ("E_ratio", "E_layer", "EC_eta", "width_eta", "num_hits", "all")
        lines = [f"{'run':<14}{'NFE':>5}{'ms/sh':>8}" + "".join(f"{f[:8]:>9}" for f in families)
                 + f"{'FPD':>9}{'KPD':>9}{'AUC hi':>8}{'AUC lo':>8}{'Edep/E':>8}"]

        def row(name, r, classifier_row):
            sep = r.get("separation_power", {})
            line = f"{name:<14}{r.get('nfe', 0):>5}" + cell(r.get("ms_per_shower"), 8, 2)
            line += "".join(cell(sep.get(f), 9, 4) for f in families)
            line += cell(r.get("fpd"), 9, 4) + cell(r.get("kpd"), 9, 5)
            line += cell(classifier_row.get("high_level"), 8, 3) + cell(classifier_row.get("low_level"), 8, 3)
            return line + cell(r.get("e_ratio_mean"), 8, 4)

        for name, r in metrics.get("runs", {}).items():
            aucs = {"high_level": r.get("classifier_high_level", {}).get("auc"),
                    "low_level": r.get("classifier_low_level", {}).get("auc")}
            lines.append(row(name, r, aucs))
        if "floor" in metrics:
            floor = metrics["floor"]
            lines.append(row("truth/truth", {**floor, "nfe": 0}, metrics.get("classifier_floor", {})))
            lines.append(f"held-out E_dep/E_inc {metrics['truth']['e_ratio_mean']:.4f}, hits/shower "
                         f"{metrics['truth']['num_hits_mean']:.1f}; columns: mean separation power per feature "
                         "family (0 = same histograms), FPD/KPD on the high-level vector, classifier AUCs "
                         "(0.5 = indistinguishable)")
        return "\n".join(lines)

