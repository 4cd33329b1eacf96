"""Probes retrained for the OOD and label-free studies (on calibration rows only, never on test)."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from cascade_core.records.table import RecordTable
from cascade_core.formatting import json_number
from cascade_core.report.common import ReportSettings


def _probe_frame(table: RecordTable, s: int) -> pd.DataFrame:
    return pd.DataFrame({"qid": table.qids, "split": table.splits, "correct": table.correct[s]})


def retrain_stage(table: RecordTable, features: Mapping[str, tuple[np.ndarray, dict]], s: int,
                  train_mask: np.ndarray, settings: ReportSettings,
                  labels: np.ndarray | None = None) -> tuple[np.ndarray, dict] | None:
    """Stage s's part of `retrain_p_ik`: (its P(IK) row, its info), or None when it has no
    features (or is recorded). Independent of the other stages, so the report can train the
    probes of different stages and masks in different processes."""
    from cascade_core.records.probe_training import align_features, train_probe

    name = table.names[s]
    if table.recorded[s] or name not in features:
        return None
    qids, feats = features[name]
    frame = _probe_frame(table, s)
    aligned = align_features(frame, qids, feats)
    options = {"float32": settings.probe_float32, "warm_start": settings.probe_warm_start}
    if settings.probe_path_stop is not None:
        options["stop_after_worse"] = settings.probe_path_stop
    result = train_probe(frame, aligned, model_id=table.model_ids[s], labels=labels, train_mask=train_mask,
                         folds=settings.probe_folds, seed=settings.seed, grid_options=options)
    return result.p_ik, {"layer": result.probe.layer, "held_out_auroc": json_number(result.test_auroc),
                         "n_train": int(train_mask.sum())}


def assemble_p_ik(table: RecordTable, parts: Mapping[int, tuple[np.ndarray, dict] | None]) -> tuple[np.ndarray, dict]:
    """`retrain_p_ik`'s result from `retrain_stage`'s parts (stage index -> part, in the order trained)."""
    p_ik = np.full(table.p_ik.shape, np.nan)
    info = {}
    for s in parts:
        if parts[s] is not None:
            p_ik[s], info[table.names[s]] = parts[s]
    return p_ik, info


def retrain_p_ik(table: RecordTable, features: Mapping[str, tuple[np.ndarray, dict]], train_mask: np.ndarray,
                 settings: ReportSettings, labels: Mapping[int, np.ndarray] | None = None,
                 stages: Sequence[int] | None = None) -> tuple[np.ndarray, dict]:
    """P(IK) of every (stage, question) from probes trained only on `train_mask` (calibration rows).

    Training rows get out-of-fold values, others the probe's. `labels[s]` replaces gold
    correctness as stage s's training target. Stages without features keep NaN.
    Returns (p_ik (S, N), {stage: {layer, held_out_auroc}}).
    """
    stages = range(table.n_stages) if stages is None else stages
    return assemble_p_ik(table, {s: retrain_stage(table, features, s, train_mask, settings,
                                                  None if labels is None else labels.get(s)) for s in stages})
