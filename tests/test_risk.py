"""Learn-then-Test: the guarantee holds over many calibration draws whose true loss is known.

Population: a small stage whose P(T) ~ U(0, 1) is calibrated (right with probability P(T)) and
a reference right with probability 0.8, independently. Keeping the small stage's answers with
P(T) >= tau costs, in expected accuracy, R(tau) = integral_tau^1 (0.8 - p) dp exactly, so every
chosen threshold's true loss is computed, not estimated.
"""

from __future__ import annotations

import numpy as np
import pytest

from cascade_core.policy import CascadePolicy, StagePolicy
from cascade_core.records.table import RecordTable
from cascade_core.choose.replay import replay
from cascade_core.choose.ltt import (Guarantee, cost_pvalues, fixed_sequence, paired_loss_pvalues,
                               paired_loss_upper_bound)
from cascade_core.choose.ltt import keep_scores, threshold_grid, threshold_path
from cascade_core.choose.selection import select_policy

REFERENCE = 0.8


def _draw(n: int, rng: np.random.Generator, subjects=None) -> RecordTable:
    p_t = rng.random(n)
    small = rng.random(n) < p_t
    big = rng.random(n) < REFERENCE
    zeros = np.zeros((2, n))
    return RecordTable(
        names=("small", "big"), model_ids=("s", "b"), qids=[f"q{i}" for i in range(n)],
        subjects=np.array(["x"] * n) if subjects is None else subjects, splits=np.array(["calibration"] * n),
        correct=np.stack([small, big]), prediction=np.zeros((2, n), int),
        p_t=np.stack([p_t, np.full(n, 0.9)]), p_ik=np.full((2, n), np.nan), margin=zeros, entropy=zeros,
        prompt_tokens=np.ones((2, n)), output_tokens=zeros, flops=np.stack([np.ones(n), np.full(n, 10.0)]),
        seconds=zeros, dollars=zeros, has_hidden=np.zeros(2, bool), recorded=np.zeros(2, bool))


def true_loss(tau: float) -> float:
    """R(tau) = int_tau^1 (0.8 - p) dp for a threshold on P(T) (tau >= 1: keeps nothing)."""
    t = min(max(tau, 0.0), 1.0)
    return REFERENCE * (1 - t) - (1 - t * t) / 2


def _tau(policy: CascadePolicy) -> float:
    if not policy[0].enabled:
        return 1.0  # the reference alone
    return policy[0].tau_t


def test_the_guarantee_holds_in_at_least_1_minus_delta_of_500_draws():
    rng = np.random.default_rng(12)
    target, delta = 0.01, 0.1
    held, saved, held_plain = 0, [], 0
    for _ in range(500):
        calib = _draw(600, rng)
        tau = _tau(select_policy(calib, target_max_loss=target, unit="flops", rule="pt_only", delta=delta).policy)
        held += true_loss(tau) <= target
        saved.append(1 - tau)
        # The plain criterion on the same grid: the cheapest threshold within the target on calibration.
        grid = threshold_grid("pt_only")
        scores = {0: keep_scores(calib, 0, "pt_only")}
        n_plus, n_minus, mean_cost, _, _ = threshold_path(calib, (0, 1), scores, grid, "flops")
        ok = np.flatnonzero((n_plus - n_minus) / calib.n_questions <= target)
        held_plain += true_loss(grid[ok[np.argmin(mean_cost[ok])]]) <= target
    assert held / 500 >= 1 - delta
    # Not vacuous: it keeps questions on most draws, and without the guarantee the target fails often.
    assert np.mean(np.array(saved) > 0) > 0.9
    assert held_plain / 500 < 0.8


def test_a_guaranteed_policy_replays_to_the_counts_it_was_certified_on():
    calib = _draw(800, np.random.default_rng(3))
    sel = select_policy(calib, target_max_loss=0.02, unit="flops", rule="pt_only", delta=0.1)
    result = replay(calib, sel.policy)
    loss = calib.correct[-1].mean() - result.accuracy
    tau = _tau(sel.policy)
    grid = threshold_grid("pt_only")
    j = int(np.flatnonzero(np.isclose(grid, tau))[0])
    n_plus, n_minus, mean_cost, accuracy, _ = threshold_path(calib, (0, 1), {0: keep_scores(calib, 0, "pt_only")}, grid,
                                                    "flops")
    assert accuracy[j] == pytest.approx(result.accuracy)
    assert (n_plus[j] - n_minus[j]) / calib.n_questions == pytest.approx(loss)
    assert mean_cost[j] == pytest.approx(result.mean_cost["flops"])
    assert isinstance(sel.guarantee, Guarantee) and sel.guarantee.certified > 0
    assert Guarantee.from_dict(sel.guarantee.to_dict()) == sel.guarantee


