"""The recorded stage: RouteLLM's outcomes joined to MMLU, and the backend that replays them."""

import numpy as np
import pytest

from cascade_core.records.mmlu import RECORDED_PATH, load_mmlu, load_recorded_outcomes, to_questions
from cascade_core.prompts import format_prompt
from cascade_core.signals import mc_signals
from cascade_core.types import Backend, Question
from cascade_core.compose.live import recorded_backend
from models.recorded import MIXTRAL_ACTIVE_NON_EMBEDDING, MIXTRAL_TOTAL, NotRecordedError


@pytest.fixture(scope="module")
def recorded():
    return load_recorded_outcomes()


@pytest.fixture(scope="module")
def gpt4():
    return recorded_backend("gpt-4-1106-preview", price_in=10.0, price_out=30.0)


def test_every_mmlu_question_has_one_recorded_outcome(recorded):
    mmlu = load_mmlu()
    assert len(recorded) == 14_042 and recorded["qid"].is_unique
    assert set(recorded["qid"]) == set(mmlu["qid"])
    subjects = dict(zip(mmlu["qid"], mmlu["subject"]))
    assert all(subjects[q] == s for q, s in zip(recorded["qid"], recorded["subject"]))
    # The accuracies stated in the shared data README (0.681 and 0.806).
    assert recorded["mixtral_correct"].mean() == pytest.approx(0.6808, abs=5e-5)
    assert recorded["gpt4_correct"].mean() == pytest.approx(0.8058, abs=5e-5)


def test_token_counts_are_positive_and_plausible(recorded):
    for column in ("gpt4_prompt_tokens", "mixtral_prompt_tokens"):
        assert (recorded[column] > 0).all()
    mmlu = load_mmlu().set_index("qid").loc[recorded["qid"]]
    chars = np.array([len(format_prompt(q)) for q in to_questions(mmlu.reset_index())])
    ratio = chars / recorded["gpt4_prompt_tokens"].to_numpy()
    # English BPE text runs at about 4 characters a token.
    assert 3.0 < np.median(ratio) < 5.5
    assert recorded["gpt4_prompt_tokens"].sum() == 1_670_759


def test_backend_shape(gpt4):
    assert isinstance(gpt4, Backend)
    assert gpt4.recorded is True and gpt4.has_hidden_states is False
    assert gpt4.model_id == "gpt-4-1106-preview" and (gpt4.price_in, gpt4.price_out) == (10.0, 30.0)
    assert gpt4.non_embedding_params == 0  # GPT-4's size is not public: no FLOPs
    mixtral = recorded_backend("mistralai/Mixtral-8x7B-Instruct-v0.1")
    assert mixtral.model_id == "mixtral-8x7b-instruct"
    assert round(MIXTRAL_TOTAL / 1e9, 1) == 46.7 and round(MIXTRAL_ACTIVE_NON_EMBEDDING / 1e9, 1) == 12.6
    with pytest.raises(ValueError, match="no recording for model 'gpt-5'"):
        recorded_backend("gpt-5")
    with pytest.raises(ValueError, match="prices must be >= 0"):
        recorded_backend("gpt-4", price_in=-1)


def test_answer_replays_the_recording(gpt4, recorded):
    mixtral = recorded_backend("mixtral-8x7b-instruct")
    for row in recorded.sample(50, random_state=0).itertuples():
        assert gpt4.answer(row.qid) == (bool(row.gpt4_correct), int(row.gpt4_prompt_tokens))
        assert mixtral.answer(row.qid) == (bool(row.mixtral_correct), int(row.mixtral_prompt_tokens))
    assert "anatomy/0000" in gpt4 and "nope/0001" not in gpt4
    with pytest.raises(NotRecordedError, match="no answer for question 'nope/0001'"):
        gpt4.answer("nope/0001")
    with pytest.raises(NotRecordedError, match="has no MMLU id"):
        gpt4.answer("")


def test_score_options_reproduces_right_and_wrong(gpt4, recorded):
    frame = load_mmlu(per_subject=4)
    questions = to_questions(frame)
    scores = gpt4.score_options([format_prompt(q) for q in questions], [4] * len(questions))
    logits = np.stack([s.letter_logits for s in scores])
    prediction, p_t, _, _ = mc_signals(logits)
    truth = recorded.set_index("qid").loc[frame["qid"]]
    assert np.array_equal(prediction == frame["answer"].to_numpy(), truth["gpt4_correct"].to_numpy())
    assert truth["gpt4_correct"].nunique() == 2  # both kinds are exercised
    assert np.all(p_t == 1.0)  # synthetic: the reason P(T) of a recorded stage is never shown
    assert [s.prompt_tokens for s in scores] == truth["gpt4_prompt_tokens"].tolist()
    assert all(s.hidden_states is None for s in scores)


def test_score_options_refuses_what_was_not_recorded(gpt4):
    q = to_questions(load_mmlu(subjects="anatomy").head(1))[0]
    edited = Question(text=q.text + " (edited)", options=q.options, subject=q.subject)
    with pytest.raises(NotRecordedError, match="only MMLU questions"):
        gpt4.score_options([format_prompt(edited)], [4])
    with pytest.raises(ValueError, match="4 options, got n_options=3"):
        gpt4.score_options([format_prompt(q)], [3])
    with pytest.raises(ValueError, match="1 prompts but 2 option counts"):
        gpt4.score_options([format_prompt(q)], [4, 4])
    with pytest.raises(NotRecordedError, match="no free-form answers"):
        gpt4.generate("Who wrote Hamlet?")


def test_duplicate_mmlu_texts_share_one_outcome(gpt4):
    # college_physics/0001 and /0097 have the same text and options: one prompt, one outcome.
    frame = load_mmlu(subjects="college_physics")
    pair = to_questions(frame[frame["qid"].isin(["college_physics/0001", "college_physics/0097"])])
    assert format_prompt(pair[0]) == format_prompt(pair[1])
    assert gpt4.answer(pair[0].qid) == gpt4.answer(pair[1].qid)
    assert len(gpt4.score_options([format_prompt(pair[0])], [4])) == 1


def test_recorded_file_is_small():
    assert RECORDED_PATH.stat().st_size < 500_000


def test_live_cascade_uses_the_recording_as_last_stage(gpt4, recorded):
    from cascade_core import cascade

    q = to_questions(load_mmlu(subjects="virology").head(1))[0]
    trace = cascade.run_cascade([cascade.RuntimeStage(name="gpt-4", backend=gpt4)], q)
    (step,) = trace.steps
    correct, tokens = gpt4.answer(q.qid)
    assert step.decision == "final" and step.prompt_tokens == tokens
    assert step.answer == ("correct (recorded)" if correct else "wrong (recorded)")
    assert np.isnan(step.p_t)
