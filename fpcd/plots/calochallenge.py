"""Figures of the CaloChallenge experiment: feature histograms with ratio panels, and the mean
shower profiles (energy per layer, energy per radial bin) of generated vs held-out showers."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fpcd.plots.common import histograms_with_ratio, save_figure  # noqa: E402

LABELS = {"E_ratio": "E_dep / E_inc", "num_hits": "hit voxels per shower"}


def _label(name: str) -> str:
    if name in LABELS:
        return LABELS[name]
    if name.startswith("E_layer_"):
        return f"log10(E in layer {name.split('_')[-1]} / MeV)"
    kind, axis, layer = name.split("_")
    return f"{'centre of energy' if kind == 'EC' else 'width'} in {axis}, layer {layer} (mm)"


def feature_histograms(truth: dict, generated: dict, names, bins: dict, view, path: str, *, title: str = "") -> str:
    """One histogram panel with its generated/truth ratio panel per feature of ``names``:
    ``truth`` and ``generated[run]`` map feature names to per-shower values, ``bins[name]`` are the
    edges in the histogrammed variable ``view(name, values)``; values beyond the edges are left
    out (as in the challenge's histograms)."""
    cols = min(4, len(names))
    rows = -(-len(names) // cols)
    fig = plt.figure(figsize=(4.2 * cols, 4.4 * rows))
    outer = fig.add_gridspec(rows, cols, hspace=0.35, wspace=0.3)
    for i, name in enumerate(names):
        panel = outer[divmod(i, cols)].subgridspec(2, 1, height_ratios=[3, 1], hspace=0.05)
        top = fig.add_subplot(panel[0])
        bottom = fig.add_subplot(panel[1], sharex=top)
        edges = bins[name]

        def inside(values):
            values = view(name, values)
            return values[(values >= edges[0]) & (values <= edges[-1])]

        histograms_with_ratio(top, bottom, inside(truth[name]), {run: inside(f[name]) for run, f in generated.items()},
                              edges, _label(name))
        if i == 0:
            top.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def shower_profiles(truth, generated: dict, geometry, path: str) -> str:
    """Mean energy per layer and per radial bin (MeV) of ``truth (N, voxels)`` and of each run's
    showers in ``generated``, on a log scale, with the ratio to truth below."""
    layer_of = geometry.voxel_indices()
    fig, axes = plt.subplots(2, 2, figsize=(10, 5.5), gridspec_kw={"height_ratios": [3, 1]}, sharex="col")
    for col, index in enumerate(("layer", "radial")):
        bins = layer_of[index]
        size = int(bins.max()) + 1

        def profile(showers):
            showers = np.asarray(showers, np.float64)
            if not len(showers):
                return np.full(size, np.nan)
            return np.bincount(bins, weights=showers.mean(axis=0), minlength=size)

        reference = profile(truth)
        x = np.arange(size)
        axes[0, col].step(x, reference, where="mid", color="0.4", lw=2, label="truth")
        for i, (name, showers) in enumerate(generated.items()):
            values = profile(showers)
            axes[0, col].step(x, values, where="mid", color=f"C{i}", lw=1, label=name)
            with np.errstate(divide="ignore", invalid="ignore"):
                axes[1, col].step(x, values / reference, where="mid", color=f"C{i}", lw=0.9)
        axes[0, col].set_yscale("log")
        axes[0, col].set_ylabel("mean energy per shower (MeV)")
        axes[1, col].axhline(1.0, color="k", lw=0.5)
        axes[1, col].set_ylim(0.5, 1.5)
        axes[1, col].set_xlabel(f"{index} bin")
    axes[0, 0].legend(fontsize=7)
    return save_figure(fig, path)
