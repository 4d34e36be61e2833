"""Wasserstein-1 distances of one-dimensional marginals."""

from __future__ import annotations

import numpy as np
from scipy.stats import wasserstein_distance


def w1_per_dimension(samples, truth, weights_samples=None, weights_truth=None) -> np.ndarray:
    """W1 between the marginals of ``samples (N, D)`` and ``truth (M, D)``, one value per dimension.

    Exact for the empirical distributions (scipy's CDF integral); sizes may differ.
    """
    samples = np.asarray(samples, np.float64)
    truth = np.asarray(truth, np.float64)
    if samples.ndim != 2 or truth.ndim != 2 or samples.shape[1] != truth.shape[1]:
        raise ValueError(f"w1_per_dimension needs (N, D) and (M, D) arrays, got {samples.shape} and {truth.shape}")
    if not (np.all(np.isfinite(samples)) and np.all(np.isfinite(truth))):
        raise ValueError("w1_per_dimension: samples or truth contain NaN/inf")
    return np.array(
        [
            wasserstein_distance(samples[:, d], truth[:, d], weights_samples, weights_truth)
            for d in range(samples.shape[1])
        ]
    )


def w1_truth_floor(truth_a, truth_b) -> np.ndarray:
    """The same distance between two independent truth samples: the floor any model is judged by.

    Use samples of the size the model's samples are compared at; W1 between finite samples
    shrinks like ``1/sqrt(N)``.
    """
    return w1_per_dimension(truth_a, truth_b)
