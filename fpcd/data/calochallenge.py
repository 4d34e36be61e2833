"""CaloChallenge 2022 datasets (arXiv 2410.21611): the cylindrical voxel geometry read from the
challenge's binning XML, and its files read and written in the challenge's own layout.

The binning file holds one ``<Bin pid=... name=...>`` per particle type, each with one
``<Layer id=i r_edges="r0,...,rk" n_bin_alpha=a/>`` per layer: ``k`` radial bins (edges in mm)
times ``a`` angular bins, no voxels for ``r_edges="0"``. A shower's voxels are stored layer after
layer; inside a layer the radial index runs fastest within each angular bin (the flattening of
the challenge's ``HighLevelFeatures``). The project keeps its own copies of the four published
files (:data:`DATASETS`, package data), so that nothing is downloaded.

The data files: ``incident_energies`` ``(N, 1)`` and ``showers`` ``(N, voxels)``, float32, MeV.
:func:`load` checks the number of voxels against the geometry; :func:`save` writes the same
layout, which the challenge's ``evaluate.py`` reads.
"""

from __future__ import annotations

import dataclasses
import os
import xml.etree.ElementTree as ElementTree

import numpy as np

from fpcd.data import calo
from fpcd.data.calo import CaloChallengeSet, CaloDataError
from fpcd.data.calo_physics import CaloGeometry
from fpcd.data.common import save_hdf5

BINNING_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "calochallenge_binning")
# dataset name -> (binning file, particle of its <Bin>)
DATASETS = {
    "1_photons": ("binning_dataset_1_photons.xml", "photon"),
    "1_pions": ("binning_dataset_1_pions.xml", "pion"),
    "2": ("binning_dataset_2.xml", "electron"),
    "3": ("binning_dataset_3.xml", "electron"),
}


class CaloChallengeError(CaloDataError):
    """A CaloChallenge binning file or data file is unreadable or does not fit its geometry."""


@dataclasses.dataclass(frozen=True)
class LayerBinning:
    """One layer's bins: radial ``r_edges`` in mm (``k + 1`` edges, ``k`` bins; ``(0.0,)`` for a
    layer without voxels) times ``num_alpha`` angular bins over ``[-pi, pi)``."""

    layer: int
    r_edges: tuple[float, ...]
    num_alpha: int

    @property
    def num_radial(self) -> int:
        return len(self.r_edges) - 1

    @property
    def num_voxels(self) -> int:
        return self.num_radial * self.num_alpha


@dataclasses.dataclass(frozen=True)
class CylindricalGeometry:
    """The voxel geometry of one particle type of a binning file: its layers in order."""

    name: str
    pid: int
    layers: tuple[LayerBinning, ...]

    @property
    def num_voxels(self) -> int:
        return sum(layer.num_voxels for layer in self.layers)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def layer_slices(self) -> list[slice]:
        """Each layer's slice of the flat voxel axis (empty for a layer without voxels)."""
        starts = np.cumsum([0] + [layer.num_voxels for layer in self.layers])
        return [slice(int(a), int(b)) for a, b in zip(starts[:-1], starts[1:])]

    def voxel_indices(self) -> dict[str, np.ndarray]:
        """``layer``, ``alpha`` and ``radial`` bin index of every voxel, in the file's order (per
        layer, angular bins outer, radial index fastest): three ``(num_voxels,)`` int arrays."""
        parts = {"layer": [], "alpha": [], "radial": []}
        for layer in self.layers:
            alpha, radial = np.meshgrid(np.arange(layer.num_alpha), np.arange(layer.num_radial), indexing="ij")
            parts["layer"].append(np.full(layer.num_voxels, layer.layer))
            parts["alpha"].append(alpha.ravel())
            parts["radial"].append(radial.ravel())
        return {k: np.concatenate(v).astype(np.int32) if v else np.zeros(0, np.int32) for k, v in parts.items()}

    def voxel_centres(self) -> dict[str, np.ndarray]:
        """``r`` (mm, the middle of the radial bin) and ``alpha`` (rad, the middle of the angular
        bin in ``[-pi, pi)``) of every voxel, in the file's order."""
        r, alpha = [], []
        for layer in self.layers:
            edges = np.asarray(layer.r_edges, np.float64)
            mid_r = 0.5 * (edges[1:] + edges[:-1])
            mid_alpha = -np.pi + (np.arange(layer.num_alpha) + 0.5) * (2.0 * np.pi / layer.num_alpha)
            a, rr = np.meshgrid(mid_alpha, mid_r, indexing="ij")
            r.append(rr.ravel())
            alpha.append(a.ravel())
        return {"r": np.concatenate(r) if r else np.zeros(0), "alpha": np.concatenate(alpha) if alpha else np.zeros(0)}

    def layer_energies(self, showers: np.ndarray) -> np.ndarray:
        """``(N, num_layers)``: each layer's summed voxel energy of ``showers (N, num_voxels)``."""
        showers = np.asarray(showers)
        return np.stack([showers[:, s].sum(axis=1) for s in self.layer_slices()], axis=1)


