"""Load a preset's benchmark records as one RecordTable, recorded API stages (GPT-4, Mixtral) included.

The report, the CLI and the dashboard all read records through `load_preset_table`, so they see
the same questions, the same stage order and the same prices. Local stages come from the
benchmark's files (`locations().record_path(stage)`, validated against `record_schema`); a
recorded stage (RouteLLM's
GPT-4 / Mixtral outcomes on MMLU) is built from `data/recorded/routellm_mmlu.parquet`, its
cost being its prompt tokens (this project's prompt, in that model's tokenizer) plus one output
token (the answer letter) times the stage's per-million-token prices.

Only questions every stage answered are kept (`RecordTable.from_frames` joins on qid), so a
benchmark still running gives a smaller table, never a ragged one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from cascade_core.records.runner import load_records
from cascade_core.locations import locations
from cascade_core.cost import dollars as dollar_cost
from cascade_core.cost import flops as flop_cost
from cascade_core.records.mmlu import RECORDED_PATH, load_recorded_outcomes, load_split, mmlu_category
from cascade_core.presets import Preset, StageConfig, load_preset
from cascade_core.records.table import RecordTable
from models.recorded import OUTPUT_TOKENS as RECORDED_OUTPUT_TOKENS
from models.recorded import RECORDED_MODELS, canonical_name

# GPT-4-1106-preview's list prices (dollars per million tokens), as in the api-recorded preset.
GPT4_STAGE = StageConfig(name="gpt-4-recorded", label="GPT-4-1106-preview (recorded)", backend="recorded",
                         model="gpt-4-1106-preview", price_in=10.0, price_out=30.0)


class MissingRecordsError(ValueError):
    """A stage of the preset has no benchmark records yet; the message names it and the file."""


recorded_model_name = canonical_name  # 'gpt-4', 'mixtral', ... -> the recording's model name


def recorded_frame(config: StageConfig, path: Path | str = RECORDED_PATH) -> pd.DataFrame:
    """A recorded stage's records, shaped like the benchmark's (qid, subject, split, correct, costs).

    `prediction` is -1 (the recording knows right/wrong, not the letter) and `p_t` NaN; the
    split comes from data/mmlu/split.json, so it agrees with the local stages' records.
    """
    if config.backend != "recorded":
        raise ValueError(f"stage {config.name!r} is a {config.backend!r} stage, not a recorded one")
    name = recorded_model_name(config.model)
    correct_column, tokens_column, _total, non_embedding = RECORDED_MODELS[name]
    outcomes = load_recorded_outcomes(path)
    split = load_split()
    qids = outcomes["qid"].astype(str)
    tokens = outcomes[tokens_column].to_numpy(dtype=np.int64)
    out_tokens = np.full(len(tokens), RECORDED_OUTPUT_TOKENS, dtype=np.int64)
    return pd.DataFrame({
        "qid": qids, "subject": outcomes["subject"].astype(str),
        "category": outcomes["subject"].astype(str).map(mmlu_category),
        "split": qids.map(split).fillna("").astype(str), "stage": config.name, "model_id": name,
        "prediction": -1, "correct": outcomes[correct_column].astype(bool), "p_t": np.nan,
        "prompt_tokens": tokens, "output_tokens": out_tokens,
        "flops": flop_cost(non_embedding, tokens + out_tokens), "seconds": 0.0,
        "dollars": dollar_cost(tokens, out_tokens, config.price_in, config.price_out), "recorded": True,
    })


def stage_configs(preset: Preset, include_recorded: bool | StageConfig | str = True,
                  stages: Sequence[str] | None = None) -> list[StageConfig]:
    """The enabled stages a table of `preset` has, in cascade order (see `load_preset_table`)."""
    configs = [c for c in preset.stages if c.enabled]
    if stages is not None:
        known = {c.name for c in preset.stages + preset.extra_stages}
        unknown = [s for s in stages if s not in known]
        if unknown:
            raise ValueError(f"preset {preset.name!r} has no stage(s) {unknown}; stages: {sorted(known)}")
        configs = [c for c in preset.stages + preset.extra_stages if c.name in set(stages)]
    local = [c for c in configs if c.backend != "recorded"]
    recorded = [c for c in configs if c.backend == "recorded"]
    if include_recorded is False:
        return local
    if include_recorded is True:
        return local + recorded
    extra = include_recorded
    if isinstance(extra, str):
        extra = GPT4_STAGE if recorded_model_name(extra) == GPT4_STAGE.model else StageConfig(
            name=f"{recorded_model_name(extra)}-recorded", backend="recorded", model=recorded_model_name(extra))
    if not isinstance(extra, StageConfig) or extra.backend != "recorded":
        raise ValueError("include_recorded must be True, False, a recorded model name or a recorded StageConfig")
    return local + [extra]


def load_stage_records(config: StageConfig, dataset: str = "mmlu",
                       results_dir: Path | str | None = None) -> pd.DataFrame:
    """One stage's records: the benchmark's file for a local stage, the recording for a recorded one."""
    if config.backend == "recorded":
        if dataset != "mmlu":
            raise ValueError(f"recorded stage {config.name!r} has outcomes for MMLU only, not {dataset!r}")
        return recorded_frame(config)
    path = locations(results_dir).record_path(config.name, dataset)
    if not path.exists():
        raise MissingRecordsError(
            f"stage {config.name!r} has no records at {path}; run "
            f"`python -m cascade_core bench --stages {config.name}` first")
    records = load_records(path)
    if records.empty:
        raise MissingRecordsError(f"stage {config.name!r} has an empty records file {path}")
    return records


def load_preset_table(
    preset: Preset | str,
    dataset: str = "mmlu",
    results_dir: Path | str | None = None,
    include_recorded: bool | StageConfig | str = True,
    stages: Sequence[str] | None = None,
    split: str | None = None,
    skip_missing: bool = False,
) -> RecordTable:
    """Every enabled stage of `preset` as one RecordTable (smallest first), on shared questions.

    include_recorded: True keeps the preset's own recorded stages (last), False drops them, and a
    recorded model name ("gpt-4", "mixtral") or recorded StageConfig appends that stage to the
    local ones (the API scenario: local cascade -> GPT-4). `stages` picks stages by name (extra
    stages allowed), in preset order. `split`: None/"all", "calibration" or "test".
    `skip_missing` leaves out local stages without records instead of raising
    MissingRecordsError. Dollars: each stage's price_in/price_out times its tokens.
    """
    preset = load_preset(preset) if not isinstance(preset, Preset) else preset
    configs = stage_configs(preset, include_recorded, stages)
    frames, kept = [], []
    for config in configs:
        try:
            frames.append(load_stage_records(config, dataset, results_dir))
        except MissingRecordsError:
            if not skip_missing:
                raise
            continue
        kept.append(config)
    if not any(c.backend != "recorded" for c in kept):
        raise MissingRecordsError(f"no stage of preset {preset.name!r} has records for {dataset!r} yet")
    table = RecordTable.from_frames(
        frames, names=[c.name for c in kept],
        recorded=[c.backend == "recorded" for c in kept],
        prices=[(c.price_in, c.price_out) for c in kept],
    )
    if split not in (None, "all"):
        table = table.subset(split)
    return table


def load_stage_features(table: RecordTable, dataset: str = "mmlu", features_dir: Path | str | None = None,
                        results_dir: Path | str | None = None,
                        ) -> tuple[dict[str, tuple[np.ndarray, dict]], dict[str, str]]:
    """Hidden-state features of the table's local stages that cover all its questions.

    Returns ({stage: (qids, {layer: (n, d) float32})}, {stage: why it was left out}); a stage
    whose features are missing or incomplete is left out (the report then says so).
    """
    from cascade_core.compose.features import stage_features

    where = locations(results_dir=results_dir, features_dir=features_dir)
    root = where.features / dataset
    found, missing = {}, {}
    for s, name in enumerate(table.names):
        if table.recorded[s]:
            continue
        record_file = where.record_path(name, dataset)
        record_qids = pd.read_parquet(record_file, columns=["qid"])["qid"] if record_file.exists() else table.qids
        qids, layers, _ = stage_features(where, name, record_qids, dataset)
        if not layers:
            missing[name] = f"no feature files under {root / name} or {where.hidden_dir(dataset) / name}"
            continue
        absent = np.setdiff1d(table.qids, qids)
        if absent.size:
            missing[name] = f"{absent.size} of {table.n_questions} questions have no features (e.g. {absent[0]!r})"
            continue
        found[name] = (qids, layers)
    return found, missing


def load_report_inputs(preset: Preset | str = "default", dataset: str = "mmlu",
                       results_dir: Path | str | None = None, features_dir: Path | str | None = None,
                       with_gpt4: bool = True) -> dict:
    """What `report.build_report` reads, from disk: the table (local stages, then GPT-4 recorded
    for MMLU when the preset has no recorded stage of its own), the question texts, the features
    and a `meta` dict (preset, dataset, questions per subject, what was left out and why)."""
    from cascade_core.records.mmlu import load_mmlu

    preset = load_preset(preset) if not isinstance(preset, Preset) else preset
    own_recorded = any(c.backend == "recorded" and c.enabled for c in preset.stages)
    include: bool | StageConfig = True if own_recorded else (GPT4_STAGE if with_gpt4 and dataset == "mmlu" else False)
    table = load_preset_table(preset, dataset, results_dir, include_recorded=include)
    questions = load_mmlu() if dataset == "mmlu" else None
    features, missing = load_stage_features(table, dataset, features_dir, results_dir)
    per_subject = pd.Series(table.subjects).value_counts()
    meta = {
        "preset": preset.name, "dataset": dataset,
        "per_subject": int(per_subject.max()) if per_subject.min() == per_subject.max() else None,
        "per_subject_note": (f"{int(per_subject.max())} per subject, {per_subject.size} subjects"
                             if per_subject.min() == per_subject.max()
                             else f"{per_subject.min()}–{per_subject.max()} per subject, {per_subject.size} subjects"),
        "features_missing": missing,
    }
    return {"table": table, "questions": questions, "features": features, "meta": meta}
