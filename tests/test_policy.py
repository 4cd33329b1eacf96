"""The routing rule: each rule's truth table, missing signals, the learned combiner, explanations."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cascade_core.policy import (
    CascadePolicy,
    LearnedCombiner,
    StagePolicy,
    explain,
    fit_combiner,
    keep_mask,
)

NAN = float("nan")
P_T = np.array([0.9, 0.9, 0.4, 0.4, 0.7, NAN])
P_IK = np.array([0.8, 0.2, 0.8, 0.2, 0.5, 0.9])


def test_both_keeps_only_when_both_signals_pass():
    policy = StagePolicy(tau_t=0.7, tau_ik=0.5, rule="both")
    # threshold ties keep (>=); a NaN P(T) never passes
    assert keep_mask(policy, P_T, P_IK).tolist() == [True, False, False, False, True, False]


def test_single_signal_rules():
    assert keep_mask(StagePolicy(tau_t=0.7, tau_ik=0.99, rule="pt_only"), P_T, P_IK).tolist() == [
        True, True, False, False, True, False]
    assert keep_mask(StagePolicy(tau_t=0.99, tau_ik=0.5, rule="pik_only"), P_T, P_IK).tolist() == [
        True, False, True, False, True, True]


@pytest.mark.parametrize("rule", ["both", "pt_only", "pik_only"])
def test_missing_p_ik_routes_on_p_t_alone(rule):
    policy = StagePolicy(tau_t=0.6, tau_ik=0.99, rule=rule)
    p_t = np.array([0.5, 0.6, 0.95])
    assert keep_mask(policy, p_t, np.full(3, NAN)).tolist() == [False, True, True]


def test_missing_p_ik_is_per_question():
    policy = StagePolicy(tau_t=0.5, tau_ik=0.7, rule="both")
    assert keep_mask(policy, [0.9, 0.9], [NAN, 0.1]).tolist() == [True, False]


def test_extreme_thresholds():
    p = np.array([0.0, 0.3, 1.0])
    assert keep_mask(StagePolicy(tau_t=0.0, tau_ik=0.0), p, p).all()
    assert not keep_mask(StagePolicy(tau_t=1.01, tau_ik=0.0), p, p).any()
    assert not keep_mask(StagePolicy(tau_t=0.0, tau_ik=1.5, rule="pik_only"), p, p).any()


@pytest.mark.parametrize("field", ["tau_t", "tau_ik", "tau_learned"])
def test_nan_threshold_rejected(field):
    with pytest.raises(ValueError, match=field):
        StagePolicy(**{field: NAN})


def test_bad_rule_and_bad_types_rejected():
    with pytest.raises(ValueError, match="unknown rule"):
        StagePolicy(rule="max")
    with pytest.raises(ValueError, match="tau_t"):
        StagePolicy(tau_t="0.5")
    with pytest.raises(ValueError, match="same length"):
        keep_mask(StagePolicy(), [0.5, 0.6], [0.5])


def test_learned_needs_a_combiner():
    with pytest.raises(ValueError, match="combiner"):
        keep_mask(StagePolicy(rule="learned"), [0.5], [0.5], [0.1], [0.2])


def _signal_data(n=3000, seed=0):
    rng = np.random.default_rng(seed)
    correct = rng.random(n) < 0.55
    p_ik = 1 / (1 + np.exp(-(2.0 * np.where(correct, 1, -1) + rng.normal(scale=1.5, size=n))))
    p_t = np.clip(0.5 + 0.1 * np.where(correct, 1, -1) + rng.normal(scale=0.2, size=n), 0.25, 1.0)
    margin = np.clip(p_t - 0.2 + rng.normal(scale=0.05, size=n), 0, 1)
    entropy = 1.3 * (1 - p_t)
    return p_t, p_ik, margin, entropy, correct


def _auroc(score, y):
    order = np.argsort(score)
    ranks = np.empty(len(score))
    ranks[order] = np.arange(1, len(score) + 1)
    pos = y.sum()
    return (ranks[y].sum() - pos * (pos + 1) / 2) / (pos * (len(y) - pos))


def test_fit_combiner_learns_the_signal_and_round_trips_through_json():
    p_t, p_ik, margin, entropy, correct = _signal_data()
    combiner = fit_combiner(p_t, p_ik, margin, entropy, correct)
    assert combiner.features == ("p_t", "p_ik", "margin", "entropy")
    score = combiner.score(p_t, p_ik, margin, entropy)
    assert ((score > 0) & (score < 1)).all()
    assert _auroc(score, correct) > max(_auroc(p_t, correct), _auroc(p_ik, correct)) - 0.01
    assert combiner.weights[1] > 0  # P(IK) carries the most signal here
    again = LearnedCombiner.from_dict(json.loads(json.dumps(combiner.to_dict())))
    assert again == combiner
    np.testing.assert_array_equal(again.score(p_t, p_ik, margin, entropy), score)
    policy = StagePolicy(rule="learned", tau_learned=0.6, combiner=combiner)
    np.testing.assert_array_equal(keep_mask(policy, p_t, p_ik, margin, entropy), score >= 0.6)


def test_fit_combiner_without_p_ik_and_fallback_where_a_feature_is_missing():
    p_t, _, margin, entropy, correct = _signal_data(seed=1)
    combiner = fit_combiner(p_t, np.full(len(p_t), NAN), margin, entropy, correct)
    assert "p_ik" not in combiner.features and not combiner.uses_p_ik
    policy = StagePolicy(rule="learned", tau_learned=0.99, tau_t=0.5, combiner=combiner)
    # the combiner ignores P(IK); a NaN margin falls back to P(T) >= tau_t
    assert keep_mask(policy, [0.6], [NAN], [NAN], [0.3]).tolist() == [True]
    assert keep_mask(policy, [0.4], [NAN], [NAN], [0.3]).tolist() == [False]
    with_pik = fit_combiner(*_signal_data(seed=2))
    policy = StagePolicy(rule="learned", tau_learned=0.0, tau_t=0.9, combiner=with_pik)
    assert keep_mask(policy, [0.6], [NAN], [0.1], [0.3]).tolist() == [False]  # P(IK) missing -> P(T)


def test_fit_combiner_errors():
    p_t, p_ik, margin, entropy, correct = _signal_data(n=100)
    with pytest.raises(ValueError, match="both right and wrong"):
        fit_combiner(p_t, p_ik, margin, entropy, np.ones(100, dtype=bool))
    with pytest.raises(ValueError, match="P\\(T\\) is NaN"):
        fit_combiner(np.full(100, NAN), p_ik, margin, entropy, correct)
    with pytest.raises(ValueError, match="correct has 100"):
        fit_combiner(p_t[:50], p_ik, margin, entropy, correct)
    with pytest.raises(ValueError, match="scales"):
        LearnedCombiner(features=("p_t",), weights=(1.0,), bias=0.0, means=(0.5,), scales=(0.0,))


def test_explain_says_why():
    policy = StagePolicy(tau_t=0.7, tau_ik=0.5)
    assert explain(policy, [0.62], [0.9]) == "escalate: P(T) 0.62 < τ_T 0.70"
    assert explain(policy, [0.62], [0.1]) == "escalate: P(T) 0.62 < τ_T 0.70 and P(IK) 0.10 < τ_IK 0.50"
    assert explain(policy, [0.8], [0.6]) == "keep: P(T) 0.80 ≥ τ_T 0.70 and P(IK) 0.60 ≥ τ_IK 0.50"
    assert "no P(IK)" in explain(policy, [0.8], [NAN]) and explain(policy, [0.8], [NAN]).startswith("keep")
    assert explain(StagePolicy(tau_t=0.5, rule="pt_only"), [0.4], [0.9]) == "escalate: P(T) 0.40 < τ_T 0.50"
    assert explain(StagePolicy(tau_ik=0.5, rule="pik_only"), [0.4], [0.9]) == "keep: P(IK) 0.90 ≥ τ_IK 0.50"
    combiner = fit_combiner(*_signal_data(n=500))
    text = explain(StagePolicy(rule="learned", combiner=combiner, tau_learned=0.5), [0.9], [0.95], [0.8], [0.1])
    assert text.startswith("keep: combined score")
    with pytest.raises(ValueError, match="one question"):
        explain(policy, [0.1, 0.2], [0.1, 0.2])


signal = st.one_of(st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0, NAN]), st.floats(0, 1))


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(signal, signal), min_size=1, max_size=20),
       st.sampled_from(["both", "pt_only", "pik_only"]),
       st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0, 1.5]), st.sampled_from([0.0, 0.25, 0.5, 1.0, 1.5]))
def test_one_question_at_a_time_equals_the_batch(rows, rule, tau_t, tau_ik):
    """The live runner calls keep_mask with length-1 arrays: it must agree with the batch call."""
    p_t, p_ik = np.array(rows).T
    policy = StagePolicy(tau_t=tau_t, tau_ik=tau_ik, rule=rule)
    batch = keep_mask(policy, p_t, p_ik)
    single = [bool(keep_mask(policy, p_t[i:i + 1], p_ik[i:i + 1])[0]) for i in range(len(rows))]
    assert batch.tolist() == single
    for i in range(len(rows)):  # the explanation agrees with the decision
        assert explain(policy, p_t[i:i + 1], p_ik[i:i + 1]).startswith("keep" if single[i] else "escalate")
        if rule == "both" and not math.isnan(p_ik[i]) and not math.isnan(p_t[i]):
            assert single[i] == (p_t[i] >= tau_t and p_ik[i] >= tau_ik)


def test_cascade_policy_construction():
    policy = CascadePolicy.from_lists([0.5, 0.6, 0.0], [0.4, 0.3, 0.0], enabled=[True, False, True])
    assert policy.enabled_indices == (0, 2) and policy.last_enabled == 2 and len(policy) == 3
    assert policy[1].enabled is False
    changed = policy.with_stage(1, enabled=True, tau_t=0.9)
    assert changed[1].tau_t == 0.9 and changed.enabled_indices == (0, 1, 2)
    assert CascadePolicy.from_dict(json.loads(json.dumps(policy.to_dict()))) == policy
    assert CascadePolicy.single(3, 1).enabled_indices == (1,)
    with pytest.raises(ValueError, match="enable at least one"):
        CascadePolicy.from_lists([0.5, 0.5], enabled=[False, False])
    with pytest.raises(ValueError, match="tau_ik has 1 values for 2 stages"):
        CascadePolicy.from_lists([0.5, 0.5], [0.5])
    with pytest.raises(ValueError, match="at least one stage"):
        CascadePolicy(())
    combiner = fit_combiner(*_signal_data(n=300))
    learned = CascadePolicy.from_lists([0.0, 0.0], rule="learned", combiners=[combiner, None])
    assert CascadePolicy.from_dict(json.loads(json.dumps(learned.to_dict()))) == learned
