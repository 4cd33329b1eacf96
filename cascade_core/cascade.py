"""The live cascade: run the stages in order on one question and stop at the first keep.

It shares its decision rule (`policy.keep_mask`) and its signals (`signals.mc_signals`) with the
offline replay, so a policy gives the same answers live and replayed on the same records.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Sequence

import numpy as np

from cascade_core.cost import dollars as dollar_cost
from cascade_core.cost import flops as flop_cost
from cascade_core.policy import StagePolicy, explain, keep_mask
from cascade_core.prompts import format_prompt
from cascade_core.signals import freeform_signals, mc_signals, option_probabilities
from cascade_core.types import OPTION_LETTERS, Backend, Question, StageStep, Trace

StageEvent = Callable[[str, "RuntimeStage", StageStep | None], None]


class CascadeError(RuntimeError):
    """The cascade could not answer: the failing stage's policy says fail, or the last stage failed.

    `trace` holds the stages visited up to the failure; `str(err)` is the message.
    """

    def __init__(self, message: str, trace: Trace | None = None):
        super().__init__(message)
        self.message = message
        self.trace = trace

    def __str__(self) -> str:
        return self.message


class CascadeCancelled(CascadeError):
    """The request was cancelled (client gone, deadline passed); the trace holds what ran."""


@dataclass
class RuntimeStage:
    """A stage ready to run: its backend, its routing policy and (optionally) its P(IK) probe."""

    name: str
    backend: Backend
    policy: StagePolicy = field(default_factory=StagePolicy)
    probe: object | None = None  # cascade_core.probe.PIKProbe; duck-typed: .layer, .p_ik(X)
    price_in: float = 0.0
    price_out: float = 0.0
    on_error: str = "escalate"  # "escalate" | "fail"
    label: str = ""
    bias: object | None = None  # cascade_core.bias.LetterBias: debiases the letters before answering
    policy_source: str = ""  # shown with every trace: which thresholds these are (compose.policies)
    off_reason: str = ""  # why the stage is switched off, when it is
    # Free-form questions are another distribution: a policy calibrated on free-form records (the
    # shipped `arith` one) replaces `policy` for them when set (`for_free_form`).
    free_form_policy: StagePolicy | None = None
    free_form_policy_source: str = ""
    free_form_off_reason: str = ""
    # P(IK) of a free-form question: a probe trained on free-form records (the prompt's last hidden
    # state, `freeform_bench`), read from the same pass that gives the first answer token.
    free_form_probe: object | None = None

    @property
    def recorded(self) -> bool:
        return bool(getattr(self.backend, "recorded", False))


def for_free_form(stage: RuntimeStage) -> RuntimeStage:
    """The stage as it runs a free-form question: with its free-form policy when it has one."""
    if stage.free_form_policy is None:
        return stage
    return replace(stage, policy=stage.free_form_policy, policy_source=stage.free_form_policy_source,
                   off_reason=stage.free_form_off_reason)


def _probe_layers(stage: RuntimeStage) -> list[int]:
    if stage.probe is None or not stage.backend.has_hidden_states:
        return []
    return [int(stage.probe.layer)]


def _score_multiple_choice(stage: RuntimeStage, question: Question, step: StageStep) -> None:
    """One forward pass -> answer, P(T), margin, entropy and, with a probe, P(IK)."""
    if stage.recorded:
        correct, prompt_tokens = stage.backend.answer(question.qid)
        step.answer = "correct (recorded)" if correct else "wrong (recorded)"
        step.prompt_tokens = int(prompt_tokens)
        return
    prompt = format_prompt(question)
    (scores,) = stage.backend.score_options([prompt], [len(question.options)], _probe_layers(stage))
    logits = np.asarray(scores.letter_logits, dtype=np.float64)
    index, p_t, margin, entropy = mc_signals(logits) if stage.bias is None else stage.bias.signals(logits)
    step.option_probs = [float(p) for p in option_probabilities(scores.letter_logits)]  # raw, as recorded
    step.answer_index = int(index)
    step.answer = OPTION_LETTERS[int(index)]
    step.p_t, step.margin, step.entropy = float(p_t), float(margin), float(entropy)
    step.prompt_tokens, step.output_tokens = scores.prompt_tokens, scores.output_tokens
    if stage.probe is not None and scores.hidden_states:
        features = np.asarray(scores.hidden_states[int(stage.probe.layer)], dtype=np.float32)
        step.p_ik = float(stage.probe.p_ik(features[None, :])[0])


class EmptyAnswer(ValueError):
    """A free-form answer with no text (empty, whitespace, or only the end-of-turn token)."""


class _StageCancelled(Exception):
    """The stage's generation stopped because the request was cancelled."""


def _generate(backend: Backend, prompt: str, max_new_tokens: int, cancel, on_text, layers=None, gate=None):
    """`backend.generate` with the keywords the `Backend` protocol states: the cancel flag, the
    text callback, the layers whose hidden states it should return and the generation gate (only
    with layers: it reads their hidden states)."""
    return backend.generate(prompt, max_new_tokens=max_new_tokens, cancel=cancel, on_text=on_text,
                            layers=layers or None, gate=gate if layers else None)


