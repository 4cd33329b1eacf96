"""Benchmark runner: every stage's model over a question set, one record per (question, model).

Records are what the replay, the frontier, the report and the dashboard read, so the runner
guards them: every batch is appended with an atomic rewrite (temp file + rename), so an
interrupted run loses at most the batch in flight and never leaves a corrupt file, and a rerun
skips the questions already done. Hidden-state features go to separate chunk files (kept out of
git; `bench` regenerates them) because they are large and only the probes need them.
"""

from __future__ import annotations

import datetime as _dt
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from cascade_core import __version__
from cascade_core.cost import flops as flop_cost
from cascade_core.io import atomic_write_npz, atomic_write_parquet, read_parquet_checked
from cascade_core.prompts import PROMPT_FORMAT_VERSION, format_prompt
from cascade_core.records.schema import REQUIRED, RUNNER_COLUMNS, validate_records
from cascade_core.signals import mc_signals, option_probabilities
from cascade_core.types import Backend, Question

RECORD_COLUMNS = list(RUNNER_COLUMNS)  # the columns the runner writes (cascade_core.records.schema)

Progress = Callable[[int, int], None]


def code_version() -> str:
    """Package version plus the git commit when run from a checkout (records say what made them)."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{__version__}+{commit}" if commit else __version__


def feature_layers(n_hidden_states: int, count: int = 8) -> list[int]:
    """Evenly spaced layers (never the embeddings, always the last) whose features are kept."""
    last = n_hidden_states - 1
    picks = np.unique(np.round(np.linspace(1, last, num=min(count, last))).astype(int))
    return [int(x) for x in picks]


@dataclass(frozen=True)
class BenchPaths:
    """Where one stage's records and features live for one dataset."""

    records: Path
    features_dir: Path

    @classmethod
    def for_stage(cls, results_dir: Path, features_root: Path, dataset: str, stage: str) -> "BenchPaths":
        return cls(results_dir / dataset / f"{stage}.parquet", features_root / dataset / stage)


def load_records(path: Path) -> pd.DataFrame:
    """A stage's records, or an empty frame when it has none yet; a corrupt file, or one that
    breaks the record schema, is refused naming the file and the column."""
    if not path.exists():
        return pd.DataFrame(columns=RECORD_COLUMNS)
    return validate_records(read_parquet_checked(path, required=REQUIRED), str(path))


def load_features(features_dir: Path) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """All feature chunks of a stage: (qids, {layer: (n, hidden) float32}); later chunks win."""
    qids: list[np.ndarray] = []
    layers: dict[int, list[np.ndarray]] = {}
    for chunk in sorted(features_dir.glob("chunk-*.npz")):
        with np.load(chunk, allow_pickle=False) as data:
            qids.append(data["qid"].astype(str))
            for key in data.files:
                if key.startswith("layer_"):
                    layers.setdefault(int(key[6:]), []).append(data[key].astype(np.float32))
    if not qids:
        return np.array([], dtype=str), {}
    all_qids = np.concatenate(qids)
    _, last_index = np.unique(all_qids[::-1], return_index=True)
    keep = np.sort(len(all_qids) - 1 - last_index)
    return all_qids[keep], {layer: np.concatenate(parts)[keep] for layer, parts in layers.items()}


def _question(row) -> Question:
    answer = int(row.answer)  # -1: a dataset without answers (its records say -1, never correct)
    return Question(text=row.question, options=tuple(row.options), subject=row.subject,
                    answer=answer if answer >= 0 else None, qid=row.qid)


QUESTIONS_PER_CALL = 64
"""Questions per backend call (and per records write) in a benchmark when no --batch-size is given:
a local backend sorts them by token count before it splits them into forward passes of its own
batch size, so 64 similar-length prompts pad far less than 8 (measured: BENCHMARKS.md)."""

LENGTH_WINDOW = 1024
"""How many consecutive questions `_batches` may reorder by length: enough that a batch holds
prompts of similar length (padding is computed like real tokens; in the benchmark's round-robin
order a batch of 8 padded MMLU to 2.2x its tokens), few enough that a run stopped part-way still
leaves the round-robin sample over subjects (`compose.jobs.bench_questions`), give or take one window."""


def by_length(lengths: list[int], window: int | None = None) -> list[int]:
    """The order the runner takes questions in: within each window of `window` (default
    `LENGTH_WINDOW`) consecutive questions, shorter prompts first (stable)."""
    window = LENGTH_WINDOW if window is None else window
    return [i for start in range(0, len(lengths), window)
            for i in sorted(range(start, min(start + window, len(lengths))), key=lengths.__getitem__)]


