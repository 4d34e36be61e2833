"""CaloChallenge showers as point clouds of hit voxels and back (datasets 2 and 3, whose layers share
one binning).

A shower ``(voxels,)`` becomes its hit voxels, most energetic first, each a point
``(log10 E [MeV], layer, alpha, radial)`` whose three indices carry a dequantisation jitter in
``(-d/2, d/2)`` so that a model sees continuous coordinates and rounding recovers the voxel. Back,
:func:`voxels_from_points` rounds each point to a voxel (the angular index wraps around), and
with ``resolve_collisions`` a point whose voxel a more energetic point of the same shower took
moves to the nearest free voxel within one step in each index (angle periodic), so that a shower
keeps the number of hit voxels it was given, as a real one never has two hits in a voxel.
"""

from __future__ import annotations

import numpy as np

from fpcd.data.calochallenge import CylindricalGeometry
from fpcd.data.common import first_free_candidates

NEIGHBOURS = np.stack(np.meshgrid(np.arange(-1, 2), np.arange(-1, 2), np.arange(-1, 2), indexing="ij"),
                      axis=-1).reshape(-1, 3)  # (layer, alpha, radial) offsets of the candidate voxels


def grid_shape(geometry: CylindricalGeometry) -> tuple[int, int, int]:
    """``(layers, alpha, radial)`` of a geometry whose layers share one binning; ValueError otherwise
    (dataset 1's layers differ: its showers are not a regular grid)."""
    bins = {(layer.num_alpha, layer.num_radial) for layer in geometry.layers}
    if len(bins) != 1 or 0 in next(iter(bins)):
        raise ValueError(f"the {geometry.name} binning has layers of different binnings {sorted(bins)}: voxel point "
                         "clouds need one binning in every layer (CaloChallenge datasets 2 and 3)")
    num_alpha, num_radial = bins.pop()
    return geometry.num_layers, num_alpha, num_radial


def voxel_points(showers, geometry: CylindricalGeometry, noise, *, dequantisation: float = 0.5,
                 max_points: int | None = None):
    """``(points (N, P, 4), mask (N, P), counts (N,))``: each shower's hit voxels as
    ``(log10 E, layer, alpha, radial)``, most energetic first, padded with zeros to ``P`` =
    ``max_points`` (default: the most hits of any shower; a shower with more keeps its ``P``
    most energetic). ``noise (N, P, 3)`` in ``[0, 1)`` is the jitter ``(noise - 1/2) * dequantisation``."""
    showers = np.asarray(showers, np.float64)
    num_layers, num_alpha, num_radial = grid_shape(geometry)
    counts = (showers > 0).sum(axis=1)
    p = int(counts.max()) if max_points is None else int(max_points)
    order = np.argsort(-showers, axis=1, kind="stable")[:, :p]
    energy = np.take_along_axis(showers, order, axis=1)
    mask = energy > 0
    layer, rest = np.divmod(order, num_alpha * num_radial)
    alpha, radial = np.divmod(rest, num_radial)
    jitter = (np.asarray(noise, np.float64)[:, :p] - 0.5) * dequantisation
    points = np.stack([np.log10(np.where(mask, energy, 1.0)), layer + jitter[..., 0], alpha + jitter[..., 1],
                       radial + jitter[..., 2]], axis=-1)
    return np.where(mask[..., None], points, 0.0).astype(np.float32), mask.astype(np.float32), np.minimum(counts, p)


def _nearest_free(position, energy, shower, shape):
    """Flat voxel per point: the nearest free voxel (index distance, angle periodic) among the
    rounded one and its neighbours within one step, more energetic points first; a point with every
    candidate taken shares its rounded voxel."""
    num_layers, num_alpha, num_radial = shape
    base = np.rint(position)
    candidates = base[:, None, :] + NEIGHBOURS[None]
    delta = candidates - position[:, None, :]
    delta[..., 1] = (delta[..., 1] + num_alpha / 2) % num_alpha - num_alpha / 2  # periodic in angle
    inside = ((candidates[..., 0] >= 0) & (candidates[..., 0] < num_layers)
              & (candidates[..., 2] >= 0) & (candidates[..., 2] < num_radial))
    distance = np.where(inside, np.sum(delta**2, axis=-1), np.inf)
    order = np.argsort(distance, axis=1, kind="stable")
    candidates = np.take_along_axis(candidates, order[..., None], axis=1).astype(np.int64)
    candidates[..., 1] %= num_alpha
    candidates[..., 0] = np.clip(candidates[..., 0], 0, num_layers - 1)
    candidates[..., 2] = np.clip(candidates[..., 2], 0, num_radial - 1)
    flat = (candidates[..., 0] * num_alpha + candidates[..., 1]) * num_radial + candidates[..., 2]
    valid = np.take_along_axis(inside, order, axis=1)
    return first_free_candidates(flat, valid, energy, shower)


def voxels_from_points(points, mask, geometry: CylindricalGeometry, *, total_energy=None,
                       resolve_collisions: bool = True) -> np.ndarray:
    """Inverse of :func:`voxel_points`: ``(N, voxels)`` float32 showers in MeV from
    ``points (N, P, 4)`` and ``mask (N, P)``. Indices round to the nearest voxel (layer and radial
    clipped to the grid, angle wrapped); with ``resolve_collisions`` colliding points move to free
    neighbours (module docstring), otherwise their energies add up. ``total_energy (N,)``, if
    given, rescales each shower to that sum."""
    points = np.asarray(points, np.float64)
    shape = grid_shape(geometry)
    num_layers, num_alpha, num_radial = shape
    n = len(points)
    real = np.asarray(mask) > 0.5
    position = np.stack([np.clip(points[..., 1], 0, num_layers - 1), points[..., 2] % num_alpha,
                         np.clip(points[..., 3], 0, num_radial - 1)], axis=-1)[real]
    energy = 10.0 ** np.clip(points[..., 0], -9, 9)[real]
    shower = np.broadcast_to(np.arange(n)[:, None], real.shape)[real]
    if resolve_collisions:
        flat = _nearest_free(position, energy, shower, shape)
    else:
        index = np.rint(position).astype(np.int64)
        index[:, 1] %= num_alpha
        flat = (index[:, 0] * num_alpha + index[:, 1]) * num_radial + index[:, 2]
    showers = np.zeros((n, geometry.num_voxels))
    np.add.at(showers, (shower, flat), energy)
    if total_energy is not None:
        sums = showers.sum(axis=1)
        showers *= np.where(sums > 0, np.asarray(total_energy, np.float64) / np.where(sums > 0, sums, 1.0), 0.0)[:, None]
    return showers.astype(np.float32)
