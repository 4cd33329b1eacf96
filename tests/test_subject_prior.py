"""The subject prior of a fitted keep score (issue 18, item 3) and the guaranteed search's
tie-break (item 4): plain floats in the policy file, the same decision live and replayed on the
committed records, and no free stage switched on that keeps nothing."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cascade_core.policy import (CascadePolicy, LearnedCombiner, StagePolicy, fit_combiner, fit_loss_aware,
                                 keep_mask, subject_prior)
from cascade_core.records.table import synthetic_table
from cascade_core.choose.replay import replay, stage_keep
from cascade_core.choose.ltt import guaranteed_policy


def _fitted(n=2000, seed=0):
    table = synthetic_table(n, 2, seed=seed)
    s = 0
    model = fit_loss_aware(table.p_t[s], table.p_ik[s], table.margin[s], table.entropy[s], table.correct[s],
                           table.correct[-1], C=0.01, subjects=table.subjects)
    return table, model


def test_subject_prior_is_smoothed_log_odds_with_a_default():
    subjects = np.array(["a"] * 20 + ["b"] * 80)
    y = np.array([True] * 20 + [False] * 40 + [True] * 40)
    values, default = subject_prior(subjects, {"subject_right": y}, smoothing=20)
    overall = 0.6
    rate_a = (20 + 20 * overall) / 40  # all right, pulled half way to the overall rate
    assert dict(values)["a"][0] == pytest.approx(np.log(rate_a / (1 - rate_a)))
    assert default[0] == pytest.approx(np.log(overall / (1 - overall)))


def test_subject_prior_survives_json_and_unknown_subjects_get_the_default():
    table, model = _fitted()
    assert model.uses_subject and "subject_reference" in model.right.features
    back = CascadePolicy.from_dict(json.loads(json.dumps(
        CascadePolicy((StagePolicy(rule="loss_aware", tau_learned=0.0, combiner=model), StagePolicy())).to_dict())))
    again = back[0].combiner
    args = (table.p_t[0], table.p_ik[0], table.margin[0], table.entropy[0])
    assert np.array_equal(again.score(*args, table.subjects), model.score(*args, table.subjects))
    # One name for all questions equals that name repeated; unknown and missing subjects: the default.
    one = model.score(*args, "subject3")
    assert np.array_equal(one, model.score(*args, np.full(table.n_questions, "subject3")))
    assert np.array_equal(model.score(*args, None), model.score(*args, "never seen"))
    assert not np.array_equal(one, model.score(*args, None))


def test_a_combiner_without_subject_prior_ignores_the_subject():
    table = synthetic_table(500, 2, seed=1)
    model = fit_combiner(table.p_t[0], table.p_ik[0], table.margin[0], table.entropy[0], table.correct[0])
    args = (table.p_t[0], table.p_ik[0], table.margin[0], table.entropy[0])
    assert not model.uses_subject and "subject_prior" not in model.to_dict()
    assert np.array_equal(model.score(*args), model.score(*args, table.subjects))


def test_bad_subject_priors_are_refused():
    with pytest.raises(ValueError, match="subject prior"):
        LearnedCombiner(features=("p_t", "subject_right"), weights=(1.0, 1.0), bias=0.0, means=(0.0, 0.0),
                        scales=(1.0, 1.0))
    with pytest.raises(ValueError, match="finite"):
        LearnedCombiner(features=("p_t", "subject_right"), weights=(1.0, 1.0), bias=0.0, means=(0.0, 0.0),
                        scales=(1.0, 1.0), subject_values=(("a", (float("nan"),)),), subject_default=(0.0,))


def test_keep_mask_one_question_at_a_time_equals_the_batch():
    table, model = _fitted(600, seed=2)
    policy = StagePolicy(rule="loss_aware", tau_learned=0.0, combiner=model)
    args = (table.p_t[0], table.p_ik[0], table.margin[0], table.entropy[0])
    batch = keep_mask(policy, *args, subject=table.subjects)
    single = [bool(keep_mask(policy, *(a[i:i + 1] for a in args), subject=table.subjects[i])[0])
              for i in range(table.n_questions)]
    assert batch.tolist() == single


# -- live equals replay on the committed records -------------------------------------------------
class _RecordBackend:
    """A stage that answers with a record's option probabilities (letter logits = their logs)."""

    recorded = False
    has_hidden_states = True

    def __init__(self, name, probs_by_prompt, hidden_by_prompt):
        self.model_id = name
        self.total_params = self.non_embedding_params = 10**9
        self._probs, self._hidden = probs_by_prompt, hidden_by_prompt

    def score_options(self, prompts, n_options, layers=None):
        from cascade_core.types import OptionScores

        with np.errstate(divide="ignore"):
            return [OptionScores(letter_logits=np.log(self._probs[p]), hidden_states={0: self._hidden[p]},
                                 prompt_tokens=10) for p in prompts]

    def generate(self, prompt, max_new_tokens=64, *, cancel=None, on_text=None, layers=None, gate=None):
        raise NotImplementedError


