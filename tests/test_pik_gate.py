"""The live P(IK) gate: a free-form stage whose P(IK) is below tau_ik skips generating its answer.

SmolLM2-135M, a real probe (fitted on seeded random features: what it scores does not matter
here, only that it gives a fixed P(IK) for a question), and thresholds placed just above and just
below that P(IK): one run skips the answer, the other generates it, token for token the same as
one-phase greedy generation.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from cascade_core.cascade import RuntimeStage, pik_gate, run_cascade, trace_to_dict
from cascade_core.policy import StagePolicy
from cascade_core.probe import PIKProbe
from cascade_core.prompts import format_prompt
from cascade_core.types import Question

pytestmark = pytest.mark.model

QUESTION = Question(text="What is the capital of France? Answer with a short phrase or a number only.")
LAYER = 6


@pytest.fixture(scope="module")
def probe(smollm2_backend):
    rng = np.random.default_rng(0)
    d = smollm2_backend.model.config.hidden_size
    return PIKProbe(layer=LAYER, model_id=smollm2_backend.model_id).fit(rng.normal(size=(60, d)), rng.random(60) < 0.5)


def _p_ik(backend, probe) -> float:
    g = backend.generate(format_prompt(QUESTION), max_new_tokens=1, layers=[LAYER])
    return float(probe.p_ik(g.hidden_states[LAYER][None, :])[0])


def test_two_phase_generation_equals_one_phase_and_a_closed_gate_generates_nothing(smollm2_backend):
    b = smollm2_backend
    prompt = format_prompt(QUESTION)
    one = b.generate(prompt, max_new_tokens=12, layers=[LAYER])
    seen: list[dict] = []
    streamed: list[str] = []
    two = b.generate(prompt, max_new_tokens=12, layers=[LAYER], gate=lambda h: seen.append(h) or True,
                     on_text=streamed.append)
    assert two.text == one.text and two.tokens == one.tokens and two.output_tokens == one.output_tokens >= 2
    np.testing.assert_array_equal(two.token_logprobs, one.token_logprobs)  # greedy: the same computation
    np.testing.assert_array_equal(two.hidden_states[LAYER], one.hidden_states[LAYER])
    np.testing.assert_array_equal(seen[0][LAYER], one.hidden_states[LAYER])  # the gate saw the prompt's state
    assert "".join(streamed) == one.text and two.finish_reason == one.finish_reason
    shut = b.generate(prompt, max_new_tokens=12, layers=[LAYER], gate=lambda h: False)
    assert shut.finish_reason == "gated" and shut.text == "" and shut.output_tokens == 0
    assert shut.prompt_tokens == one.prompt_tokens and len(shut.token_logprobs) == 0
    np.testing.assert_array_equal(shut.hidden_states[LAYER], one.hidden_states[LAYER])
    assert b.decoding_estimate() is not None
    with pytest.raises(ValueError, match="layers"):
        b.generate(prompt, max_new_tokens=4, gate=lambda h: True)


def test_a_stage_below_its_gate_skips_generation_and_one_above_answers_as_before(smollm2_backend, probe):
    b = smollm2_backend
    p = _p_ik(b, probe)
    plain = b.generate(format_prompt(QUESTION), max_new_tokens=8)
    b.generate(format_prompt(QUESTION), max_new_tokens=8)  # a measured answer: the saving has an estimate
    tokens, seconds = b.decoding_estimate()

    def stages(tau_ik):
        first = RuntimeStage(name="small", backend=b, free_form_probe=probe,
                             policy=StagePolicy(tau_t=0.0, tau_ik=tau_ik, rule="both"))
        return [first, RuntimeStage(name="last", backend=b, policy=StagePolicy())]

    skipped = run_cascade(stages(min(p + 0.01, 1.0)), QUESTION, max_new_tokens=8)
    step = skipped.steps[0]
    assert step.generation_skipped and step.decision == "escalate" and step.output_tokens == 0
    assert step.reason.startswith(f"skipped generation: P(IK) {p:.3f} < tau_ik {min(p + 0.01, 1.0):.3f}")
    assert step.answer == "" and math.isnan(step.p_t) and step.p_ik == pytest.approx(p, abs=1e-5)
    assert step.saved_tokens > 0 and step.saved_seconds > 0 and step.prompt_tokens > 0
    assert step.flops < skipped.steps[1].flops  # the prompt's pass only
    assert skipped.answered_by.stage == "last" and skipped.answer == plain.text
    summary = trace_to_dict(skipped)["generation_skipped"]
    assert summary["stages"] == ["small"] and summary["saved_tokens"] == pytest.approx(step.saved_tokens)
    kept = run_cascade(stages(max(p - 0.01, 0.0)), QUESTION, max_new_tokens=8)
    step = kept.steps[0]
    assert not step.generation_skipped and step.decision == "keep" and step.answer == plain.text
    assert [t for t, _ in step.token_logprobs] == list(plain.tokens)
    assert tokens > 0 and seconds > 0


def test_only_a_p_ik_rule_before_the_last_stage_with_a_free_form_probe_gates(smollm2_backend, probe):
    b = smollm2_backend
    gated = RuntimeStage(name="s", backend=b, free_form_probe=probe, policy=StagePolicy(tau_ik=0.4, rule="both"))
    assert pik_gate(gated, is_last=False) == 0.4 and pik_gate(gated, is_last=True) is None
    assert pik_gate(RuntimeStage(name="s", backend=b, free_form_probe=probe,
                                 policy=StagePolicy(tau_ik=0.4, rule="pik_only")), is_last=False) == 0.4
    assert pik_gate(RuntimeStage(name="s", backend=b, free_form_probe=probe,
                                 policy=StagePolicy(tau_ik=0.4, rule="pt_only")), is_last=False) is None
    assert pik_gate(RuntimeStage(name="s", backend=b, policy=StagePolicy(tau_ik=0.4, rule="both")),
                    is_last=False) is None  # no free-form probe: no P(IK) before the answer


def test_every_stage_streams_its_answer_when_asked_and_only_the_last_by_default(smollm2_backend):
    """The Route page shows each stage's answer growing (`stream_every_stage`); a server streams only
    the last stage's, the one it cannot take back. A stage 1 that escalates (tau_t 1.0) still streamed."""
    b = smollm2_backend
    stages = [RuntimeStage(name="small", backend=b, policy=StagePolicy(tau_t=1.0, tau_ik=0.0, rule="pt_only")),
              RuntimeStage(name="last", backend=b, policy=StagePolicy())]
    both: list[str] = []
    trace = run_cascade(stages, QUESTION, max_new_tokens=6, on_text=both.append, stream_every_stage=True)
    assert [s.decision for s in trace.steps][0] == "escalate"
    assert "".join(both) == trace.steps[0].answer + trace.steps[1].answer
    last_only: list[str] = []
    trace = run_cascade(stages, QUESTION, max_new_tokens=6, on_text=last_only.append)
    assert "".join(last_only) == trace.steps[1].answer