def _layer(node, path: str) -> LayerBinning:
    where = f"{path}: <Layer id={node.get('id')!r}>"
    try:
        layer = int(node.get("id"))
        edges = tuple(float(v) for v in node.get("r_edges", "").split(","))
        num_alpha = int(node.get("n_bin_alpha", "1"))
    except (TypeError, ValueError):
        raise CaloChallengeError(f"{where}: id, r_edges and n_bin_alpha must be an integer, comma-separated "
                                 "numbers and an integer") from None
    if num_alpha < 1:
        raise CaloChallengeError(f"{where}: n_bin_alpha must be at least 1, got {num_alpha}")
    if edges[0] != 0.0 or any(not np.isfinite(e) for e in edges) or any(b <= a for a, b in zip(edges, edges[1:])):
        raise CaloChallengeError(f"{where}: r_edges must start at 0 and increase strictly, got {node.get('r_edges')!r}")
    return LayerBinning(layer, edges, num_alpha)


def read_binning(path: str) -> dict[str, CylindricalGeometry]:
    """Every particle type's geometry in a binning XML file, by the ``name`` of its ``<Bin>``.

    Raises:
      CaloChallengeError: naming the file: unreadable or not XML, no ``<Bin>``, a layer with bad
        attributes, or layer ids that are not ``0, 1, 2, ...`` in order.
    """
    try:
        root = ElementTree.parse(path).getroot()
    except (OSError, ElementTree.ParseError) as err:
        raise CaloChallengeError(f"{path}: cannot read the binning file ({err})") from None
    geometries = {}
    for node in root.iter("Bin"):
        layers = tuple(_layer(child, path) for child in node.iter("Layer"))
        if [layer.layer for layer in layers] != list(range(len(layers))) or not layers:
            raise CaloChallengeError(f"{path}: <Bin name={node.get('name')!r}> needs layers with ids 0, 1, 2, ... "
                                     f"in order, got {[layer.layer for layer in layers]}")
        try:
            pid = int(node.get("pid"))
        except (TypeError, ValueError):
            raise CaloChallengeError(f"{path}: <Bin name={node.get('name')!r}> has no integer pid") from None
        geometries[node.get("name", str(pid))] = CylindricalGeometry(node.get("name", str(pid)), pid, layers)
    if not geometries:
        raise CaloChallengeError(f"{path}: no <Bin> element: not a CaloChallenge binning file")
    return geometries


def dataset_geometry(dataset: str) -> CylindricalGeometry:
    """The geometry of CaloChallenge dataset ``"1_photons"``, ``"1_pions"``, ``"2"`` or ``"3"``,
    from the project's copy of its binning file."""
    if dataset not in DATASETS:
        raise CaloChallengeError(f"unknown CaloChallenge dataset {dataset!r}; expected one of {sorted(DATASETS)}")
    filename, particle = DATASETS[dataset]
    return read_binning(os.path.join(BINNING_DIR, filename))[particle]


def load(path: str, geometry: CylindricalGeometry) -> CaloChallengeSet:
    """Read a CaloChallenge data file (:func:`fpcd.data.calo.load`'s checks: finite, positive
    incident energies, no negative voxel) and check it against ``geometry``.

    Raises:
      CaloChallengeError: the file is not in the CaloChallenge layout, or its number of voxels per
        shower is not the geometry's (naming both numbers and the dataset they fit).
    """
    data = calo.load(path)
    if not isinstance(data, CaloChallengeSet):
        raise CaloChallengeError(f"{path}: not a CaloChallenge file (needs datasets 'incident_energies' and "
                                 "'showers')")
    found = data.showers.shape[1]
    if found != geometry.num_voxels:
        fits = [d for d in DATASETS if dataset_geometry(d).num_voxels == found]
        hint = f" (the voxel count of dataset {' or '.join(fits)})" if fits else ""
        own = [d for d in DATASETS if dataset_geometry(d) == geometry]
        binning = f"dataset {own[0]}'s binning ({geometry.name})" if own else f"the {geometry.name} binning"
        raise CaloChallengeError(f"{path}: showers have {found} voxels{hint}, but {binning} has "
                                 f"{geometry.num_voxels} ({geometry.num_layers} layers)")
    return data


def save(data: CaloChallengeSet, path: str) -> str:
    """Write ``data`` in the CaloChallenge layout: ``incident_energies`` ``(N, 1)`` and ``showers``
    ``(N, voxels)``, float32 MeV, atomically (:func:`fpcd.data.common.save_hdf5`)."""
    energies = np.asarray(data.incident_energies, np.float32).reshape(-1, 1)
    showers = np.asarray(data.showers, np.float32)
    if showers.ndim != 2 or len(showers) != len(energies):
        raise ValueError(f"save: need showers (N, voxels) beside N incident energies, got {showers.shape} and "
                         f"{len(energies)}")
    return save_hdf5(path, {"incident_energies": energies, "showers": showers}, compressed=("showers",))


