"""Calorimeter showers: a parametrised charged-pion shower generator for an ePIC-like forward
hadronic calorimeter, the public point-cloud layout, voxel converters and the loader.

The layout (``../shared/physics/calo.md`` (c), the EIC forward-HCal point-cloud sample):

* ``hcal_cells (N, C, 5)`` = (E [GeV], x, y, z [mm], mask): the hit cells of each shower at their
  cell centres, most energetic first, zero-padded to ``C`` (200 in the public file);
* ``cluster (N, 4)`` = (P_gen [GeV], theta_gen [deg], sum of cell E [GeV], N_cells);
* ``dropped_energy (N,)`` (fpcd's addition): energy of the cells beyond the cap, 0 when none.

:func:`simulate` makes such showers offline from published parametrisations
(:mod:`fpcd.data.calo_physics` holds the detector, :class:`CaloGeometry`, and the physics).
Everything is vectorised numpy, deterministic per seed (chunks of 1024 showers with their own
seeded generator, :func:`fpcd.data.common.chunk_rng`, so the first showers of a larger sample are
those of a smaller one).

:func:`to_voxels` / :func:`from_voxels` convert to and from the 11x11x11 voxel image (each voxel
sums 5x5x5 cells); :func:`load` reads this layout and the CaloChallenge one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math

import numpy as np
from tqdm.auto import tqdm

from fpcd.data.calo_physics import EPIC_FORWARD_HCAL, CaloGeometry, simulate_chunk
from fpcd.data.common import chunk_rng, chunk_sizes, save_hdf5
from fpcd.errors import DataError
from fpcd.io import open_hdf5

PARTICLES = ("pion", "electron")
CHUNK = 1024


class CaloDataError(DataError):
    """A calorimeter file is missing, has the wrong layout or holds non-finite values."""


@dataclasses.dataclass
class ShowerSet:
    """Showers in the point-cloud layout (module docstring)."""

    cells: np.ndarray  # (N, C, 5)
    cluster: np.ndarray  # (N, 4)
    dropped_energy: np.ndarray | None = None  # (N,)

    def __post_init__(self):
        if self.dropped_energy is None:
            self.dropped_energy = np.zeros(len(self.cells), np.float32)

    def __len__(self):
        return len(self.cells)

    def take(self, index) -> "ShowerSet":
        return ShowerSet(self.cells[index], self.cluster[index], self.dropped_energy[index])

    @property
    def mask(self) -> np.ndarray:
        return self.cells[..., 4] > 0.5

    @property
    def momentum(self) -> np.ndarray:
        return self.cluster[:, 0]

    @property
    def theta(self) -> np.ndarray:
        return self.cluster[:, 1]


@dataclasses.dataclass
class CaloChallengeSet:
    """A CaloChallenge file: ``incident_energies (N,)`` and ``showers (N, n_voxels)``, both in MeV."""

    incident_energies: np.ndarray
    showers: np.ndarray

    def __len__(self):
        return len(self.showers)

    def take(self, rows) -> "CaloChallengeSet":
        """The showers of ``rows`` (an index array or a slice)."""
        return CaloChallengeSet(self.incident_energies[rows], self.showers[rows])

    def grid(self, num_layers: int, num_alpha: int, num_r: int) -> np.ndarray:
        """``(N, layers, alpha, r)``: the flattening order is r fastest, then alpha, then layer."""
        return self.showers.reshape(len(self), num_layers, num_alpha, num_r)


def _finite_pair(name, value):
    """``(min, max)`` of a range argument as floats; ValueError naming ``name`` unless it is two
    finite numbers."""
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r}: expected (min, max)") from None
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"{name}={value!r}: need finite (min, max)")
    return lo, hi


def simulate(num_showers: int, *, momentum_range=(1.0, 100.0), theta_range=(16.0, 18.0), phi: float = 0.0,
             spectrum: str = "log-uniform", seed: int = 0, geometry: CaloGeometry = EPIC_FORWARD_HCAL,
             max_cells: int | None = None, particle: str = "pion", progress: bool = False,
             return_truth: bool = False):
    """Simulate charged-pion showers in ``geometry`` (:mod:`fpcd.data.calo_physics` has the physics).

    Args:
      num_showers: number of showers.
      momentum_range: (min, max) pion momentum in GeV.
      theta_range: (min, max) polar angle in degrees, drawn uniformly (cos theta uniform would
        differ by < 1 % over 16-18 deg).
      phi: azimuth in degrees (fixed; the cluster layout does not record it).
      spectrum: ``"log-uniform"`` or ``"uniform"`` momenta.
      seed: showers depend only on ``seed`` and their index.
      max_cells: cap on stored cells (default ``geometry.max_cells``); the most energetic are kept
        and the rest recorded in ``dropped_energy``.
      particle: ``"pion"`` (charged pions, the default) or ``"electron"`` (purely electromagnetic
        showers starting at the front face: a check of the sampling fraction and ``em_stochastic``).
      return_truth: also return a dict of per-shower generator truth (first-interaction depth
        along z from the front face in mm, electromagnetic fraction, kinetic energy).

    Returns:
      :class:`ShowerSet` (and the truth dict when asked).

    Raises:
      ValueError: naming the argument: a momentum range that is not finite with
        ``0 < min <= max``, a theta range outside ``0 <= min <= max < 60``, a non-finite ``phi``,
        an unknown ``spectrum`` or ``particle``, a non-integer or non-positive ``num_showers`` or
        ``max_cells``, a non-integer ``seed``.
    """
    g = geometry
    for name, value in (("num_showers", num_showers), ("max_cells", max_cells), ("seed", seed)):
        if value is not None and (isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer))):
            raise ValueError(f"{name}={value!r}: expected an integer")
    max_cells = g.max_cells if max_cells is None else int(max_cells)
    lo, hi = _finite_pair("momentum_range", momentum_range)
    t_lo, t_hi = _finite_pair("theta_range", theta_range)
    if not (0 < lo <= hi):
        raise ValueError(f"momentum_range={momentum_range!r}: need 0 < min <= max (GeV)")
    if not (0 <= t_lo <= t_hi < 60):
        raise ValueError(f"theta_range={theta_range!r}: need 0 <= min <= max < 60 degrees")
    if not math.isfinite(float(phi)):
        raise ValueError(f"phi={phi!r}: expected a finite angle in degrees")
    if spectrum not in ("log-uniform", "uniform"):
        raise ValueError(f"spectrum={spectrum!r}: expected 'log-uniform' or 'uniform'")
    if particle not in PARTICLES:
        raise ValueError(f"particle={particle!r}: expected one of {PARTICLES}")
    if num_showers < 1 or max_cells < 1:
        raise ValueError(f"num_showers={num_showers} and max_cells={max_cells} must be positive")
    parts = []
    sizes = chunk_sizes(num_showers, CHUNK)
    for chunk, n in enumerate(tqdm(sizes, desc="simulate showers", disable=not progress, unit_scale=CHUNK,
                                   leave=False)):
        rng = chunk_rng(seed, chunk)
        u = rng.random(CHUNK)[:n]
        momentum = np.exp(np.log(lo) + u * np.log(hi / lo)) if spectrum == "log-uniform" else lo + u * (hi - lo)
        theta = np.radians(t_lo + rng.random(CHUNK)[:n] * (t_hi - t_lo))
        phi_rad = np.full(n, math.radians(phi))
        parts.append(simulate_chunk(rng, momentum, theta, phi_rad, g, max_cells, particle))
    showers = ShowerSet(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                        np.concatenate([p[2] for p in parts]))
    if return_truth:
        return showers, {k: np.concatenate([p[3][k] for p in parts]) for k in parts[0][3]}
    return showers


# --- voxels ---------------------------------------------------------------------------------------


def cell_indices(positions, geometry: CaloGeometry = EPIC_FORWARD_HCAL):
    """Integer (layer, ix, iy) of cell positions ``(..., 3)`` in mm (clipped into the grid)."""
    g = geometry
    positions = np.asarray(positions)
    layer = np.floor((positions[..., 2] - g.front_z_mm) / g.layer_pitch_mm)
    ix = np.floor((positions[..., 0] + g.half_width_mm) / g.cell_size_mm)
    iy = np.floor((positions[..., 1] + g.half_width_mm) / g.cell_size_mm)
    return (np.clip(layer, 0, g.num_layers - 1).astype(np.int64), np.clip(ix, 0, g.num_cells - 1).astype(np.int64),
            np.clip(iy, 0, g.num_cells - 1).astype(np.int64))


def _check_group(g: CaloGeometry, group: int):
    if g.num_layers % group or g.num_cells % group:
        raise ValueError(f"group={group} must divide the {g.num_layers} layers and {g.num_cells} cells per axis")


def to_voxels(cells, geometry: CaloGeometry = EPIC_FORWARD_HCAL, group: int = 5) -> np.ndarray:
    """Voxel images ``(N, L/group, C/group, C/group)`` (axes layer, x, y): each voxel sums the
    energies of the ``group^3`` cells it contains (masked cells ignored).

    Raises:
      ValueError: ``cells`` not of shape ``(N, C, 5)`` = (E, x, y, z, mask), or a ``group`` that
        does not divide the grid.
    """
    g = geometry
    _check_group(g, group)
    cells = np.asarray(cells)
    if cells.ndim != 3 or cells.shape[2] != 5:
        raise ValueError(f"cells must have shape (N, C, 5) = (E, x, y, z, mask), got shape {cells.shape}")
    n = len(cells)
    layer, ix, iy = cell_indices(cells[..., 1:4], g)
    shape = (g.num_layers // group, g.num_cells // group, g.num_cells // group)
    flat = ((layer // group) * shape[1] + ix // group) * shape[2] + iy // group
    flat = flat + np.arange(n)[:, None] * int(np.prod(shape))
    weights = cells[..., 0] * (cells[..., 4] > 0.5)
    images = np.bincount(flat.ravel(), weights=weights.ravel(), minlength=n * int(np.prod(shape)))
    return images.reshape((n,) + shape).astype(np.float32)


def voxel_centres(geometry: CaloGeometry = EPIC_FORWARD_HCAL, group: int = 5):
    """Centres (z of layers, x, y) in mm of the voxels of ``group^3`` cells."""
    g = geometry
    _check_group(g, group)
    z = g.layer_centres().reshape(-1, group).mean(axis=1)
    xy = g.cell_centres().reshape(-1, group).mean(axis=1)
    return z, xy, xy


def from_voxels(images, geometry: CaloGeometry = EPIC_FORWARD_HCAL, group: int = 5,
                max_cells: int | None = None) -> np.ndarray:
    """Point clouds ``(N, M, 5)`` = (E, x, y, z, mask) with one point per non-zero voxel at its
    centre, most energetic first; ``M`` is ``max_cells`` or the largest count.

    Raises:
      ValueError: ``images`` not of shape ``(N, L/group, C/group, C/group)``.
    """
    images = np.asarray(images)
    z, x, y = voxel_centres(geometry, group)
    if images.ndim != 4 or images.shape[1:] != (len(z), len(x), len(y)):
        raise ValueError(f"images must have shape (N, {len(z)}, {len(x)}, {len(y)}) = (showers, layer, x, y) for "
                         f"group={group}, got shape {images.shape}")
    n = len(images)
    flat = images.reshape(n, -1)
    counts = (flat > 0).sum(axis=1)
    m = int(max_cells if max_cells is not None else max(int(counts.max(initial=0)), 1))
    order = np.argsort(-flat, axis=1, kind="stable")[:, :m]
    energy = np.take_along_axis(flat, order, axis=1)
    il, ix, iy = np.unravel_index(order, images.shape[1:])
    real = energy > 0
    out = np.stack([energy, x[ix], y[iy], z[il], real.astype(np.float32)], axis=-1)
    return np.where(real[..., None], out, 0.0).astype(np.float32)


# --- files ----------------------------------------------------------------------------------------


def save(showers: ShowerSet, path: str, geometry: CaloGeometry = EPIC_FORWARD_HCAL) -> str:
    """Write ``showers`` in the point-cloud layout (atomically)."""
    return save_hdf5(path, {"hcal_cells": showers.cells.astype(np.float32),
                            "cluster": showers.cluster.astype(np.float32),
                            "dropped_energy": showers.dropped_energy.astype(np.float32)},
                     {"geometry": json.dumps(geometry.to_dict())}, compressed=("hcal_cells",))


def _read(f, path, name, ndim, last=None):
    if name not in f:
        raise CaloDataError(f"{path}: missing dataset {name!r} (found {sorted(f.keys())})")
    data = f[name]
    if data.ndim != ndim or (last is not None and data.shape[-1] != last):
        want = f"{ndim}-d" + (f" with last axis {last}" if last is not None else "")
        raise CaloDataError(f"{path}: dataset {name!r} has shape {data.shape}, expected {want}")
    values = np.asarray(data[()], np.float32)
    bad = ~np.isfinite(values)
    if bad.any():
        rows = np.unique(np.nonzero(bad)[0])
        raise CaloDataError(f"{path}: dataset {name!r} holds {int(bad.sum())} NaN/inf values "
                            f"(rows {rows[:5].tolist()}{'...' if len(rows) > 5 else ''})")
    return values


def _refuse_rows(path, name, bad, problem, values=None):
    """Raise :class:`CaloDataError` naming the file, the dataset, the number of bad rows and the
    first one (with its value) when any of ``bad (N,)`` is True."""
    if bad.any():
        rows = np.flatnonzero(bad)
        value = "" if values is None else f", value {values[rows[0]]:g}"
        raise CaloDataError(f"{path}: dataset {name!r}: {problem} in {len(rows)} row(s) (first: row {int(rows[0])}"
                            f"{value})")


def load(path: str):
    """Read a calorimeter file: the point-cloud layout (:class:`ShowerSet`) or the CaloChallenge
    layout (:class:`CaloChallengeSet`).

    Raises:
      CaloDataError: naming the file, the dataset and the first bad row: a missing file or dataset,
        a wrong shape, NaN/inf values, a mask other than 0/1, negative cell (voxel) energies, a
        generated (incident) momentum that is not positive, ``N_cells`` (``cluster[:, 3]``)
        differing from the number of real cells in ``hcal_cells``, or a ``dropped_energy`` of the
        wrong length or negative.
    """
    with open_hdf5(path, CaloDataError) as f:
        if "hcal_cells" in f or "cluster" in f:
            cells = _read(f, path, "hcal_cells", 3, 5)
            cluster = _read(f, path, "cluster", 2, 4)
            if len(cells) != len(cluster):
                raise CaloDataError(f"{path}: hcal_cells has {len(cells)} showers but cluster has {len(cluster)}")
            mask = cells[..., 4]
            if not np.all((mask == 0) | (mask == 1)):
                raise CaloDataError(f"{path}: the mask column of hcal_cells (index 4) must be 0 or 1")
            if np.any(cells[..., 0][mask == 1] < 0):
                raise CaloDataError(f"{path}: hcal_cells holds negative cell energies")
            _refuse_rows(path, "cluster", ~(cluster[:, 0] > 0), "the generated momentum P_gen (column 0) is not "
                         "positive", cluster[:, 0])
            counts = mask.sum(axis=1)
            wrong = cluster[:, 3] != counts
            if wrong.any():
                row = int(np.argmax(wrong))
                raise CaloDataError(f"{path}: dataset 'cluster': N_cells (column 3) differs from the number of real "
                                    f"cells (mask 1) in 'hcal_cells' in {int(wrong.sum())} row(s) (first: row {row}, "
                                    f"N_cells {cluster[row, 3]:g} but {counts[row]:g} real cells)")
            dropped = None
            if "dropped_energy" in f:
                dropped = _read(f, path, "dropped_energy", 1)
                if len(dropped) != len(cells):
                    raise CaloDataError(f"{path}: dataset 'dropped_energy' has {len(dropped)} rows but hcal_cells "
                                        f"has {len(cells)} showers")
                _refuse_rows(path, "dropped_energy", dropped < 0, "negative energy", dropped)
            return ShowerSet(cells, cluster, dropped)
        if "showers" in f or "incident_energies" in f:
            energies = _read(f, path, "incident_energies", 2, 1)[:, 0]
            showers = _read(f, path, "showers", 2)
            if len(energies) != len(showers):
                raise CaloDataError(f"{path}: incident_energies has {len(energies)} rows but showers {len(showers)}")
            _refuse_rows(path, "incident_energies", ~(energies > 0), "the incident energy is not positive", energies)
            _refuse_rows(path, "showers", np.any(showers < 0, axis=1), "negative voxel energies")
            return CaloChallengeSet(energies, showers)
        raise CaloDataError(f"{path}: unknown layout (datasets {sorted(f.keys())}); expected 'hcal_cells' + "
                            "'cluster' (point cloud) or 'incident_energies' + 'showers' (CaloChallenge)")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Simulate pion showers into the point-cloud layout.")
    parser.add_argument("output")
    parser.add_argument("--num-showers", type=int, default=10000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--momentum-range", type=float, nargs=2, default=(1.0, 100.0))
    parser.add_argument("--theta-range", type=float, nargs=2, default=(16.0, 18.0))
    args = parser.parse_args(argv)
    showers = simulate(args.num_showers, momentum_range=args.momentum_range, theta_range=args.theta_range,
                       seed=args.seed, progress=True)
    save(showers, args.output)
    print(f"wrote {len(showers)} showers to {args.output}")


if __name__ == "__main__":
    main()
