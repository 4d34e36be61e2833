"""Anomaly-detection figures of merit: the ROC curve, its area and the significance improvement.

Convention: ``labels`` are 1 for signal (the anomaly) and 0 for background; a higher ``score``
means more anomalous. Ties are handled exactly: the ROC curve has one point per distinct score,
so tied events move together, and :func:`auc` equals the Mann-Whitney probability
``P(score_signal > score_background) + P(equal) / 2``.

The significance improvement characteristic ``SIC = TPR / sqrt(FPR)`` (signal efficiency over the
square root of the background efficiency) tells by how much a cut on the score multiplies the
significance ``S / sqrt(B)`` of a signal. It is read off the same ROC curve.
"""

from __future__ import annotations

import numpy as np


def _labels_and_scores(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels)
    scores = np.asarray(scores, np.float64)
    if labels.ndim != 1 or scores.ndim != 1 or labels.shape != scores.shape:
        raise ValueError(f"labels and scores must be 1-D arrays of one length, got shapes {labels.shape} and "
                         f"{scores.shape}")
    if not np.all((labels == 0) | (labels == 1)):
        raise ValueError("labels must be 0 (background) or 1 (signal)")
    if not np.all(np.isfinite(scores)):
        raise ValueError(f"scores hold {int(np.sum(~np.isfinite(scores)))} non-finite value(s)")
    if labels.sum() == 0 or labels.sum() == len(labels):
        raise ValueError(f"labels need both classes, got {int(labels.sum())} signal and "
                         f"{int(len(labels) - labels.sum())} background events")
    return labels.astype(bool), scores


def roc_curve(labels, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ROC curve of ``scores`` (higher = more signal-like).

    Returns:
      ``(fpr, tpr, thresholds)``: one point per distinct score in decreasing order, preceded by
      ``(0, 0)`` at threshold ``+inf``; point ``k`` is the cut ``score >= thresholds[k]``, with
      ``fpr`` the fraction of background and ``tpr`` the fraction of signal passing it.

    Raises:
      ValueError: labels not 0/1, shapes that differ, one class only, or non-finite scores.
    """
    labels, scores = _labels_and_scores(labels, scores)
    order = np.argsort(-scores, kind="stable")
    sorted_scores, sorted_labels = scores[order], labels[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(sorted_scores) != 0), len(scores) - 1]
    true_positives = np.cumsum(sorted_labels)[last_of_tie]
    false_positives = (last_of_tie + 1) - true_positives
    tpr = np.r_[0.0, true_positives / labels.sum()]
    fpr = np.r_[0.0, false_positives / (~labels).sum()]
    return fpr, tpr, np.r_[np.inf, sorted_scores[last_of_tie]]


def auc(labels, scores) -> float:
    """Area under the ROC curve (trapezoids), i.e. ``P(s > b) + P(s = b) / 2`` for a random signal
    score ``s`` and background score ``b``; 0.5 for a score that tells nothing."""
    fpr, tpr, _ = roc_curve(labels, scores)
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))


def sic(labels, scores, *, signal_efficiency: float = 0.1, min_background: int = 10) -> dict:
    """The significance improvement ``TPR / sqrt(FPR)``: its maximum and its value at one signal efficiency.

    Args:
      signal_efficiency: the TPR at which SIC is also read (the FPR there is linearly
        interpolated on the ROC curve).
      min_background: the maximum is taken over cuts that keep at least this many background
        events (FPR >= min_background / N_background), so that it is not one background event's
        fluctuation; the FPR at ``signal_efficiency`` is floored at one background event,
        ``1 / N_background``, which makes that value a lower bound when no background passes.

    Returns:
      ``{"max": max SIC, "tpr_at_max": the TPR there, "at_efficiency": SIC at signal_efficiency,
      "signal_efficiency": signal_efficiency, "at_efficiency_is_lower_bound": whether the FPR there
      was floored}``.
    """
    if not 0.0 < signal_efficiency <= 1.0:
        raise ValueError(f"signal_efficiency must lie in (0, 1], got {signal_efficiency}")
    if min_background < 1:
        raise ValueError(f"min_background must be >= 1, got {min_background}")
    fpr, tpr, _ = roc_curve(labels, scores)
    num_background = int(np.sum(np.asarray(labels) == 0))
    allowed = fpr >= min(min_background, num_background) / num_background
    values = tpr[allowed] / np.sqrt(fpr[allowed])
    best = int(np.argmax(values))
    # Both rates are non-decreasing along the curve: interpolate the FPR on the first segment
    # that reaches the TPR (tpr[k - 1] < efficiency <= tpr[k]).
    k = int(np.argmax(tpr >= signal_efficiency))
    weight = (signal_efficiency - tpr[k - 1]) / (tpr[k] - tpr[k - 1])
    fpr_at = float(fpr[k - 1] + weight * (fpr[k] - fpr[k - 1]))
    floored = fpr_at < 1.0 / num_background
    fpr_at = max(fpr_at, 1.0 / num_background)
    return {"max": float(values[best]), "tpr_at_max": float(tpr[allowed][best]),
            "at_efficiency": float(signal_efficiency / np.sqrt(fpr_at)), "signal_efficiency": float(signal_efficiency),
            "at_efficiency_is_lower_bound": bool(floored)}
