"""Replay is exact: it equals a question-by-question loop and the live cascade; records and costs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cascade_core.cost import COST_UNITS, compute_reduction, dollars, flops
from cascade_core.policy import CascadePolicy, StagePolicy, keep_mask
from cascade_core.records.table import RecordTable, synthetic_table
from cascade_core.choose.replay import replay

NAN = float("nan")


def reference_replay(table: RecordTable, policy: CascadePolicy):
    """The live cascade's loop, one question at a time: the definition replay must match."""
    enabled = [s for s in range(table.n_stages) if policy[s].enabled]
    finals, costs = [], {u: [] for u in COST_UNITS}
    for i in range(table.n_questions):
        totals = {u: 0.0 for u in COST_UNITS}
        for s in enabled:
            for u in COST_UNITS:
                totals[u] += float(table.cost(u)[s, i])
            if s == enabled[-1]:
                break
            args = [getattr(table, k)[s, i:i + 1] for k in ("p_t", "p_ik", "margin", "entropy")]
            if keep_mask(policy[s], *args)[0]:
                break
        finals.append(s)
        for u in COST_UNITS:
            costs[u].append(totals[u])
    return np.array(finals), {u: np.array(v) for u, v in costs.items()}


def make_table(n_stages: int, values: list[list[tuple]], recorded_last: bool = False) -> RecordTable:
    """A table from per-stage rows of (correct, p_t, p_ik, prompt_tokens, seconds)."""
    arr = np.array(values, dtype=np.float64)  # (S, N, 5)
    S, N = arr.shape[:2]
    params = np.array([1e6 * 10 ** s for s in range(S)])[:, None]
    return RecordTable(
        names=tuple(f"s{i}" for i in range(S)), model_ids=tuple(f"m{i}" for i in range(S)),
        qids=np.array([f"q{j}" for j in range(N)]), subjects=np.array(["x"] * N), splits=np.array([""] * N),
        correct=arr[..., 0] > 0.5, prediction=np.zeros((S, N)), p_t=arr[..., 1], p_ik=arr[..., 2],
        margin=np.full((S, N), NAN), entropy=np.full((S, N), NAN), prompt_tokens=arr[..., 3],
        output_tokens=np.ones((S, N)), flops=2 * params * (arr[..., 3] + 1), seconds=arr[..., 4],
        dollars=arr[..., 3] * 3e-6, has_hidden=np.ones(S, dtype=bool),
        recorded=np.array([False] * (S - 1) + [recorded_last]),
    )


signal = st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0, NAN, 0.3333, 0.9])
cell = st.tuples(st.booleans(), signal, signal, st.integers(0, 500), st.floats(0, 10, allow_nan=False))


@st.composite
def table_and_policy(draw):
    S = draw(st.integers(1, 4))
    N = draw(st.integers(1, 25))
    values = [[draw(cell) for _ in range(N)] for _ in range(S)]
    taus = st.sampled_from([-0.5, 0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 0.6])
    enabled = draw(st.lists(st.booleans(), min_size=S, max_size=S).filter(any))
    stages = tuple(StagePolicy(tau_t=draw(taus), tau_ik=draw(taus),
                               rule=draw(st.sampled_from(["both", "pt_only", "pik_only"])),
                               enabled=enabled[s]) for s in range(S))
    return make_table(S, values, recorded_last=draw(st.booleans())), CascadePolicy(stages)


@settings(max_examples=300, deadline=None)
@given(table_and_policy())
def test_replay_equals_the_question_by_question_loop(case):
    table, policy = case
    result = replay(table, policy)
    final, costs = reference_replay(table, policy)
    np.testing.assert_array_equal(result.final_stage, final)
    np.testing.assert_array_equal(result.correct, table.correct[final, np.arange(len(final))])
    assert result.accuracy == table.correct[final, np.arange(len(final))].mean()
    for unit in COST_UNITS:
        np.testing.assert_array_equal(result.cost_per_question[unit], costs[unit])  # bit-exact
        assert result.total_cost[unit] == pytest.approx(costs[unit].sum(), rel=1e-12, abs=1e-12)
    # rates: what reached a stage = what the previous enabled stage passed on
    enabled = policy.enabled_indices
    N = table.n_questions
    assert result.reach_rate[enabled[0]] == 1.0
    for prev, nxt in zip(enabled, enabled[1:]):
        expected = result.reach_rate[prev] * np.nan_to_num(result.escalation_rate[prev])
        assert result.reach_rate[nxt] == pytest.approx(expected)
    reached = result.reach_rate > 0
    assert np.isnan(result.escalation_rate[~reached]).all() and not np.isnan(result.escalation_rate[reached]).any()
    assert result.escalation_rate[enabled[-1]] == 0.0 or not reached[enabled[-1]]
    assert result.answer_rate.sum() == pytest.approx(1.0)
    off = [s for s in range(table.n_stages) if s not in enabled]
    assert (result.reach_rate[off] == 0).all() and np.isnan(result.escalation_rate[off]).all()
    np.testing.assert_array_equal(result.cost_per_question["calls"], (np.array(enabled)[:, None] <= final).sum(axis=0))
    assert result.answer_rate.tolist() == (np.bincount(final, minlength=table.n_stages) / N).tolist()


