"""P(T) and its companions, computed from what one forward pass gives: option-letter logits.

The live cascade and the benchmark runner both call `mc_signals`, so a record's P(T) and the
P(T) a live run routes on are the same number. Everything works on one question, shape (K,), or
a batch, shape (N, K).

Unscored letters: an API that returns only its top-k tokens cannot score every option letter;
the backend marks those with -inf and they get probability 0. NaN is treated the same way (a
letter with no usable score), so a row is only an error when no letter at all has a score.
"""

from __future__ import annotations

import numpy as np


def _as_logits(letter_logits) -> np.ndarray:
    logits = np.array(letter_logits, dtype=np.float64)  # a copy: we write NaN -> -inf below
    if logits.ndim not in (1, 2):
        raise ValueError(
            f"letter_logits must have shape (K,) or (N, K), got shape {logits.shape}"
        )
    if logits.shape[-1] < 2:
        raise ValueError(
            f"a multiple-choice question needs at least 2 option logits, got K={logits.shape[-1]}"
        )
    logits[np.isnan(logits)] = -np.inf
    return logits


def option_probabilities(letter_logits) -> np.ndarray:
    """Softmax over the option letters: shape (K,) -> (K,), (N, K) -> (N, K); rows sum to 1.

    -inf (or NaN) entries get probability 0. A row whose entries are all -inf/NaN has no
    answer at all and raises ValueError naming the row. A +inf entry (an fp16 overflow) takes all
    the mass, shared equally with any other +inf entries: the limit of the softmax.
    """
    logits = _as_logits(letter_logits)
    rows = np.atleast_2d(logits)
    scored = np.isfinite(rows) | (rows == np.inf)
    empty = ~scored.any(axis=1)
    if empty.any():
        bad = np.flatnonzero(empty)
        where = "" if logits.ndim == 1 else f" (rows {bad[:10].tolist()})"
        raise ValueError(f"no option letter has a score: every logit is -inf or NaN{where}")
    top = rows.max(axis=1, keepdims=True)
    with np.errstate(invalid="ignore"):
        shifted = rows - np.where(np.isinf(top), 0.0, top)
    weights = np.exp(shifted)
    overflow = np.isposinf(rows)
    has_overflow = overflow.any(axis=1)
    if has_overflow.any():
        weights[has_overflow] = overflow[has_overflow].astype(np.float64)
    probs = weights / weights.sum(axis=1, keepdims=True)
    return probs[0] if logits.ndim == 1 else probs


def entropy_nats(probs: np.ndarray) -> np.ndarray:
    """Shannon entropy over the last axis in nats, with 0 * log 0 = 0."""
    p = np.asarray(probs, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, -p * np.log(p), 0.0)
    return terms.sum(axis=-1)


def mc_signals(letter_logits, normalize_entropy: bool = False):
    """(answer_index, p_t, margin, entropy) of one question (K,) or a batch (N, K).

    - answer_index: the option with the highest probability (the first one on a tie).
    - p_t: P(T), that option's probability, in [1/K, 1].
    - margin: top-1 minus top-2 probability, in [0, 1].
    - entropy: in nats, in [0, log K]; with `normalize_entropy=True` divided by log K (K = all
      options of the question, scored or not), in [0, 1]. The records and the policy use nats.

    A (K,) input gives Python scalars (int, float, float, float); an (N, K) input gives arrays
    (int64, float64, float64, float64) of length N.
    """
    probs = option_probabilities(letter_logits)
    rows = np.atleast_2d(probs)
    k = rows.shape[1]
    answer = rows.argmax(axis=1)
    top_two = -np.partition(-rows, 1, axis=1)[:, :2]
    p_t = top_two[:, 0]
    margin = top_two[:, 0] - top_two[:, 1]
    entropy = entropy_nats(rows)
    if normalize_entropy:
        entropy = entropy / np.log(k)
    entropy = np.clip(entropy, 0.0, 1.0 if normalize_entropy else np.log(k))
    if probs.ndim == 1:
        return int(answer[0]), float(p_t[0]), float(margin[0]), float(entropy[0])
    return answer.astype(np.int64), p_t, margin, entropy


def freeform_signals(token_logprobs) -> tuple[float, float]:
    """(geometric-mean token probability, minimum token probability) of a generated answer.

    The geometric mean, exp(mean log p), is the free-form P(T): it does not shrink with the
    answer's length the way the product of the probabilities does. The minimum flags a single
    token the model was unsure of. Log-probabilities are natural logs, one per generated token.
    """
    logprobs = np.asarray(token_logprobs, dtype=np.float64)
    if logprobs.ndim != 1:
        raise ValueError(f"token_logprobs must be 1-D (one per generated token), got shape {logprobs.shape}")
    if logprobs.size == 0:
        raise ValueError("token_logprobs is empty: the model generated no tokens to score")
    if np.isnan(logprobs).any():
        raise ValueError(f"token_logprobs contains NaN at positions {np.flatnonzero(np.isnan(logprobs))[:10].tolist()}")
    if (logprobs > 1e-6).any():
        raise ValueError(
            f"token_logprobs must be log-probabilities (<= 0), got a maximum of {logprobs.max():.4g}"
        )
    logprobs = np.minimum(logprobs, 0.0)
    return float(np.exp(logprobs.mean())), float(np.exp(logprobs.min()))
