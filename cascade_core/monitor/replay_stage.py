"""A stage that answers free-form questions from a benchmarked model's records.

The drift test and its benchmark feed hundreds of questions through the monitor, many times over
(seeded runs); running SmolLM2 and the 1.5B model live for that takes hours on this machine. The
records (`data/results/<dataset>/<model>.parquet`) hold each model's real answer and P(T) to
each question, so a stage that looks the question up and answers with them gives the cascade,
the audit and the monitor exactly the outcomes the live model gave (P(T) is returned as one
token whose probability is the recorded geometric mean, so `signals.freeform_signals` reads it
back unchanged). A question the records do not hold is refused (ValueError), never made up.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from cascade_core.types import Generation


class RecordedAnswers:
    """A `types.Backend` replaying one model's free-form records (module docstring)."""

    has_hidden_states = False

    def __init__(self, records: Path | str, questions: dict[str, str]):
        """`records`: a free-form records parquet; `questions`: qid -> question text."""
        import pandas as pd

        frame = pd.read_parquet(records, columns=["qid", "model_id", "answer_text", "p_t", "prompt_tokens",
                                                  "output_tokens", "flops"])
        self.model_id = str(frame["model_id"].iloc[0])
        tokens = (frame["prompt_tokens"] + frame["output_tokens"]).to_numpy(dtype=np.float64)
        per_token = frame["flops"].to_numpy(dtype=np.float64) / np.maximum(tokens, 1) / 2.0
        self.non_embedding_params = int(np.median(per_token))
        self.total_params = self.non_embedding_params
        self._by_text = {}
        for row in frame.itertuples(index=False):
            text = questions.get(str(row.qid))
            if text is not None:
                self._by_text[" ".join(text.split())] = row

    def _row(self, prompt: str):
        body = prompt.rsplit("\nAnswer:", 1)[0].split("\n\n")[-1]
        row = self._by_text.get(" ".join(body.split()))
        if row is None:
            raise ValueError(f"{self.model_id}: no recorded answer to this question")
        return row

    def score_options(self, prompts, n_options, layers=None):
        raise ValueError(f"{self.model_id}: recorded free-form answers only")

    def generate(self, prompt: str, max_new_tokens: int = 64, **_ignored) -> Generation:
        row = self._row(prompt)
        p_t = min(max(float(row.p_t), 1e-12), 1.0)
        return Generation(text=str(row.answer_text), token_logprobs=np.array([math.log(p_t)]),
                          prompt_tokens=int(row.prompt_tokens), output_tokens=int(row.output_tokens),
                          tokens=(str(row.answer_text),))


def arith_questions(path: Path | str = "data/arith/arith.jsonl") -> dict[str, dict]:
    """qid -> {"question", "subject", "answer"} of the shipped arith set."""
    import json

    out = {}
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                item = json.loads(line)
                out[str(item["id"])] = item
    return out
