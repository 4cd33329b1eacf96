"""Is a cascade's difference from the largest model real? Paired tests and intervals per question.

Every comparison here is paired: the cascade and the model it is compared with answered the
same questions, so the tests use per-question pairs (McNemar) and the bootstrap resamples
questions, keeping each question's values together. That is tighter and more honest than
treating the two accuracies as independent samples.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import numpy as np
from scipy import stats as _stats


class Estimate(NamedTuple):
    """A point estimate and its confidence interval; unpacks as (value, low, high)."""

    value: float
    low: float
    high: float


def _as_correct(values, name: str) -> np.ndarray:
    c = np.asarray(values)
    if c.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one entry per question), got shape {c.shape}")
    if c.dtype != bool:
        if not np.isin(c, (0, 1)).all():
            raise ValueError(f"{name} must hold booleans or 0/1")
        c = c.astype(bool)
    return c


def _check_level(level: float) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")


def mcnemar_exact(correct_a, correct_b) -> tuple[float, int, int]:
    """Exact (binomial) McNemar test on paired per-question correctness: (p_value, b, c).

    b = questions A got right and B wrong, c = the reverse; under "A and B are equally accurate"
    b ~ Binomial(b + c, 1/2). Two-sided p-value; 1.0 when there are no discordant pairs.
    """
    a = _as_correct(correct_a, "correct_a")
    b_arr = _as_correct(correct_b, "correct_b")
    if len(a) != len(b_arr):
        raise ValueError(f"correct_a has {len(a)} questions but correct_b has {len(b_arr)}: they must be paired")
    b = int(np.sum(a & ~b_arr))
    c = int(np.sum(~a & b_arr))
    if b + c == 0:
        return 1.0, b, c
    return float(_stats.binomtest(b, b + c, 0.5).pvalue), b, c


def accuracy_ci(correct, level: float = 0.95) -> Estimate:
    """Accuracy with its Wilson score interval (good near 0 and 1 and on small samples)."""
    _check_level(level)
    c = _as_correct(correct, "correct")
    if len(c) == 0:
        raise ValueError("correct is empty: no questions to compute an accuracy over")
    k, n = int(c.sum()), len(c)
    ci = _stats.binomtest(k, n).proportion_ci(confidence_level=level, method="wilson")
    return Estimate(k / n, float(ci.low), float(ci.high))


def bootstrap_ci(
    statistic_fn: Callable[..., np.ndarray],
    *paired_arrays,
    n_resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> Estimate:
    """Paired percentile bootstrap over questions: resample question indices, keep rows together.

    `statistic_fn(*arrays)` must reduce the LAST axis (questions) and work on stacked resamples,
    e.g. `lambda c: c.mean(axis=-1)` or `lambda a, b: 1 - a.sum(-1) / b.sum(-1)`: a ratio of sums
    is resampled as a ratio of sums, not as a mean of per-question ratios. Deterministic for a
    given seed. Uses scipy.stats.bootstrap (paired, vectorised, in memory-bounded batches).
    """
    _check_level(level)
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    if not paired_arrays:
        raise ValueError("bootstrap_ci needs at least one array")
    arrays = [np.asarray(a, dtype=np.float64) for a in paired_arrays]
    n = len(arrays[0])
    for i, a in enumerate(arrays):
        if a.ndim != 1:
            raise ValueError(f"array {i} must be 1-D (one value per question), got shape {a.shape}")
        if len(a) != n:
            raise ValueError(f"array {i} has {len(a)} values but array 0 has {n}: they must be paired")
    if n < 2:
        raise ValueError(f"a bootstrap needs at least 2 questions, got {n}")
    value = float(statistic_fn(*arrays))
    result = _stats.bootstrap(
        arrays,
        lambda *data, axis=-1: statistic_fn(*data),
        n_resamples=n_resamples,
        batch=max(1, min(n_resamples, 4_000_000 // n)),
        vectorized=True,
        paired=True,
        confidence_level=level,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    ci = result.confidence_interval
    return Estimate(value, float(ci.low), float(ci.high))


@functools.lru_cache(maxsize=4)
def resample_counts(n: int, n_resamples: int, seed: int) -> np.ndarray:
    """(n_resamples, n) float32: how often each question appears in each bootstrap resample.

    One matrix per (n, n_resamples, seed), shared by every interval the report computes on the
    same questions: a resampled sum is then one matrix-vector product (the report computes
    hundreds of intervals; drawing fresh resamples for each was most of its time).
    """
    rng = np.random.default_rng(seed)
    counts = np.empty((n_resamples, n), dtype=np.float32)
    for start in range(0, n_resamples, 256):
        rows = min(256, n_resamples - start)
        idx = rng.integers(0, n, size=(rows, n)) + (np.arange(rows) * n)[:, None]
        counts[start:start + rows] = np.bincount(idx.ravel(), minlength=rows * n).reshape(rows, n)
    counts.setflags(write=False)
    return counts


def _sums_ci(value: float, resampled: np.ndarray, level: float) -> Estimate:
    alpha = (1 - level) / 2
    finite = resampled[np.isfinite(resampled)]
    if finite.size == 0:
        return Estimate(value, float("nan"), float("nan"))
    low, high = np.percentile(finite, [alpha * 100, (1 - alpha) * 100])
    return Estimate(value, float(low), float(high))


def compute_reduction_ci(
    cost_cascade, cost_largest, n_resamples: int = 2000, level: float = 0.95, seed: int = 0
) -> Estimate:
    """Compute reduction = 1 - sum(cost_cascade) / sum(cost_largest), with a paired bootstrap CI.

    Both arrays are per-question costs (FLOPs, dollars, seconds) on the same questions.
    """
    a = np.asarray(cost_cascade, dtype=np.float64)
    b = np.asarray(cost_largest, dtype=np.float64)
    for name, x in (("cost_cascade", a), ("cost_largest", b)):
        if x.ndim == 1 and (np.isnan(x).any() or (x < 0).any()):
            raise ValueError(f"{name} must hold non-negative costs (no NaN)")
    if b.ndim == 1 and b.sum() <= 0:
        raise ValueError("cost_largest sums to 0: a reduction relative to it is undefined")
    _check_level(level)
    _check_paired(a, b)
    counts = resample_counts(len(a), n_resamples, seed)
    sums = counts @ np.column_stack([a, b]).astype(np.float32)  # (R, 2)
    with np.errstate(invalid="ignore", divide="ignore"):
        resampled = 1.0 - sums[:, 0].astype(np.float64) / sums[:, 1]
    return _sums_ci(float(1.0 - a.sum() / b.sum()), resampled, level)


def accuracy_difference_ci(
    correct_a, correct_b, n_resamples: int = 2000, level: float = 0.95, seed: int = 0
) -> Estimate:
    """accuracy(A) - accuracy(B) on the same questions, with a paired bootstrap CI (the PD)."""
    a = _as_correct(correct_a, "correct_a")
    b = _as_correct(correct_b, "correct_b")
    _check_level(level)
    _check_paired(a, b)
    counts = resample_counts(len(a), n_resamples, seed)
    diff = (a.astype(np.float32) - b.astype(np.float32))
    resampled = (counts @ diff).astype(np.float64) / len(a)
    return _sums_ci(float(a.mean() - b.mean()), resampled, level)


def _check_paired(a: np.ndarray, b: np.ndarray) -> None:
    if a.ndim != 1 or b.ndim != 1:
        raise ValueError(f"both arrays must be 1-D (one value per question), got shapes {a.shape} and {b.shape}")
    if len(a) != len(b):
        raise ValueError(f"array 1 has {len(b)} values but array 0 has {len(a)}: they must be paired")
    if len(a) < 2:
        raise ValueError(f"a bootstrap needs at least 2 questions, got {len(a)}")
