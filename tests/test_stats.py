import math

import numpy as np
import pytest

from cascade_core.choose.paired_stats import (
    Estimate,
    accuracy_ci,
    accuracy_difference_ci,
    bootstrap_ci,
    compute_reduction_ci,
    mcnemar_exact,
)


def _pairs(b, c, both_right=5, both_wrong=3):
    a = [1] * b + [0] * c + [1] * both_right + [0] * both_wrong
    other = [0] * b + [1] * c + [1] * both_right + [0] * both_wrong
    return np.array(a, dtype=bool), np.array(other, dtype=bool)


def test_mcnemar_matches_hand_computed_binomial():
    a, b = _pairs(8, 2)
    p, n01, n10 = mcnemar_exact(a, b)
    assert (n01, n10) == (8, 2)
    # two-sided: 2 * P(X <= 2 | n=10, 1/2) = 2 * (1 + 10 + 45) / 1024
    assert p == pytest.approx(2 * 56 / 1024)
    assert mcnemar_exact(b, a) == (pytest.approx(2 * 56 / 1024), 2, 8)


def test_mcnemar_edge_cases():
    same = np.array([1, 0, 1, 1], dtype=bool)
    assert mcnemar_exact(same, same) == (1.0, 0, 0)
    assert mcnemar_exact(*_pairs(5, 5))[0] == pytest.approx(1.0)
    assert mcnemar_exact(*_pairs(0, 1))[0] == pytest.approx(1.0)
    assert mcnemar_exact(*_pairs(0, 12))[0] == pytest.approx(2 / 4096)
    with pytest.raises(ValueError, match="paired"):
        mcnemar_exact([1, 0], [1])
    with pytest.raises(ValueError, match="0/1"):
        mcnemar_exact([1, 2], [1, 0])


def test_accuracy_ci_wilson():
    value, low, high = accuracy_ci(np.array([1] * 7 + [0] * 3))
    assert value == 0.7
    # Wilson 95%: (p + z^2/2n -+ z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n)
    z, n, p = 1.959963984540054, 10, 0.7
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert (low, high) == (pytest.approx(centre - half), pytest.approx(centre + half))
    assert accuracy_ci([1, 1, 1]).high == pytest.approx(1.0)
    assert 0 < accuracy_ci([1, 1, 1]).low < 1
    with pytest.raises(ValueError, match="empty"):
        accuracy_ci([])
    with pytest.raises(ValueError, match="level"):
        accuracy_ci([1], level=95)


def test_bootstrap_is_deterministic_and_returns_estimate():
    rng = np.random.default_rng(0)
    c = rng.random(500) < 0.6
    first = bootstrap_ci(lambda x: x.mean(axis=-1), c, seed=3)
    assert isinstance(first, Estimate)
    assert first == bootstrap_ci(lambda x: x.mean(axis=-1), c, seed=3)
    assert first != bootstrap_ci(lambda x: x.mean(axis=-1), c, seed=4)
    assert first.value == pytest.approx(c.mean())
    assert first.low < first.value < first.high
    # agrees with the Wilson interval on a proportion
    _, w_low, w_high = accuracy_ci(c)
    assert first.low == pytest.approx(w_low, abs=0.01) and first.high == pytest.approx(w_high, abs=0.01)


def test_bootstrap_covers_the_true_value_at_about_the_nominal_rate():
    rng = np.random.default_rng(11)
    covered = 0
    for rep in range(100):
        c = rng.random(400) < 0.7
        est = bootstrap_ci(lambda x: x.mean(axis=-1), c, n_resamples=400, seed=rep)
        covered += est.low <= 0.7 <= est.high
    assert 85 <= covered <= 100


def test_compute_reduction_ratio_of_sums_covers_truth():
    rng = np.random.default_rng(5)
    n = 20000
    largest = rng.gamma(2.0, 50.0, size=n)  # E = 100 per question
    kept = rng.random(n) < 0.6  # 60% stop at a stage costing 10% of the largest
    cascade = np.where(kept, 0.1 * largest, 1.1 * largest)
    truth = 1 - (0.6 * 0.1 + 0.4 * 1.1)  # = 0.5 in expectation
    est = compute_reduction_ci(cascade, largest, n_resamples=1000, seed=0)
    assert est.value == pytest.approx(1 - cascade.sum() / largest.sum())
    assert est.low < truth < est.high
    assert est.high - est.low < 0.03


def test_compute_reduction_bad_input():
    with pytest.raises(ValueError, match="sums to 0"):
        compute_reduction_ci([1.0, 2.0], [0.0, 0.0])
    with pytest.raises(ValueError, match="non-negative"):
        compute_reduction_ci([-1.0, 2.0], [1.0, 1.0])
    with pytest.raises(ValueError, match="paired"):
        compute_reduction_ci([1.0, 2.0, 3.0], [1.0, 1.0])


def test_accuracy_difference_ci_is_paired():
    rng = np.random.default_rng(2)
    base = rng.random(2000) < 0.6
    # B agrees with A except on 60 questions it gets wrong: a small but clear paired difference
    other = base.copy()
    flip = np.flatnonzero(base)[:60]
    other[flip] = False
    est = accuracy_difference_ci(base, other, seed=0)
    assert est.value == pytest.approx(0.03)
    assert est.low > 0.0  # paired: significant, though unpaired intervals (~+-0.03) would overlap
    assert mcnemar_exact(base, other)[0] < 1e-10


def test_bootstrap_bad_input():
    mean = lambda x: x.mean(axis=-1)  # noqa: E731
    with pytest.raises(ValueError, match="at least 2"):
        bootstrap_ci(mean, [1.0])
    with pytest.raises(ValueError, match="at least one array"):
        bootstrap_ci(mean)
    with pytest.raises(ValueError, match="1-D"):
        bootstrap_ci(mean, np.zeros((3, 2)))
