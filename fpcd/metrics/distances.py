"""Wasserstein-1 distances of one-dimensional marginals."""

from __future__ import annotations

import numpy as np


def wasserstein_1d(u, v) -> float:
    """W1 between the empirical distributions of the 1-D samples ``u`` and ``v`` (sizes may differ).

    ``W1 = int |F_u - F_v| dx``, evaluated exactly on the merged sorted sample with one stable
    argsort (the same value as ``scipy.stats.wasserstein_distance`` without weights, ~3x faster).
    """
    u = np.asarray(u, np.float64).ravel()
    v = np.asarray(v, np.float64).ravel()
    if u.size == 0 or v.size == 0:
        raise ValueError("wasserstein_1d needs two non-empty samples")
    values = np.concatenate([u, v])
    order = np.argsort(values, kind="stable")
    steps = np.concatenate([np.full(u.size, 1.0 / u.size), np.full(v.size, -1.0 / v.size)])[order]
    cdf_difference = np.cumsum(steps)[:-1]
    return float(np.sum(np.abs(cdf_difference) * np.diff(values[order])))


def w1_per_dimension(samples, truth) -> np.ndarray:
    """W1 between the marginals of ``samples (N, D)`` and ``truth (M, D)``, one value per dimension.

    Exact for the empirical distributions; sizes may differ.
    """
    samples = np.asarray(samples, np.float64)
    truth = np.asarray(truth, np.float64)
    if samples.ndim != 2 or truth.ndim != 2 or samples.shape[1] != truth.shape[1]:
        raise ValueError(f"w1_per_dimension needs (N, D) and (M, D) arrays, got {samples.shape} and {truth.shape}")
    if not (np.all(np.isfinite(samples)) and np.all(np.isfinite(truth))):
        raise ValueError("w1_per_dimension: samples or truth contain NaN/inf")
    return np.array([wasserstein_1d(samples[:, d], truth[:, d]) for d in range(samples.shape[1])])


def w1_truth_floor(truth_a, truth_b) -> np.ndarray:
    """The same distance between two independent truth samples: the floor any model is judged by.

    Use samples of the size the model's samples are compared at; W1 between finite samples
    shrinks like ``1/sqrt(N)``.
    """
    return w1_per_dimension(truth_a, truth_b)