def _batches(todo: pd.DataFrame, batch_size: int, max_batches: int | None):
    """(source rows, questions) of each batch of `todo`, at most `max_batches` of them, in `by_length`'s
    order, so a batch holds prompts of similar length."""
    rows = list(todo.itertuples(index=False))
    questions = [_question(r) for r in rows]
    order = by_length([len(format_prompt(q)) for q in questions])
    for b, start in enumerate(range(0, len(order), batch_size)):
        if max_batches is not None and b >= max_batches:
            return
        picked = order[start : start + batch_size]
        yield [rows[i] for i in picked], [questions[i] for i in picked]


def _score_batch(backend: Backend, batch: list[Question]):
    """One forward pass over a batch: (scores, seconds per question, prediction, p_t, margin, entropy, probs)."""
    prompts = [format_prompt(q) for q in batch]
    started = time.perf_counter()
    scores = backend.score_options(prompts, [len(q.options) for q in batch], None)
    seconds = (time.perf_counter() - started) / len(batch)
    rows = [np.asarray(s.letter_logits, dtype=np.float64) for s in scores]
    if len({len(r) for r in rows}) == 1:  # one option count (MMLU): one array
        logits = np.stack(rows)
        prediction, p_t, margin, entropy = mc_signals(logits)
        return scores, seconds, prediction, p_t, margin, entropy, option_probabilities(logits)
    # A file whose questions have different option counts: the same signals, question by question.
    prediction, p_t, margin, entropy = (np.array(v) for v in zip(*(mc_signals(r) for r in rows)))
    return scores, seconds, prediction.astype(np.int64), p_t, margin, entropy, [option_probabilities(r) for r in rows]


def _write_feature_chunk(backend: Backend, paths: BenchPaths, batch: list[Question], scores,
                         prediction: np.ndarray, p_t: np.ndarray) -> bool:
    """The batch's hidden states (evenly spaced layers, float16) as one chunk file; False when none.

    The chunk also carries the batch's prediction and P(T), so features made in a later pass
    (`backfill_features`) can be checked against the records they are joined to.
    """
    if not (backend.has_hidden_states and scores[0].hidden_states):
        return False
    keys = sorted(scores[0].hidden_states)
    # All layers (a local model): evenly spaced ones; a few named layers (a vLLM stage gives its last): those.
    keep_layers = feature_layers(len(keys)) if keys == list(range(len(keys))) else keys
    arrays = {f"layer_{k}": np.stack([s.hidden_states[k] for s in scores]).astype(np.float16) for k in keep_layers}
    chunk = paths.features_dir / f"chunk-{time.time_ns()}.npz"
    atomic_write_npz(chunk, qid=np.array([q.qid for q in batch]), prediction=prediction.astype(np.int16),
                     p_t=p_t.astype(np.float32), **arrays)
    return True


def feature_qids(features_dir: Path) -> set[str]:
    """The qids that have a feature chunk (reads only the qid arrays)."""
    found: set[str] = set()
    for chunk in sorted(features_dir.glob("chunk-*.npz")):
        with np.load(chunk, allow_pickle=False) as data:
            found.update(data["qid"].astype(str).tolist())
    return found


def check_same_dtype(records: pd.DataFrame, dtype: str, path: Path) -> None:
    """Refuse to mix dtypes in one records file: bfloat16 and float32 answers differ on a few
    percent of questions, so a table half of each would describe no model that can be run."""
    if not dtype or records.empty or "dtype" not in records:
        return
    made = sorted(set(records["dtype"].astype(str)) - {""})
    if made and made != [dtype]:
        raise ValueError(
            f"{path}: its records were made in {', '.join(made)}, this run computes in {dtype}; set the "
            f"stage's dtype = \"{made[0]}\" in the preset to extend them, or bench into another --results-dir")


def resume(paths: BenchPaths, questions: pd.DataFrame, dtype: str, progress: Progress | None = None):
    """(records so far, questions still to do, how many are done, how many in all): where a stage's
    run picks up (the multiple-choice and the free-form runner alike); a records file made in
    another dtype is refused (`check_same_dtype`)."""
    records = load_records(paths.records)
    check_same_dtype(records, dtype, paths.records)
    done = set(records["qid"].astype(str))
    todo = questions[~questions["qid"].astype(str).isin(done)]
    total, finished = len(questions), len(questions) - len(todo)
    if progress:
        progress(finished, total)
    return records, todo, finished, total


