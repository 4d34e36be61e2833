"""Anomaly-detection figures: score histograms per jet type and ROC / SIC curves."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fpcd.metrics.anomaly import roc_curve  # noqa: E402
from fpcd.plots.common import density, save_figure  # noqa: E402

PANELS = (("likelihood", r"$-\log p(\mathrm{jet}) - \log p(\mathrm{particles}\,|\,\mathrm{jet})/N$"),
          ("jet_term", r"$-\log p(\mathrm{jet})$"),
          ("particle_term", r"$-\log p(\mathrm{particles}\,|\,\mathrm{jet})/N$"))


def score_histograms(scores: dict, type_of, background, path: str, *, title: str = "", bins: int = 50) -> str:
    """One panel per term of the anomaly score (``scores[name]`` per jet), one line per jet type;
    background types filled. The range holds the central 99 % of all jets."""
    type_of = np.asarray(type_of)
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4.6 * len(PANELS), 3.6))
    for ax, (name, label) in zip(axes, PANELS):
        values = np.asarray(scores[name], np.float64)
        edges = np.linspace(*np.percentile(values, [0.5, 99.5]), bins + 1)
        for i, jet_type in enumerate(dict.fromkeys(type_of)):
            h = density(values[type_of == jet_type], edges)
            if jet_type in background:
                ax.stairs(h, edges, fill=True, alpha=0.35, color=f"C{i}", label=f"{jet_type} (background)")
            else:
                ax.stairs(h, edges, color=f"C{i}", lw=1.4, label=jet_type)
        ax.set_xlabel(label)
    axes[0].set_ylabel("density")
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    return save_figure(fig, path)


def roc_and_sic(scores: dict, type_of, background, path: str, *, title: str = "",
                names=("likelihood", "mass", "multiplicity")) -> str:
    """Per anomalous type: background rejection 1/FPR and SIC = TPR/sqrt(FPR) against the signal
    efficiency for the likelihood score and the simple scores (each in its better direction)."""
    type_of = np.asarray(type_of)
    is_background = np.isin(type_of, background)
    anomalies = [t for t in dict.fromkeys(type_of) if t not in background]
    fig, axes = plt.subplots(2, len(anomalies), figsize=(4.2 * len(anomalies), 7), squeeze=False)
    for col, jet_type in enumerate(anomalies):
        keep = is_background | (type_of == jet_type)
        labels = (type_of[keep] == jet_type).astype(np.int32)
        for i, name in enumerate(names):
            score = np.asarray(scores[name], np.float64)[keep]
            fpr, tpr, _ = roc_curve(labels, score)
            if np.trapezoid(tpr, fpr) < 0.5 and name != "likelihood":
                fpr, tpr, _ = roc_curve(labels, -score)
            positive = fpr > 0
            axes[0, col].plot(tpr[positive], 1.0 / fpr[positive], color=f"C{i}", label=name)
            axes[1, col].plot(tpr[positive], tpr[positive] / np.sqrt(fpr[positive]), color=f"C{i}", label=name)
        efficiency = np.linspace(0.01, 1.0, 100)
        axes[0, col].plot(efficiency, 1.0 / efficiency, "k:", lw=0.8, label="random")
        axes[0, col].set_yscale("log")
        axes[0, col].set_title(f"{jet_type} as the anomaly")
        axes[0, col].set_ylabel("background rejection 1/FPR")
        axes[1, col].axhline(1.0, color="k", lw=0.5)
        axes[1, col].set_ylabel(r"SIC = TPR/$\sqrt{\mathrm{FPR}}$")
        axes[1, col].set_xlabel("signal efficiency (TPR)")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(title)
    return save_figure(fig, path)
