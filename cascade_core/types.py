"""The shapes that pass between models, the cascade and the dashboard.

Backends in `models/` produce these; everything in `cascade_core` consumes them. Keeping the
contract here lets `cascade_core` run, test and replay without importing any model code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol, Sequence, runtime_checkable

import numpy as np

OPTION_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
MAX_OPTIONS = len(OPTION_LETTERS)

# What a stage did with a question: kept its answer, passed it on, answered as the last stage,
# or failed (the cascade then escalates past it unless the stage says on_error = "fail").
Decision = Literal["keep", "escalate", "final", "error"]


@dataclass(frozen=True)
class OptionScores:
    """What one forward pass of one stage gives for one multiple-choice question.

    `letter_logits[i]` is the logit (or log-probability; softmax is shift-invariant) of the token
    for option letter i at the answer position; -inf marks a letter the backend could not score
    (an API that returned only its top-k tokens). `hidden_states` maps a layer index (0 = the
    embeddings, as transformers counts) to the hidden state at that same position, or is None for
    a backend that has none.
    """

    letter_logits: np.ndarray
    hidden_states: dict[int, np.ndarray] | None
    prompt_tokens: int
    output_tokens: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class Generation:
    """A free-form answer and the probability of each generated token."""

    text: str
    token_logprobs: np.ndarray
    prompt_tokens: int
    output_tokens: int
    seconds: float = 0.0
    tokens: tuple[str, ...] = ()  # the text of each generated token, where the backend gives it
    finish_reason: str = "stop"  # "stop" (end of turn), "length" (max_new_tokens) or "cancelled"
    hidden_states: dict[int, np.ndarray] | None = None  # at the prompt's last token, when asked for
    first_token_seconds: float = float("nan")  # the prompt's pass (and its first token)


@runtime_checkable
class Backend(Protocol):
    """Any model a stage can run on: a local HF model, an OpenAI-compatible endpoint, a recording.

    `score_options` does one forward pass per prompt (batched where the backend can) and returns
    the option-letter logits and, when `has_hidden_states`, the hidden states of `layers` (all
    layers when None). Both signals, P(T) and P(IK), come from that one pass.

    `generate` takes every keyword below; a backend that cannot honour one accepts and ignores it
    (the cascade then gets no stream, no early stop or no hidden states, never an error):
    - `cancel`: anything with `is_set()`, checked as the answer grows; once set, generation stops
      and the answer so far comes back with finish_reason "cancelled".
    - `on_text(delta)`: receives the answer's text as it grows.
    - `layers`: the hidden states to return in `Generation.hidden_states` (at the prompt's last
      token), from the same pass as the answer.
    - `gate(hidden) -> bool`: with `layers`, called on those hidden states before the first new
      token; False ends the call without an answer (finish_reason "gated").
    """

    model_id: str
    has_hidden_states: bool
    total_params: int
    non_embedding_params: int

    def score_options(
        self,
        prompts: Sequence[str],
        n_options: Sequence[int],
        layers: Sequence[int] | None = None,
    ) -> list[OptionScores]: ...

    def generate(self, prompt: str, max_new_tokens: int = 64, *, cancel=None, on_text=None,
                 layers: Sequence[int] | None = None, gate=None) -> Generation: ...


@dataclass(frozen=True)
class Question:
    """One question as the cascade sees it: text, options (empty for free-form), subject."""

    text: str
    options: tuple[str, ...] = ()
    subject: str = ""
    answer: int | None = None  # index of the right option when known (benchmarks)
    qid: str = ""

    @property
    def is_multiple_choice(self) -> bool:
        return len(self.options) > 0


@dataclass
class StageStep:
    """One row of a trace: what happened at one stage for one question."""

    stage: str
    model_id: str
    answer: str | None = None  # option letter, or generated text for free-form
    answer_index: int | None = None
    p_t: float = float("nan")
    p_ik: float = float("nan")  # NaN when the stage has no probe or no hidden states
    margin: float = float("nan")
    entropy: float = float("nan")
    decision: Decision = "escalate"
    reason: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    flops: float = 0.0
    dollars: float = 0.0
    seconds: float = 0.0
    error: str | None = None
    option_probs: list[float] = field(default_factory=list)
    token_logprobs: list[list] = field(default_factory=list)  # free-form: [token, log-probability] each
    # Free-form, the live P(IK) gate (`cascade._score_free_form`): the answer was not generated
    # because P(IK) < tau_ik; saved_tokens / saved_seconds: the stage's mean answer length and
    # decoding time measured so far (NaN before its first answer): what the skip saved, on average.
    generation_skipped: bool = False
    saved_tokens: float = 0.0
    saved_seconds: float = 0.0


@dataclass
class Trace:
    """The stages one question visited, in order, and what the cascade finally answered."""

    question: Question
    steps: list[StageStep]
    thresholds: str = ""  # where the policy came from, e.g. "thresholds: calibrated for <= 1 pt at delta 0.1 ..."
    off: dict[str, str] = field(default_factory=dict)  # stages switched off -> why

    @property
    def answered_by(self) -> StageStep | None:
        for step in reversed(self.steps):
            if step.decision in ("keep", "final"):
                return step
        return None

    @property
    def answer(self) -> str | None:
        step = self.answered_by
        return None if step is None else step.answer

    def answer_text(self, step: StageStep | None = None) -> str:
        """A stage's answer as a person reads it: the letter and its option ("C. Paris") for
        multiple choice, the generated text otherwise; the final answer when no step is named."""
        step = self.answered_by if step is None else step
        if step is None:
            return ""
        if step.answer_index is not None and self.question.options:
            return f"{step.answer}. {self.question.options[step.answer_index]}"
        return step.answer or ""

    def total(self, unit: str) -> float:
        """Sum of one cost unit ("flops", "dollars", "seconds", "prompt_tokens", ...) over stages."""
        return float(sum(getattr(s, unit) for s in self.steps))
