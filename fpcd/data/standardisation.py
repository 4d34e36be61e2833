"""Per-feature standardisation, the one helper every experiment's preprocessing uses."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Standardisation:
    """``(values - mean) / std`` per feature, with its exact inverse.

    ``mean`` and ``std`` are float64 arrays broadcasting against the trailing feature axis (or
    scalars for one statistic over every value, as for a voxel image).
    """

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, values, axis=0, floor: float = 1e-6) -> "Standardisation":
        """Statistics of ``values`` over ``axis`` (float64); standard deviations below ``floor`` become ``floor``."""
        values = np.asarray(values, np.float64)
        return cls(values.mean(axis=axis), np.maximum(values.std(axis=axis), floor))

    def apply(self, values) -> np.ndarray:
        """Standardised ``values`` as float32 (computed in float64)."""
        return ((np.asarray(values, np.float64) - self.mean) / self.std).astype(np.float32)

    def invert(self, values) -> np.ndarray:
        """Inverse of :meth:`apply` in float64."""
        return np.asarray(values, np.float64) * self.std + self.mean

    def to_dict(self) -> dict:
        return {"mean": np.asarray(self.mean).tolist(), "std": np.asarray(self.std).tolist()}

    @classmethod
    def from_dict(cls, data: dict) -> "Standardisation":
        return cls(np.asarray(data["mean"], np.float64), np.asarray(data["std"], np.float64))


def feature_bounds(values, mask=None) -> tuple[np.ndarray, np.ndarray]:
    """``(low, high)``: the per-feature minimum and maximum of ``values (..., F)`` over the entries
    where ``mask (...)`` is true (all entries without a mask), as float32 ``(F,)`` arrays: the box
    a sampler's denoised estimate may be clipped to (:class:`fpcd.nets.NetworkScore`)."""
    values = np.asarray(values)
    rows = values.reshape(-1, values.shape[-1])
    if mask is not None:
        rows = rows[np.asarray(mask).reshape(-1) > 0.5]
    if len(rows) == 0:
        raise ValueError("feature_bounds: no real entries")
    return rows.min(axis=0).astype(np.float32), rows.max(axis=0).astype(np.float32)
