"""Free-form benchmark runner: every question answered in the model's own words, graded, with P(T) and features.

The multiple-choice runner (`bench.run_stage`) reads four letter logits; a free-form question
needs a generated answer. Each question gets exactly what the live cascade gives it
(`cascade._score_free_form`): the same prompt (`prompts.format_prompt` of a question without
options; the dataset's group is metadata, not part of the prompt, as for a user's own question),
the chat template, greedy decoding, stop at the end of the turn or after `max_new_tokens`.

A record (one row per question and model) holds, beside the common columns:
- `answer_text`, `finish_reason`, `references` (JSON list) and `correct` from the dataset's grader;
- `prediction`: the answer's equivalence class under the grader (a stable 52-bit id of its
  grading key, `answer_class`), so the label-free
  loss ("disagrees with the last stage") compares classes exactly as it compares MMLU letters;
- two free-form P(T) definitions, compared in the report by AUROC: `p_t`, the geometric mean of
  the generated tokens' probabilities (the live cascade's, `signals.freeform_signals`), and
  `p_t_min`, the smallest token probability; an answer with no visible text gets 0 for both
  (the cascade never keeps it);
- `first_token_seconds`: the prompt's pass. P(IK) is read from that pass (the hidden states of
  the prompt's last token, kept as feature chunks like the MC runner's), before any answer
  token exists, so a stage gated on P(IK) saves `seconds - first_token_seconds` and
  `output_tokens` on each question it escalates without generating.

Records are appended with an atomic rewrite every `batch_size` questions and a rerun skips the
questions done, as for multiple choice.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import time
from typing import Callable

import numpy as np
import pandas as pd

from cascade_core.records.runner import BenchPaths, code_version, feature_layers, resume
from cascade_core.cost import flops as flop_cost
from cascade_core.graders import Grader, normalise_text
from cascade_core.io import atomic_write_npz, atomic_write_parquet
from cascade_core.prompts import format_prompt
from cascade_core.signals import freeform_signals
from cascade_core.types import Question

FREEFORM_PROMPT_FORMAT = "zero-shot-free-chat-v1"
DEFAULT_MAX_NEW_TOKENS = 16  # an arithmetic result or a short fact; longer answers are cut ("length")

Progress = Callable[[int, int], None]


def answer_class(grader: Grader, text: str) -> int:
    """The answer's equivalence class under `grader`: equal ids iff equal grading keys. An answer
    the grader finds no key in (no number for `numeric`) is graded wrong against any reference;
    its class is its normalised text, so two such answers agree only when they are the same text,
    and are then graded alike (both wrong), as the label-free bound needs (`label_free`)."""
    key = grader.key(text)
    if key is None:
        key = ("unkeyed", normalise_text(text))
    digest = hashlib.sha256(repr(key).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") >> 12  # 52 bits: exact in the float64 a record table reads


def _visible(text: str) -> bool:
    return bool((text or "").strip())


def run_freeform_stage(
    backend,
    stage: str,
    questions: pd.DataFrame,
    paths: BenchPaths,
    grader: Grader,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    batch_size: int = 8,
    model_hash: str = "",
    dtype: str = "",
    quantization: str = "",
    progress: Progress | None = None,
    max_batches: int | None = None,
) -> pd.DataFrame:
    """Answer every question of `questions` not yet in the stage's records; return all records.

    `questions` has columns qid, subject, category, split, question, references (a list of
    accepted answers; empty where the dataset has no labels: `correct` is then false and only
    the label-free guarantee applies).
    """
    records, todo, finished, total = resume(paths, questions, dtype, progress)
    if todo.empty:
        return records
    layers = feature_layers(backend.n_layers + 1) if getattr(backend, "has_hidden_states", False) else []
    version = code_version()
    paths.features_dir.mkdir(parents=True, exist_ok=True)
    rows = list(todo.itertuples(index=False))
    for b, start in enumerate(range(0, len(rows), batch_size)):
        if max_batches is not None and b >= max_batches:
            break
        batch = rows[start:start + batch_size]
        new, hidden = [], []
        for row in batch:
            prompt = format_prompt(Question(text=row.question, subject=""))
            began = time.perf_counter()
            g = backend.generate(prompt, max_new_tokens=max_new_tokens, layers=layers or None)
            seconds = time.perf_counter() - began
            references = [str(r) for r in (row.references if row.references is not None else [])]
            if _visible(g.text) and len(g.token_logprobs):
                p_t, p_min = freeform_signals(g.token_logprobs)
            else:
                p_t, p_min = 0.0, 0.0
            new.append({
                "qid": str(row.qid), "subject": row.subject, "category": row.category, "split": row.split,
                "stage": stage, "model_id": backend.model_id, "answer": -1,
                "prediction": answer_class(grader, g.text),
                "correct": bool(references) and grader.grade(g.text, references),
                "p_t": float(p_t), "p_t_min": float(p_min),
                "answer_text": g.text, "finish_reason": g.finish_reason, "references": json.dumps(references),
                "prompt_tokens": int(g.prompt_tokens), "output_tokens": int(g.output_tokens),
                "flops": flop_cost(backend.non_embedding_params, g.prompt_tokens + g.output_tokens),
                "seconds": seconds, "first_token_seconds": float(min(g.first_token_seconds, seconds)),
                "max_new_tokens": int(max_new_tokens),
                "model_hash": model_hash, "prompt_format": FREEFORM_PROMPT_FORMAT, "dtype": dtype,
                "quantization": quantization, "code_version": version,
            })
            hidden.append(g.hidden_states or {})
        if layers and all(hidden):
            atomic_write_npz(paths.features_dir / f"chunk-{time.time_ns()}.npz",
                             qid=np.array([r["qid"] for r in new]),
                             prediction=np.array([r["prediction"] for r in new], dtype=np.int64),
                             p_t=np.array([r["p_t"] for r in new], dtype=np.float32),
                             **{f"layer_{k}": np.stack([h[k] for h in hidden]).astype(np.float16) for k in layers})
        now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        frame = pd.DataFrame(new).assign(created_at=now)
        records = frame if records.empty else pd.concat([records, frame], ignore_index=True)
        atomic_write_parquet(records, paths.records)
        finished += len(batch)
        if progress:
            progress(finished, total)
    return records
