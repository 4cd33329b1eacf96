"""Section 4: rule both / pt_only / pik_only / learned on the full local cascade and the largest local -> GPT-4."""

from __future__ import annotations

from dataclasses import dataclass

from cascade_core.records.table import RecordTable
from cascade_core.report.common import Part, Progress, ReportSettings, api_metrics, local_indices, choose_and_report


@dataclass
class AblationBlock(Part):
    stages: list
    unit: str
    rules: list  # one dict per rule: rule, thresholds, policy, calibration, test (+ api)


def ablation_section(table: RecordTable, settings: ReportSettings, progress: Progress) -> list[AblationBlock]:
    local = local_indices(table)
    setups = [(local, settings.unit)]
    if table.recorded[-1]:
        setups.append(([local[-1], table.n_stages - 1], settings.api_unit))
    out = []
    for stages, unit in setups:
        rows = []
        for rule in settings.rules:
            progress(f"ablation {rule} on {' -> '.join(table.names[s] for s in stages)}")
            entry = choose_and_report(table, stages, rule, unit, settings)
            row = {"rule": rule, "thresholds": entry["thresholds"], "policy": entry["policy"],
                   "calibration": entry["calibration"], "test": entry["test"]}
            if table.recorded[stages[-1]]:
                row["api"] = api_metrics(entry["_test"], entry["_result"])
            rows.append(row)
        out.append(AblationBlock(stages=[table.names[s] for s in stages], unit=unit, rules=rows))
    return out

