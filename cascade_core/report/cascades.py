"""Section 2: every 2-stage and the full local cascade at <= the target lost against its largest
model (the paper's table): thresholds, accuracy, PD, compute reduction (bootstrap CI), escalation
rates, McNemar p, and the oracle's saving for scale."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from cascade_core.cost import compute_reduction
from cascade_core.choose.baselines import oracle
from cascade_core.records.table import RecordTable
from cascade_core.report.baselines import oracle_curve
from cascade_core.formatting import json_number
from cascade_core.report.common import Part, Progress, ReportSettings, local_indices, choose_and_report


@dataclass
class CascadeRow(Part):
    stages: list
    rule: str
    unit: str
    target_max_loss: float
    policy: dict
    thresholds: list
    calibration: dict
    test: dict  # `common.outcome`
    oracle: dict
    share_of_oracle_saving: float | None
    best_single_stage: dict


def oracle_saving(test: RecordTable, unit: str, target: float) -> dict:
    """The oracle's accuracy and saving, and its saving at the cascade's own target (reference - target):
    the most any router could save there, the yardstick for "half of the oracle's saving"."""
    o = oracle(test, unit)
    cost, acc = oracle_curve(test, unit, points=None)
    ok = np.flatnonzero(acc >= test.correct[-1].mean() - target - 1e-12)
    reference = test.cost(unit)[-1].mean()
    at_target = compute_reduction(cost[ok[0]], reference) if ok.size else float("nan")
    return {"accuracy": o.accuracy, "compute_reduction": json_number(o.compute_reduction[unit]),
            "compute_reduction_at_target": json_number(at_target)}


def cascade_section(table: RecordTable, settings: ReportSettings, progress: Progress) -> list[CascadeRow]:
    local = local_indices(table)
    subsets = [list(c) for size in range(2, len(local) + 1) for c in itertools.combinations(local, size)]
    out = []
    for stages in subsets:
        progress(f"cascade {' -> '.join(table.names[s] for s in stages)}")
        entry = choose_and_report(table, stages, "both", settings.unit, settings)
        test = entry["_test"]
        o = oracle_saving(test, settings.unit, settings.target_max_loss)
        saving = entry["test"]["reductions"][settings.unit]
        share = (json_number(saving / o["compute_reduction_at_target"])
                 if saving is not None and o["compute_reduction_at_target"] else None)
        fields = {k: v for k, v in entry.items() if not k.startswith("_")}
        out.append(CascadeRow(**fields, oracle=o, share_of_oracle_saving=share,
                              best_single_stage=_best_single(test, settings)))
    return out


def _best_single(test: RecordTable, settings: ReportSettings) -> dict:
    acc = test.correct.mean(axis=1)
    s = int(np.argmax(acc))
    return {"stage": test.names[s], "accuracy": float(acc[s]),
            "compute_reduction": json_number(compute_reduction(test.cost(settings.unit)[s].sum(),
                                                        test.cost(settings.unit)[-1].sum()))}

