import math

import numpy as np
import pytest

from cascade_core.signal_quality import auroc, expected_calibration_error, reliability_curve


def test_auroc_perfect_inverse_and_random():
    correct = np.array([0, 0, 1, 1, 0, 1], dtype=bool)
    scores = correct.astype(float) + 0.01 * np.arange(6)
    assert auroc(scores, correct) == 1.0
    assert auroc(-scores, correct) == 0.0
    rng = np.random.default_rng(0)
    y = rng.random(20000) < 0.3
    assert auroc(rng.random(20000), y) == pytest.approx(0.5, abs=0.02)


def test_auroc_hand_computed():
    # pairs (pos, neg): 0.8>0.3, 0.8>0.5, 0.4>0.3, 0.4<0.5 -> 3 of 4
    assert auroc([0.8, 0.4, 0.3, 0.5], [1, 1, 0, 0]) == pytest.approx(0.75)


def test_auroc_undefined_is_nan_not_a_crash():
    assert math.isnan(auroc([0.2, 0.9], [True, True]))
    assert math.isnan(auroc([0.2, 0.9], [0, 0]))
    assert math.isnan(auroc([], []))
    assert math.isnan(auroc([np.nan, np.nan], [0, 1]))


def test_auroc_bad_input():
    with pytest.raises(ValueError, match="NaN"):
        auroc([0.1, np.nan, 0.3], [0, 1, 1])
    with pytest.raises(ValueError, match="3 values but correct has 2"):
        auroc([0.1, 0.2, 0.3], [0, 1])
    with pytest.raises(ValueError, match="0/1"):
        auroc([0.1, 0.2], [0, 2])


def test_ece_of_calibrated_data_is_small_and_of_overconfident_data_is_large():
    rng = np.random.default_rng(1)
    p = rng.random(50000)
    correct = rng.random(50000) < p
    assert expected_calibration_error(p, correct) < 0.01
    overconfident = np.clip(p + 0.2, 0, 1)
    assert expected_calibration_error(overconfident, correct) > 0.15


def test_ece_hand_computed():
    p = np.array([0.05, 0.05, 0.95, 0.95])
    correct = np.array([0, 1, 1, 1])
    # bin 0: conf 0.05 acc 0.5 -> 0.45 ; bin 9: conf 0.95 acc 1 -> 0.05 ; weights 1/2 each
    assert expected_calibration_error(p, correct) == pytest.approx(0.25)
    assert math.isnan(expected_calibration_error([], []))


def test_reliability_curve_bins_and_edges():
    curve = reliability_curve([0.0, 0.3, 0.31, 1.0], [1, 0, 1, 1], bins=10)
    np.testing.assert_allclose(curve["bin_center"], np.arange(10) / 10 + 0.05)
    assert curve["count"].tolist() == [1, 0, 1, 1, 0, 0, 0, 0, 0, 1]  # (lo, hi], 0 in the first
    assert math.isnan(curve["accuracy"][1]) and math.isnan(curve["mean_confidence"][1])
    assert curve["accuracy"][2] == 0.0 and curve["mean_confidence"][3] == pytest.approx(0.31)
    assert curve["count"].sum() == 4


@pytest.mark.parametrize("p", [[1.2], [-0.1], [np.nan]])
def test_probabilities_out_of_range_are_rejected(p):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        expected_calibration_error(p, [1])


def test_bins_must_be_positive_integer():
    with pytest.raises(ValueError, match="bins"):
        reliability_curve([0.5], [1], bins=0)
