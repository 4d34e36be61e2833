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

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy.stats import rankdata

from fpcd.data.calo import EPIC_FORWARD_HCAL, CaloGeometry
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


def voxel_features(images, momentum) -> np.ndarray:
    """The classifier's low-level input (as the CaloChallenge): log10 P and the voxels / P."""
    momentum = np.asarray(momentum, np.float64)
    flat = np.asarray(images, np.float64).reshape(len(images), -1) / momentum[:, None]
    return np.concatenate([np.log10(momentum)[:, None], flat], axis=1).astype(np.float32)


def roc_auc(labels, scores) -> float:
    """Area under the ROC curve (Mann-Whitney U with tied ranks averaged)."""
    labels = np.asarray(labels).astype(bool)
    ranks = rankdata(np.asarray(scores, np.float64))
    num_pos, num_neg = int(labels.sum()), int((~labels).sum())
    if num_pos == 0 or num_neg == 0:
        raise ValueError("roc_auc needs both classes")
    return float((ranks[labels].sum() - num_pos * (num_pos + 1) / 2) / (num_pos * num_neg))


def _bce(model, x, y):
    logits = jax.vmap(model)(x)[:, 0]
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, y))


def classifier_auc(truth, generated, *, seed: int = 0, hidden: tuple = (256, 256), epochs: int = 60,
                   batch_size: int = 256, learning_rate: float = 5e-4) -> dict:
    """Train an MLP to separate ``generated`` (label 1) from ``truth`` (label 0) feature rows.

    Splits each class 60/20/20 into train/test/validation (as the CaloChallenge), standardises
    with the training statistics, trains with Adam on binary cross-entropy, keeps the epoch with
    the lowest test loss and reports on the validation split: ``auc`` (0.5 = indistinguishable),
    ``jsd = (ln 2 - BCE) / ln 2`` (uncalibrated, so a lower bound) and the ``best_epoch``.
    """
    truth, generated = np.asarray(truth, np.float32), np.asarray(generated, np.float32)
    if truth.ndim != 2 or generated.ndim != 2 or truth.shape[1] != generated.shape[1]:
        raise ValueError(f"feature arrays must be (N, F) with equal F, got {truth.shape} and {generated.shape}")
    rng = np.random.default_rng(seed)
    splits = {"train": [], "test": [], "val": []}
    for label, rows in ((0.0, truth), (1.0, generated)):
        order = rng.permutation(len(rows))
        a, b = int(0.6 * len(rows)), int(0.8 * len(rows))
        for name, index in (("train", order[:a]), ("test", order[a:b]), ("val", order[b:])):
            splits[name].append((rows[index], np.full(len(index), label, np.float32)))
    data = {k: (np.concatenate([v[0] for v in parts]), np.concatenate([v[1] for v in parts]))
            for k, parts in splits.items()}
    mean = data["train"][0].mean(axis=0)
    std = data["train"][0].std(axis=0)
    std = np.where(std > 1e-8, std, 1.0)
    data = {k: (jnp.asarray(np.clip((x - mean) / std, -50, 50)), jnp.asarray(y)) for k, (x, y) in data.items()}

    key = jax.random.key(seed)
    model = eqx.nn.MLP(truth.shape[1], 1, hidden[0], depth=len(hidden), activation=jax.nn.leaky_relu, key=key)
    optimizer = optax.adam(learning_rate)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    opt_state = optimizer.init(params)
    x_train, y_train = data["train"]
    num_batches = max(len(x_train) // batch_size, 1)
    size = min(batch_size, len(x_train))

    @jax.jit
    def epoch(params, opt_state, key):
        order = jax.random.permutation(key, len(x_train))[: num_batches * size].reshape(num_batches, size)

        def step(carry, index):
            params, opt_state = carry
            loss, grads = jax.value_and_grad(lambda p: _bce(eqx.combine(p, static), x_train[index],
                                                            y_train[index]))(params)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        (params, opt_state), _ = jax.lax.scan(step, (params, opt_state), order)
        test_loss = _bce(eqx.combine(params, static), *data["test"])
        return params, opt_state, test_loss

    best = (np.inf, params, -1)
    for index in range(epochs):
        params, opt_state, test_loss = epoch(params, opt_state, jax.random.fold_in(key, index))
        if float(test_loss) < best[0]:
            best = (float(test_loss), params, index)
    model = eqx.combine(best[1], static)
    x_val, y_val = data["val"]
    logits = np.asarray(jax.vmap(model)(x_val)[:, 0])
    bce = float(_bce(model, x_val, y_val))
    return {"auc": roc_auc(np.asarray(y_val), logits), "jsd": (np.log(2) - bce) / np.log(2),
            "best_epoch": best[2], "num_validation": int(len(y_val))}