@pytest.fixture(scope="module")
def table():
    return synthetic_table(2000, 3, seed=3)


def test_thresholds_zero_give_the_first_model(table):
    result = replay(table, CascadePolicy.from_lists([0.0] * 3, [0.0] * 3))
    assert (result.final_stage == 0).all()
    assert result.accuracy == table.correct[0].mean()
    for unit in COST_UNITS:
        np.testing.assert_array_equal(result.cost_per_question[unit], table.cost(unit)[0])
    assert result.reach_rate.tolist() == [1.0, 0.0, 0.0]


def test_thresholds_above_one_give_the_last_model_and_pay_every_stage(table):
    result = replay(table, CascadePolicy.from_lists([1.01] * 3, [0.0] * 3))
    assert (result.final_stage == 2).all()
    assert result.accuracy == table.correct[2].mean()
    np.testing.assert_allclose(result.cost_per_question["flops"], table.flops.sum(axis=0), rtol=1e-15)
    assert result.escalation_rate.tolist() == [1.0, 1.0, 0.0]
    assert result.compute_reduction["flops"] < 0  # the whole ladder costs more than the top alone


def test_disabled_stages_cost_nothing(table):
    policy = CascadePolicy.from_lists([0.8, 0.7, 0.0], [0.6, 0.5, 0.0], enabled=[True, False, True])
    result = replay(table, policy)
    assert result.reach_rate[1] == 0 and result.answer_rate[1] == 0
    two = replay(table.stage_subset([0, 2]), CascadePolicy((policy[0], policy[2])))
    for unit in COST_UNITS:
        np.testing.assert_array_equal(result.cost_per_question[unit], two.cost_per_question[unit])
    np.testing.assert_array_equal(result.final_stage, np.array([0, 2])[two.final_stage])
    alone = replay(table, CascadePolicy.single(3, 2))
    assert alone.compute_reduction["flops"] == 0.0 and alone.accuracy == table.correct[2].mean()


def test_policy_table_mismatch_is_a_clear_error(table):
    with pytest.raises(ValueError, match="2 stages, the table 3"):
        replay(table, CascadePolicy.from_lists([0.5, 0.5]))


def test_replay_of_a_subset_equals_the_subset_of_replay(table):
    policy = CascadePolicy.from_lists([0.7, 0.6, 0.0], [0.5, 0.5, 0.0])
    full = replay(table, policy)
    calib = replay(table.subset("calibration"), policy)
    mask = table.splits == "calibration"
    np.testing.assert_array_equal(calib.final_stage, full.final_stage[mask])


# -- the live cascade makes the same decisions as the replay -------------------------------------
class _ScriptedBackend:
    """Stands in for a model (none can run in this test): fixed letter logits and hidden states."""

    recorded = False

    def __init__(self, model_id, logits_by_prompt, hidden_by_prompt, tokens_by_prompt, params):
        self.model_id = model_id
        self.has_hidden_states = True
        self.total_params = self.non_embedding_params = params
        self._logits, self._hidden, self._tokens = logits_by_prompt, hidden_by_prompt, tokens_by_prompt

    def score_options(self, prompts, n_options, layers=None):
        from cascade_core.types import OptionScores

        return [OptionScores(letter_logits=self._logits[p], hidden_states={4: self._hidden[p]},
                             prompt_tokens=self._tokens[p]) for p in prompts]

    def generate(self, prompt, max_new_tokens=64, *, cancel=None, on_text=None, layers=None, gate=None):
        raise NotImplementedError


