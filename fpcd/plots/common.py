"""Figures shared by experiments: samples vs truth, NFE vs W1 per sampler, training loss curves."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.ticker  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fpcd.io import atomic_write  # noqa: E402


def save_figure(fig, path):
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png"))
    plt.close(fig)
    return path


def density(values, edges) -> np.ndarray:
    """Histogram normalised to unit area over ``edges`` (zeros when no value falls inside)."""
    counts, _ = np.histogram(values, edges)
    total = counts.sum() * np.diff(edges)
    return np.divide(counts, total, out=np.zeros(len(counts)), where=total > 0)


def histograms_with_ratio(top, bottom, truth, generated: dict, edges, xlabel: str) -> None:
    """Draw ``truth`` filled and each ``generated`` sample (label -> values) as a line on ``top``, and
    generated / truth on ``bottom`` (0.5 to 1.5), on the bin ``edges``."""
    h_truth = density(truth, edges)
    top.stairs(h_truth, edges, fill=True, color="0.8", label="truth")
    centres = 0.5 * (edges[1:] + edges[:-1])
    for i, (name, values) in enumerate(generated.items()):
        h = density(values, edges)
        top.stairs(h, edges, color=f"C{i}", label=name)
        with np.errstate(divide="ignore", invalid="ignore"):
            bottom.plot(centres, h / h_truth, color=f"C{i}", lw=0.9, drawstyle="steps-mid")
    bottom.axhline(1.0, color="k", lw=0.5)
    bottom.set_ylim(0.5, 1.5)
    bottom.set_xlabel(xlabel)
    top.tick_params(labelbottom=False)


def samples_vs_truth_2d(truth, samples_by_run: dict, path: str, *, max_points: int = 3000):
    """One scatter panel per run (generated in colour over truth in grey) plus the truth alone."""
    names = list(samples_by_run)
    cols = min(4, len(names) + 1)
    rows = -(-(len(names) + 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    truth = np.asarray(truth)[:max_points]
    lo, hi = np.percentile(truth, [0.5, 99.5], axis=0)
    pad = 0.15 * (hi - lo)
    panels = [("truth", truth)] + [(n, np.asarray(samples_by_run[n])[:max_points]) for n in names]
    for ax, (name, pts) in zip(axes.flat, panels):
        ax.scatter(truth[:, 0], truth[:, 1], s=1, c="0.75", label="truth")
        if name != "truth":
            ax.scatter(pts[:, 0], pts[:, 1], s=1, c="C0", alpha=0.6, label="generated")
        ax.set_title(name, fontsize=9)
        ax.set_xlim(lo[0] - pad[0], hi[0] + pad[0])
        ax.set_ylim(lo[1] - pad[1], hi[1] + pad[1])
        ax.set_aspect("equal")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    return save_figure(fig, path)


def marginals(truth, samples_by_run: dict, path: str, *, bins: int = 60, labels=None):
    """Histogram of each dimension: truth filled, each run as a line, with a ratio panel."""
    truth = np.asarray(truth)
    dims = truth.shape[1]
    fig, axes = plt.subplots(2, dims, figsize=(4 * dims, 4.5), squeeze=False, gridspec_kw={"height_ratios": [3, 1]},
                             sharex="col")
    for d in range(dims):
        edges = np.histogram_bin_edges(truth[:, d], bins=bins)
        h_truth, _ = np.histogram(truth[:, d], edges, density=True)
        centres = 0.5 * (edges[1:] + edges[:-1])
        axes[0, d].stairs(h_truth, edges, fill=True, color="0.8", label="truth")
        for i, (name, pts) in enumerate(samples_by_run.items()):
            h, _ = np.histogram(np.asarray(pts)[:, d], edges, density=True)
            axes[0, d].stairs(h, edges, color=f"C{i}", label=name)
            with np.errstate(divide="ignore", invalid="ignore"):
                axes[1, d].plot(centres, h / h_truth, color=f"C{i}", lw=0.8)
        axes[1, d].axhline(1.0, color="k", lw=0.5)
        axes[1, d].set_ylim(0.5, 1.5)
        axes[1, d].set_xlabel(labels[d] if labels else f"x[{d}]")
        axes[1, d].set_ylabel("gen / truth")
    axes[0, 0].legend(fontsize=7)
    return save_figure(fig, path)


def nfe_vs_w1(runs: dict, path: str, *, floor: float | None = None, metric_key: str = "w1_mean",
              ylabel: str = "mean W1 over dimensions"):
    """W1 against NFE, one line per sampling method (runs: name -> {method, nfe, metric_key}); runs
    with a true ``"student"`` field (distilled students) make a line of their own."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    by_method: dict[str, list] = {}
    for name, row in runs.items():
        label = f"{row['method']} (distilled students)" if row.get("student") else row["method"]
        by_method.setdefault(label, []).append((row["nfe"], row[metric_key], name))
    for i, (method, points) in enumerate(sorted(by_method.items())):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], "o-", color=f"C{i}", label=method)
    if floor is not None:
        ax.axhline(floor, color="k", ls="--", lw=1, label="truth vs truth")
    ax.set_xscale("log")
    ax.set_yscale("log")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("NFE (score evaluations per sample)")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    return save_figure(fig, path)


def loss_curves(rows: list[dict], path: str):
    """Training loss (and gradient norm) against step, one line per stage, from ``train_log.jsonl``
    rows (``{"stage", "step", "loss", "grad_norm", ...}``); a resumed run's rows replace the
    earlier ones of the same steps."""
    stages: dict[str, dict[int, dict]] = {}
    for row in rows:
        stages.setdefault(row["stage"], {})[int(row["step"])] = row
    fig, (ax_loss, ax_grad) = plt.subplots(1, 2, figsize=(10, 3.6))
    for i, (stage, by_step) in enumerate(stages.items()):
        steps = sorted(by_step)
        ax_loss.plot(steps, [by_step[s]["loss"] for s in steps], "-", color=f"C{i}", label=stage)
        ax_grad.plot(steps, [by_step[s]["grad_norm"] for s in steps], "-", color=f"C{i}", label=stage)
    for ax, label in ((ax_loss, "training loss"), (ax_grad, "gradient norm")):
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
    if stages:
        ax_loss.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)
