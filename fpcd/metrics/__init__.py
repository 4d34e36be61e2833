"""Distances between generated and true samples."""

from fpcd.metrics.distances import w1_per_dimension, w1_truth_floor, wasserstein_1d

__all__ = ["w1_per_dimension", "w1_truth_floor", "wasserstein_1d"]