# --- the built-in default data: electron showers in the dataset-2 readout -------------------------------------

# A CaloChallenge dataset-2/3 voxel layer: 2 x (1.4 mm W + 0.3 mm Si) = 3.4 mm (../shared/physics/calo.md (a));
# PDG tungsten (X0 3.504 mm, R_M 9.327 mm, Z 74, A 183.84, X0 6.76 g/cm^2) and silicon (X0 93.7 mm, R_M 48.8 mm).
SILICON_TUNGSTEN = CaloGeometry(
    num_layers=45, layer_pitch_mm=3.4, first_layer_z_mm=1.7, absorber_mm=2.8, active_mm=0.6,
    absorber_x0_mm=3.504, absorber_lambda_mm=99.46, absorber_moliere_mm=9.327, absorber_z=74.0,
    absorber_a=183.84, absorber_x0_gcm2=6.76, active_x0_mm=93.7, active_lambda_mm=465.2, active_moliere_mm=48.8,
    sampling_fraction=1.0, em_stochastic=0.17, threshold_mev=0.01515, em_spots=1024)


def simulate(num_showers: int, *, dataset: str = "2", energy_range_mev=(1e3, 1e6), seed: int = 0,
             chunk_size: int = 500, geometry: CaloGeometry = SILICON_TUNGSTEN, progress: bool = False
             ) -> CaloChallengeSet:
    """Electron showers in the readout of CaloChallenge dataset ``dataset`` (``"2"`` or ``"3"``), in
    the challenge's layout: incident energies log-uniform in ``energy_range_mev``, voxel energies in
    MeV on the incident-energy scale (sampling-corrected, as the challenge's files appear to be).

    The physics is :func:`fpcd.data.calo_physics.em_spots` (GFLASH longitudinal and radial
    profiles with correlated per-shower fluctuations) in the silicon-tungsten mixture of
    :data:`SILICON_TUNGSTEN`, along the cylinder axis from the front face: spots are binned into
    (layer, angular, radial) voxels (those beyond the last radial edge or the last layer leave the
    readout), each voxel's energy gets Gamma sampling fluctuations of variance ``a^2 E``
    (``a = em_stochastic`` in sqrt(GeV)), and voxels below ``threshold_mev`` (15.15 keV) are zeroed.
    Showers depend on ``seed``, their index and ``chunk_size``.
    """
    from fpcd.data.calo_physics import em_spots
    from fpcd.data.common import check_integer, chunk_rng, chunk_sizes

    num_showers = check_integer("num_showers", num_showers)
    lo, hi = (float(v) for v in energy_range_mev)
    if not (0.0 < lo <= hi and np.isfinite(hi)):
        raise ValueError(f"energy_range_mev={energy_range_mev!r}: need 0 < min <= max (MeV)")
    readout = dataset_geometry(dataset)
    if dataset not in ("2", "3"):
        raise ValueError(f"dataset={dataset!r}: the built-in electron showers fill dataset 2 or 3")
    if readout.num_layers != geometry.num_layers:
        raise ValueError(f"the readout has {readout.num_layers} layers, the calorimeter {geometry.num_layers}")
    layer0 = readout.layers[0]
    edges = np.asarray(layer0.r_edges)
    num_alpha, num_radial = layer0.num_alpha, layer0.num_radial
    energies, showers = [], []
    sizes = chunk_sizes(num_showers, check_integer("chunk_size", chunk_size))
    for chunk, size in enumerate(sizes):
        rng = chunk_rng(seed, chunk)
        energy = np.exp(rng.uniform(np.log(lo), np.log(hi), size))  # MeV
        depth, radius, deposit = em_spots(rng, energy / 1000.0, geometry)  # mm, mm, GeV
        layer = np.floor(depth / geometry.layer_pitch_mm).astype(np.int64)
        radial = np.searchsorted(edges, radius, side="right") - 1
        alpha = np.floor(rng.uniform(0.0, num_alpha, depth.shape)).astype(np.int64)
        inside = (layer < geometry.num_layers) & (radial < num_radial)
        flat = (layer * num_alpha + alpha) * num_radial + radial
        rows = np.broadcast_to(np.arange(size)[:, None], flat.shape)
        grid = np.zeros((size, readout.num_voxels))
        np.add.at(grid, (rows[inside], flat[inside]), deposit[inside])  # GeV
        eps = geometry.em_stochastic**2
        hit = grid > 0
        grid[hit] = rng.standard_gamma(grid[hit] / eps) * eps
        grid *= 1000.0 * geometry.sampling_fraction  # MeV
        grid[grid < geometry.threshold_mev] = 0.0
        energies.append(energy)
        showers.append(grid.astype(np.float32))
        if progress:
            print(f"simulated {sum(sizes[:chunk + 1])}/{num_showers} showers", flush=True)
    return CaloChallengeSet(np.concatenate(energies).astype(np.float32), np.concatenate(showers))
