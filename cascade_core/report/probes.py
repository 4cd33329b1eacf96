"""Probes retrained for the OOD and label-free studies (on calibration rows only, never on test)."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from cascade_core.records.table import RecordTable
from cascade_core.report.common import ReportSettings, _num


def _probe_frame(table: RecordTable, s: int) -> pd.DataFrame:
    return pd.DataFrame({"qid": table.qids, "split": table.splits, "correct": table.correct[s]})


def retrain_p_ik(table: RecordTable, features: Mapping[str, tuple[np.ndarray, dict]], train_mask: np.ndarray,
                 settings: ReportSettings, labels: Mapping[int, np.ndarray] | None = None,
                 stages: Sequence[int] | None = None) -> tuple[np.ndarray, dict]:
    """P(IK) of every (stage, question) from probes trained only on `train_mask` (calibration rows).

    Training rows get out-of-fold values, others the probe's. `labels[s]` replaces gold
    correctness as stage s's training target. Stages without features keep NaN.
    Returns (p_ik (S, N), {stage: {layer, held_out_auroc}}).
    """
    from cascade_core.records.probe_training import align_features, train_probe

    p_ik = np.full(table.p_ik.shape, np.nan)
    info = {}
    for s in (range(table.n_stages) if stages is None else stages):
        name = table.names[s]
        if table.recorded[s] or name not in features:
            continue
        qids, feats = features[name]
        frame = _probe_frame(table, s)
        aligned = align_features(frame, qids, feats)
        result = train_probe(frame, aligned, model_id=table.model_ids[s],
                             labels=None if labels is None else labels.get(s), train_mask=train_mask,
                             folds=settings.probe_folds, seed=settings.seed)
        p_ik[s] = result.p_ik
        info[name] = {"layer": result.probe.layer, "held_out_auroc": _num(result.test_auroc),
                      "n_train": int(train_mask.sum())}
    return p_ik, info

