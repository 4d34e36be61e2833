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