def test_the_multi_stage_path_equals_replay():
    rng = np.random.default_rng(4)
    base = _draw(500, rng)
    three = base.stage_subset([0, 0 + 1])  # (small, big)
    # a 3-stage table: small, a copy of small with other P(T), big
    tab = RecordTable(names=("a", "b", "c"), model_ids=("a", "b", "c"), qids=three.qids, subjects=three.subjects,
                      splits=three.splits,
                      correct=np.stack([three.correct[0], rng.random(500) < 0.6, three.correct[1]]),
                      prediction=np.zeros((3, 500), int), p_t=np.stack([three.p_t[0], rng.random(500), three.p_t[1]]),
                      p_ik=np.full((3, 500), np.nan), margin=np.zeros((3, 500)), entropy=np.zeros((3, 500)),
                      prompt_tokens=np.ones((3, 500)), output_tokens=np.zeros((3, 500)),
                      flops=np.stack([np.ones(500), np.full(500, 3.0), np.full(500, 10.0)]), seconds=np.zeros((3, 500)),
                      dollars=np.zeros((3, 500)), has_hidden=np.zeros(3, bool), recorded=np.zeros(3, bool))
    grid = threshold_grid("pt_only")
    scores = {s: keep_scores(tab, s, "pt_only") for s in (0, 1)}
    _, _, mean_cost, accuracy, _ = threshold_path(tab, (0, 1, 2), scores, grid, "flops")
    for j in (0, 50, 120, len(grid) - 1):
        policy = CascadePolicy((StagePolicy(tau_t=grid[j], rule="pt_only"), StagePolicy(tau_t=grid[j], rule="pt_only"),
                                StagePolicy()))
        r = replay(tab, policy)
        assert accuracy[j] == pytest.approx(r.accuracy) and mean_cost[j] == pytest.approx(r.mean_cost["flops"])


def test_pvalues_are_valid_and_the_binomial_bound_is_tighter_than_hoeffding_bentkus():
    # Under a null exactly at the target (P(+) - P(-) = target), P(p <= delta) <= delta.
    rng = np.random.default_rng(0)
    n, target = 400, 0.02
    probs = [0.05, 0.03, 0.92]
    counts = rng.multinomial(n, probs, size=4000)
    p = paired_loss_pvalues(counts[:, 0], counts[:, 1], n, target)
    assert np.mean(p <= 0.1) <= 0.1
    # At zero observed loss with few discordant questions, the binomial bound certifies, HB cannot.
    assert paired_loss_pvalues([10], [10], 2000, 0.01)[0] < 0.1
    assert paired_loss_pvalues([10], [10], 2000, 0.01, bound="hb")[0] > 0.1
    assert paired_loss_upper_bound(np.array([0]), np.array([0]), 1000, 0.1)[0] > 0


def test_the_direct_certification_chooses_what_the_p_values_choose():
    from cascade_core.choose.ltt import guaranteed_policy

    rng = np.random.default_rng(5)
    for _ in range(20):
        calib = _draw(int(rng.integers(200, 1500)), rng)
        with_p = guaranteed_policy(calib, "flops", "pt_only", 0.01, None, 0.1, None, "binomial")
        direct = guaranteed_policy(calib, "flops", "pt_only", 0.01, None, 0.1, None, "binomial", pvalues=False)
        assert with_p[0] == direct[0] and with_p[1].certified == direct[1].certified


def test_fixed_sequence_stops_at_the_first_failure():
    assert fixed_sequence([0.01, 0.02, 0.5, 0.01], 0.1) == 2
    assert fixed_sequence([0.5, 0.01], 0.1) == 0


def test_budget_mode_is_guaranteed_on_cost():
    rng = np.random.default_rng(7)
    # True mean FLOPs of threshold tau: 1 + 10 * P(P(T) < tau) = 1 + 10 tau; budget 6 -> tau <= 0.5.
    over = 0
    for _ in range(200):
        calib = _draw(500, rng)
        sel = select_policy(calib, cost_budget=6.0, unit="flops", rule="pt_only", delta=0.1)
        pol = sel.policy
        true_cost = 1 + 10 * min(max(_tau(pol), 0), 1) if pol[0].enabled and pol[1].enabled else (
            1.0 if pol[0].enabled else 10.0)
        over += true_cost > 6.0
    assert over / 200 <= 0.1
    assert cost_pvalues([0.5], 100, 0.9, 1.0)[0] < 0.05


