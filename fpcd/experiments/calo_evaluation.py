"""The calorimeter experiment's evaluation: shower observables at the cell and voxel level with
their W1 to held-out showers and the truth-vs-truth floor, classifier AUCs (high-level observables,
voxel images) with the observables that separate generated from true showers, the figures, the
summary row and the point-cloud vs image comparison table.

:class:`CaloEvaluation` is a mixin of :class:`fpcd.experiments.calo.CaloExperiment`: its methods
read ``self.cfg``, ``self.progress``, ``self.models()`` and ``self.stage2``.
"""

from __future__ import annotations

import os
import resource

import jax
import numpy as np

from fpcd.data.calo import from_voxels, to_voxels
from fpcd.experiments.two_stage import classifier, run_row, table_cell
from fpcd.io import atomic_write, write_json
from fpcd.metrics import calo as calo_metrics
from fpcd.nets import count_parameters
from fpcd.plots.calo import observables_by_momentum, profiles_by_momentum
from fpcd.plots.common import nfe_vs_w1
from fpcd.runner import TRAIN_INFO_FILE, is_student, read_json

GROUP = 5  # cells per voxel along each axis


class CaloEvaluation:
    """The evaluators ``observables`` and ``classifier`` of the calo experiment, its summary and
    console table."""

    def _classifier(self, truth, generated):
        return classifier(self.cfg, truth, generated)

    def evaluators(self):
        return {"observables": self.evaluate_observables, "classifier": self.evaluate_classifier}

    def evaluate(self, data, samples, models, *, figures_dir):
        metrics = super().evaluate(data, samples, models, figures_dir=figures_dir)
        metrics["summary"] = self._summary(figures_dir, metrics)
        comparison = self._compare_with(figures_dir, metrics)
        if comparison is not None:
            metrics["comparison"] = comparison
        return metrics

    def _observables(self, data, samples):
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

    def evaluate_observables(self, data, samples, models, *, figures_dir):
        """W1 of every shower observable at each level against held-out showers, the truth-vs-truth
        floor, and the figures."""
        cfg = self.cfg
        levels, (truth_a, _), _, truth, generated = self._observables(data, samples)
        floors = {level: calo_metrics.observable_w1(*truth[level]) for level in levels}
        metrics = {"representation": cfg.representation, "num_samples": cfg.sampling.num_samples,
                   "num_empty_showers_dropped": data.num_empty, "floor": floors, "runs": {}}
        for name, r in samples[""].items():
            row = run_row(r)
            for level in levels:
                row[level] = w1_block(truth[level][0], generated[name][level], floors[level])
            metrics["runs"][name] = row
        if figures_dir is not None:
            self._figures(figures_dir, metrics, samples[""], truth, generated, truth_a.momentum, levels)
        return metrics

    def evaluate_classifier(self, data, samples, models, *, figures_dir):
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

        cell = table_cell
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
