"""Choosing a policy on calibration: the criterion holds, the choice is the cheapest, test is held out."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cascade_core.choose.baselines import single_models
from cascade_core.choose.sweep import sweep
from cascade_core.records.table import synthetic_table
from cascade_core.choose.replay import replay
from cascade_core.choose.selection import SubjectPolicy, evaluate_on, select_policy


@pytest.fixture(scope="module")
def tables():
    table = synthetic_table(6000, 3, seed=5)
    return table.subset("calibration"), table.subset("test")


@pytest.mark.parametrize("target", [0.0, 0.01, 0.05])
def test_target_loss_picks_the_cheapest_policy_that_meets_it(tables, target):
    calib, _ = tables
    chosen = select_policy(calib, target_max_loss=target, unit="flops", rule="both", n_quantiles=6)
    reference = calib.correct[-1].mean()
    assert chosen.reference_accuracy == reference
    assert chosen.calibration.accuracy >= reference - target - 1e-12
    result = sweep(calib, rule="both", n_quantiles=6)
    feasible = result.accuracy >= reference - target - 1e-12
    assert chosen.calibration.mean_cost["flops"] == pytest.approx(result.cost("flops")[feasible].min(), rel=1e-9)
    # never worse than a single model that meets the same target
    singles = single_models(calib)
    for s in range(3):
        if singles.accuracy[s] >= reference - target:
            assert chosen.calibration.mean_cost["flops"] <= singles.cost_flops[s] * (1 + 1e-9)
    assert chosen.n_policies == len(result)


def test_budget_picks_the_most_accurate_policy_within_it(tables):
    calib, _ = tables
    budget = float(single_models(calib).cost_flops[1])
    chosen = select_policy(calib, cost_budget=budget, unit="flops", rule="pt_only", n_quantiles=20)
    assert chosen.calibration.mean_cost["flops"] <= budget * (1 + 1e-9)
    result = sweep(calib, rule="pt_only", n_quantiles=20)
    within = result.cost("flops") <= budget * (1 + 1e-9)
    assert chosen.calibration.accuracy == result.accuracy[within].max()
    assert chosen.calibration.accuracy >= single_models(calib).accuracy[1]
    assert np.isnan(chosen.target_accuracy) and chosen.cost_budget == budget


def test_selection_in_dollars_with_a_free_local_ladder(tables):
    calib, _ = tables
    chosen = select_policy(calib, target_max_loss=0.02, unit="dollars", rule="pt_only", n_quantiles=15)
    assert chosen.calibration.accuracy >= chosen.reference_accuracy - 0.02 - 1e-12
    assert chosen.calibration.compute_reduction["dollars"] > 0  # the local stages cost no dollars


def test_evaluate_on_the_test_split_is_a_plain_replay(tables):
    calib, test = tables
    chosen = select_policy(calib, target_max_loss=0.01, n_quantiles=6)
    held_out = evaluate_on(test, chosen.policy)
    again = replay(test, chosen.policy)
    assert held_out.accuracy == again.accuracy
    np.testing.assert_array_equal(held_out.final_stage, again.final_stage)


def test_learned_rule_selection(tables):
    calib, test = tables
    chosen = select_policy(calib, target_max_loss=0.01, rule="learned", n_quantiles=15)
    assert chosen.calibration.accuracy >= chosen.reference_accuracy - 0.01 - 1e-12
    assert all(s.combiner is not None for s in chosen.policy.stages[:2])
    evaluate_on(test, chosen.policy)


def test_per_subject_policies(tables):
    calib, test = tables
    counts = {s: int((calib.subjects == s).sum()) for s in np.unique(calib.subjects)}
    minimum = sorted(counts.values())[len(counts) // 2]  # about half the subjects get their own
    chosen = select_policy(calib, target_max_loss=0.02, rule="pt_only", n_quantiles=10, per_subject=True,
                           min_subject_questions=minimum)
    policy = chosen.policy
    assert isinstance(policy, SubjectPolicy)
    own = {s for s, n in counts.items() if n >= minimum}
    assert set(policy.by_subject) == set(counts) and 0 < len(own) < len(counts)
    assert {s for s, info in chosen.subjects.items() if info["policy"] == "own"} == own
    assert {s for s, info in chosen.subjects.items() if info["policy"] == "pooled"} == set(counts) - own
    # each subject (and the pool of small ones) meets the target on its calibration questions,
    # so the whole split does
    assert chosen.calibration.accuracy >= chosen.reference_accuracy - 0.02 - 1e-12
    for subject in own:
        sub = calib.subset(calib.subjects == subject)
        assert replay(sub, policy.by_subject[subject]).accuracy >= sub.correct[-1].mean() - 0.02 - 1e-12
    pooled = calib.subset(~np.isin(calib.subjects, list(own)))
    assert len({policy.by_subject[s] for s in set(counts) - own}) == 1
    pooled_policy = policy.by_subject[next(iter(set(counts) - own))]
    assert replay(pooled, pooled_policy).accuracy >= pooled.correct[-1].mean() - 0.02 - 1e-12
    # on test, each question follows its subject's policy (the default for unseen subjects)
    held_out = evaluate_on(test, policy)
    for subject in np.unique(test.subjects):
        mask = test.subjects == subject
        expected = replay(test.subset(mask), policy.for_subject(subject))
        np.testing.assert_array_equal(held_out.final_stage[mask], expected.final_stage)
        np.testing.assert_array_equal(held_out.cost_per_question["flops"][mask], expected.cost_per_question["flops"])
    assert policy.for_subject("never seen") == policy.default
    assert SubjectPolicy.from_dict(json.loads(json.dumps(policy.to_dict()))) == policy


def test_selection_errors(tables):
    calib, _ = tables
    with pytest.raises(ValueError, match="not both"):
        select_policy(calib, target_max_loss=0.01, cost_budget=1.0)
    with pytest.raises(ValueError, match="no policy costs"):
        select_policy(calib, cost_budget=1.0, unit="flops", rule="pt_only", n_quantiles=5)
    with pytest.raises(ValueError, match="target_max_loss"):
        select_policy(calib, target_max_loss=-0.1)
    with pytest.raises(ValueError, match="unknown cost unit"):
        select_policy(calib, unit="euros")
    with pytest.raises(ValueError, match="CascadePolicy or SubjectPolicy"):
        evaluate_on(calib, "both")


def test_per_subject_budget_holds_overall(tables):
    calib, _ = tables
    budget = float(single_models(calib).cost_flops[1])
    chosen = select_policy(calib, cost_budget=budget, rule="pt_only", n_quantiles=10, per_subject=True,
                           min_subject_questions=400)
    assert chosen.calibration.mean_cost["flops"] <= budget * (1 + 1e-9)
