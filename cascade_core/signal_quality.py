"""How well a confidence signal (P(T), P(IK)) predicts that an answer is correct.

AUROC says whether the signal ranks right answers above wrong ones (what routing needs); ECE and
the reliability curve say whether its values can be read as probabilities (what a threshold
such as tau = 0.8 assumes). Both are reported per stage on the test split.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score


def _paired(scores, correct, name: str) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64)
    c = np.asarray(correct)
    if s.ndim != 1 or c.ndim != 1:
        raise ValueError(f"{name} and correct must be 1-D, got shapes {s.shape} and {c.shape}")
    if len(s) != len(c):
        raise ValueError(f"{name} has {len(s)} values but correct has {len(c)}")
    if c.dtype != bool:
        if not np.isin(c, (0, 1)).all():
            raise ValueError("correct must hold booleans or 0/1")
        c = c.astype(bool)
    return s, c


def auroc(scores, correct) -> float:
    """Area under the ROC curve of `scores` for predicting `correct`; 0.5 is no signal.

    NaN, never an exception, when it is undefined: no rows, only one class, or every score NaN
    (a stage with no probe). Some but not all scores NaN is a ValueError: silently dropping rows
    would make the number describe a different set of questions.
    """
    s, c = _paired(scores, correct, "scores")
    missing = np.isnan(s)
    if len(s) == 0 or missing.all() or c.all() or not c.any():
        return float("nan")
    if missing.any():
        raise ValueError(f"scores has {int(missing.sum())} NaN values out of {len(s)}")
    return float(roc_auc_score(c, s))


def reliability_curve(p, correct, bins: int = 10) -> dict[str, np.ndarray]:
    """Equal-width bins over [0, 1]: per bin its center, mean confidence, accuracy and count.

    Bins are (lo, hi] with 0 falling in the first one (the usual convention, Guo et al. 2017).
    Empty bins have count 0 and NaN confidence and accuracy, so a plot can skip them.
    """
    if int(bins) != bins or bins < 1:
        raise ValueError(f"bins must be a positive integer, got {bins!r}")
    bins = int(bins)
    conf, c = _paired(p, correct, "p")
    if np.isnan(conf).any() or (conf < 0).any() or (conf > 1).any():
        raise ValueError("p must hold probabilities in [0, 1] (no NaN)")
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(conf, edges, right=True) - 1, 0, bins - 1)
    count = np.bincount(index, minlength=bins)
    conf_sum = np.bincount(index, weights=conf, minlength=bins)
    hits = np.bincount(index, weights=c.astype(np.float64), minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.where(count > 0, conf_sum / count, np.nan)
        accuracy = np.where(count > 0, hits / count, np.nan)
    return {
        "bin_center": (edges[:-1] + edges[1:]) / 2,
        "bin_edges": edges,
        "mean_confidence": mean_confidence,
        "accuracy": accuracy,
        "count": count,
    }


def expected_calibration_error(p, correct, bins: int = 10) -> float:
    """ECE = sum over bins of (bin count / n) * |accuracy - mean confidence|; NaN with no rows."""
    curve = reliability_curve(p, correct, bins)
    n = curve["count"].sum()
    if n == 0:
        return float("nan")
    filled = curve["count"] > 0
    gaps = np.abs(curve["accuracy"][filled] - curve["mean_confidence"][filled])
    return float(np.sum(curve["count"][filled] / n * gaps))
