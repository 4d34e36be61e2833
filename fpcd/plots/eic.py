"""EIC figures: generated vs held-out observables with ratio panels, and per-species spectra."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fpcd.data import eic  # noqa: E402
from fpcd.metrics import eic as eic_metrics  # noqa: E402
from fpcd.plots.common import density, histograms_with_ratio, save_figure  # noqa: E402

LABELS = {
    "electron_pt": "electron $p_T$ [GeV]", "electron_eta": "electron $\\eta$", "multiplicity": "multiplicity",
    "log10_q2": "$\\log_{10} Q^2$ [GeV$^2$]", "log10_x": "$\\log_{10} x$", "y": "$y$",
    "eta": "particle $\\eta$", "phi_recoil": "particle $\\phi$ from the recoil",
    "log_pt_ratio": "particle $\\log(p_T / p_T^e)$", "charge_sum": "$\\sum$ charge (e' included)",
    "z_sum": "$\\sum z$ (e' included)",
}


def _histogram_panel(top, bottom, truth, generated: dict, label: str, bins: int, integer: bool = False,
                     value_range=None):
    if integer:
        values = np.concatenate([truth, *generated.values()])
        low, high = np.percentile(values, [0.5, 99.5])
        edges = np.arange(np.floor(low) - 0.5, np.ceil(high) + 1.5, 1.0)
        if len(edges) > bins + 1:
            edges = np.arange(edges[0], edges[-1] + 1, np.ceil((edges[-1] - edges[0]) / bins))
    elif value_range is not None:
        edges = np.linspace(*value_range, bins + 1)
    else:
        edges = np.histogram_bin_edges(truth, bins=bins, range=tuple(np.percentile(truth, [0.5, 99.5])))
    histograms_with_ratio(top, bottom, truth, generated, edges, label)


def compare(truth: eic.EventSet, generated: dict, path: str, *, bins: int = 40, title: str | None = None) -> str:
    """PNG grid: every observable of :mod:`fpcd.metrics.eic`, the charge and z sums and the species
    fractions, truth filled and each generated :class:`~fpcd.data.eic.EventSet` a line, with
    generated/truth ratio panels."""
    obs_t = eic_metrics.observables(truth)
    obs_g = {name: eic_metrics.observables(events) for name, events in generated.items()}
    panels = [(name, obs_t[name], {k: o[name] for k, o in obs_g.items()}, name == "multiplicity")
              for name in eic_metrics.OBSERVABLES]
    panels.append(("charge_sum", eic_metrics.charge_sums(truth),
                   {k: eic_metrics.charge_sums(e) for k, e in generated.items()}, True))
    panels.append(("z_sum", eic_metrics.z_sums(truth), {k: eic_metrics.z_sums(e) for k, e in generated.items()}, False))
    fig = plt.figure(figsize=(18, 12))
    grid = fig.add_gridspec(8, 4, height_ratios=[3, 1, 0.55, 3, 1, 0.55, 3, 1], hspace=0.08, wspace=0.3)
    for number, (name, t, g, integer) in enumerate(panels):
        row, col = 3 * (number // 4), number % 4
        top = fig.add_subplot(grid[row, col])
        bottom = fig.add_subplot(grid[row + 1, col], sharex=top)
        value_range = None
        if name == "z_sum":  # truth is a spike at 2: show +-50 % (overflow in the edge bins)
            value_range = (1.0, 3.0)
            t = np.clip(t, 1.0, 3.0)
            g = {k: np.clip(v, 1.0, 3.0) for k, v in g.items()}
        _histogram_panel(top, bottom, t, g, LABELS[name], bins, integer, value_range)
        if col == 0:
            top.set_ylabel("density")
            bottom.set_ylabel("gen / truth")
        if number == 0:
            top.legend(fontsize=8)
    top = fig.add_subplot(grid[6, 3])
    bottom = fig.add_subplot(grid[7, 3], sharex=top)
    x = np.arange(len(eic.SPECIES))
    f_truth = eic_metrics.species_fractions(obs_t)
    top.bar(x, f_truth, color="0.8", label="truth")
    for i, (name, o) in enumerate(obs_g.items()):
        f = eic_metrics.species_fractions(o)
        top.step(x, f, where="mid", color=f"C{i}", label=name)
        with np.errstate(divide="ignore", invalid="ignore"):
            bottom.plot(x, f / f_truth, "o", ms=3, color=f"C{i}")
    top.set_yscale("log")
    top.tick_params(labelbottom=False)
    bottom.axhline(1.0, color="k", lw=0.5)
    bottom.set_ylim(0.5, 1.5)
    bottom.set_xticks(x, eic.SPECIES, fontsize=8)
    bottom.set_xlabel("species fraction")
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def species_spectra(truth: eic.EventSet, generated: dict, path: str, *, bins: int = 30,
                    title: str | None = None) -> str:
    """PNG: log(pT_i / pT_e) and eta per species (rows: p, n, K, pi, e, gamma, K0L), truth filled,
    each generated sample a line, normalised to the species' fraction."""
    shown = ("p", "n", "K", "pi", "e", "gamma", "K0L")
    obs_t = eic_metrics.observables(truth)
    obs_g = {name: eic_metrics.observables(events) for name, events in generated.items()}
    fig, axes = plt.subplots(2, len(shown), figsize=(3 * len(shown), 6))
    for column, species in enumerate(shown):
        index = eic.SPECIES.index(species)
        for row, obs in enumerate(("log_pt_ratio", "eta")):
            ax = axes[row, column]
            t = obs_t[obs][obs_t["species"] == index]
            if len(t) < 2:
                continue
            edges = np.histogram_bin_edges(t, bins=bins, range=tuple(np.percentile(t, [0.5, 99.5])))
            weight = len(t) / max(len(obs_t["species"]), 1)
            h = density(t, edges)
            ax.stairs(h * weight, edges, fill=True, color="0.8", label="truth")
            for i, (name, o) in enumerate(obs_g.items()):
                g = o[obs][o["species"] == index]
                if len(g) >= 2:
                    h = density(g, edges)
                    ax.stairs(h * len(g) / max(len(o["species"]), 1), edges, color=f"C{i}", label=name)
            ax.set_xlabel(f"{species}: {LABELS[obs].replace('particle ', '')}", fontsize=8)
            if column == 0 and row == 0:
                ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)
