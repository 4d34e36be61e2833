"""FPCD on calorimeter showers: a two-stage point-cloud model (or a voxel-image model), every
sampler, shower observables, a classifier AUC and the point-cloud vs image comparison.

Stage 1 (``"cluster"``): a :class:`~fpcd.nets.ResMLP` score model of the shower-level features
(log10 total deposited energy, number of hit cells), standardised, given the standardised
(log10 P_gen, theta_gen).

Stage 2, ``representation="cloud"`` (``"cells"``): a :class:`~fpcd.nets.SetTransformer` score
model of the hit cells given (log10 P, theta, log10 sum E, N_cells); N_cells sets the mask. Cell
features are (log10 E, dx, dy, layer): ``dx``/``dy`` are the cell's index offsets from the cell
the particle's straight line crosses at that layer (``x = z tan(theta) cos(phi)``, ``phi =
data.phi``), ``layer`` the layer index, each with a uniform dequantisation of width
``data.dequantisation`` (in cells); all standardised. Generated points are digitised to cells (a
point whose cell is taken moves to the nearest free neighbour, ``sampling.resolve_collisions``), and the
energies are scaled so the cells sum to the stage-1 total. Training and sampling group showers
into buckets of similar N_cells (``data.buckets``) so padding costs little.

Stage 2, ``representation="image"`` (``"image"``): a :class:`~fpcd.nets.UNet3D` score model of
the 11x11x11 voxel image (5x5x5 cells per voxel) as ``log10(voxel / sum + 1e-6)``, standardised,
given the same conditions. Generated images are mapped back, clipped at 0, renormalised, scaled to
the stage-1 total, and voxels below the cell threshold are zeroed.

Evaluation on held-out showers (the generated ones use the held-out showers' P_gen and theta):
observables of :mod:`fpcd.metrics.calo` at the cell level (point clouds only) and the voxel level
(both), their W1 and the truth-vs-truth floor, classifier AUCs on high-level observables and on
voxel images, NFE and wall time per sampler run, the parameters / train-step memory / training
seconds / ms per shower summary, and, when the other representation's run exists
(``eval.compare_with``), the comparison table. Outputs: ``metrics.json``, ``samples.h5``,
``observables_*.png``, ``profiles_*.png``, ``nfe_vs_w1.png``, ``comparison.{json,md}``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import time

import h5py
import jax
import jax.numpy as jnp
import numpy as np

from fpcd.config import ConfigError, get_field, require_choice, require_float, require_int, validate_common
from fpcd.data.calo import (EPIC_FORWARD_HCAL, CaloChallengeSet, CaloDataError, ShowerSet, cell_indices,
                            from_voxels, load, pack_cells, simulate, to_voxels)
from fpcd.io import atomic_write, write_json
from fpcd.metrics import calo as calo_metrics
from fpcd.nets import ResMLP, SetTransformer, UNet3D, count_parameters, score_fn_from
from fpcd.parallel import shard_batch
from fpcd.pipelines.common import build_sde, make_stage, prepare_workdir, restore_stage, timed_sampling, train_stage
from fpcd.plots.calo import observables_by_momentum, profiles_by_momentum
from fpcd.plots.common import nfe_vs_w1
from fpcd.train import batch_indices

REPRESENTATIONS = ("cloud", "image")
IDENTITY_FIELDS = ("experiment", "seed", "representation", "data", "sde", "cluster_model", "cell_model",
                   "image_model", "train.prediction", "train_cluster.prediction")
GROUP = 5  # cells per voxel along each axis
NUM_CELL_FEATURES = 4
TRAIN_TIME_FILE = "train_info.json"


def stage_name(cfg) -> str:
    return "cells" if cfg.representation == "cloud" else "image"


def validate(cfg, num_devices: int) -> None:
    validate_common(cfg, num_devices=num_devices, train_sections=("train_cluster", "train"))
    require_choice(cfg, "representation", REPRESENTATIONS)
    if not cfg.data.path:
        require_int(cfg, "data.num_showers", minimum=20)
    lo, hi = (float(v) for v in get_field(cfg, "data.momentum_range"))
    if not 0 < lo <= hi:
        raise ConfigError(f"config.data.momentum_range={tuple(cfg.data.momentum_range)}: need 0 < min <= max (GeV)")
    t_lo, t_hi = (float(v) for v in get_field(cfg, "data.theta_range"))
    if not 0 <= t_lo <= t_hi < 60:
        raise ConfigError(f"config.data.theta_range={tuple(cfg.data.theta_range)}: need 0 <= min <= max < 60 deg")
    require_float(cfg, "data.test_fraction", low=0.05, high=0.9)
    require_int(cfg, "data.max_cells", minimum=0)
    require_float(cfg, "data.dequantisation", low=0.0, high=1.0)
    _parse_ints(cfg, "data.buckets", allow_empty=True)
    for section in ("cluster_model", "cell_model"):
        require_int(cfg, f"{section}.width")
        require_int(cfg, f"{section}.depth")
    if cfg.cell_model.width % require_int(cfg, "cell_model.num_heads"):
        raise ConfigError(f"config.cell_model.width ({cfg.cell_model.width}) must be divisible by "
                          f"config.cell_model.num_heads ({cfg.cell_model.num_heads})")
    _parse_ints(cfg, "image_model.channels")
    require_int(cfg, "image_model.context_width")
    _parse_floats(cfg, "eval.momentum_bins", minimum_count=2)
    require_int(cfg, "eval.classifier.epochs")
    require_int(cfg, "eval.classifier.batch_size")
    _parse_ints(cfg, "eval.classifier.hidden")
    require_float(cfg, "eval.classifier.learning_rate", low=0.0, open_low=True)


def _parse_ints(cfg, field, allow_empty=False) -> tuple[int, ...]:
    text = str(get_field(cfg, field)).strip()
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"config.{field}={text!r}: expected comma-separated positive integers") from None
    if (not values and not allow_empty) or any(v < 1 for v in values):
        raise ConfigError(f"config.{field}={text!r}: expected comma-separated positive integers")
    return values


def _parse_floats(cfg, field, minimum_count=1) -> tuple[float, ...]:
    text = str(get_field(cfg, field))
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if len(values) < minimum_count or any(b <= a for a, b in zip(values, values[1:])):
        raise ConfigError(f"config.{field}={text!r}: expected at least {minimum_count} increasing numbers")
    return values


# --- data ---------------------------------------------------------------------------------------


def load_showers(cfg, progress: bool) -> ShowerSet:
    """The real file when ``data.path`` is set (point-cloud layout), else simulated showers."""
    if cfg.data.path:
        try:
            data = load(cfg.data.path)
        except CaloDataError as err:
            raise ConfigError(str(err)) from None
        if isinstance(data, CaloChallengeSet):
            raise ConfigError(f"{cfg.data.path}: a CaloChallenge file (incident_energies, showers); the calo "
                              "experiment needs the point-cloud layout (hcal_cells, cluster)")
        return data
    return simulate(cfg.data.num_showers, momentum_range=tuple(cfg.data.momentum_range),
                    theta_range=tuple(cfg.data.theta_range), phi=cfg.data.phi, seed=cfg.seed, progress=progress)


@dataclasses.dataclass(frozen=True)
class Standardisation:
    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, values, axis=0, floor=1e-6):
        values = np.asarray(values, np.float64)
        return cls(values.mean(axis=axis), np.maximum(values.std(axis=axis), floor))

    def apply(self, values):
        return ((values - self.mean) / self.std).astype(np.float32)

    def invert(self, values):
        return np.asarray(values, np.float64) * self.std + self.mean


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


def _assign_cells(position, energy, shower, geometry):
    """Flat cell index per point: each point takes the nearest free cell (in mm: layers are 23.4 mm,
    cells 100 mm apart, so points move along the shower axis first) among its rounded cell and
    the cells within 2 layers and 1 cell of it, points of higher energy first; a point with all
    candidates taken shares its rounded cell. ``position (P, 3)`` = continuous (layer, ix, iy)."""
    g = geometry
    base = np.rint(position)
    candidates = base[:, None, :] + NEIGHBOURS[None]
    upper = np.array([g.num_layers - 1, g.num_cells - 1, g.num_cells - 1])
    inside = np.all((candidates >= 0) & (candidates <= upper), axis=-1)
    scale = np.array([g.layer_pitch_mm, g.cell_size_mm, g.cell_size_mm])
    distance = np.where(inside, np.sum(((candidates - position[:, None, :]) * scale) ** 2, axis=-1), np.inf)
    order = np.argsort(distance, axis=1, kind="stable")
    candidates = np.clip(np.take_along_axis(candidates, order[..., None], axis=1), 0, upper).astype(np.int64)
    flat = (candidates[..., 0] * g.num_cells + candidates[..., 1]) * g.num_cells + candidates[..., 2]
    valid = np.take_along_axis(inside, order, axis=1)
    chosen = flat[:, 0].copy()
    taken: dict = {}
    for i in np.lexsort((-energy, shower)):
        occupied = taken.setdefault(int(shower[i]), set())
        for c, ok in zip(flat[i], valid[i]):
            if ok and c not in occupied:
                chosen[i] = c
                break
        occupied.add(int(chosen[i]))
    return chosen


def cells_from_features(features, mask, theta_deg, total_energy, max_cells: int, *, phi_deg: float = 0.0,
                        resolve_collisions: bool = True, geometry=EPIC_FORWARD_HCAL) -> np.ndarray:
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
        flat = _assign_cells(position[real], energy[real], shower, g)
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


def bucket_lengths(cfg, max_cells: int) -> tuple[int, ...]:
    """Padded lengths of the N_cells buckets: ``data.buckets`` below ``max_cells``, then ``max_cells``."""
    return tuple(sorted({b for b in _parse_ints(cfg, "data.buckets", allow_empty=True) if b < max_cells})) + (max_cells,)


def training_buckets(num_cells, lengths, batch_size):
    """Merge buckets holding fewer than ``batch_size`` showers into the next larger one.

    Returns ``(lengths, bucket index per shower)``."""
    num_cells = np.asarray(num_cells)
    lengths = list(lengths)
    while True:
        index = np.searchsorted(lengths, num_cells)
        counts = np.bincount(index, minlength=len(lengths))
        small = [i for i in range(len(lengths) - 1) if counts[i] < batch_size]
        if not small:
            return tuple(lengths), index
        del lengths[small[0]]


def bucketed_batch(seed: int, step: int, buckets, batch_size: int):
    """``(bucket, indices)`` of the training batch at ``step``: each epoch shuffles every bucket,
    cuts it into full batches and shuffles the batch order, all seeded by ``(seed, epoch)``."""
    members = [np.nonzero(buckets == b)[0] for b in range(int(buckets.max()) + 1)]
    per_epoch = sum(len(m) // batch_size for m in members)
    epoch, position = divmod(int(step), per_epoch)
    rng = np.random.default_rng([int(seed), epoch])
    batches = []
    for b, m in enumerate(members):
        order = rng.permutation(m)
        batches += [(b, order[i * batch_size:(i + 1) * batch_size]) for i in range(len(m) // batch_size)]
    return batches[rng.permutation(len(batches))[position]]


class PreparedData:
    """Train/test split, stage-1 targets and conditions (standardised), stage-2 inputs."""

    def __init__(self, cfg, progress: bool):
        showers = load_showers(cfg, progress)
        has_cells = showers.cluster[:, 3] >= 1
        self.num_empty = int(np.sum(~has_cells))
        showers = showers.take(np.nonzero(has_cells)[0])
        cut = int(round(len(showers) * (1.0 - cfg.data.test_fraction)))
        self.train, self.test = showers.take(slice(0, cut)), showers.take(slice(cut, None))
        counts = showers.mask.sum(axis=1)
        largest = int(counts.max())
        self.max_cells = int(cfg.data.max_cells) or -(-largest // 8) * 8
        if largest > self.max_cells:
            raise ConfigError(f"config.data.max_cells={cfg.data.max_cells} is below the largest shower "
                              f"({largest} cells); use 0 (automatic) or a larger value")
        self.phi = float(cfg.data.phi)
        self.dequantisation = float(cfg.data.dequantisation)
        self.cluster_stats = Standardisation.fit(cluster_targets(self.train))
        self.cond_stats = Standardisation.fit(conditions(self.train.momentum, self.train.theta))
        self.cluster = self.cluster_stats.apply(cluster_targets(self.train))
        self.cond = self.cond_stats.apply(conditions(self.train.momentum, self.train.theta))
        cells = self.train.cells[:, :self.max_cells]
        self.cells = np.pad(cells, ((0, 0), (0, self.max_cells - cells.shape[1]), (0, 0)))
        if cfg.representation == "cloud":
            noise = np.random.default_rng([cfg.seed, 7]).random(self.cells.shape[:2] + (3,))
            raw = cell_features(self.cells, self.train.theta, noise, phi_deg=self.phi,
                                dequantisation=self.dequantisation)
            real = self.cells[..., 4] > 0.5
            self.cell_stats = Standardisation.fit(raw[real])
            self.lengths, self.buckets = training_buckets(counts[:cut],
                                                          bucket_lengths(cfg, self.max_cells), cfg.train.batch_size)
        else:
            images = to_voxels(self.train.cells, group=GROUP)
            logs = image_to_log_fractions(images)
            self.image_stats = Standardisation.fit(logs.ravel())
            self.images = self.image_stats.apply(logs)

    def stage2_cond(self, cluster_std, cond_std):
        return np.concatenate([cond_std, cluster_std], axis=1).astype(np.float32)

    def cloud_batch(self, seed: int, step: int, batch_size: int):
        bucket, idx = bucketed_batch(seed, step, self.buckets, batch_size)
        length = self.lengths[bucket]
        noise = np.random.default_rng([seed, 11, step]).random((len(idx), length, 3))
        cells = self.cells[idx, :length]
        raw = cell_features(cells, self.train.theta[idx], noise, phi_deg=self.phi,
                            dequantisation=self.dequantisation)
        mask = cells[..., 4].astype(np.float32)
        x = np.where(mask[..., None] > 0, self.cell_stats.apply(raw), 0.0).astype(np.float32)
        return {"x": x, "mask": mask, "cond": self.stage2_cond(self.cluster[idx], self.cond[idx])}


# --- models ----------------------------------------------------------------------------------------


def make_models(cfg, key):
    k_cluster, k_stage2 = jax.random.split(key)
    cluster_model = ResMLP(2, width=cfg.cluster_model.width, depth=cfg.cluster_model.depth, cond_dim=2,
                           fourier_scale=cfg.cluster_model.fourier_scale, key=k_cluster)
    if cfg.representation == "cloud":
        m = cfg.cell_model
        stage2 = SetTransformer(NUM_CELL_FEATURES, width=m.width, depth=m.depth, num_heads=m.num_heads,
                                mlp_ratio=m.mlp_ratio, cond_dim=4, fourier_scale=m.fourier_scale, key=k_stage2)
    else:
        m = cfg.image_model
        shape = (EPIC_FORWARD_HCAL.num_layers // GROUP,) + (EPIC_FORWARD_HCAL.num_cells // GROUP,) * 2
        stage2 = UNet3D(shape, channels=_parse_ints(cfg, "image_model.channels"), cond_dim=4,
                        context_width=m.context_width, fourier_scale=m.fourier_scale, key=k_stage2)
    return cluster_model, stage2


def _keys(cfg):
    root = jax.random.key(cfg.seed)
    return {name: jax.random.fold_in(root, i) for i, name in enumerate(("models", "train_cluster", "train", "sampling"))}


def train_step_memory_bytes(step_fn, state, batch) -> int | None:
    """Peak memory of one compiled training step as XLA plans it (arguments, outputs, temporaries)."""
    try:
        stats = step_fn.lower(state, batch).compile().compiled.memory_analysis()
    except Exception:  # noqa: BLE001 -- a backend without memory analysis
        return None
    if stats is None:
        return None
    peak = getattr(stats, "peak_memory_in_bytes", 0)
    return int(peak or (stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
                        - stats.alias_size_in_bytes))


def _read_json(path) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _train(cfg, workdir, mesh, data: PreparedData, sde, models, keys, progress):
    cluster_model, stage2_model = models
    stage = stage_name(cfg)

    def cluster_batch(step):
        idx = batch_indices(cfg.seed, step, len(data.cluster), cfg.train_cluster.batch_size)
        return shard_batch({"x": data.cluster[idx], "cond": data.cond[idx]}, mesh)

    def stage2_batch(step):
        if cfg.representation == "cloud":
            return shard_batch(data.cloud_batch(cfg.seed + 1, step, cfg.train.batch_size), mesh)
        idx = batch_indices(cfg.seed + 1, step, len(data.images), cfg.train.batch_size)
        return shard_batch({"x": data.images[idx], "cond": data.stage2_cond(data.cluster[idx], data.cond[idx])}, mesh)

    config = cfg.to_dict()
    info_path = os.path.join(workdir, TRAIN_TIME_FILE)
    info = _read_json(info_path)
    states = []
    for name, model, train_cfg, key, batch_fn in (("cluster", cluster_model, cfg.train_cluster, keys["train_cluster"],
                                                   cluster_batch),
                                                  (stage, stage2_model, cfg.train, keys["train"], stage2_batch)):
        state, stage_info = train_stage(stage=name, model=model, train_cfg=train_cfg, sde=sde, key=key, mesh=mesh,
                                        workdir=workdir, batch_fn=batch_fn, config=config, progress=progress)
        row = info.get(name, {"seconds": 0.0})
        row["seconds"] = row["seconds"] + stage_info["seconds_this_invocation"]
        row["steps"] = stage_info["steps"]
        row["final_loss"] = stage_info["history"][-1]["loss"] if stage_info["history"] else row.get("final_loss")
        if "step_memory_bytes" not in row:
            fresh, step_fn = make_stage(model, train_cfg, sde, key, mesh)
            if name == "cells":  # the largest bucket sets the peak
                batch = data.cloud_batch(cfg.seed + 1, 0, cfg.train.batch_size)
                length = data.lengths[-1]
                batch = {"x": np.zeros((len(batch["x"]), length, NUM_CELL_FEATURES), np.float32),
                         "mask": np.ones((len(batch["x"]), length), np.float32), "cond": batch["cond"]}
                batch = shard_batch(batch, mesh)
            else:
                batch = batch_fn(0)
            row["step_memory_bytes"] = train_step_memory_bytes(step_fn, fresh, batch)
        info[name] = row
        write_json(info_path, info)
        states.append(state)
    return tuple(states)


def _restore(cfg, workdir, mesh, sde, models, keys):
    cluster = restore_stage(stage="cluster", model=models[0], train_cfg=cfg.train_cluster, sde=sde,
                            key=keys["train_cluster"], mesh=mesh, workdir=workdir)
    stage2 = restore_stage(stage=stage_name(cfg), model=models[1], train_cfg=cfg.train, sde=sde, key=keys["train"],
                           mesh=mesh, workdir=workdir)
    return cluster, stage2


# --- sampling ----------------------------------------------------------------------------------------


def _rows(index, size, n):
    return np.arange(index * size, (index + 1) * size) % n


def _batch_size(cfg, n, mesh):
    devices = mesh.devices.size if mesh is not None else 1
    return max(devices, min(int(cfg.sampling.batch_size), -(-n // devices) * devices))


def generate(cfg, states, sde, data: PreparedData, momentum, theta, run: dict, key, *, progress: bool = True,
             mesh=None, sample_fn=None):
    """Generate one shower per (momentum, theta) with one sampler run through both stages.

    Returns ``(cells (n, M, 5), images (n, 11, 11, 11), info)``; ``info`` has the NFE and seconds
    of each stage, ms per shower and the number of non-finite showers (returned empty).
    """
    cluster_state, stage2_state = states
    n = len(momentum)
    extra = {"mesh": mesh} if sample_fn is None else {"sample_fn": sample_fn}
    k_cluster, k_stage2 = jax.random.split(key)
    cond_std = data.cond_stats.apply(conditions(momentum, theta))
    batch = _batch_size(cfg, n, mesh)

    def cluster_score(index, size):
        return score_fn_from(cluster_state.ema_model, sde, prediction=cfg.train_cluster.prediction,
                             cond=jnp.asarray(cond_std[_rows(index, size, n)]))

    cluster_std, nfe_cluster, seconds_cluster = timed_sampling(
        cluster_score, sde, k_cluster, num_samples=n, batch_size=batch, sample_shape=(2,), run=run,
        description="sample cluster features", progress=progress, **extra)
    finite = np.all(np.isfinite(cluster_std), axis=1)
    cluster_std = np.where(finite[:, None], cluster_std, 0.0)
    cluster = data.cluster_stats.invert(cluster_std)
    total_energy = 10.0 ** np.clip(cluster[:, 0], -6, 3)
    num_cells = np.clip(np.rint(cluster[:, 1]), 1, data.max_cells).astype(np.int64)
    cluster[:, 1] = num_cells
    cluster_std = data.cluster_stats.apply(cluster)
    cond2 = data.stage2_cond(cluster_std, cond_std)
    info = {"nfe": 0, "nfe_cluster_stage": nfe_cluster, "seconds_cluster_stage": seconds_cluster}
    seconds = 0.0

    if cfg.representation == "cloud":
        features = np.zeros((n, data.max_cells, NUM_CELL_FEATURES), np.float32)
        lengths = data.lengths
        bucket = np.searchsorted(lengths, num_cells)
        for b, length in enumerate(lengths):
            rows_b = np.nonzero(bucket == b)[0]
            if not len(rows_b):
                continue
            size_b = _batch_size(cfg, len(rows_b), mesh)
            masks = (np.arange(length)[None, :] < num_cells[rows_b][:, None]).astype(np.float32)

            def local(index, size, rows_b=rows_b):
                return _rows(index, size, len(rows_b))

            def cell_score(index, size, rows_b=rows_b, masks=masks, local=local):
                r = local(index, size)
                return score_fn_from(stage2_state.ema_model, sde, prediction=cfg.train.prediction,
                                     mask=jnp.asarray(masks[r]), cond=jnp.asarray(cond2[rows_b[r]]))

            x, nfe, secs = timed_sampling(
                cell_score, sde, jax.random.fold_in(k_stage2, b), num_samples=len(rows_b), batch_size=size_b,
                sample_shape=(length, NUM_CELL_FEATURES), run=run, description=f"sample cells (<= {length})",
                make_mask=lambda index, size, masks=masks, local=local: jnp.asarray(masks[local(index, size)]),
                progress=progress, **extra)
            features[rows_b, :length] = x
            info["nfe"] = max(info["nfe"], nfe)
            seconds += secs
        finite &= np.all(np.isfinite(features), axis=(1, 2))
        features = np.where(finite[:, None, None], features, 0.0)
        mask = np.arange(data.max_cells)[None, :] < num_cells[:, None]
        raw = data.cell_stats.invert(features)
        cells = cells_from_features(raw, mask & finite[:, None], theta, total_energy, data.max_cells,
                                    phi_deg=data.phi, resolve_collisions=cfg.sampling.resolve_collisions)
        images = to_voxels(cells, group=GROUP)
    else:
        def image_score(index, size):
            return score_fn_from(stage2_state.ema_model, sde, prediction=cfg.train.prediction,
                                 cond=jnp.asarray(cond2[_rows(index, size, n)]))

        x, nfe, seconds = timed_sampling(
            image_score, sde, k_stage2, num_samples=n, batch_size=batch, sample_shape=data.images.shape[1:],
            run=run, description="sample voxel images", progress=progress, **extra)
        info["nfe"] = nfe
        finite &= np.all(np.isfinite(x), axis=(1, 2, 3))
        logs = data.image_stats.invert(np.where(finite[:, None, None, None], x, -10.0))
        images = log_fractions_to_image(logs, total_energy)
        images = np.where(images > EPIC_FORWARD_HCAL.threshold_mev * 1e-3, images, 0.0).astype(np.float32)
        cells = from_voxels(images, group=GROUP)
    cells[~finite] = 0.0
    images[~finite] = 0.0
    total = seconds + seconds_cluster
    info.update({"seconds": total, "seconds_stage2": seconds, "ms_per_shower": 1000.0 * total / n,
                 "num_nonfinite": int(np.sum(~finite))})
    return cells, images, finite, info


def _write_samples(workdir, results, momentum, theta):
    def write(tmp):
        with h5py.File(tmp, "w") as f:
            for i, (name, (cells, images, finite, info, run)) in enumerate(results.items()):
                groups = [f.require_group(f"runs/{name}")] + ([f] if i == 0 else [])
                for g in groups:
                    g.create_dataset("hcal_cells", data=cells, compression="gzip")
                    g.create_dataset("cluster", data=cells_to_cluster(cells, momentum, theta))
                    g.create_dataset("voxels", data=images, compression="gzip")
                    g.create_dataset("finite", data=finite)
                f[f"runs/{name}"].attrs["options"] = json.dumps(run)
                f[f"runs/{name}"].attrs["info"] = json.dumps(info)
            f.attrs["run"] = next(iter(results))

    atomic_write(os.path.join(workdir, "samples.h5"), write)


def _read_samples(workdir):
    path = os.path.join(workdir, "samples.h5")
    if not os.path.exists(path):
        raise ConfigError(f"{path} does not exist; run with --mode=sample first")
    out = {}
    with h5py.File(path, "r") as f:
        for name, g in f["runs"].items():
            out[name] = (g["hcal_cells"][()], g["voxels"][()], g["finite"][()], json.loads(g.attrs["info"]),
                         json.loads(g.attrs["options"]))
    return out


# --- evaluation -------------------------------------------------------------------------------------


def _voxel_observables(images, momentum):
    return calo_metrics.shower_observables(from_voxels(images, group=GROUP), momentum, group=GROUP)


def _w1_block(truth_obs, generated_obs, floor):
    w1 = calo_metrics.observable_w1(truth_obs, generated_obs)
    ratios = [w1[k] / floor[k] for k in w1 if floor[k] > 0]
    return {"w1": w1, "w1_over_floor_mean": float(np.mean(ratios))}


def _classifier(cfg, truth, generated, seed):
    c = cfg.eval.classifier
    return calo_metrics.classifier_auc(truth, generated, seed=seed, hidden=_parse_ints(cfg, "eval.classifier.hidden"),
                                       epochs=c.epochs, batch_size=c.batch_size, learning_rate=c.learning_rate)


def _evaluate(cfg, workdir, data: PreparedData, samples: dict, models, progress: bool):
    n = cfg.sampling.num_samples
    truth_a, truth_b = data.test.take(slice(0, n)), data.test.take(slice(n, 2 * n))
    levels = ("cell", "voxel") if cfg.representation == "cloud" else ("voxel",)
    images_a, images_b = to_voxels(truth_a.cells, group=GROUP), to_voxels(truth_b.cells, group=GROUP)
    truth_obs = {"voxel": (_voxel_observables(images_a, truth_a.momentum), _voxel_observables(images_b, truth_b.momentum))}
    if "cell" in levels:
        truth_obs["cell"] = (calo_metrics.shower_observables(truth_a.cells, truth_a.momentum),
                             calo_metrics.shower_observables(truth_b.cells, truth_b.momentum))
    floors = {level: calo_metrics.observable_w1(*truth_obs[level]) for level in levels}

    features = calo_metrics.high_level_features
    metrics = {"experiment": cfg.experiment, "representation": cfg.representation, "num_samples": n,
               "num_empty_showers_dropped": data.num_empty, "floor": {level: floors[level] for level in levels},
               "runs": {}}
    seed = int(cfg.eval.seed)
    metrics["classifier_floor"] = {
        "voxel_image": _classifier(cfg, calo_metrics.voxel_features(images_a, truth_a.momentum),
                                   calo_metrics.voxel_features(images_b, truth_b.momentum), seed)["auc"],
        **{f"high_level_{level}": _classifier(
            cfg, features(truth_obs[level][0], truth_a.momentum, truth_a.theta),
            features(truth_obs[level][1], truth_b.momentum, truth_b.theta), seed)["auc"] for level in levels},
    }
    generated_obs = {}
    for name, (cells, images, finite, info, run) in samples.items():
        keep = np.asarray(finite, bool)
        p, th = truth_a.momentum[keep], truth_a.theta[keep]
        obs = {"voxel": _voxel_observables(images[keep], p)}
        if "cell" in levels:
            obs["cell"] = calo_metrics.shower_observables(cells[keep], p)
        generated_obs[name] = obs
        truth_kept = {level: {k: v[keep] for k, v in truth_obs[level][0].items()} for level in levels}
        row = {"method": run["method"], "options": {k: v for k, v in run.items() if k != "method"}, **info}
        for level in levels:
            row[level] = _w1_block(truth_obs[level][0], obs[level], floors[level])
            row[level]["classifier_high_level"] = _classifier(
                cfg, features(truth_kept[level], p, th), features(obs[level], p, th), seed)
        row["voxel"]["classifier_voxel_image"] = _classifier(
            cfg, calo_metrics.voxel_features(images_a[keep], p), calo_metrics.voxel_features(images[keep], p), seed)
        metrics["runs"][name] = row
        if progress:
            print(f"[eval] {name}: AUC high-level {row[levels[0]]['classifier_high_level']['auc']:.3f}, "
                  f"voxels {row['voxel']['classifier_voxel_image']['auc']:.3f}; W1/floor "
                  f"{row[levels[0]]['w1_over_floor_mean']:.2f}", flush=True)

    bins = _parse_floats(cfg, "eval.momentum_bins", minimum_count=2)
    for level in levels:
        generated = {name: (obs[level], truth_a.momentum[np.asarray(samples[name][2], bool)])
                     for name, obs in generated_obs.items()}
        observables_by_momentum(truth_obs[level][0], truth_a.momentum, generated, bins,
                                os.path.join(workdir, f"observables_{level}.png"),
                                title=f"{cfg.representation} model, {level} level: generated vs held-out truth")
        profiles_by_momentum(truth_obs[level][0], truth_a.momentum, generated, bins,
                             os.path.join(workdir, f"profiles_{level}.png"),
                             title=f"{cfg.representation} model, {level} level: mean profiles")
    runs = {name: {"method": r["method"], "nfe": r["nfe"], "w1_over_floor": r["voxel"]["w1_over_floor_mean"]}
            for name, r in metrics["runs"].items()}
    nfe_vs_w1(runs, os.path.join(workdir, "nfe_vs_w1.png"), floor=1.0, metric_key="w1_over_floor",
              ylabel="voxel-level W1 / truth floor (mean over observables)")
    metrics["summary"] = _summary(cfg, workdir, metrics, models)
    write_json(os.path.join(workdir, "metrics.json"), metrics)
    comparison = compare_with(cfg, workdir, metrics)
    if comparison is not None:
        metrics["comparison"] = comparison
    return metrics


def _summary(cfg, workdir, metrics, models) -> dict:
    """The row of this run in the point-cloud vs image table (first sampler run)."""
    info_path = os.path.join(workdir, TRAIN_TIME_FILE)
    train_info = _read_json(info_path)
    stage = stage_name(cfg)
    name, first = next(iter(metrics["runs"].items()))
    memory = train_info.get(stage, {}).get("step_memory_bytes")
    return {
        "representation": cfg.representation, "run": name, "nfe": first["nfe"],
        "parameters_stage2": count_parameters(models[1]),
        "parameters_total": count_parameters(models[0]) + count_parameters(models[1]),
        "train_step_memory_mb_stage2": None if memory is None else memory / 2**20,
        "process_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "training_seconds_stage2": train_info.get(stage, {}).get("seconds"),
        "training_seconds_total": sum(v.get("seconds", 0.0) for v in train_info.values()) or None,
        "ms_per_shower": first["ms_per_shower"],
        "auc_high_level": first["voxel"]["classifier_high_level"]["auc"],
        "auc_voxel_image": first["voxel"]["classifier_voxel_image"]["auc"],
        "w1_voxel": first["voxel"]["w1"], "w1_over_floor_voxel": first["voxel"]["w1_over_floor_mean"],
        "device": jax.devices()[0].device_kind, "num_devices": jax.device_count(),
    }


COMPARISON_ROWS = (
    ("parameters_stage2", "parameters (stage 2)", "{:,.0f}"),
    ("train_step_memory_mb_stage2", "train-step memory, MB (XLA)", "{:.1f}"),
    ("process_peak_rss_mb", "process peak RSS, MB", "{:.0f}"),
    ("training_seconds_stage2", "training seconds (stage 2)", "{:.0f}"),
    ("ms_per_shower", "ms per generated shower", "{:.2f}"),
    ("auc_high_level", "classifier AUC, high-level", "{:.3f}"),
    ("auc_voxel_image", "classifier AUC, voxel image", "{:.3f}"),
    ("w1_over_floor_voxel", "voxel W1 / floor (mean)", "{:.2f}"),
)


def comparison_table(cloud: dict, image: dict) -> str:
    """Markdown table of two :func:`_summary` rows (point cloud, image)."""
    lines = ["| quantity | point cloud | image |", "|---|---:|---:|"]
    for key, label, fmt in COMPARISON_ROWS:
        cells = [("n/a" if row.get(key) is None else fmt.format(row[key])) for row in (cloud, image)]
        lines.append(f"| {label} | {cells[0]} | {cells[1]} |")
    for obs in calo_metrics.SCALAR_OBSERVABLES + calo_metrics.VECTOR_OBSERVABLES:
        lines.append(f"| W1 {obs} (voxel level) | {cloud['w1_voxel'][obs]:.4g} | {image['w1_voxel'][obs]:.4g} |")
    return "\n".join(lines)


def compare_with(cfg, workdir, metrics):
    """Write ``comparison.{json,md}`` when ``eval.compare_with`` holds the other representation's run."""
    other_dir = cfg.eval.compare_with
    path = os.path.join(other_dir, "metrics.json") if other_dir else ""
    if not path or not os.path.exists(path) or os.path.abspath(other_dir) == os.path.abspath(workdir):
        return None
    other = _read_json(path)
    if other.get("representation") == metrics["representation"] or "summary" not in other:
        return None
    rows = {metrics["representation"]: metrics["summary"], other["representation"]: other["summary"]}
    table = comparison_table(rows["cloud"], rows["image"])
    write_json(os.path.join(workdir, "comparison.json"), rows)
    atomic_write(os.path.join(workdir, "comparison.md"), lambda tmp: open(tmp, "w").write(table + "\n"))
    return {"table": table, "other_workdir": other_dir}