def test_per_group_guarantee_splits_delta():
    rng = np.random.default_rng(9)
    subjects = np.array(["a", "b"] * 400)
    calib = _draw(800, rng, subjects=subjects)
    sel = select_policy(calib, target_max_loss=0.02, unit="flops", rule="pt_only", delta=0.1, per_subject=True,
                        min_subject_questions=100)
    assert set(sel.subjects) == {"a", "b"}
    assert sel.guarantee is not None


def test_bad_delta_is_refused():
    with pytest.raises(ValueError, match="delta"):
        select_policy(_draw(50, np.random.default_rng(0)), delta=1.5)


def test_the_betting_bound_holds_in_at_least_1_minus_delta_of_500_draws():
    """`bound="wsr"` (Waudby-Smith & Ramdas betting) on the same population, true loss known."""
    rng = np.random.default_rng(13)
    target, delta = 0.01, 0.1
    held, saved_wsr, saved_binomial = 0, [], []
    for _ in range(500):
        calib = _draw(600, rng)
        tau = _tau(select_policy(calib, target_max_loss=target, unit="flops", rule="pt_only", delta=delta,
                                 bound="wsr").policy)
        held += true_loss(tau) <= target
        saved_wsr.append(1 - tau)
        saved_binomial.append(1 - _tau(select_policy(calib, target_max_loss=target, unit="flops", rule="pt_only",
                                                     delta=delta).policy))
    assert held / 500 >= 1 - delta
    assert np.mean(np.array(saved_wsr) > 0) > 0.9  # not vacuous
    print(f"wsr held {held / 500:.3f}, mean kept {np.mean(saved_wsr):.4f} vs binomial {np.mean(saved_binomial):.4f}")


def test_betting_pvalues_are_valid_under_a_null_at_the_target():
    from cascade_core.choose.ltt import betting_pvalues

    rng = np.random.default_rng(1)
    n, target = 400, 0.02
    draws = rng.choice([1, -1, 0], p=[0.05, 0.03, 0.92], size=(4000, n))  # mean exactly 0.02
    p = betting_pvalues(draws, target, 0.1)
    assert np.mean(p <= 0.1) <= 0.1
    assert np.all((p > 0) & (p <= 1))
    # All zeros, far below the target: certified.
    assert betting_pvalues(np.zeros((1, 2000)), 0.01, 0.1)[0] < 0.1


def test_paired_losses_sum_to_the_path_counts():
    from cascade_core.records.table import synthetic_table
    from cascade_core.choose.ltt import paired_losses

    table = synthetic_table(500, 3, seed=2)
    grid = threshold_grid("pt_only")
    scores = {s: keep_scores(table, s, "pt_only") for s in (0, 1)}
    for subset in ((0, 2), (1, 2), (0, 1, 2)):
        n_plus, n_minus, *_ = threshold_path(table, subset, scores, grid, "flops")
        losses = paired_losses(table, subset, scores, grid)
        assert (losses == 1).sum(axis=1).tolist() == n_plus.tolist()
        assert (losses == -1).sum(axis=1).tolist() == n_minus.tolist()


def _betting_reference(losses, target, level, truncation=0.5):
    """The betting p-values in one pass over each whole row (the definition `betting_pvalues` must
    reproduce bit for bit, whatever its blocks)."""
    L = np.atleast_2d(np.asarray(losses, dtype=np.float64))
    J, n = L.shape
    m = (1.0 + target) / 2.0
    x = (L.astype(np.float32) + 1.0) / 2.0
    t = np.arange(2, n + 2, dtype=np.float32)
    mean = (0.5 + np.cumsum(x, axis=1)) / t
    var = (0.25 + np.cumsum((x - mean) ** 2, axis=1)) / t
    previous = np.concatenate([np.full((J, 1), 0.25, dtype=np.float32), var[:, :-1]], axis=1)
    lam = np.minimum(np.sqrt(np.float32(2.0 * np.log(1.0 / level) / n) / previous), truncation / (1.0 - m))
    log_capital = np.cumsum(np.log1p(lam.astype(np.float64) * (m - x.astype(np.float64))), axis=1)
    return np.minimum(1.0, np.exp(-np.maximum(log_capital.max(axis=1), 0.0)))