GATED_RULES = ("both", "pik_only")  # rules under which P(IK) < tau_ik escalates whatever P(T) is


def pik_gate(stage: RuntimeStage, is_last: bool) -> float | None:
    """The stage's P(IK) gate, tau_ik, when a free-form answer below it need not be generated: a
    stage that is not the last, reads P(IK) from a free-form probe, and whose rule escalates on
    P(IK) < tau_ik whatever the answer's P(T) (`both`, `pik_only`); else None."""
    if is_last or stage.free_form_probe is None or not stage.backend.has_hidden_states:
        return None
    if stage.policy.rule not in GATED_RULES or not math.isfinite(stage.policy.tau_ik):
        return None
    return float(stage.policy.tau_ik)


def _skip_generation(stage: RuntimeStage, step: StageStep, tau_ik: float, max_new_tokens: int) -> None:
    """Fill a step whose answer the gate skipped: escalate, say why, and what it saved on average."""
    step.generation_skipped = True
    step.answer, step.output_tokens, step.p_t = "", 0, float("nan")
    estimate = getattr(stage.backend, "decoding_estimate", None)
    measured = estimate() if callable(estimate) else None
    if measured is None:
        step.saved_tokens, step.saved_seconds = float("nan"), float("nan")
        saved = f"up to {max_new_tokens} tokens not generated (no answer of this stage measured yet)"
    else:
        step.saved_tokens, step.saved_seconds = float(measured[0]), float(measured[1])
        saved = (f"saved about {measured[0]:.1f} tokens and {measured[1]:.2f} s (this stage's mean answer so far; "
                 f"at most {max_new_tokens} tokens)")
    step.decision = "escalate"
    step.reason = f"skipped generation: P(IK) {step.p_ik:.3f} < tau_ik {tau_ik:.3f}; {saved}"


def _score_free_form(stage: RuntimeStage, question: Question, step: StageStep, max_new_tokens: int,
                     cancel=None, on_text=None, is_last: bool = False) -> None:
    """Free-form answers: P(T) from the token probabilities (geometric mean) and, with a free-form
    probe, P(IK) from the prompt's last hidden state (the same pass as the first token).

    With a P(IK) gate (`pik_gate`) the backend runs in two phases: the prompt's pass gives P(IK),
    and the answer is generated (from that pass's cache) only when P(IK) >= tau_ik; below it the
    step escalates with "skipped generation" (`_skip_generation`). A backend that cannot gate
    generates as before. An answer with no visible text gets P(T) = 0: it is never kept (`run_cascade`)."""
    probe = stage.free_form_probe if stage.backend.has_hidden_states else None
    layers = [int(probe.layer)] if probe is not None else None
    tau_ik = pik_gate(stage, is_last)
    gate = None
    if tau_ik is not None:
        def gate(hidden: dict) -> bool:
            features = np.asarray(hidden[int(probe.layer)], dtype=np.float32)
            step.p_ik = float(probe.p_ik(features[None, :])[0])
            return step.p_ik >= tau_ik

    generation = _generate(stage.backend, format_prompt(question), max_new_tokens, cancel, on_text, layers, gate)
    if getattr(generation, "finish_reason", "") == "gated":
        step.prompt_tokens = generation.prompt_tokens
        _skip_generation(stage, step, tau_ik, max_new_tokens)
        return
    hidden = getattr(generation, "hidden_states", None)
    if probe is not None and hidden:
        features = np.asarray(hidden[int(probe.layer)], dtype=np.float32)
        step.p_ik = float(probe.p_ik(features[None, :])[0])
    step.answer = generation.text
    step.prompt_tokens, step.output_tokens = generation.prompt_tokens, generation.output_tokens
    step.token_logprobs = [[str(t), float(lp)] for t, lp in zip(generation.tokens, generation.token_logprobs)]
    if getattr(generation, "finish_reason", "") == "cancelled":
        raise _StageCancelled()
    if not (generation.text or "").strip():
        step.p_t = 0.0
        return
    step.p_t, _minimum = freeform_signals(generation.token_logprobs)
    step.p_t = float(step.p_t)


def _cost(stage: RuntimeStage, step: StageStep) -> None:
    tokens = step.prompt_tokens + step.output_tokens
    step.flops = float(flop_cost(stage.backend.non_embedding_params, tokens))
    step.dollars = float(dollar_cost(step.prompt_tokens, step.output_tokens, stage.price_in, stage.price_out))


def _decide(stage: RuntimeStage, step: StageStep, is_last: bool, subject: str | None = None) -> None:
    """Keep or escalate by `policy.keep_mask` on this question's signals and subject (a fitted
    keep score may read the subject prior; the replay passes the records' subjects the same way)."""
    if is_last:
        step.decision, step.reason = "final", "last stage: always answers"
        return
    args = [np.array([v]) for v in (step.p_t, step.p_ik, step.margin, step.entropy)]
    keep = bool(keep_mask(stage.policy, *args, subject=subject)[0])
    step.decision = "keep" if keep else "escalate"
    step.reason = explain(stage.policy, *args, subject=subject)


