"""The anomaly experiment's evaluation: per background and anomalous type the AUC and SIC of the
likelihood score, of its two terms, of the jet mass and of the multiplicity; the mean held-out
log-likelihoods; the cost per jet; the exact-vs-Hutchinson agreement; the figures.

:class:`AnomalyEvaluation` is a mixin of :class:`fpcd.experiments.anomaly.AnomalyExperiment`:
its methods read ``self.cfg``, ``self.backgrounds`` and ``self.options_of`` (a likelihood run's
options with their defaults).
"""

from __future__ import annotations

import os

import numpy as np

from fpcd.config import ConfigError
from fpcd.metrics import anomaly as anomaly_metrics


class AnomalyEvaluation:
    """The evaluators ``anomaly`` and ``agreement`` and the console table."""

    def evaluators(self):
        return {"anomaly": self.evaluate_anomaly, "agreement": self.evaluate_agreement}

    def _discrimination(self, labels, scores: dict) -> dict:
        cfg = self.cfg
        out = {}
        for name, score in scores.items():
            area = anomaly_metrics.auc(labels, score)
            row = {"auc": area}
            if name in ("mass", "multiplicity"):  # a simple score: the better of its two directions
                row["direction"] = "higher" if area >= 0.5 else "lower"
                score = score if area >= 0.5 else -np.asarray(score)
                row["auc"] = max(area, 1.0 - area)
            sic = anomaly_metrics.sic(labels, score, signal_efficiency=cfg.eval.signal_efficiency,
                                      min_background=cfg.eval.min_background)
            out[name] = {**row, "sic_max": sic["max"], "sic_tpr_at_max": sic["tpr_at_max"],
                         "sic_at_efficiency": sic["at_efficiency"],
                         "sic_at_efficiency_is_lower_bound": sic["at_efficiency_is_lower_bound"]}
        return out

    def evaluate_anomaly(self, data, samples, models, *, figures_dir):
        """Per background and anomalous type: the discrimination of the likelihood score (and of its
        two terms, the jet mass and the multiplicity) from the Hutchinson run over every scored jet;
        the mean log-likelihood of each type's held-out jets; the cost per jet of every run."""
        from fpcd.plots.anomaly import roc_and_sic, score_histograms

        cfg = self.cfg
        metrics = {"num_jets_per_type": int(cfg.sampling.num_samples),
                   "signal_efficiency": float(cfg.eval.signal_efficiency), "backgrounds": {}}
        for group, runs in samples.items():
            name = self.full_run(runs)
            arrays = runs[name].arrays
            background = self.backgrounds[group]
            type_of = np.asarray(data.types)[arrays["type_index"]]
            is_background = np.isin(type_of, background)
            scores = {"likelihood": arrays["score"], "jet_term": -arrays["log_p_jet"],
                      "particle_term": -arrays["log_p_particles"] / arrays["num_particles"],
                      "mass": arrays["mass"], "multiplicity": arrays["num_particles"].astype(np.float64)}
            row = {"background_types": list(background), "run": name, "anomalies": {}, "log_likelihood": {},
                   "cost": {run: {k: v for k, v in r.info.items()} for run, r in runs.items()}}
            for jet_type in data.types:
                chosen = type_of == jet_type
                total = arrays["log_p_jet"][chosen] + arrays["log_p_particles"][chosen]
                row["log_likelihood"][jet_type] = {
                    "mean_log_p_jet": float(np.mean(arrays["log_p_jet"][chosen])),
                    "mean_log_p_particles": float(np.mean(arrays["log_p_particles"][chosen])),
                    "mean_log_p_particles_per_particle": float(np.mean(
                        arrays["log_p_particles"][chosen] / arrays["num_particles"][chosen])),
                    "mean_log_p": float(np.mean(total)), "std_log_p": float(np.std(total)),
                    "mean_score": float(np.mean(arrays["score"][chosen]))}
                if jet_type in background:
                    continue
                keep = is_background | chosen
                labels = chosen[keep].astype(np.int32)
                row["anomalies"][jet_type] = self._discrimination(labels, {k: np.asarray(v)[keep]
                                                                          for k, v in scores.items()})
            metrics["backgrounds"][group] = row
            if figures_dir is not None:
                score_histograms(scores, type_of, background, os.path.join(figures_dir, f"anomaly_scores_{group}.png"),
                                 title=f"trained on {'+'.join(background)}")
                roc_and_sic(scores, type_of, background, os.path.join(figures_dir, f"anomaly_roc_{group}.png"),
                            title=f"trained on {'+'.join(background)}")
        return metrics

    def full_run(self, runs: dict) -> str:
        """The anomaly score's run: the first Hutchinson run over every scored jet, else the first
        exact one (validation requires one)."""
        full = [name for name, r in runs.items() if self.options_of(r.run)["num_jets"] == 0]
        hutchinson = [name for name in full if self.options_of(runs[name].run)["divergence"] == "hutchinson"]
        if not full:
            raise ConfigError("no likelihood run over every scored jet (num_jets=0) in the scores files")
        return (hutchinson or full)[0]

    def evaluate_agreement(self, data, samples, models, *, figures_dir):
        """Exact vs Hutchinson particle likelihoods on the exact runs' subsets: the correlation of
        the scores and of the per-particle terms, the largest absolute score difference, and the
        AUC of each anomalous type from either (same jets)."""
        metrics = {"backgrounds": {}}
        for group, runs in samples.items():
            full = runs[self.full_run(runs)]
            rows = {}
            for name, r in runs.items():
                options = self.options_of(r.run)
                if options["divergence"] != "exact":
                    continue
                # The exact run scores the first num_jets of each type, the full run all of them.
                n, m = options["num_jets"] or self.cfg.sampling.num_samples, self.cfg.sampling.num_samples
                take = np.concatenate([np.arange(i * m, i * m + min(n, m)) for i in range(len(data.types))])
                exact, hutch = r.arrays, {k: v[take] for k, v in full.arrays.items()}
                if not np.array_equal(exact["type_index"], hutch["type_index"]):
                    raise ValueError(f"{group}: runs {name!r} and the full run do not score the same jets")
                per_particle = [a["log_p_particles"] / a["num_particles"] for a in (exact, hutch)]
                type_of = np.asarray(data.types)[exact["type_index"]]
                is_background = np.isin(type_of, self.backgrounds[group])
                aucs = {}
                for jet_type in data.types:
                    if jet_type in self.backgrounds[group]:
                        continue
                    keep = is_background | (type_of == jet_type)
                    labels = (type_of[keep] == jet_type).astype(np.int32)
                    a_exact = anomaly_metrics.auc(labels, exact["score"][keep])
                    a_hutch = anomaly_metrics.auc(labels, hutch["score"][keep])
                    aucs[jet_type] = {"auc_exact": a_exact, "auc_hutchinson": a_hutch,
                                      "auc_difference": a_hutch - a_exact}
                rows[name] = {"num_jets": int(len(take)), "hutchinson_run": self.full_run(runs),
                              "score_correlation": float(np.corrcoef(exact["score"], hutch["score"])[0, 1]),
                              "particle_term_correlation": float(np.corrcoef(*per_particle)[0, 1]),
                              "max_abs_score_difference": float(np.max(np.abs(exact["score"] - hutch["score"]))),
                              "rms_particle_term_difference": float(np.sqrt(np.mean(
                                  (per_particle[0] - per_particle[1]) ** 2))),
                              "anomalies": aucs}
            metrics["backgrounds"][group] = {"agreement": rows}
        return metrics

    def format_results(self, metrics):
        lines = [f"{'trained on':<12}{'anomaly':<9}{'AUC':>7}{'SICmax':>8}{'SIC@eff':>9}{'AUC mass':>10}"
                 f"{'AUC mult':>10}"]
        for group, row in metrics.get("backgrounds", {}).items():
            for jet_type, r in row.get("anomalies", {}).items():
                lh = r["likelihood"]
                lines.append(f"{'+'.join(row['background_types']):<12}{jet_type:<9}{lh['auc']:>7.3f}"
                             f"{lh['sic_max']:>8.2f}{lh['sic_at_efficiency']:>9.2f}{r['mass']['auc']:>10.3f}"
                             f"{r['multiplicity']['auc']:>10.3f}")
            for name, agreement in row.get("agreement", {}).items():
                diffs = ", ".join(f"{t} {a['auc_difference']:+.4f}" for t, a in agreement["anomalies"].items())
                lines.append(f"  {name}: exact vs Hutchinson on {agreement['num_jets']} jets: score correlation "
                             f"{agreement['score_correlation']:.4f}; AUC difference {diffs}")
        return "\n".join(lines)


