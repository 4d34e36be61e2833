"""Jet figures: generated vs true feature histograms with ratio panels."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fpcd.data.jetnet import JetSet  # noqa: E402
from fpcd.plots.common import histograms_with_ratio, save_figure  # noqa: E402

PANELS = (
    ("jet mass [GeV]", "jet", 2, None),
    ("jet $p_T$ [GeV]", "jet", 0, None),
    ("jet $\\eta$", "jet", 1, None),
    ("multiplicity", "jet", 3, None),
    ("particle $\\eta^{rel}$", "particle", 0, (-0.8, 0.8)),
    ("particle $\\phi^{rel}$", "particle", 1, (-0.8, 0.8)),
    ("particle $p_T^{rel}$", "particle", 2, "log"),
)


def _values(jets: JetSet, kind: str, index: int) -> np.ndarray:
    if kind == "jet":
        return jets.jet_features[:, index]
    return jets.particle_features[..., index][jets.mask]


def compare(truth: JetSet, generated, path: str, *, bins: int = 40, title: str | None = None) -> str:
    """Save a PNG grid of histograms: jet mass, pT, eta, multiplicity and particle eta_rel,
    phi_rel, pt_rel, truth filled, each generated sample a line, with generated/truth ratio panels.

    Args:
      truth: the reference :class:`JetSet`.
      generated: a :class:`JetSet` or a dict ``label -> JetSet``.
      path: output PNG path (written atomically).
    """
    if isinstance(generated, JetSet):
        generated = {"generated": generated}
    fig = plt.figure(figsize=(16, 8.5))
    grid = fig.add_gridspec(5, 4, height_ratios=[3, 1, 0.55, 3, 1], hspace=0.08, wspace=0.3)
    for number, (label, kind, index, binning) in enumerate(PANELS):
        row, col = (0, number) if number < 4 else (3, number - 4)
        top = fig.add_subplot(grid[row, col])
        bottom = fig.add_subplot(grid[row + 1, col], sharex=top)
        t = _values(truth, kind, index)
        if binning == "log":
            positive = t[t > 0]
            edges = np.geomspace(max(positive.min(), 1e-5), positive.max(), bins + 1)
            top.set_xscale("log")
        elif isinstance(binning, tuple):
            edges = np.linspace(*binning, bins + 1)
        elif kind == "jet" and index == 3:
            edges = np.arange(t.min() - 0.5, t.max() + 1.5, max(1, int(np.ptp(t) // bins) or 1))
        else:
            edges = np.histogram_bin_edges(t, bins=bins, range=tuple(np.percentile(t, [0.5, 99.5])))
        histograms_with_ratio(top, bottom, t, {name: _values(jets, kind, index) for name, jets in generated.items()},
                              edges, label)
        if col == 0:
            top.set_ylabel("density")
            bottom.set_ylabel("gen / truth")
        if number == 0:
            top.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)
