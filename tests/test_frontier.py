"""The sweep reproduces replay; the frontier is non-dominated; baselines and metrics by hand."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cascade_core.cost import COST_UNITS
from cascade_core.choose.baselines import oracle, random_routing, single_models
from cascade_core.choose.frontier import pareto_frontier, upper_hull
from cascade_core.choose.router_metrics import (accuracy_difference, aiq, apgr, cheapest_at_accuracy,
                                                cost_reduction_at_iso_accuracy)
from cascade_core.choose.sweep import cascade_subsets, stage_candidates, sweep
from cascade_core.policy import CascadePolicy
from cascade_core.records.table import synthetic_table
from cascade_core.choose.replay import replay


@pytest.fixture(scope="module")
def table():
    return synthetic_table(3000, 3, seed=11)


def _check_rows_match_replay(table, result, rows):
    for i in rows:
        replayed = replay(table, result.policy(int(i)))
        assert replayed.accuracy == result.accuracy[i]
        for unit in COST_UNITS:
            assert replayed.mean_cost[unit] == pytest.approx(result.mean_cost[unit][i], rel=1e-9)
        np.testing.assert_allclose(replayed.reach_rate, result.reach_rate[i], rtol=1e-12)
        np.testing.assert_allclose(replayed.escalation_rate, result.escalation_rate[i], rtol=1e-12)
        assert [s.enabled for s in replayed.policy.stages] == result.enabled[i].tolist()


@pytest.mark.parametrize("rule", ["both", "pt_only", "pik_only", "learned"])
def test_every_swept_policy_replays_to_the_same_numbers(table, rule):
    result = sweep(table, rule=rule, n_quantiles=4 if rule == "both" else 12)
    rows = np.random.default_rng(0).choice(len(result), size=min(40, len(result)), replace=False)
    _check_rows_match_replay(table, result, rows)


@pytest.mark.parametrize("n_stages", [1, 2, 4])
def test_sweep_works_for_any_cascade_length(n_stages):
    table = synthetic_table(800, n_stages, seed=n_stages)
    result = sweep(table, rule="both", n_quantiles=3)
    assert len(result) == sum(int(np.prod([len(stage_candidates(table, s, "both", 3).keep) for s in subset[:-1]]))
                              for subset in cascade_subsets(table))
    rows = np.random.default_rng(1).choice(len(result), size=min(60, len(result)), replace=False)
    _check_rows_match_replay(table, result, rows)


def test_sweep_includes_single_models_and_skips(table):
    result = sweep(table, rule="pt_only", n_quantiles=10)
    singles = single_models(table)
    for s in range(3):
        rows = np.flatnonzero((result.enabled.sum(axis=1) == 1) & result.enabled[:, s])
        assert len(rows) == 1
        assert result.accuracy[rows[0]] == singles.accuracy[s]
        assert result.mean_cost["flops"][rows[0]] == pytest.approx(singles.cost_flops[s])
    assert {tuple(r) for r in result.enabled.tolist()} == {
        tuple(s in subset for s in range(3)) for subset in cascade_subsets(table)}
    only_full = sweep(table, rule="pt_only", n_quantiles=10, include_skips=False)
    assert only_full.enabled.all()
    frame = result.frame()
    assert len(frame) == len(result)
    assert {"accuracy", "cost_flops", "stage1:tau_t", "stage2:escalation"} <= set(frame.columns)


def test_thresholds_at_the_extremes_match_the_single_models(table):
    result = sweep(table, rule="pt_only", n_quantiles=10, include_skips=False)
    keep_all = np.flatnonzero(np.isclose(result.reach_rate[:, 1], 0))
    assert len(keep_all) and (result.accuracy[keep_all] == table.correct[0].mean()).all()


def test_recorded_stage_is_only_ever_last():
    table = dataclasses.replace(synthetic_table(50, 3, seed=0), recorded=np.array([False, False, True]), _costs={})
    assert np.isnan(table.p_t[2]).all()
    for subset in cascade_subsets(table):
        assert 2 not in subset[:-1]
    assert cascade_subsets(table, include_skips=False) == [(0, 1, 2)]


def test_sweep_errors(table):
    with pytest.raises(ValueError, match="unknown rule"):
        sweep(table, rule="vote")
    with pytest.raises(ValueError, match="max_policies"):
        sweep(table, rule="pt_only", n_quantiles=50, max_policies=100)
    with pytest.raises(ValueError, match="3 stages"):
        sweep(table, rule="learned", combiners=[None])


# -- frontier -----------------------------------------------------------------------------------
point_lists = st.lists(st.tuples(st.integers(0, 20), st.integers(0, 20)), min_size=1, max_size=40)


@settings(max_examples=200, deadline=None)
@given(point_lists)
def test_pareto_frontier_is_exactly_the_non_dominated_points(points):
    cost, acc = np.array(points, dtype=float).T
    front = pareto_frontier(cost, acc)
    assert (np.diff(cost[front]) > 0).all() and (np.diff(acc[front]) > 0).all()
    for i in range(len(cost)):
        dominated = ((cost <= cost[i]) & (acc >= acc[i]) & ((cost < cost[i]) | (acc > acc[i]))).any()
        if i in front:
            assert not dominated
        else:  # dominated, or a copy of a frontier point
            assert dominated or any(cost[j] == cost[i] and acc[j] == acc[i] for j in front)
    hx, hy = upper_hull(cost, acc)
    assert set(zip(hx, hy)) <= set(zip(cost[front], acc[front]))
    for k in range(1, len(hx) - 1):  # concave: slopes decrease
        assert (hy[k] - hy[k - 1]) / (hx[k] - hx[k - 1]) > (hy[k + 1] - hy[k]) / (hx[k + 1] - hx[k])
    for i in range(len(cost)):  # every point lies on or under the hull (where the hull spans it)
        if hx[0] <= cost[i] <= hx[-1]:
            assert acc[i] <= np.interp(cost[i], hx, hy) + 1e-9


def test_sweep_frontier_is_non_dominated(table):
    result = sweep(table, rule="both", n_quantiles=5)
    front = result.frontier("flops")
    cost, acc = result.cost("flops"), result.accuracy
    for i in front:
        assert not ((cost <= cost[i]) & (acc >= acc[i]) & ((cost < cost[i]) | (acc > acc[i]))).any()


# -- baselines ----------------------------------------------------------------------------------
@pytest.mark.parametrize("unit", ["flops", "tokens", "dollars", "calls"])
def test_no_swept_policy_beats_the_oracle(table, unit):
    best = oracle(table, unit=unit)
    assert best.accuracy == table.correct.any(axis=0).mean()
    result = sweep(table, rule="both", n_quantiles=6)
    at_least_as_accurate = result.accuracy >= best.accuracy
    assert (result.cost(unit)[at_least_as_accurate] >= best.mean_cost[unit] - 1e-9).all()
    # and at any accuracy the oracle's picks are the cheapest right answers
    cost = table.cost(unit)
    i = np.arange(len(table))
    right = table.correct.any(axis=0)
    assert (cost[best.answered_by, i][right] == np.where(table.correct, cost, np.inf).min(axis=0)[right]).all()


def test_single_models_equal_replay_of_each_stage_alone(table):
    frame = single_models(table)
    for s in range(3):
        replayed = replay(table, CascadePolicy.single(3, s))
        assert frame.accuracy[s] == replayed.accuracy
        for unit in COST_UNITS:
            assert frame[f"cost_{unit}"][s] == pytest.approx(replayed.mean_cost[unit])
    assert frame.reduction_flops.iloc[-1] == 0.0


def test_random_routing_matches_a_simulation(table):
    policy = CascadePolicy.from_lists([0.7, 0.7, 0.0], [0.5, 0.5, 0.0])
    cascade = replay(table, policy)
    expected = random_routing(table, cascade)
    np.testing.assert_allclose(expected.reach_rate, cascade.reach_rate, rtol=1e-12)
    assert expected.accuracy < cascade.accuracy  # the signals beat chance on this table
    rng = np.random.default_rng(0)
    rates = cascade.escalation_rate
    accs, costs = [], []
    for _ in range(300):
        go_on_1 = rng.random(len(table)) < rates[0]
        go_on_2 = go_on_1 & (rng.random(len(table)) < rates[1])
        final = np.where(go_on_2, 2, np.where(go_on_1, 1, 0))
        accs.append(table.correct[final, np.arange(len(table))].mean())
        paid = np.where(go_on_2, table.flops.sum(0), np.where(go_on_1, table.flops[:2].sum(0), table.flops[0]))
        costs.append(paid.mean())
    assert np.mean(accs) == pytest.approx(expected.accuracy, abs=3 * np.std(accs) / np.sqrt(300) + 1e-4)
    assert np.mean(costs) == pytest.approx(expected.mean_cost["flops"], rel=0.01)
    assert random_routing(table, [0.0, 0.0, 0.0]).accuracy == pytest.approx(table.correct[0].mean())
    skip = random_routing(table, [1.0, np.nan, 0.0])
    assert skip.reach_rate.tolist() == [1.0, 0.0, 1.0] and skip.accuracy == pytest.approx(table.correct[2].mean())
    with pytest.raises(ValueError, match="one value per stage"):
        random_routing(table, [0.5])


# -- metrics ------------------------------------------------------------------------------------
def test_cost_reduction_at_iso_accuracy_by_hand():
    cost = np.array([10.0, 30.0, 60.0, 100.0])
    acc = np.array([0.50, 0.70, 0.79, 0.80])
    assert cost_reduction_at_iso_accuracy((cost, acc), 0.80, 100.0) == 0.0
    assert cost_reduction_at_iso_accuracy((cost, acc), 0.80, 100.0, tolerance=0.01) == pytest.approx(0.4)
    assert cost_reduction_at_iso_accuracy((cost, acc), 0.70, 100.0) == pytest.approx(0.7)
    assert np.isnan(cost_reduction_at_iso_accuracy((cost, acc), 0.9, 100.0))
    assert cheapest_at_accuracy((cost, acc), 0.75) == 2
    assert accuracy_difference(0.78, 0.80) == pytest.approx(-0.02)


def test_apgr_by_hand():
    weak, strong = (0.0, 0.5), (1.0, 0.8)
    x = np.linspace(0, 1, 11)
    assert apgr((x, np.full(11, 0.8)), weak, strong) == pytest.approx(1.0)
    assert apgr((x, np.full(11, 0.5)), weak, strong) == pytest.approx(0.0)
    assert apgr((x, 0.5 + 0.3 * x), weak, strong) == pytest.approx(0.5)  # the random-mix line
    # generalised cost axis: the same curve with costs in FLOPs gives the same APGR
    assert apgr((1e9 + 9e9 * x, 0.5 + 0.3 * x ** 0.5), (1e9, 0.5), (1e10, 0.8)) == pytest.approx(
        apgr((x, 0.5 + 0.3 * x ** 0.5), weak, strong))
    with pytest.raises(ValueError, match="equally accurate"):
        apgr((x, x), (0, 0.5), (1, 0.5))


def test_aiq_by_hand():
    # points (0, 0.2), (1, 0.6), (2, 0.4) and (4, 0.8): the hull drops (2, 0.4) (it is dominated)
    cost = np.array([0.0, 1.0, 2.0, 4.0])
    acc = np.array([0.2, 0.6, 0.4, 0.8])
    hx, hy = upper_hull(cost, acc)
    assert hx.tolist() == [0.0, 1.0, 4.0] and hy.tolist() == [0.2, 0.6, 0.8]
    area = (0.2 + 0.6) / 2 * 1 + (0.6 + 0.8) / 2 * 3
    assert aiq((cost, acc)) == pytest.approx(area / 4)
    # a point under the chord is not on the hull; beyond the last point the hull stays flat
    assert aiq(([0.0, 1.0, 2.0], [0.0, 0.1, 1.0])) == pytest.approx(0.5)
    assert aiq(([0.0, 2.0], [0.4, 0.8]), cost_range=(0.0, 4.0)) == pytest.approx((1.2 + 1.6) / 4)
    assert aiq(([2.0, 4.0], [0.5, 0.5]), cost_range=(0.0, 4.0)) == pytest.approx(0.25)  # nothing before 2
    with pytest.raises(ValueError, match="cost range"):
        aiq(([1.0], [0.5]))


@pytest.mark.parametrize("rule", ["both", "pt_only", "pik_only", "learned", "loss_aware"])
def test_vectorised_candidate_masks_equal_keep_mask(rule):
    from cascade_core.choose.sweep import stage_candidates
    from cascade_core.policy import fit_combiner, fit_loss_aware, keep_mask

    table = synthetic_table(300, 3, seed=11)
    p_ik = table.p_ik.copy()
    p_ik[0, ::7] = np.nan  # some questions without P(IK)
    table = dataclasses.replace(table, p_ik=p_ik, _costs={})
    args = (table.p_t[0], table.p_ik[0], table.margin[0], table.entropy[0], table.correct[0])
    model = {"learned": lambda: fit_combiner(*args),
             "loss_aware": lambda: fit_loss_aware(*args, reference_correct=table.correct[-1])}.get(rule, lambda: None)()
    cands = stage_candidates(table, 0, rule, n_quantiles=6, combiner=model)
    for policy, keep in zip(cands.policies, cands.keep):
        assert np.array_equal(keep, keep_mask(policy, table.p_t[0], table.p_ik[0], table.margin[0], table.entropy[0]))