def test_live_cascade_answers_like_the_replay():
    from cascade_core.cascade import RuntimeStage, run_cascade
    from cascade_core.probe import PIKProbe
    from cascade_core.prompts import format_prompt
    from cascade_core.signals import mc_signals
    from cascade_core.types import Question

    rng = np.random.default_rng(7)
    S, N = 3, 60
    questions = [Question(text=f"question {i}?", options=("a", "b", "c", "d"), subject="demo",
                          answer=int(rng.integers(4)),
                          qid=f"q{i}") for i in range(N)]
    prompts = [format_prompt(q) for q in questions]
    answers = np.array([q.answer for q in questions])
    stages, arrays = [], {k: np.zeros((S, N)) for k in ("p_t", "p_ik", "margin", "entropy", "tokens", "flops")}
    correct = np.zeros((S, N), dtype=bool)
    for s in range(S):
        logits = rng.normal(scale=1 + s, size=(N, 4))
        hidden = rng.normal(size=(N, 16)).astype(np.float32)
        tokens = rng.integers(50, 300, size=N)
        probe = PIKProbe(layer=4, model_id=f"m{s}").fit(hidden, rng.random(N) < 0.5)
        prediction, p_t, margin, entropy = mc_signals(logits)
        correct[s] = prediction == answers
        arrays["p_t"][s], arrays["margin"][s], arrays["entropy"][s] = p_t, margin, entropy
        arrays["p_ik"][s] = [probe.p_ik(hidden[i:i + 1])[0] for i in range(N)]
        arrays["tokens"][s] = tokens
        params = 10 ** (6 + s)
        arrays["flops"][s] = flops(params, tokens)
        backend = _ScriptedBackend(f"m{s}", dict(zip(prompts, logits)), dict(zip(prompts, hidden)),
                                   dict(zip(prompts, tokens.tolist())), params)
        stages.append(RuntimeStage(name=f"s{s}", backend=backend, probe=probe))
    table = RecordTable(
        names=("s0", "s1", "s2"), model_ids=("m0", "m1", "m2"), qids=[q.qid for q in questions],
        subjects=["demo"] * N, splits=[""] * N, correct=correct, prediction=np.zeros((S, N)),
        p_t=arrays["p_t"], p_ik=arrays["p_ik"], margin=arrays["margin"], entropy=arrays["entropy"],
        prompt_tokens=arrays["tokens"], output_tokens=np.zeros((S, N)), flops=arrays["flops"],
        seconds=np.zeros((S, N)), dollars=np.zeros((S, N)), has_hidden=[True] * 3, recorded=[False] * 3)
    for policy in (CascadePolicy.from_lists([0.5, 0.45, 0], [0.5, 0.5, 0]),
                   CascadePolicy.from_lists([0.6, 0.0, 0], [0.4, 0.0, 0], rule="pik_only", enabled=[True, False, True]),
                   CascadePolicy.from_lists([0.0, 0.55, 0], rule="pt_only", enabled=[False, True, True])):
        for stage, stage_policy in zip(stages, policy.stages):
            stage.policy = stage_policy
        result = replay(table, policy)
        for i, question in enumerate(questions):
            trace = run_cascade(stages, question)
            assert trace.answered_by.stage == f"s{result.final_stage[i]}"
            assert trace.total("flops") == pytest.approx(result.cost_per_question["flops"][i], rel=1e-12)
            assert len(trace.steps) == result.cost_per_question["calls"][i]


