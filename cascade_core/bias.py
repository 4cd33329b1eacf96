"""Letter-bias calibration: undo a stage's favourite letter before it answers.

SmolLM2 answers "A" on 99% of MMLU questions, Qwen2.5-Coder-0.5B "B" on 91%: their option
probabilities carry a prior over letters that has nothing to do with the question. Contextual
calibration (Zhao et al. 2021, with the mean option distribution on calibration as the prior)
divides each question's option probabilities by that prior and renormalises; in logits it adds
-log(prior) to each letter. Fit on calibration, stored as plain floats with the policy, applied
identically by the live cascade (`cascade.RuntimeStage.bias`) and by replay (`rescore`), so the
answer itself can change; the records keep the raw probabilities.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from cascade_core.signals import mc_signals


@dataclass(frozen=True)
class LetterBias:
    """Per-letter logit offsets (-log of the calibration mean probability of A, B, C, ...)."""

    offsets: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.offsets) < 2 or not all(math.isfinite(float(o)) for o in self.offsets):
            raise ValueError(f"a letter bias needs >= 2 finite offsets, got {self.offsets}")
        object.__setattr__(self, "offsets", tuple(float(o) for o in self.offsets))

    def logits(self, letter_logits) -> np.ndarray:
        """Debiased letter logits, (K,) or (N, K); NaN / -inf (unscored letters) stay unscored."""
        raw = np.asarray(letter_logits, dtype=np.float64)
        k = raw.shape[-1]
        if k > len(self.offsets):
            raise ValueError(f"the bias covers {len(self.offsets)} options, the question has {k}")
        return raw + np.asarray(self.offsets[:k])

    def signals(self, letter_logits):
        """`signals.mc_signals` of the debiased logits: (answer, P(T), margin, entropy)."""
        return mc_signals(self.logits(letter_logits))

    def to_dict(self) -> dict:
        return {"kind": "letter_bias", "offsets": list(self.offsets)}

    @classmethod
    def from_dict(cls, data: dict) -> "LetterBias":
        if "offsets" not in data:
            raise ValueError("letter bias dict lacks key 'offsets'")
        return cls(offsets=tuple(float(o) for o in data["offsets"]))


def fit_letter_bias(option_probs) -> LetterBias:
    """The bias of a stage from its calibration option probabilities (N, K) (NaN = unscored)."""
    probs = np.asarray(option_probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] < 2 or probs.shape[0] == 0:
        raise ValueError(f"option_probs must have shape (N, K) with N >= 1 and K >= 2, got {probs.shape}")
    prior = np.nanmean(np.where(np.isfinite(probs), probs, np.nan), axis=0)
    if not np.all(np.isfinite(prior)) or np.any(prior <= 0):
        raise ValueError("every option letter needs some probability on calibration to fit a bias")
    prior = prior / prior.sum()
    return LetterBias(offsets=tuple(float(-np.log(p)) for p in prior))


def rescore(option_probs, answers, bias: LetterBias | None):
    """Replay side: (prediction, correct, P(T), margin, entropy) per question from the recorded
    raw option probabilities (N, K) and the gold answers (N,), with `bias` applied (None = raw)."""
    probs = np.asarray(option_probs, dtype=np.float64)
    with np.errstate(divide="ignore"):
        logits = np.log(probs)  # log-probabilities are logits of the same softmax
    prediction, p_t, margin, entropy = mc_signals(logits if bias is None else bias.logits(logits))
    return prediction, prediction == np.asarray(answers), p_t, margin, entropy


def with_letter_bias(table, stage: int, option_probs, answers, bias: LetterBias | None):
    """The record table with stage `stage` replayed under `bias`: its prediction, correctness,
    P(T), margin and entropy recomputed from the raw option probabilities (N, K) and the gold
    answers (N,), in the table's question order; P(IK) and costs unchanged (one forward pass)."""
    import dataclasses

    if table.recorded[stage]:
        raise ValueError(f"stage {table.names[stage]!r} is recorded: it has no option probabilities to debias")
    probs = np.asarray(option_probs, dtype=np.float64)
    if probs.shape[0] != table.n_questions:
        raise ValueError(f"option_probs has {probs.shape[0]} rows for {table.n_questions} questions")
    prediction, correct, p_t, margin, entropy = rescore(probs, answers, bias)
    arrays = {name: getattr(table, name).copy() for name in ("prediction", "correct", "p_t", "margin", "entropy")}
    for name, value in zip(arrays, (prediction, correct, p_t, margin, entropy)):
        arrays[name][stage] = value
    return dataclasses.replace(table, **arrays, _costs={})
