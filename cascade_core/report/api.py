"""Section 3, the API scenario: local stage(s) -> recorded GPT-4: share of GPT-4 calls, tokens and
dollars saved, for several variants (rule x thresholds global / per category / per subject x
calibration target); the headline variant is picked by cross-validation INSIDE the calibration split."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd

from cascade_core.records.table import RecordTable
from cascade_core.formatting import json_number
from cascade_core.report.common import (Part, Progress, ReportSettings, api_metrics, local_indices, subtable,
                                        evaluate_on, outcome, policy_dict, policy_thresholds, split_tables,
                                        with_groups)
from cascade_core.choose.selection import select_policies


@dataclass
class ApiCascade(Part):
    stages: list
    unit: str
    target_max_loss: float
    gpt4_accuracy: float
    # every variant tried: name, rule, grouping, calibration_target, cv, policy, thresholds, calibration, test
    variants: list
    skipped_groupings: dict
    chosen: str  # the CV-chosen variant's name
    chosen_test: dict
    target_met_on_test: bool
    oracle_calls_saved: float


def _groups(table: RecordTable, grouping: str, categories: np.ndarray) -> np.ndarray | None:
    if grouping == "global":
        return None
    if grouping == "category":
        return categories
    if grouping == "subject":
        return table.subjects
    raise ValueError(f"unknown grouping {grouping!r}")


def _cv_variants(calib: RecordTable, rule: str, per_group: bool, targets: Sequence[float], unit: str,
                 settings: ReportSettings) -> list[dict]:
    """Cross-validate one (rule, grouping) for every calibration target inside the calibration
    split: pooled held-out loss and savings per target (one search per fold for all targets)."""
    order = np.random.default_rng(settings.seed).permutation(calib.n_questions)
    K = len(targets)
    final = np.empty((K, calib.n_questions), dtype=np.int64)
    correct = np.empty((K, calib.n_questions), dtype=bool)
    for part in np.array_split(order, settings.cv_folds):
        train_mask = np.ones(calib.n_questions, dtype=bool)
        train_mask[part] = False
        held_mask = ~train_mask
        held = calib.subset(held_mask)
        selections = select_policies(calib.subset(train_mask), targets, unit=unit, rule=rule, per_subject=per_group,
                                     min_subject_questions=settings.min_group_questions)
        for k, selection in enumerate(selections):
            result = evaluate_on(held, selection.policy)
            final[k, held_mask] = result.final_stage
            correct[k, held_mask] = result.correct
    last = calib.n_stages - 1
    dollars = calib.cost(unit)[last]
    out = []
    for k in range(K):
        reached = final[k] == last
        out.append({"accuracy_loss": float(calib.correct[last].mean() - correct[k].mean()),
                    "calls_saved": float(1.0 - reached.mean()),
                    "cost_saved": json_number(1.0 - dollars[reached].sum() / dollars.sum())
                    if dollars.sum() > 0 else None})
    return out


def _variants(settings: ReportSettings, calib: RecordTable, calib_categories: np.ndarray) -> tuple[list[tuple], dict]:
    """(rule, grouping, calibration target) to try, and the groupings left out with why: one whose
    groups would nearly all share the pooled policy (too few questions each) is the global variant."""
    has_pik = bool(np.isfinite(calib.p_ik[:-1]).any())
    rules = [r for r in settings.rules if has_pik or r in ("pt_only", "learned")]
    out, skipped = [], {}
    for grouping in settings.api_groupings:
        groups = _groups(calib, grouping, calib_categories)
        if groups is not None:
            counts = pd.Series(groups).value_counts()
            if (counts >= settings.min_group_questions).sum() < 2:
                skipped[grouping] = (f"only {int((counts >= settings.min_group_questions).sum())} of {counts.size} "
                                     f"{grouping} groups have >= {settings.min_group_questions} calibration "
                                     "questions: the rest share one pooled policy, i.e. the global variant")
                continue
        for rule in rules:
            for target in settings.api_calibration_targets:
                out.append((rule, grouping, target))
    return out, skipped


def api_cascade(table: RecordTable, stages: Sequence[int], categories: np.ndarray, settings: ReportSettings,
                progress: Progress) -> ApiCascade:
    """One local cascade -> GPT-4 (last stage of `stages`): every variant, and the CV-chosen one."""
    unit = settings.api_unit
    sub = subtable(table, stages)
    calib_full, test_full = split_tables(sub)
    variants = []
    tried, skipped = _variants(settings, calib_full, categories[sub.splits == "calibration"])
    if sub.n_stages > settings.api_group_max_stages:
        for grouping in sorted({g for _, g, _ in tried} - {"global"}):
            skipped[grouping] = (f"left out on cascades of more than {settings.api_group_max_stages} stages for time "
                                 "(each group's search covers ~10^5 policies); the 2-stage cascades show what "
                                 "per-group thresholds do")
        tried = [v for v in tried if v[1] == "global"]
    combos = list(dict.fromkeys((rule, grouping) for rule, grouping, _ in tried))
    done = {}
    for rule, grouping in combos:  # one search per (rows, rule, grouping), every target picked from it
        targets = [t for r, g, t in tried if (r, g) == (rule, grouping)]
        groups = _groups(sub, grouping, categories)
        table_g = sub if groups is None else with_groups(sub, groups)
        calib, test = split_tables(table_g)
        cvs = _cv_variants(calib, rule, groups is not None, targets, unit, settings)
        selections = select_policies(calib, targets, unit=unit, rule=rule, per_subject=groups is not None,
                                     min_subject_questions=settings.min_group_questions)
        for target, cv, selection in zip(targets, cvs, selections):
            done[(rule, grouping, target)] = (calib, test, cv, selection)
    for rule, grouping, target in tried:
        calib, test, cv, selection = done[(rule, grouping, target)]
        result = evaluate_on(test, selection.policy)
        variants.append({
            "name": f"{rule}/{grouping}/target {target * 100:g} pt", "rule": rule, "grouping": grouping,
            "calibration_target": target, "cv": cv,
            "policy": policy_dict(selection.policy), "thresholds": policy_thresholds(selection.policy, sub),
            "calibration": {"accuracy": selection.calibration.accuracy,
                            "reference_accuracy": selection.reference_accuracy,
                            **{k: v for k, v in api_metrics(calib, selection.calibration).items()}},
            "test": {**api_metrics(test, result),
                     **{k: v for k, v in outcome(test, result, unit, settings.n_resamples, settings.seed).items()
                        if k in ("accuracy", "pd", "mcnemar", "reference_accuracy", "answer_rate",
                                 "compute_reduction")}},
        })
    chosen = pick_variant(variants, settings.target_max_loss)
    progress(f"api {' -> '.join(sub.names)}: {len(variants)} variants, chosen {variants[chosen]['name']}")
    best = variants[chosen]
    return ApiCascade(
        stages=list(sub.names), unit=unit, target_max_loss=settings.target_max_loss,
        gpt4_accuracy=float(test_full.correct[-1].mean()),
        variants=variants, skipped_groupings=skipped, chosen=best["name"],
        chosen_test=best["test"],
        target_met_on_test=best["test"]["accuracy_loss"] <= settings.target_max_loss + 1e-12,
        oracle_calls_saved=float(np.mean(test_full.correct[:-1].any(axis=0) | ~test_full.correct[-1])),
    )


def pick_variant(variants: Sequence[dict], target: float) -> int:
    """The variant with the largest cross-validated saving among those whose CV loss <= target;
    if none holds the target, the one with the smallest CV loss. Calibration numbers only."""
    ok = [i for i, v in enumerate(variants) if v["cv"]["accuracy_loss"] <= target + 1e-12]
    if ok:
        return max(ok, key=lambda i: ((variants[i]["cv"]["cost_saved"] or 0.0), variants[i]["cv"]["calls_saved"], -i))
    return min(range(len(variants)), key=lambda i: (variants[i]["cv"]["accuracy_loss"], i))


def api_setups(table: RecordTable) -> list[list[int]]:
    """The stages of each API cascade of the section (each local stage -> GPT-4, then all of them)."""
    if not table.recorded[-1]:
        return []
    local = local_indices(table)
    last = table.n_stages - 1
    cascades = [[s, last] for s in local]
    if len(local) > 1:
        cascades.append(local + [last])
    return cascades


def api_section(table: RecordTable, categories: np.ndarray, settings: ReportSettings,
                progress: Progress) -> list[ApiCascade]:
    return [api_cascade(table, stages, categories, settings, progress) for stages in api_setups(table)]
