"""Shower observables, their Wasserstein-1 distances, and a generated-vs-truth classifier AUC.

Observables of showers given as cells ``(N, C, 5)`` = (E, x, y, z, mask) (point clouds, or voxel
images turned into points at voxel centres by :func:`fpcd.data.calo.from_voxels`):

* ``energy_over_momentum``: sum of cell E / P_gen;
* ``num_cells``: number of hit cells (voxels);
* ``centroid_x/y/z`` and ``width_x/y/z``: energy-weighted mean and standard deviation (mm);
* ``energy_per_layer`` ``(N, L)``: energy summed per layer (``L`` = 55 cell layers, or 11 voxel
  layers with ``group=5``);
* ``radial_profile`` ``(N, R)``: fraction of the energy in bins of transverse distance from the
  shower's energy centroid (edges :data:`RADIAL_EDGES_MM`).

:func:`observable_w1` gives per observable the W1 distance (vector observables: mean over their
components), :func:`classifier_auc` the AUC of an MLP separating two samples (0.5: identical).
"""

from __future__ import annotations

import numpy as np

from fpcd.data.calo import EPIC_FORWARD_HCAL, CaloGeometry
from fpcd.metrics.classifier import classifier_auc, roc_auc, separating_features  # noqa: F401  (public here)
from fpcd.metrics.distances import wasserstein_1d

RADIAL_EDGES_MM = (0.0, 75.0, 150.0, 250.0, 400.0, 700.0, np.inf)
SCALAR_OBSERVABLES = ("energy_over_momentum", "num_cells", "centroid_x", "centroid_y", "centroid_z",
                      "width_x", "width_y", "width_z")
VECTOR_OBSERVABLES = ("energy_per_layer", "radial_profile")


def shower_observables(cells, momentum, geometry: CaloGeometry = EPIC_FORWARD_HCAL, group: int = 1) -> dict:
    """Observables (module docstring) of showers ``cells (N, C, 5)`` with momenta ``(N,)`` in GeV.

    ``group`` is the number of cell layers per layer of ``energy_per_layer`` (5 for voxel images).
    Showers with no hit cell get zero centroids and widths.
    """
    cells = np.asarray(cells, np.float64)
    mask = cells[..., 4] > 0.5
    energy = np.where(mask, cells[..., 0], 0.0)
    total = energy.sum(axis=1)
    safe_total = np.where(total > 0, total, 1.0)
    weights = energy / safe_total[:, None]
    out = {"energy_over_momentum": total / np.asarray(momentum, np.float64),
           "num_cells": mask.sum(axis=1).astype(np.float64)}
    for axis, name in ((1, "x"), (2, "y"), (3, "z")):
        mean = (weights * cells[..., axis]).sum(axis=1)
        var = (weights * (cells[..., axis] - mean[:, None]) ** 2).sum(axis=1)
        out[f"centroid_{name}"] = mean
        out[f"width_{name}"] = np.sqrt(np.maximum(var, 0.0))
    g = geometry
    layer = np.clip(np.floor((cells[..., 3] - g.front_z_mm) / (g.layer_pitch_mm * group)), 0,
                    g.num_layers // group - 1).astype(np.int64)
    num_layers = g.num_layers // group
    flat = layer + num_layers * np.arange(len(cells))[:, None]
    out["energy_per_layer"] = np.bincount(flat.ravel(), weights=energy.ravel(),
                                          minlength=len(cells) * num_layers).reshape(len(cells), num_layers)
    radius = np.hypot(cells[..., 1] - out["centroid_x"][:, None], cells[..., 2] - out["centroid_y"][:, None])
    edges = np.asarray(RADIAL_EDGES_MM)
    bins = np.clip(np.searchsorted(edges, radius, side="right") - 1, 0, len(edges) - 2)
    flat = bins + (len(edges) - 1) * np.arange(len(cells))[:, None]
    profile = np.bincount(flat.ravel(), weights=weights.ravel(), minlength=len(cells) * (len(edges) - 1))
    out["radial_profile"] = profile.reshape(len(cells), len(edges) - 1)
    return out


def observable_w1(truth: dict, generated: dict) -> dict:
    """W1 per observable: scalars directly, vector observables as the mean over components."""
    out = {}
    for name in truth:
        a, b = np.asarray(truth[name]), np.asarray(generated[name])
        if a.ndim == 1:
            out[name] = wasserstein_1d(a, b)
        else:
            out[name] = float(np.mean([wasserstein_1d(a[:, j], b[:, j]) for j in range(a.shape[1])]))
    return out


def high_level_features(observables: dict, momentum, theta) -> np.ndarray:
    """The classifier's high-level input per shower: log10 P, theta, log10 of the layer energies
    (+1e-8), the radial profile, centroids and widths (in 100 mm), log10 total energy and the number
    of hit cells; ``(N, F)``."""
    columns = [np.log10(np.asarray(momentum, np.float64))[:, None], np.asarray(theta, np.float64)[:, None],
               np.log10(observables["energy_per_layer"] + 1e-8), observables["radial_profile"]]
    columns += [observables[f"{k}_{a}"][:, None] / 100.0 for k in ("centroid", "width") for a in "xyz"]
    total = observables["energy_over_momentum"] * np.asarray(momentum, np.float64)
    columns += [np.log10(total + 1e-8)[:, None], observables["num_cells"][:, None]]
    return np.concatenate(columns, axis=1).astype(np.float32)


def high_level_feature_names(num_layers: int) -> list[str]:
    """Names of the columns of :func:`high_level_features` with ``num_layers`` layer energies."""
    edges = RADIAL_EDGES_MM
    return (["log10 P", "theta"] + [f"log10 E layer {i}" for i in range(num_layers)]
            + [f"radial fraction {edges[i]:g}-{edges[i + 1]:g} mm" for i in range(len(edges) - 1)]
            + [f"{k}_{a}" for k in ("centroid", "width") for a in "xyz"] + ["log10 E total", "num_cells"])


def voxel_features(images, momentum) -> np.ndarray:
    """The classifier's low-level input (as the CaloChallenge): log10 P and the voxels / P."""
    momentum = np.asarray(momentum, np.float64)
    flat = np.asarray(images, np.float64).reshape(len(images), -1) / momentum[:, None]
    return np.concatenate([np.log10(momentum)[:, None], flat], axis=1).astype(np.float32)
