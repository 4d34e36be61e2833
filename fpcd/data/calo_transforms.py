"""Model-side representation of calorimeter showers, with exact inverses where one exists.

* Stage 1: :func:`cluster_targets` (log10 sum E, N_cells) given :func:`conditions`
  (log10 P_gen, theta_gen).
* Point clouds: :func:`cell_features` turns hit cells into (log10 E, dx, dy, layer), ``dx``/``dy``
  the cell's index offsets from the cell the particle's straight line crosses at that layer
  (:func:`track_cells`), each with a uniform dequantisation; :func:`cells_from_features` digitises
  generated points back to cells (rounding recovers the cell of a dequantised truth point).
* Voxel images: :func:`image_to_log_fractions` / :func:`log_fractions_to_image`.

Standardisation is :class:`fpcd.data.standardisation.Standardisation`, as for jets; the N_cells
buckets of training are :mod:`fpcd.data.buckets`.
"""

from __future__ import annotations

import numpy as np

from fpcd.data.calo import ShowerSet, cell_indices
from fpcd.data.calo_physics import EPIC_FORWARD_HCAL, pack_cells
from fpcd.data.common import first_free_candidates


def cluster_targets(showers: ShowerSet) -> np.ndarray:
    """Stage-1 targets ``(N, 2)`` = (log10 sum E, N_cells)."""
    return np.stack([np.log10(showers.cluster[:, 2]), showers.cluster[:, 3]], axis=1)


def conditions(momentum, theta) -> np.ndarray:
    return np.stack([np.log10(momentum), theta], axis=1)


def track_cells(theta_deg, *, phi_deg: float = 0.0, geometry=EPIC_FORWARD_HCAL):
    """Cell indices ``(ix, iy)``, each ``(N, L)``, that the particle's straight line from the origin
    crosses at every layer centre (``x = z tan(theta) cos(phi)``, ``y = z tan(theta) sin(phi)``)."""
    g = geometry
    tan = np.tan(np.radians(np.asarray(theta_deg, np.float64)))[:, None]
    z = g.layer_centres()[None, :]
    index = [np.clip(np.floor((z * tan * trig + g.half_width_mm) / g.cell_size_mm), 0, g.num_cells - 1)
             for trig in (np.cos(np.radians(phi_deg)), np.sin(np.radians(phi_deg)))]
    return index[0].astype(np.int64), index[1].astype(np.int64)


def cell_features(cells, theta_deg, noise, *, phi_deg: float = 0.0, dequantisation: float = 0.5,
                  geometry=EPIC_FORWARD_HCAL) -> np.ndarray:
    """Raw stage-2 cell features ``(N, C, 4)`` = (log10 E, dx, dy, layer) of ``cells (N, C, 5)``.

    ``dx``/``dy`` are the cell's index offsets from the cell the particle's trajectory crosses at
    that layer, ``layer`` the layer index; each gets ``(noise - 0.5) * dequantisation`` with
    ``noise (N, C, 3)`` in [0, 1), so rounding recovers the cell. Padded cells are 0.
    """
    layer, ix, iy = cell_indices(cells[..., 1:4], geometry)
    track_x, track_y = track_cells(theta_deg, phi_deg=phi_deg, geometry=geometry)
    rows = np.arange(len(cells))[:, None]
    jitter = (np.asarray(noise) - 0.5) * dequantisation
    features = np.stack([np.log10(np.maximum(cells[..., 0], 1e-7)), ix - track_x[rows, layer] + jitter[..., 1],
                         iy - track_y[rows, layer] + jitter[..., 2], layer + jitter[..., 0]], axis=-1)
    return np.where(cells[..., 4:5] > 0.5, features, 0.0).astype(np.float32)


NEIGHBOURS = np.stack(np.meshgrid(np.arange(-2, 3), np.arange(-1, 2), np.arange(-1, 2), indexing="ij"),
                      axis=-1).reshape(-1, 3)  # (layer, ix, iy) offsets of the candidate cells


COLLISION_METRICS = ("mm", "index")


