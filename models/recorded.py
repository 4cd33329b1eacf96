"""A stage whose answers are replayed from a recording: GPT-4 or Mixtral on MMLU (RouteLLM).

These models cannot run here, but RouteLLM recorded whether each got each MMLU test question
right (data/recorded/, see its README). A recorded stage lets the project measure the paper's
API scenario on real outcomes: the local stages keep what they are sure of, the rest goes to
GPT-4, and the recording says whether GPT-4 got it right.

What a recording cannot give: the recording knows right/wrong only, not the letter chosen nor
any probability. So:
- `recorded = True` marks the stage; the cascade and the presets allow it only as the LAST
  stage (it has no P(T) to route on) and never report a P(T) for it.
- `answer(qid) -> (correct, prompt_tokens)` is the honest interface; the cascade uses it.
- `score_options` exists so that generic code (the benchmark runner) can treat it as any
  Backend: it finds the question by its prompt text and returns SYNTHETIC logits: 0 for the
  right option and -inf elsewhere when the recording says correct, 0 for a fixed wrong option
  ((right + 1) mod K) otherwise. They reproduce right/wrong exactly; their P(T) of 1.0 is not a
  measurement and must not be shown as one (check `recorded`).
- Questions outside the recording (not MMLU, or an edited MMLU question) raise
  `NotRecordedError`, and `generate` always does: there is no free-form recording.

The backend is handed its data (the outcomes table and, for `score_options`, the prompts of the
recorded questions) by the composition layer (`cascade_core.compose.live.recorded_backend`),
so this module imports only the shared types. `RECORDED_MODELS` is the one table of recorded
models; the record loader reads it too.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import numpy as np
import pandas as pd

from cascade_core.types import Generation, OptionScores

# Mixtral-8x7B (hidden 4096, 32 layers, 8 experts of which 2 run per token, FFN 14336, 8 KV
# heads, vocabulary 32,000): 46.70 B parameters in all, 12.62 B of them non-embedding and active
# per token, which is what a token costs (FLOPs = 2 x active non-embedding params x tokens).
_MIXTRAL_LAYER_ATTENTION = 2 * 4096 * 4096 + 2 * 4096 * 1024
_MIXTRAL_EXPERT = 3 * 4096 * 14336
_MIXTRAL_LAYER_FIXED = _MIXTRAL_LAYER_ATTENTION + 4096 * 8 + 2 * 4096  # + router + two norms
MIXTRAL_ACTIVE_NON_EMBEDDING = 32 * (_MIXTRAL_LAYER_FIXED + 2 * _MIXTRAL_EXPERT) + 4096
MIXTRAL_TOTAL = 32 * (_MIXTRAL_LAYER_FIXED + 8 * _MIXTRAL_EXPERT) + 4096 + 2 * 32_000 * 4096

# model name -> (correctness column, token-count column, total params, non-embedding params).
# GPT-4's size was never published: its FLOPs are unknown and stay 0; compare it by dollars.
RECORDED_MODELS = {
    "gpt-4-1106-preview": ("gpt4_correct", "gpt4_prompt_tokens", 0, 0),
    "mixtral-8x7b-instruct": ("mixtral_correct", "mixtral_prompt_tokens", MIXTRAL_TOTAL, MIXTRAL_ACTIVE_NON_EMBEDDING),
}
ALIASES = {
    "gpt-4": "gpt-4-1106-preview", "gpt4": "gpt-4-1106-preview",
    "mixtral": "mixtral-8x7b-instruct", "mixtral-8x7b-instruct-v0.1": "mixtral-8x7b-instruct",
    "mistralai/mixtral-8x7b-instruct-v0.1": "mixtral-8x7b-instruct",
}


def canonical_name(model: str) -> str:
    """'gpt-4', 'mixtral', ... -> the recording's model name; ValueError for an unknown one."""
    name = ALIASES.get(str(model).strip().lower(), str(model).strip().lower())
    if name not in RECORDED_MODELS:
        raise ValueError(f"no recording for model {model!r}; recorded: {', '.join(RECORDED_MODELS)}")
    return name


# The recording's answer is one greedy token (the letter).
OUTPUT_TOKENS = 1

PromptSource = Callable[[], Iterable[tuple[str, str, int]]]  # -> (prompt, qid, right option index)


class NotRecordedError(LookupError):
    """The recording has no answer for this question."""

    def __str__(self) -> str:  # LookupError would quote the message like a dict key
        return str(self.args[0]) if self.args else ""