class _RecordedPIK:
    """The probe's recorded P(IK), handed back through the 'hidden state' (a one-number feature)."""

    layer = 0

    def p_ik(self, features):
        return np.asarray(features, dtype=np.float64)[:, 0]


@pytest.fixture(scope="module")
def committed():
    from cascade_core.compose.tables import MissingRecordsError, load_preset_table

    try:
        table = load_preset_table("api-recorded", stages=["qwen2.5-coder-1.5b", "gpt-4-recorded"])
    except (MissingRecordsError, ValueError) as err:
        pytest.skip(f"no committed records: {err}")
    return table


def test_live_cascade_decides_like_the_replay_on_committed_records(committed):
    import pandas as pd

    from cascade_core.cascade import RuntimeStage, run_cascade
    from cascade_core.locations import locations
    from cascade_core.records.mmlu import load_mmlu, to_questions
    from cascade_core.prompts import format_prompt

    table = committed
    assert table.names[0] == "qwen2.5-coder-1.5b"
    calib, test = table.subset("calibration"), table.subset("test")
    policy, _, _ = guaranteed_policy(calib, "dollars", "loss_aware", 0.01, None, 0.1, None, "binomial")
    policy = CascadePolicy.from_dict(json.loads(json.dumps(policy.to_dict())))  # as a policy file holds it
    stage = policy[0]
    assert stage.enabled and stage.combiner is not None and stage.combiner.uses_subject
    # 400 test questions, every subject's default and own prior in play.
    rows = np.random.default_rng(0).permutation(test.n_questions)[:400]
    qids = test.qids[rows]
    records = pd.read_parquet(locations().record_path("qwen2.5-coder-1.5b", "mmlu"), columns=["qid", "option_probs"])
    probs = dict(zip(records["qid"].astype(str), records["option_probs"]))
    mmlu = load_mmlu().set_index("qid").loc[qids].reset_index()
    questions = to_questions(mmlu)
    prompts = [format_prompt(q) for q in questions]
    small = _RecordBackend("small", {p: np.asarray(probs[q], dtype=np.float64) for p, q in zip(prompts, qids)},
                           {p: np.array([test.p_ik[0][i]], dtype=np.float32) for p, i in zip(prompts, rows)})
    big = _RecordBackend("big", {p: np.array([0.7, 0.1, 0.1, 0.1]) for p in prompts}, {p: np.zeros(1) for p in prompts})
    stages = [RuntimeStage(name="small", backend=small, policy=stage, probe=_RecordedPIK()),
              RuntimeStage(name="big", backend=big, policy=StagePolicy())]
    replayed = stage_keep(test, policy, 0)[rows]
    live = np.array([run_cascade(stages, q).answered_by.stage == "small" for q in questions])
    assert 0 < live.sum() < len(live)  # some kept, some escalated
    assert live.tolist() == replayed.tolist()
    assert replay(test, policy).answer_rate[0] == pytest.approx(stage_keep(test, policy, 0).mean())


# -- item 4: on equal cost and accuracy, fewer stages -------------------------------------------
def test_no_enabled_stage_keeps_nothing_on_the_committed_records():
    """The shipped api-recorded policy ran SmolLM2 on every question and kept none: its
    sub-cascade's mean cost, summed in another order, came out a rounding error cheaper than the
    same policy without it. On equal cost and accuracy the fewer stages now win."""
    from cascade_core.compose.tables import MissingRecordsError, load_preset_table

    try:
        table = load_preset_table("api-recorded", split="calibration")
    except (MissingRecordsError, ValueError) as err:
        pytest.skip(f"no committed records: {err}")
    for rule in ("both", "pt_only"):
        policy, _, _ = guaranteed_policy(table, "dollars", rule, 0.01, None, 0.1, None, "binomial")
        result = replay(table, policy)
        for s in policy.enabled_indices[:-1]:
            assert result.answer_rate[s] > 0, f"{rule}: {table.names[s]} is enabled and keeps nothing"
