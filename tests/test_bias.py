"""Letter-bias calibration: fitted as plain floats, and the same answers live and replayed."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cascade_core.bias import LetterBias, fit_letter_bias, rescore
from cascade_core.signals import mc_signals, option_probabilities

QUESTIONS = [
    ("What is 2 + 3?", ("4", "5", "6", "7"), 1),
    ("Which planet is closest to the Sun?", ("Venus", "Earth", "Mercury", "Mars"), 2),
    ("What is the chemical symbol for water?", ("H2O", "CO2", "O2", "NaCl"), 0),
    ("How many legs does a spider have?", ("6", "10", "4", "8"), 3),
    ("Which is a prime number?", ("9", "15", "7", "21"), 2),
]


def test_fit_divides_by_the_calibration_prior():
    probs = np.array([[0.7, 0.1, 0.1, 0.1], [0.5, 0.3, 0.1, 0.1], [0.6, 0.2, 0.1, 0.1]])
    bias = fit_letter_bias(probs)
    prior = probs.mean(axis=0)
    expected = probs / prior
    expected /= expected.sum(axis=1, keepdims=True)
    debiased = option_probabilities(bias.logits(np.log(probs)))
    assert np.allclose(debiased, expected)
    assert LetterBias.from_dict(json.loads(json.dumps(bias.to_dict()))) == bias


def test_rescore_changes_the_answer_and_keeps_correctness_honest():
    probs = np.array([[0.40, 0.35, 0.15, 0.10], [0.45, 0.20, 0.30, 0.05]])
    bias = LetterBias(offsets=(-np.log(0.6), -np.log(0.2), -np.log(0.1), -np.log(0.1)))
    prediction, correct, p_t, _, _ = rescore(probs, [1, 2], bias)
    raw_prediction, raw_correct, *_ = rescore(probs, [1, 2], None)
    assert raw_prediction.tolist() == [0, 0] and not raw_correct.any()
    assert prediction.tolist() == [1, 2] and correct.all()
    assert np.all(p_t >= 0.25) and np.all(p_t <= 1)


def test_bad_bias_input_is_refused():
    with pytest.raises(ValueError, match="offsets"):
        LetterBias(offsets=(1.0,))
    with pytest.raises(ValueError, match="probability"):
        fit_letter_bias(np.array([[1.0, 0.0], [1.0, 0.0]]))


@pytest.mark.model
def test_replay_with_a_bias_equals_the_live_cascade_with_it(smollm2_backend):
    """Records (raw option probabilities) -> replay with the bias; the live cascade with the same
    bias on the same questions gives the same answers, P(T) and keep decisions."""
    from cascade_core.cascade import RuntimeStage, run_cascade
    from cascade_core.policy import StagePolicy, keep_mask
    from cascade_core.prompts import format_prompt
    from cascade_core.types import Question

    questions = [Question(text, options, subject="misc", answer=a, qid=f"q{i}")
                 for i, (text, options, a) in enumerate(QUESTIONS)]
    scores = smollm2_backend.score_options([format_prompt(q) for q in questions], [4] * len(questions), [])
    recorded = np.array([option_probabilities(s.letter_logits) for s in scores])  # what the records keep
    raw_answers = mc_signals(np.log(recorded))[0]
    bias = fit_letter_bias(recorded)
    prediction, correct, p_t, margin, entropy = rescore(recorded, [q.answer for q in questions], bias)
    middle = np.sort(p_t)[len(p_t) // 2 - 1:len(p_t) // 2 + 1]
    policy = StagePolicy(tau_t=float(middle.mean()), rule="pt_only")  # between two questions: no float ties
    replay_keep = keep_mask(policy, p_t, np.full(len(p_t), np.nan), margin, entropy)
    fallback = RuntimeStage("again", smollm2_backend)
    for i, q in enumerate(questions):
        trace = run_cascade([RuntimeStage("smollm2", smollm2_backend, policy=policy, bias=bias), fallback], q)
        first = trace.steps[0]
        assert first.answer_index == prediction[i]
        # One prompt live vs a padded batch of five for the records: float32 noise of ~1e-6.
        assert first.p_t == pytest.approx(p_t[i], abs=1e-4)
        assert np.allclose(first.option_probs, recorded[i], atol=1e-4)  # the trace keeps raw probabilities
        assert (first.decision == "keep") == bool(replay_keep[i])
    # the bias did something or had nothing to undo
    assert (prediction != raw_answers).any() or len(set(raw_answers)) > 1


def test_with_letter_bias_replays_the_changed_answers():
    from cascade_core.bias import with_letter_bias
    from cascade_core.policy import CascadePolicy
    from cascade_core.records.table import synthetic_table
    from cascade_core.choose.replay import replay

    table = synthetic_table(200, 2, seed=0)
    rng = np.random.default_rng(0)
    probs = rng.dirichlet([5, 1, 1, 1], size=200)  # a stage that loves "A"
    answers = rng.integers(0, 4, size=200)
    bias = fit_letter_bias(probs)
    biased = with_letter_bias(table, 0, probs, answers, bias)
    prediction, correct, p_t, _, _ = rescore(probs, answers, bias)
    assert np.array_equal(biased.prediction[0], prediction) and np.array_equal(biased.correct[0], correct)
    assert np.array_equal(biased.correct[1], table.correct[1])
    policy = CascadePolicy.from_lists([0.0, 0.0], rule="pt_only")  # stage 0 keeps everything
    assert replay(biased, policy).accuracy == pytest.approx(correct.mean())
    assert (prediction != 0).mean() > (mc_signals(np.log(probs))[0] != 0).mean()
