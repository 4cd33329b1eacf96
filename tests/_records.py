"""Synthetic benchmark records on real MMLU ids, written as the benchmark runner writes them."""

from __future__ import annotations

from pathlib import Path

from cascade_core.records.mmlu import load_mmlu
from cascade_core.io import atomic_write_parquet
from cascade_core.records.table import RecordTable, synthetic_table
from app_ui.view_model import record_frames

DEFAULT_STAGES = ("smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b")


def write_synthetic_records(root: Path, n: int = 1600, names=DEFAULT_STAGES, seed: int = 3) -> RecordTable:
    """Records for stages `names` on the first n MMLU questions (their real ids, subjects and
    splits) under root/mmlu/<stage>.parquet; returns the same records as one table."""
    mmlu = load_mmlu().iloc[:n]
    table = synthetic_table(n, len(names), seed=seed)
    frames = record_frames(table, qids=mmlu["qid"].to_numpy(), splits=mmlu["split"].to_numpy())
    frames = [f.assign(stage=name, model_id=name, subject=mmlu["subject"].to_numpy()) for f, name in zip(frames, names)]
    for name, frame in zip(names, frames):
        atomic_write_parquet(frame, Path(root) / "mmlu" / f"{name}.parquet")
    return RecordTable.from_frames(frames, names=list(names))
