"""Section 1: each model alone on the test split: accuracy (Wilson 95% CI), mean cost, AUROC/ECE of P(T), P(IK)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cascade_core.signal_quality import auroc, expected_calibration_error
from cascade_core.cost import COST_UNITS
from cascade_core.records.table import RecordTable
from cascade_core.formatting import json_estimate
from cascade_core.report.common import Part, split_tables
from cascade_core.choose.paired_stats import accuracy_ci


@dataclass
class ModelRow(Part):
    stage: str
    model_id: str
    recorded: bool
    n_test: int
    accuracy: dict  # {"value", "low", "high"}
    calibration_accuracy: float
    mean_cost: dict  # unit -> mean cost per test question
    p_t: dict | None  # {"auroc", "ece", "mean"}; None without the signal
    p_ik: dict | None


def model_section(table: RecordTable) -> list[ModelRow]:
    calib, test = split_tables(table)
    rows = []
    for s, name in enumerate(table.names):
        y = test.correct[s]
        row = ModelRow(
            stage=name, model_id=table.model_ids[s], recorded=bool(table.recorded[s]),
            n_test=test.n_questions, accuracy=json_estimate(accuracy_ci(y)),
            calibration_accuracy=float(calib.correct[s].mean()),
            mean_cost={u: float(test.cost(u)[s].mean()) for u in COST_UNITS},
            p_t=None, p_ik=None,
        )
        for signal in ("p_t", "p_ik"):
            values = getattr(test, signal)[s]
            if np.isfinite(values).all():
                setattr(row, signal, {"auroc": auroc(values, y),
                                      "ece": expected_calibration_error(np.clip(values, 0, 1), y),
                                      "mean": float(values.mean())})
        rows.append(row)
    return rows
