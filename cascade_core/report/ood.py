"""Section 6, out of distribution: probes and thresholds fit on three MMLU categories, reported on the fourth."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from cascade_core.signal_quality import auroc
from cascade_core.records.table import RecordTable
from cascade_core.formatting import json_number
from cascade_core.report.common import (Part, Progress, ReportSettings, local_indices, subtable, evaluate_on,
                                        policy_thresholds, select_policy, with_p_ik)
from cascade_core.report.probes import retrain_p_ik


@dataclass
class OodSection(Part):
    omit_none = True
    categories: list | None = None  # per held-out category: held_out, n_test, n_train, probes, cascades
    skipped: str | None = None  # why the section did not run


def ood_categories(categories: np.ndarray) -> list[str]:
    """The held-out categories of the section, in its order (first appearance)."""
    return [str(c) for c in pd.unique(np.asarray(categories)) if c]


def ood_train_mask(table: RecordTable, categories: np.ndarray, held: str) -> np.ndarray:
    """The rows the probes and thresholds of held-out category `held` are fit on."""
    return (table.splits == "calibration") & (categories != held)


def ood_section(table: RecordTable, features, categories: np.ndarray, settings: ReportSettings,
                progress: Progress, held_out=None, probes=None) -> OodSection:
    """For each category C: probes and thresholds fit on the calibration questions of the other
    three, reported on the test questions of C, next to the in-distribution choice on the same
    questions. `held_out`: only these categories (each is independent of the others, so the
    report can split them between two processes and join the rows with `join_ood`). `probes`:
    category -> `retrain_p_ik`'s result on `ood_train_mask`, already computed (the report trains
    each (category, stage) probe in whichever process is free); else trained here."""
    local = local_indices(table)
    setups = [(local, settings.unit)]
    if table.recorded[-1]:
        setups.append(([local[-1], table.n_stages - 1], settings.api_unit))
    cats = [c for c in ood_categories(categories) if held_out is None or c in set(held_out)]
    is_test = table.splits == "test"
    # The in-distribution choice does not depend on the held-out category: made once per setup.
    in_distribution = {}
    rows = []
    for held in cats:
        progress(f"ood: held-out category {held}")
        train_mask = ood_train_mask(table, categories, held)
        target_rows = is_test & (categories == held)
        if not target_rows.any() or not train_mask.any():
            continue
        # Stages without features get NaN (route on P(T) alone): their records' probe saw category C.
        if probes is not None:
            p_ik, info = probes[held]
        else:
            p_ik, info = retrain_p_ik(table, features, train_mask, settings, stages=local)
        ood_table = with_p_ik(table, p_ik)
        entry = {"held_out": held, "n_test": int(target_rows.sum()), "n_train": int(train_mask.sum()),
                 "probes": {}, "cascades": []}
        for s in local:
            name = table.names[s]
            y = table.correct[s][target_rows]
            entry["probes"][name] = {
                "ood_auroc": json_number(auroc(p_ik[s][target_rows], y)) if name in info else None,
                "in_distribution_auroc": json_number(auroc(table.p_ik[s][target_rows], y))
                if np.isfinite(table.p_ik[s][target_rows]).all() else None,
                "p_t_auroc": json_number(auroc(table.p_t[s][target_rows], y)),
            }
        for stages, unit in setups:
            ood_sub = subtable(ood_table, stages)
            id_sub = subtable(table, stages)
            sel_ood = select_policy(ood_sub.subset(train_mask), target_max_loss=settings.target_max_loss, unit=unit)
            key = (tuple(stages), unit)
            if key not in in_distribution:
                in_distribution[key] = select_policy(id_sub.subset("calibration"),
                                                     target_max_loss=settings.target_max_loss, unit=unit)
            sel_id = in_distribution[key]
            test_ood, test_id = ood_sub.subset(target_rows), id_sub.subset(target_rows)
            r_ood, r_id = evaluate_on(test_ood, sel_ood.policy), evaluate_on(test_id, sel_id.policy)
            entry["cascades"].append({
                "stages": list(ood_sub.names), "unit": unit,
                "reference_accuracy": float(test_ood.correct[-1].mean()),
                "ood": {"accuracy": r_ood.accuracy, "pd": float(r_ood.accuracy - test_ood.correct[-1].mean()),
                        "compute_reduction": json_number(r_ood.compute_reduction[unit]),
                        "thresholds": policy_thresholds(sel_ood.policy, ood_sub)},
                "in_distribution": {"accuracy": r_id.accuracy, "pd": float(r_id.accuracy - test_id.correct[-1].mean()),
                                    "compute_reduction": json_number(r_id.compute_reduction[unit])},
            })
        rows.append(entry)
    return OodSection(categories=rows)



def join_ood(parts, categories: np.ndarray) -> OodSection:
    """One section from `ood_section` parts over disjoint categories, rows in the section's order."""
    rows = {row["held_out"]: row for part in parts for row in (part.categories or [])}
    return OodSection(categories=[rows[c] for c in ood_categories(categories) if c in rows])