def run_cascade(
    stages: Sequence[RuntimeStage],
    question: Question,
    on_event: StageEvent | None = None,
    max_new_tokens: int = 64,
    *,
    cancel=None,
    on_text: Callable[[str], None] | None = None,
    stream_every_stage: bool = False,
) -> Trace:
    """Run `question` through `stages` in order; the trace lists every stage visited.

    A failing stage becomes an error row; the cascade escalates past it unless the stage says
    `on_error = "fail"` or it is the last stage, in which case `CascadeError` carries the trace.
    An empty free-form answer is never kept: an earlier stage escalates ("empty answer"), the
    last stage fails. `cancel` (anything with `is_set()`) is checked before every stage and,
    by backends that take it, at every decoding step: once set, `CascadeCancelled` is raised.
    `on_text(delta)` streams the last stage's free-form answer as it is generated (a server cannot
    take back text an earlier stage might not keep); `stream_every_stage` streams each stage's (the
    app's Route page shows every stage's answer growing in its own card, and the "done" event ends it).
    """
    if not question.is_multiple_choice:
        stages = [for_free_form(s) for s in stages]
    enabled = [i for i, s in enumerate(stages) if s.policy.enabled]
    if not enabled:
        raise ValueError("every stage is switched off: enable at least one")
    last = enabled[-1]
    for i in enabled[:-1]:
        if stages[i].recorded:
            raise ValueError(f"stage {stages[i].name!r} is recorded: it can only be the last stage")
    if not question.is_multiple_choice and stages[last].recorded:
        raise ValueError("a recorded stage answers only the multiple-choice questions it recorded")
    trace = Trace(question=question, steps=[], thresholds=stages[enabled[0]].policy_source,
                  off={s.name: s.off_reason or "switched off" for s in stages if not s.policy.enabled})
    for i in enabled:
        stage = stages[i]
        if cancel is not None and cancel.is_set():
            raise CascadeCancelled("the request was cancelled", trace)
        step = StageStep(stage=stage.name, model_id=stage.backend.model_id)
        if on_event:
            on_event("start", stage, None)
        started = time.perf_counter()
        try:
            if question.is_multiple_choice:
                _score_multiple_choice(stage, question, step)
            else:
                _score_free_form(stage, question, step, max_new_tokens, cancel,
                                 on_text if i == last or stream_every_stage else None,
                                 is_last=i == last)
            _cost(stage, step)
            step.seconds = time.perf_counter() - started
            if step.generation_skipped:
                pass  # escalates; the reason says why and what it saved (`_skip_generation`)
            elif not question.is_multiple_choice and not (step.answer or "").strip():
                if i == last:
                    raise EmptyAnswer("empty answer (only whitespace or the end-of-turn token)")
                step.decision, step.reason = "escalate", "empty answer"
            else:
                _decide(stage, step, is_last=i == last, subject=question.subject or None)
        except _StageCancelled:
            _cost(stage, step)
            step.seconds = time.perf_counter() - started
            step.decision, step.reason, step.error = "error", "cancelled", "the request was cancelled"
            trace.steps.append(step)
            raise CascadeCancelled("the request was cancelled", trace) from None
        except Exception as err:  # a stage failure is data for the trace
            step.seconds = time.perf_counter() - started
            step.decision, step.error = "error", f"{type(err).__name__}: {err}"
            step.reason = "empty answer" if isinstance(err, EmptyAnswer) else "stage failed"
            trace.steps.append(step)
            if on_event:
                on_event("error", stage, step)
            if i == last or stage.on_error == "fail":
                raise CascadeError(f"stage {stage.name!r} failed: {step.error}", trace) from err
            continue
        trace.steps.append(step)
        if on_event:
            on_event("done", stage, step)
        if step.decision in ("keep", "final"):
            break
    return trace


def nan_to_none(value):
    """JSON has no NaN: missing signals become null."""
    return None if isinstance(value, float) and math.isnan(value) else value


def trace_to_dict(trace: Trace) -> dict:
    """A JSON-safe view of a trace (NaN -> null), for the CLI, the server and the app."""
    final = trace.answered_by
    return {
        "question": {"text": trace.question.text, "options": list(trace.question.options),
                     "subject": trace.question.subject, "qid": trace.question.qid},
        "steps": [{k: nan_to_none(v) for k, v in asdict(step).items()} for step in trace.steps],
        "answer": trace.answer,
        "answered_by": None if final is None else final.stage,
        "thresholds": trace.thresholds,
        "off": [{"stage": name, "reason": why} for name, why in trace.off.items()],
        "total": {unit: trace.total(unit)
                  for unit in ("flops", "prompt_tokens", "output_tokens", "dollars", "seconds")},
        "generation_skipped": {"stages": [s.stage for s in trace.steps if s.generation_skipped],
                               "saved_tokens": nan_to_none(float(np.nansum([s.saved_tokens for s in trace.steps
                                                                            if s.generation_skipped]))),
                               "saved_seconds": nan_to_none(float(np.nansum([s.saved_seconds for s in trace.steps
                                                                             if s.generation_skipped])))},
    }