class RecordedBackend:
    """Replays one model's recorded MMLU outcomes; see the module docstring for what it fakes."""

    recorded = True
    has_hidden_states = False

    def __init__(self, model: str, outcomes: pd.DataFrame, prompts: PromptSource | None = None,
                 price_in: float = 0.0, price_out: float = 0.0):
        """`outcomes`: the recording (qid + each model's correctness and token columns);
        `prompts`: called once, on the first `score_options`, for (prompt, qid, right option)
        of the recorded questions."""
        name = canonical_name(model)
        if price_in < 0 or price_out < 0:
            raise ValueError("prices must be >= 0 (dollars per million tokens)")
        correct_column, tokens_column, total, non_embedding = RECORDED_MODELS[name]
        self.model_id = name
        self.price_in, self.price_out = float(price_in), float(price_out)
        self.total_params, self.non_embedding_params = total, non_embedding
        self._outcomes = {
            qid: (bool(correct), int(tokens))
            for qid, correct, tokens in zip(outcomes["qid"], outcomes[correct_column], outcomes[tokens_column])
        }
        self._prompts = prompts
        self._by_prompt: dict[str, list[tuple[str, int]]] | None = None

    def __repr__(self) -> str:
        return f"RecordedBackend({self.model_id!r}, {len(self._outcomes)} recorded questions)"

    def __contains__(self, qid: str) -> bool:
        return qid in self._outcomes

    def answer(self, qid: str) -> tuple[bool, int]:
        """(recorded correct?, prompt tokens of the project's prompt for this model)."""
        if not qid:
            raise NotRecordedError(
                f"the recorded stage {self.model_id!r} answers only MMLU questions it recorded, "
                "and this question has no MMLU id (qid)"
            )
        try:
            return self._outcomes[qid]
        except KeyError:
            raise NotRecordedError(f"the recorded stage {self.model_id!r} has no answer for question {qid!r}") from None

    def _prompt_index(self) -> dict[str, list[tuple[str, int]]]:
        """prompt text -> [(qid, right option)], built once from the MMLU questions recorded."""
        if self._by_prompt is None:
            if self._prompts is None:
                raise NotRecordedError(f"the recorded stage {self.model_id!r} was built without the recorded "
                                       "questions' prompts; use answer(qid)")
            index: dict[str, list[tuple[str, int]]] = {}
            for prompt, qid, right in self._prompts():
                if qid in self._outcomes:
                    index.setdefault(prompt, []).append((qid, int(right)))
            self._by_prompt = index
        return self._by_prompt

    def score_options(self, prompts: Sequence[str], n_options: Sequence[int],
                      layers: Sequence[int] | None = None) -> list[OptionScores]:
        """Synthetic logits that reproduce the recorded right/wrong (see the module docstring)."""
        prompts, n_options = list(prompts), [int(n) for n in n_options]
        if len(prompts) != len(n_options):
            raise ValueError(f"{len(prompts)} prompts but {len(n_options)} option counts")
        index = self._prompt_index()
        out = []
        for prompt, k in zip(prompts, n_options):
            matches = index.get(prompt)
            if not matches:
                raise NotRecordedError(
                    f"the recorded stage {self.model_id!r} has no answer for this prompt: only MMLU "
                    "questions, unchanged and in the project's prompt format, are recorded"
                )
            outcomes = {(self._outcomes[qid], right) for qid, right in matches}
            if len(outcomes) > 1:
                raise NotRecordedError(
                    f"{len(matches)} recorded questions share this prompt with different outcomes "
                    f"({', '.join(q for q, _ in matches)}); use answer(qid)"
                )
            (((correct, tokens), right),) = outcomes
            if k != 4:
                raise ValueError(f"recorded MMLU questions have 4 options, got n_options={k}")
            logits = np.full(k, -np.inf)
            logits[right if correct else (right + 1) % k] = 0.0
            out.append(OptionScores(letter_logits=logits, hidden_states=None, prompt_tokens=tokens))
        return out

    def generate(self, prompt: str, max_new_tokens: int = 64, *, cancel=None, on_text=None, layers=None,
                 gate=None) -> Generation:
        """Refused: a recording holds multiple-choice outcomes only (the keywords of `types.Backend`
        are accepted so that the refusal, not a TypeError, is what the cascade sees)."""
        raise NotRecordedError(f"the recorded stage {self.model_id!r} has no free-form answers: "
                               "it replays MMLU outcomes only")
