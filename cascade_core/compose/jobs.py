"""The offline jobs: benchmark a preset's stages, train their probes and write P(IK) back.

What a benchmark does, not how it is run: the CLI calls these in the foreground, the app's
background job (`compose.background`: a child process, its status file and lock) calls the same
ones, so a benchmark started from either writes the same files in the same places (`locations`).
They wire, they do not compute: the runners are `records.runner.run_stage` and
`records.freeform_runner.run_freeform_stage`, the probe `records.probe_training.train_probe`, the
columns `records.schema`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import pandas as pd

from cascade_core.records.runner import (QUESTIONS_PER_CALL, BenchPaths, backfill_features, load_records,
                                         run_stage)
from cascade_core.compose.features import checkpoint_qids, export_probe_layer, stage_features
from cascade_core.compose.live import build_backend, describe_backend
from cascade_core.locations import Locations
from cascade_core.io import atomic_write_parquet
from cascade_core.presets import Preset, StageConfig
from cascade_core.records.schema import labelled_rows, validate_records

Progress = Callable[[int, int], None]


def bench_questions(dataset: str = "mmlu", split: str | None = None, per_subject: int | None = None,
                    subjects: Sequence[str] | None = None, results_dir=None) -> pd.DataFrame:
    """The questions a benchmark runs, round-robin over subjects in their seeded order, so a run
    stopped part-way leaves a balanced per-subject sample, half calibration and half test.
    `dataset`: `mmlu` or anything `records.registry.resolve_dataset` takes (a file's split and
    metadata are then stored under `results_dir`, the records' folder)."""
    from cascade_core.records.mmlu import load_mmlu
    from cascade_core.records.split import seeded_ranks

    if dataset != "mmlu":  # a file dataset (or a name reserved for one): the registry resolves it
        from cascade_core.records.registry import resolve_dataset, select_questions

        found = resolve_dataset(dataset, results_dir)
        questions = select_questions(found, split, per_subject, subjects)
        return questions.iloc[np.lexsort((questions["subject"].to_numpy(), questions["rank"].to_numpy()))]
    questions = load_mmlu(split=None if split in (None, "all") else split, per_subject=per_subject, subjects=subjects)
    return questions.iloc[np.lexsort((questions["subject"].to_numpy(), seeded_ranks(questions).to_numpy()))]


def shard_of(questions: pd.DataFrame, index: int, count: int) -> pd.DataFrame:
    """Every `count`-th question from position `index` (0-based): `count` workers or machines that
    each take one shard cover the questions once between them. The questions come round-robin over
    subjects, so each shard stays balanced across subjects and splits."""
    if not 0 <= index < count:
        raise ValueError(f"shard {index}/{count}: the index must be from 0 to {count - 1}")
    return questions.iloc[index::count]


def stage_paths(where: Locations, config: StageConfig, dataset: str = "mmlu") -> BenchPaths:
    return BenchPaths(where.record_path(config.name, dataset), where.features_dir(config.name, dataset))


def bench_stage(config: StageConfig, questions: pd.DataFrame, where: Locations, dataset: str = "mmlu",
                backend=None, batch_size: int | None = None, progress: Progress | None = None,
                backfill: bool = False, max_new_tokens: int | None = None):
    """One stage over `questions` (resumable): its records, or with `backfill` only the missing
    hidden-state features (returns `records.runner.backfill_features`'s counts). Questions without
    options are answered in free form (`records.freeform_runner`), graded by the dataset's grader."""
    if config.backend == "recorded":
        raise ValueError(f"stage {config.name!r} replays recorded outcomes: there is nothing to run")
    free = "options" in questions and len(questions) > 0 and not any(len(o) for o in questions["options"])
    if free and backfill:
        raise ValueError(f"dataset {dataset!r} is free-form: its runner keeps features as it goes; nothing to backfill")
    backend = backend or build_backend(config)
    paths = stage_paths(where, config, dataset)
    size = batch_size or config.batch_size
    if free:
        from cascade_core.records.registry import read_metadata
        from cascade_core.records.freeform_runner import DEFAULT_MAX_NEW_TOKENS, run_freeform_stage
        from cascade_core.graders import grader_from_dict

        grader = grader_from_dict(read_metadata(dataset, where.results)["grader"])
        return run_freeform_stage(backend, config.name, questions, paths, grader,
                                  max_new_tokens=max_new_tokens or DEFAULT_MAX_NEW_TOKENS, batch_size=size,
                                  progress=progress, **describe_backend(config, backend))
    # Multiple choice: the runner hands the backend QUESTIONS_PER_CALL questions at a time, which it
    # sorts by token count and splits into forward passes of its own batch size (less padding).
    size = batch_size or max(config.batch_size, QUESTIONS_PER_CALL)
    if backfill:
        return backfill_features(backend, questions, paths, batch_size=size, progress=progress,
                                 dtype=describe_backend(config, backend)["dtype"],
                                 have_elsewhere=checkpoint_qids(where, config.name, dataset))
    return run_stage(backend, config.name, questions, paths, batch_size=size, progress=progress,
                     **describe_backend(config, backend))


def bench_configs(preset: Preset, stages: Sequence[str] | None = None) -> list[StageConfig]:
    """The preset's stages and extra stages a benchmark runs (all, or the ones named)."""
    return [c for c in preset.stages + preset.extra_stages if not stages or c.name in stages]


@dataclass(frozen=True)
class ProbeOutcome:
    """What training one stage's probe did (for the CLI's one line per stage)."""

    stage: str
    trained: bool
    message: str


def with_p_ik(records: pd.DataFrame, p_ik: np.ndarray, source: str) -> pd.DataFrame:
    """The records with the probe's P(IK) (out-of-fold on the calibration split), schema-checked."""
    out = records.assign(
        p_ik=p_ik,
        p_ik_source=np.where(records["split"].astype(str) == "calibration", "out-of-fold", "probe"),
    )
    return validate_records(out, source)


def train_probes(preset: Preset, where: Locations, dataset: str = "mmlu", stages: Sequence[str] | None = None,
                 seed: int = 0) -> Iterator[ProbeOutcome]:
    """Train each local stage's probe on its calibration records, save it, write P(IK) back."""
    from cascade_core.probe import MIN_PER_CLASS
    from cascade_core.records.probe_training import align_features, train_probe

    for config in preset.stages + preset.extra_stages:
        if stages and config.name not in stages:
            continue
        paths = stage_paths(where, config, dataset)
        if config.backend == "recorded" or not paths.records.exists():
            continue
        records = load_records(paths.records)
        if len(records) and not labelled_rows(records).any():
            yield ProbeOutcome(config.name, False, "its dataset has no answers and a P(IK) probe learns right from "
                                                   "wrong (a probe of agreement with the last stage is not built yet); "
                                                   "skipped")
            continue
        training = records.loc[records["split"].astype(str) == "calibration", "correct"].astype(bool)
        if min(int(training.sum()), int((~training).sum())) < MIN_PER_CLASS:
            yield ProbeOutcome(config.name, False, f"{int(training.sum())} right and {int((~training).sum())} wrong "
                                                   "answers on its calibration split, and a probe learns from "
                                                   f"at least {MIN_PER_CLASS} of each: skipped (no P(IK) for this "
                                                   f"stage on {dataset}; calibrate it with --rule pt_only)")
            continue
        qids, features, source = stage_features(where, config.name, records["qid"], dataset)
        if not features:
            yield ProbeOutcome(config.name, False, f"no hidden-state features under {paths.features_dir} "
                                                   f"or {where.hidden_dir(dataset) / config.name}; skipped")
            continue
        aligned = align_features(records, qids, features)
        result = train_probe(records, aligned, model_id=str(records["model_id"].iloc[0]), seed=seed)
        probe_path = where.probe_path(config, dataset)
        result.probe.metadata["test_auroc"] = result.test_auroc
        result.probe.metadata["layer_cv_auroc"] = {str(k): v for k, v in result.layer_auroc.items()}
        result.probe.metadata["grid_cv_auroc"] = {f"{k}/{c:g}": v for (k, c), v in (result.grid_auroc or {}).items()}
        result.probe.save(probe_path)
        atomic_write_parquet(with_p_ik(records, result.p_ik, str(paths.records)), paths.records)
        exported = ""
        if source in ("local", "local+committed"):
            written = export_probe_layer(where, config.name, records, qids, features, result.probe.layer, dataset)
            exported = f"; layer {result.probe.layer} -> {written}"
        yield ProbeOutcome(config.name, True, f"layer {result.probe.layer}, C {result.probe.C:g}, "
                                              f"held-out AUROC {result.test_auroc:.3f} ({source} features) -> "
                                              f"{probe_path}{exported}")