def _assign_cells(position, energy, shower, geometry, metric: str = "mm"):
    """Flat cell index per point: each point takes the nearest free cell among its rounded cell and
    the cells within 2 layers and 1 cell of it, points of higher energy first; a point with all
    candidates taken shares its rounded cell. ``position (P, 3)`` = continuous (layer, ix, iy).
    Nearest is in mm (``metric="mm"``: layers are 23.4 mm, cells 100 mm apart, so points move
    along the shower axis first) or in index units (``"index"``: a step of one layer and of one
    cell weigh the same, as the model's own coordinates do)."""
    if metric not in COLLISION_METRICS:
        raise ValueError(f"unknown collision metric {metric!r}; expected one of {COLLISION_METRICS}")
    g = geometry
    base = np.rint(position)
    candidates = base[:, None, :] + NEIGHBOURS[None]
    upper = np.array([g.num_layers - 1, g.num_cells - 1, g.num_cells - 1])
    inside = np.all((candidates >= 0) & (candidates <= upper), axis=-1)
    scale = np.array([g.layer_pitch_mm, g.cell_size_mm, g.cell_size_mm]) if metric == "mm" else np.ones(3)
    distance = np.where(inside, np.sum(((candidates - position[:, None, :]) * scale) ** 2, axis=-1), np.inf)
    order = np.argsort(distance, axis=1, kind="stable")
    candidates = np.clip(np.take_along_axis(candidates, order[..., None], axis=1), 0, upper).astype(np.int64)
    flat = (candidates[..., 0] * g.num_cells + candidates[..., 1]) * g.num_cells + candidates[..., 2]
    valid = np.take_along_axis(inside, order, axis=1)
    return first_free_candidates(flat, valid, energy, shower)


def cells_from_features(features, mask, theta_deg, total_energy, max_cells: int, *, phi_deg: float = 0.0,
                        resolve_collisions: bool = True, collision_metric: str = "mm",
                        geometry=EPIC_FORWARD_HCAL) -> np.ndarray:
    """Inverse of :func:`cell_features`: digitise points to cells, scale energies to
    ``total_energy`` per shower; ``(N, max_cells, 5)`` at cell centres.

    Each point goes to the cell its coordinates round to. With ``resolve_collisions`` a point whose
    cell is already taken by a more energetic point of the same shower moves to the nearest free
    neighbouring cell (so a shower keeps the number of cells stage 1 asked for, as a real one
    never has two hits in a cell); without it, points in one cell are merged (energies summed).
    """
    g = geometry
    n = len(features)
    layer = np.clip(np.rint(features[..., 3]), 0, g.num_layers - 1).astype(np.int64)
    track_x, track_y = track_cells(theta_deg, phi_deg=phi_deg, geometry=g)
    rows = np.arange(n)[:, None]
    position = np.stack([np.clip(features[..., 3], 0, g.num_layers - 1),
                         np.clip(features[..., 1] + track_x[rows, layer], 0, g.num_cells - 1),
                         np.clip(features[..., 2] + track_y[rows, layer], 0, g.num_cells - 1)], axis=-1)
    energy = 10.0 ** np.clip(features[..., 0], -9, 3)
    real = np.asarray(mask) > 0.5
    shower = np.broadcast_to(np.arange(n)[:, None], real.shape)[real]
    if resolve_collisions:
        flat = _assign_cells(position[real], energy[real], shower, g, collision_metric)
    else:
        index = np.rint(position[real]).astype(np.int64)
        flat = (index[:, 0] * g.num_cells + index[:, 1]) * g.num_cells + index[:, 2]
    cells, _, _ = pack_cells(shower, flat, energy[real], n, max_cells, g)
    sums = cells[..., 0].sum(axis=1)
    scale = np.where(sums > 0, np.asarray(total_energy) / np.where(sums > 0, sums, 1.0), 0.0)
    cells[..., 0] *= scale[:, None].astype(np.float32)
    return cells


IMAGE_LOG_OFFSET = 1e-6


def image_to_log_fractions(images) -> np.ndarray:
    """``log10(voxel / sum + 1e-6)``: empty voxels sit at -6, a lone voxel at 0."""
    images = np.asarray(images, np.float64)
    fractions = images / np.maximum(images.sum(axis=(1, 2, 3), keepdims=True), 1e-12)
    return np.log10(fractions + IMAGE_LOG_OFFSET)


def log_fractions_to_image(logs, total_energy) -> np.ndarray:
    """Inverse of :func:`image_to_log_fractions` scaled to ``total_energy``: negative fractions
    are clipped, the image renormalised (voxels below the cell threshold are left to the caller)."""
    fractions = np.maximum(10.0 ** np.minimum(logs, 0.5) - IMAGE_LOG_OFFSET, 0.0)
    fractions /= np.maximum(fractions.sum(axis=(1, 2, 3), keepdims=True), 1e-12)
    return fractions * np.asarray(total_energy)[:, None, None, None]


def cells_to_cluster(cells, momentum, theta) -> np.ndarray:
    mask = cells[..., 4] > 0.5
    return np.stack([momentum, theta, cells[..., 0].sum(axis=1), mask.sum(axis=1)], axis=1).astype(np.float32)