def run_stage(
    backend: Backend,
    stage: str,
    questions: pd.DataFrame,
    paths: BenchPaths,
    batch_size: int = 8,
    model_hash: str = "",
    dtype: str = "",
    quantization: str = "",
    progress: Progress | None = None,
    max_batches: int | None = None,
) -> pd.DataFrame:
    """Score every question of `questions` not yet in the stage's records; return all records.

    `questions` has columns qid, subject, category, split, question, options, answer. Each batch is
    one forward pass; its records are appended with an atomic rewrite, its features written as a
    chunk file first, so a crash between the two only makes a rerun redo that batch.
    """
    records, todo, finished, total = resume(paths, questions, dtype, progress)
    if todo.empty:
        return records
    version = code_version()
    paths.features_dir.mkdir(parents=True, exist_ok=True)
    for source, batch in _batches(todo, batch_size, max_batches):
        scores, seconds, prediction, p_t, margin, entropy, probs = _score_batch(backend, batch)
        _write_feature_chunk(backend, paths, batch, scores, prediction, p_t)
        now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        answers = np.array([-1 if q.answer is None else q.answer for q in batch], dtype=np.int64)
        new = pd.DataFrame({
            "qid": [q.qid for q in batch],
            "subject": [r.subject for r in source],
            "category": [r.category for r in source],
            "split": [r.split for r in source],
            "stage": stage,
            "model_id": backend.model_id,
            "answer": answers,
            "prediction": prediction.astype(np.int16),
            "correct": (prediction == answers) & (answers >= 0),
            "p_t": p_t, "margin": margin, "entropy": entropy,
            "option_probs": [p.tolist() for p in probs],
            "prompt_tokens": [s.prompt_tokens for s in scores],
            "output_tokens": [s.output_tokens for s in scores],
            "flops": [flop_cost(backend.non_embedding_params, s.prompt_tokens + s.output_tokens) for s in scores],
            "seconds": seconds,
            "model_hash": model_hash, "prompt_format": PROMPT_FORMAT_VERSION, "dtype": dtype,
            "quantization": quantization, "code_version": version, "created_at": now,
        })
        records = new if records.empty else pd.concat([records, new], ignore_index=True)
        atomic_write_parquet(records, paths.records)
        finished += len(batch)
        if progress:
            progress(finished, total)
    return records


def backfill_features(
    backend: Backend,
    questions: pd.DataFrame,
    paths: BenchPaths,
    batch_size: int = 8,
    progress: Progress | None = None,
    max_batches: int | None = None,
    dtype: str = "",
    have_elsewhere: frozenset[str] | set[str] = frozenset(),
) -> dict[str, int]:
    """Hidden-state features for questions that have records but no features; records stay as they are.

    Records made before features were kept (or on a machine whose feature files are gone) get
    their features from a fresh forward pass of the same prompt. The records are never
    rewritten: the pass only adds chunk files, each carrying its own prediction, and the return
    value counts how many of those agree with the recorded prediction (bfloat16 numerics can
    differ with the batch a question was padded in). Resumable like `run_stage`; `have_elsewhere`
    names questions whose features exist outside the chunks (a committed checkpoint), not redone.
    """
    if not backend.has_hidden_states:
        raise ValueError(f"{backend.model_id}: this backend gives no hidden states; nothing to backfill")
    records = load_records(paths.records)
    check_same_dtype(records, dtype, paths.records)
    recorded = records.set_index(records["qid"].astype(str))["prediction"]
    have = (feature_qids(paths.features_dir) if paths.features_dir.exists() else set()) | set(have_elsewhere)
    qids = questions["qid"].astype(str)
    wanted = questions[qids.isin(recorded.index)]
    todo = wanted[~wanted["qid"].astype(str).isin(have)]
    total, finished = len(wanted), len(wanted) - len(todo)
    counts = {"questions": total, "backfilled": 0, "agree": 0}
    if progress:
        progress(finished, total)
    paths.features_dir.mkdir(parents=True, exist_ok=True)
    for _, batch in _batches(todo, batch_size, max_batches):
        scores, _, prediction, p_t, _, _, _ = _score_batch(backend, batch)
        _write_feature_chunk(backend, paths, batch, scores, prediction, p_t)
        counts["backfilled"] += len(batch)
        counts["agree"] += int(np.sum(prediction == recorded.loc[[q.qid for q in batch]].to_numpy()))
        finished += len(batch)
        if progress:
            progress(finished, total)
    return counts
