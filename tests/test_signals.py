import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from cascade_core.signals import entropy_nats, freeform_signals, mc_signals, option_probabilities


def test_equal_logits_give_uniform_probabilities():
    for k in (2, 4, 10):
        probs = option_probabilities(np.full(k, 3.7))
        np.testing.assert_allclose(probs, 1.0 / k)
        index, p_t, margin, entropy = mc_signals(np.zeros(k))
        assert index == 0  # the first option wins a tie
        assert p_t == pytest.approx(1.0 / k)
        assert margin == pytest.approx(0.0)
        assert entropy == pytest.approx(math.log(k))
        assert mc_signals(np.zeros(k), normalize_entropy=True)[3] == pytest.approx(1.0)


def test_known_values_match_hand_computation():
    logits = np.log(np.array([0.1, 0.6, 0.3]))
    index, p_t, margin, entropy = mc_signals(logits + 12.0)  # shift-invariant
    assert index == 1
    assert p_t == pytest.approx(0.6)
    assert margin == pytest.approx(0.3)
    expected = -(0.1 * math.log(0.1) + 0.6 * math.log(0.6) + 0.3 * math.log(0.3))
    assert entropy == pytest.approx(expected)
    assert isinstance(index, int) and isinstance(p_t, float)


def test_large_logits_do_not_overflow():
    probs = option_probabilities(np.array([1000.0, 999.0, -1000.0]))
    assert np.isfinite(probs).all()
    assert probs[0] == pytest.approx(1 / (1 + math.exp(-1)))


def test_minus_inf_letters_get_zero_probability():
    probs = option_probabilities(np.array([-np.inf, 0.0, -np.inf, 0.0]))
    np.testing.assert_allclose(probs, [0.0, 0.5, 0.0, 0.5])
    index, p_t, margin, entropy = mc_signals(np.array([2.0, -np.inf, np.nan, -np.inf]))
    assert (index, p_t, margin, entropy) == (0, 1.0, 1.0, 0.0)


def test_plus_inf_takes_all_the_mass():
    np.testing.assert_allclose(option_probabilities(np.array([np.inf, 3.0, np.inf])), [0.5, 0.0, 0.5])


def test_batch_matches_rows_and_returns_arrays():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(50, 4)) * 3
    logits[3, 2] = -np.inf
    index, p_t, margin, entropy = mc_signals(logits)
    assert index.shape == p_t.shape == margin.shape == entropy.shape == (50,)
    assert index.dtype == np.int64
    for i in (0, 3, 49):
        single = mc_signals(logits[i])
        assert single[0] == index[i]
        np.testing.assert_allclose(single[1:], [p_t[i], margin[i], entropy[i]])
    np.testing.assert_allclose(option_probabilities(logits).sum(axis=1), 1.0)


def test_all_unscored_row_is_a_clear_error():
    with pytest.raises(ValueError, match="no option letter has a score"):
        option_probabilities(np.array([-np.inf, -np.inf, np.nan]))
    batch = np.zeros((3, 4))
    batch[1] = -np.inf
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        mc_signals(batch)


@pytest.mark.parametrize("bad", [np.array([1.0]), np.zeros((3, 1)), np.zeros((2, 2, 2)), np.array(1.0)])
def test_bad_shapes_are_clear_errors(bad):
    with pytest.raises(ValueError, match="K|shape"):
        option_probabilities(bad)


def test_input_is_not_modified():
    logits = np.array([0.0, np.nan, 1.0])
    option_probabilities(logits)
    assert np.isnan(logits[1])


def test_entropy_of_one_hot_is_zero():
    assert entropy_nats(np.array([0.0, 1.0, 0.0])) == 0.0


logit_rows = arrays(
    np.float64,
    st.tuples(st.integers(1, 6), st.integers(2, 8)),
    elements=st.one_of(st.floats(-50, 50), st.just(-np.inf)),
).filter(lambda a: np.isfinite(a).any(axis=1).all())


@settings(max_examples=150, deadline=None)
@given(logit_rows)
def test_signal_ranges_hold_for_any_logits(logits):
    k = logits.shape[1]
    probs = option_probabilities(logits)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-12)
    assert (probs >= 0).all()
    index, p_t, margin, entropy = mc_signals(logits)
    eps = 1e-12
    assert ((p_t >= 1.0 / k - eps) & (p_t <= 1.0 + eps)).all()
    assert ((margin >= 0) & (margin <= 1.0 + eps)).all()
    assert ((entropy >= 0) & (entropy <= math.log(k) + eps)).all()
    np.testing.assert_allclose(probs[np.arange(len(index)), index], p_t)
    normalised = mc_signals(logits, normalize_entropy=True)[3]
    assert ((normalised >= 0) & (normalised <= 1.0)).all()


def test_freeform_geometric_mean_and_minimum():
    logprobs = np.log(np.array([0.5, 0.8, 0.2]))
    geomean, minimum = freeform_signals(logprobs)
    assert geomean == pytest.approx((0.5 * 0.8 * 0.2) ** (1 / 3))
    assert minimum == pytest.approx(0.2)
    assert freeform_signals([0.0]) == (1.0, 1.0)
    assert freeform_signals([-np.inf, 0.0]) == (0.0, 0.0)


@pytest.mark.parametrize(
    "bad, message",
    [([], "empty"), ([0.5, -0.1], "<= 0"), ([np.nan], "NaN"), ([[-0.1]], "1-D")],
)
def test_freeform_bad_input_is_a_clear_error(bad, message):
    with pytest.raises(ValueError, match=message):
        freeform_signals(bad)


@settings(max_examples=100, deadline=None)
@given(arrays(np.float64, st.integers(1, 30), elements=st.floats(-30, 0)))
def test_freeform_geomean_lies_between_min_and_max(logprobs):
    geomean, minimum = freeform_signals(logprobs)
    assert 0.0 <= minimum <= geomean * (1 + 1e-9)
    assert geomean <= math.exp(logprobs.max()) * (1 + 1e-9)