# -- records ------------------------------------------------------------------------------------
def _frame(qids, stage="a", **extra):
    n = len(qids)
    data = {"qid": qids, "stage": stage, "model_id": f"model-{stage}", "subject": "math", "split": "calibration",
            "correct": [True, False] * (n // 2) + [True] * (n % 2), "prediction": [0] * n,
            "p_t": np.linspace(0.3, 0.9, n),
            "margin": 0.1, "entropy": 1.0, "prompt_tokens": 100, "output_tokens": 0, "flops": 2e9, "seconds": 0.1}
    data.update(extra)
    return pd.DataFrame(data)


def test_from_frames_inner_joins_on_qid():
    a = _frame(["q1", "q2", "q3", "q4"], "a", p_ik=[0.1, 0.2, 0.3, 0.4])
    b = _frame(["q4", "q2", "q9", "q1"], "b")
    table = RecordTable.from_frames([a, b], prices=[(0.0, 0.0), (2.0, 8.0)])
    assert table.names == ("a", "b") and table.model_ids == ("model-a", "model-b")
    assert table.qids.tolist() == ["q1", "q2", "q4"]  # the first frame's order
    assert table.p_ik[0].tolist() == [0.1, 0.2, 0.4] and np.isnan(table.p_ik[1]).all()
    assert table.has_hidden.tolist() == [True, False]
    assert table.p_t[1].tolist() == pytest.approx(b.set_index("qid").loc[["q1", "q2", "q4"], "p_t"].tolist())
    assert table.dollars[1].tolist() == pytest.approx([100 * 2.0 / 1e6] * 3)
    assert table.cost("tokens").tolist() == [[100.0] * 3] * 2
    assert table.subjects.tolist() == ["math"] * 3 and table.splits.tolist() == ["calibration"] * 3


def test_from_frames_errors():
    a = _frame(["q1", "q2"])
    with pytest.raises(ValueError, match=r"stage 'b'.*lack column\(s\) \['p_t'\]"):
        RecordTable.from_frames([a, _frame(["q1"], "b").drop(columns="p_t")])
    with pytest.raises(ValueError, match="repeat question id 'q1'"):
        RecordTable.from_frames([a, _frame(["q1", "q1"], "b")])
    with pytest.raises(ValueError, match="no question in common"):
        RecordTable.from_frames([a, _frame(["q7"], "b")])
    with pytest.raises(ValueError, match="disagree on the split"):
        RecordTable.from_frames([a, _frame(["q1", "q2"], "b", split="test")])
    with pytest.raises(ValueError, match="unique"):
        RecordTable.from_frames([a, _frame(["q1", "q2"], "a")])
    with pytest.raises(ValueError, match="no record frames"):
        RecordTable.from_frames([])


def test_recorded_stage_has_no_probabilities_and_must_be_last():
    local = _frame(["q1", "q2"], "local")
    gpt = _frame(["q1", "q2"], "gpt4").drop(columns=["p_t", "prediction", "flops", "seconds"])
    table = RecordTable.from_frames([local, gpt], recorded=[False, True], prices=[(0, 0), (10.0, 30.0)])
    assert np.isnan(table.p_t[1]).all() and table.flops[1].tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="only be the last"):
        RecordTable.from_frames([gpt, local], recorded=[True, False])
    with pytest.raises(ValueError, match="only be the last"):
        table.stage_subset([1, 0])
    # even when a recording ships synthetic P(T) = 1, the table never shows it
    fake = _frame(["q1", "q2"], "gpt4", recorded=True)
    assert np.isnan(RecordTable.from_frames([local, fake]).p_t[1]).all()


def test_subset_and_stage_subset(table):
    calib = table.subset("calibration")
    assert set(calib.splits) == {"calibration"} and len(calib) == (table.splits == "calibration").sum()
    some = table.subset(table.qids[[5, 1]])
    assert some.qids.tolist() == [table.qids[5], table.qids[1]]
    assert some.correct[:, 0].tolist() == table.correct[:, 5].tolist()
    two = table.stage_subset(["stage1", 2])
    assert two.names == ("stage1", "stage3") and two.flops[1].tolist() == table.flops[2].tolist()
    with pytest.raises(ValueError, match="no question in split 'dev'"):
        table.subset("dev")
    with pytest.raises(ValueError, match="not in the table"):
        table.subset(["nope"])
    with pytest.raises(ValueError, match="selects no question"):
        table.subset(np.zeros(len(table), dtype=bool))
    with pytest.raises(ValueError, match="no stage 'x'"):
        table.stage_subset(["x"])
    with pytest.raises(ValueError, match="only once"):
        table.stage_subset([0, 0])
    with pytest.raises(ValueError, match="unknown cost unit"):
        table.cost("euros")


def test_bad_arrays_are_rejected():
    base = dict(names=("a",), model_ids=("m",), qids=["q1", "q2"], subjects=["", ""], splits=["", ""],
                correct=[[True, False]], prediction=[[0, 1]], p_t=[[0.5, 0.6]], p_ik=[[NAN, NAN]],
                margin=[[0.1, 0.1]], entropy=[[1.0, 1.0]], prompt_tokens=[[10, 10]], output_tokens=[[0, 0]],
                flops=[[1.0, 1.0]], seconds=[[0.1, 0.1]], dollars=[[0.0, 0.0]], has_hidden=[False], recorded=[False])
    RecordTable(**base)
    with pytest.raises(ValueError, match="p_t must have shape"):
        RecordTable(**{**base, "p_t": [[0.5]]})
    with pytest.raises(ValueError, match="flops must be >= 0"):
        RecordTable(**{**base, "flops": [[1.0, -1.0]]})
    with pytest.raises(ValueError, match="unique"):
        RecordTable(**{**base, "qids": ["q1", "q1"]})


# -- cost model ---------------------------------------------------------------------------------
def test_cost_formulas():
    assert flops(1e9, 100) == 2e11
    np.testing.assert_array_equal(flops(10, np.array([1, 2])), [20.0, 40.0])
    assert dollars(1_000_000, 500_000, 10.0, 30.0) == pytest.approx(25.0)
    assert compute_reduction(25.0, 100.0) == 0.75
    assert np.isnan(compute_reduction(1.0, 0.0))
    with pytest.raises(ValueError, match="prices"):
        dollars(1, 1, -1.0, 0.0)