def test_betting_pvalues_by_blocks_equal_one_pass_and_stopping_early_keeps_the_decisions():
    from cascade_core.choose.ltt import betting_pvalues

    rng = np.random.default_rng(3)
    for trial in range(40):
        n, J = int(rng.integers(1, 3000)), int(rng.integers(1, 9))
        shares = [0.02, 0.96, 0.02] if trial % 2 else rng.dirichlet([1, 20, 1])
        losses = rng.choice([1, 0, -1], p=shares, size=(J, n)).astype(np.int8)
        target, level = [(0.0, 0.1), (0.01, 0.1), (0.02, 0.0125), (0.005, 0.5)][trial % 4]
        exact = _betting_reference(losses, target, level)
        for block in (1, 37, 512, 10**6):
            assert np.array_equal(betting_pvalues(losses, target, level, block=block), exact)
        fast = betting_pvalues(losses, target, level, stop_below=level)
        assert np.array_equal(fast <= level, exact <= level) and np.all(fast >= exact)
        assert np.array_equal(fast[exact > level], exact[exact > level])


def test_the_betting_sequence_certifies_as_the_plain_loop_does():
    """Shared values for repeated candidates and small chunks give the plain loop's p-values up to
    its first failure (exact mode) and the same certified count (fast mode)."""
    from cascade_core.records.table import synthetic_table
    from cascade_core.choose.ltt import betting_sequence, paired_losses

    for seed in range(6):
        table = synthetic_table(400 + 300 * seed, 3, seed=seed)
        order = np.random.default_rng(seed).permutation(table.n_questions)
        for rule in ("pt_only", "both"):
            grid = threshold_grid(rule)
            scores = {s: keep_scores(table, s, rule) for s in (0, 1)}
            for subset in ((0, 2), (1, 2), (0, 1, 2)):
                for target, level in ((0.01, 0.1), (0.03, 0.05)):
                    plain = np.ones(len(grid))
                    for start in range(0, len(grid), 16):
                        rows = slice(start, start + 16)
                        plain[rows] = _betting_reference(paired_losses(table, subset, scores, grid[rows])[:, order],
                                                         target, level)
                        if (plain[rows] > level).any():
                            break
                    k = fixed_sequence(plain, level)
                    exact = betting_sequence(table, subset, scores, grid, order, target, level)
                    fast = betting_sequence(table, subset, scores, grid, order, target, level, exact=False)
                    assert fixed_sequence(exact, level) == k == fixed_sequence(fast, level)
                    assert np.array_equal(exact[:k + 1], plain[:k + 1])


def test_paired_losses_equal_a_question_by_question_replay():
    from cascade_core.records.table import synthetic_table
    from cascade_core.choose.ltt import paired_losses

    table = synthetic_table(300, 4, seed=5)
    grid = threshold_grid("both")[::7]
    scores = {s: keep_scores(table, s, "both") for s in range(3)}
    for subset in ((0, 3), (0, 1, 3), (0, 1, 2, 3), (1, 2)):
        losses = paired_losses(table, subset, scores, grid)
        assert losses.dtype == np.int8
        for j, tau in enumerate(grid):
            for i in range(0, table.n_questions, 13):
                answer = next((s for s in subset[:-1] if scores[s][i] >= tau), subset[-1])
                assert losses[j, i] == int(table.correct[-1, i]) - int(table.correct[answer, i])


def test_the_resplit_study_is_the_same_with_coded_subjects_and_shared_fits():
    from cascade_core.records.table import synthetic_table
    from cascade_core.choose.resplit import coded_subjects, resplit_study

    table = synthetic_table(600, 3, seed=7)
    coded = coded_subjects(table)
    assert len(set(coded.subjects)) == len(set(table.subjects)) and max(map(len, coded.subjects)) == 1
    args = dict(target=0.02, delta=0.2, resplits=3, rules=("pt_only", "learned", "loss_aware"), unit="calls",
                cost_unit="flops")
    from cascade_core.choose.resplit import stratified_halves

    assert np.array_equal(stratified_halves(table.subjects, 3), stratified_halves(coded.subjects, 3))
    import cascade_core.choose.resplit as resplit

    names = resplit.coded_subjects
    try:  # the study on the names themselves
        resplit.coded_subjects = lambda t: t
        plain = resplit_study(table, **args).to_json()
    finally:
        resplit.coded_subjects = names
    fits: dict = {}
    assert resplit_study(coded, **args, fits=fits).to_json() == plain
    assert fits and resplit_study(coded, **args, bound="wsr", fits=fits).to_json() == resplit_study(
        table, **args, bound="wsr").to_json()
