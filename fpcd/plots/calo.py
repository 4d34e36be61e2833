"""Calorimeter figures: observables and mean profiles of generated vs true showers, binned in
momentum, each with a generated/truth ratio panel."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fpcd.metrics.calo import RADIAL_EDGES_MM, SCALAR_OBSERVABLES  # noqa: E402
from fpcd.plots.common import save_figure  # noqa: E402

LABELS = {
    "energy_over_momentum": r"$\sum E$ / $P_{gen}$", "num_cells": "hit cells",
    "centroid_x": "centroid x [mm]", "centroid_y": "centroid y [mm]", "centroid_z": "centroid z [mm]",
    "width_x": "width x [mm]", "width_y": "width y [mm]", "width_z": "width z [mm]",
}


def _density(values, edges):
    counts, _ = np.histogram(values, edges)
    total = counts.sum()
    return counts / (total * np.diff(edges)) if total else np.zeros(len(edges) - 1)


def _momentum_bins(bins):
    return [(lo, hi) for lo, hi in zip(bins[:-1], bins[1:])]


def _ratio_axes(fig, grid, row, col):
    top = fig.add_subplot(grid[2 * row, col])
    bottom = fig.add_subplot(grid[2 * row + 1, col], sharex=top)
    plt.setp(top.get_xticklabels(), visible=False)
    bottom.axhline(1.0, color="grey", lw=0.8)
    bottom.set_ylim(0.5, 1.5)
    return top, bottom


def _label_panel(top, bottom, *, row, col, num_cols, momentum_bin, xlabel):
    """Momentum title on the first row, axis label and small ticks, the legend in the top-right panel."""
    if row == 0:
        top.set_title(f"{momentum_bin[0]:g} < P < {momentum_bin[1]:g} GeV", fontsize=9)
    bottom.set_xlabel(xlabel, fontsize=8)
    top.tick_params(labelsize=7)
    bottom.tick_params(labelsize=7)
    if row == 0 and col == num_cols - 1:
        top.legend(fontsize=7)


def _save(fig, title, path):
    if title:
        fig.suptitle(title, y=1.0)
    return save_figure(fig, path)


def _ratio(num, den):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / den, np.nan)


def observables_by_momentum(truth: dict, truth_momentum, generated: dict, bins, path, *, title="",
                            observables=SCALAR_OBSERVABLES):
    """Histograms of scalar observables (rows) per momentum bin (columns): truth filled, each
    generated run ``{name: (observables, momentum)}`` as a line, ratio generated/truth below."""
    pbins = _momentum_bins(bins)
    fig = plt.figure(figsize=(3.4 * len(pbins), 2.9 * len(observables)))
    grid = fig.add_gridspec(2 * len(observables), len(pbins), height_ratios=[3, 1] * len(observables), hspace=0.08)
    for row, obs in enumerate(observables):
        for col, (lo, hi) in enumerate(pbins):
            top, bottom = _ratio_axes(fig, grid, row, col)
            sel = (truth_momentum >= lo) & (truth_momentum < hi)
            values = truth[obs][sel]
            if len(values) < 2:
                continue
            edges = np.linspace(*np.percentile(values, [0.5, 99.5]), 31)
            if edges[-1] <= edges[0]:
                edges = np.linspace(edges[0] - 0.5, edges[0] + 0.5, 31)
            reference = _density(values, edges)
            top.stairs(reference, edges, fill=True, color="0.8", label="truth")
            for name, (gen, momentum) in generated.items():
                g = gen[obs][(momentum >= lo) & (momentum < hi)]
                h = _density(g, edges)
                line = top.stairs(h, edges, label=name)
                bottom.stairs(_ratio(h, reference), edges, color=line.get_edgecolor())
            _label_panel(top, bottom, row=row, col=col, num_cols=len(pbins), momentum_bin=(lo, hi),
                         xlabel=LABELS.get(obs, obs))
            if col == 0:
                bottom.set_ylabel("gen/truth", fontsize=7)
    return _save(fig, title, path)


def profiles_by_momentum(truth: dict, truth_momentum, generated: dict, bins, path, *, title=""):
    """Mean energy per layer and mean radial energy fraction per momentum bin, with ratios."""
    pbins = _momentum_bins(bins)
    fig = plt.figure(figsize=(3.4 * len(pbins), 5.8))
    grid = fig.add_gridspec(4, len(pbins), height_ratios=[3, 1, 3, 1], hspace=0.08)
    radial_centres = np.arange(len(RADIAL_EDGES_MM) - 1)
    for row, (obs, xlabel) in enumerate((("energy_per_layer", "layer"),
                                         ("radial_profile", "distance from centroid [mm]"))):
        for col, (lo, hi) in enumerate(pbins):
            top, bottom = _ratio_axes(fig, grid, row, col)
            sel = (truth_momentum >= lo) & (truth_momentum < hi)
            if not sel.any():
                continue
            reference = truth[obs][sel].mean(axis=0)
            x = np.arange(len(reference)) if obs == "energy_per_layer" else radial_centres
            top.plot(x, reference, color="k", lw=2, alpha=0.4, label="truth")
            for name, (gen, momentum) in generated.items():
                g = gen[obs][(momentum >= lo) & (momentum < hi)]
                if len(g):
                    line, = top.plot(x, g.mean(axis=0), lw=1, label=name)
                    bottom.plot(x, _ratio(g.mean(axis=0), reference), lw=1, color=line.get_color())
            top.set_yscale("log")
            if obs == "radial_profile":
                bottom.set_xticks(radial_centres, [f"<{e:g}" for e in RADIAL_EDGES_MM[1:-1]] + [">"], fontsize=6)
            top.set_ylabel("mean energy [GeV]" if obs == "energy_per_layer" else "energy fraction", fontsize=7)
            _label_panel(top, bottom, row=row, col=col, num_cols=len(pbins), momentum_bin=(lo, hi), xlabel=xlabel)
    return _save(fig, title, path)