def format_results(metrics: dict) -> str:
    """The console table of a finished run."""
    levels = ("cell", "voxel") if metrics["representation"] == "cloud" else ("voxel",)
    lines = [f"{'run':<12}{'NFE':>6}{'ms/shower':>11}" + "".join(f"{'W1/floor ' + lv:>17}{'AUC ' + lv:>11}"
                                                               for lv in levels) + f"{'AUC voxels':>12}"]
    for name, r in metrics["runs"].items():
        line = f"{name:<12}{r['nfe']:>6}{r['ms_per_shower']:>11.2f}"
        for level in levels:
            line += f"{r[level]['w1_over_floor_mean']:>17.2f}{r[level]['classifier_high_level']['auc']:>11.3f}"
        lines.append(line + f"{r['voxel']['classifier_voxel_image']['auc']:>12.3f}")
    floor = metrics["classifier_floor"]
    lines.append("truth vs truth AUC: " + ", ".join(f"{k} {v:.3f}" for k, v in floor.items()))
    if "comparison" in metrics:
        lines += ["", metrics["comparison"]["table"]]
    return "\n".join(lines)


def run(cfg, workdir: str, mode: str, mesh, *, progress: bool = True):
    """Run the calorimeter experiment's ``mode`` (``train``, ``sample``, ``eval`` or ``all``)."""
    validate(cfg, mesh.devices.size)
    data = PreparedData(cfg, progress)
    n = cfg.sampling.num_samples
    if len(data.test) < 2 * n:
        raise ConfigError(f"config.sampling.num_samples={n} needs at least {2 * n} held-out showers (two disjoint "
                          f"subsets for the floor), found {len(data.test)}")
    prepare_workdir(workdir, cfg.to_dict(), IDENTITY_FIELDS)
    sde = build_sde(cfg)
    keys = _keys(cfg)
    models = make_models(cfg, keys["models"])
    states = None
    if mode in ("train", "all"):
        states = _train(cfg, workdir, mesh, data, sde, models, keys, progress)
        if mode == "train":
            return None
    if mode in ("sample", "all"):
        states = states or _restore(cfg, workdir, mesh, sde, models, keys)
        truth = data.test.take(slice(0, n))
        samples = {}
        for index, (name, run_cfg) in enumerate(cfg.sampling.runs.items()):
            run_dict = dict(run_cfg)
            start = time.perf_counter()
            cells, images, finite, info = generate(cfg, states, sde, data, truth.momentum, truth.theta, run_dict,
                                                   jax.random.fold_in(keys["sampling"], index), progress=progress,
                                                   mesh=mesh)
            if progress:
                print(f"[sample] {name}: NFE {info['nfe']} (+{info['nfe_cluster_stage']} cluster stage), "
                      f"{info['ms_per_shower']:.2f} ms/shower, {time.perf_counter() - start:.1f} s with compilation",
                      flush=True)
            samples[name] = (cells, images, finite, info, run_dict)
        _write_samples(workdir, samples, truth.momentum, truth.theta)
        if mode == "sample":
            return None
    else:
        samples = _read_samples(workdir)
    return _evaluate(cfg, workdir, data, samples, models, progress)
