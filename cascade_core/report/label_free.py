"""Section 7: probes trained on "agrees with the largest local model" (free from escalated traffic)
against the gold-label probes, and the full local cascade with each; and the label-free
guarantee of the local cascade (issue 20): Learn-then-Test on the disagreement with the largest
local model's recorded answers (`cascade_core.choose.label_free`), which bounds the accuracy lost against
it for any labels, redone on subject-stratified re-splits beside the labelled guarantee
(`report.freeform.guarantee_study`, the same study as a free-form set's). It needs no hidden-state
features, so it is computed even where the probes part is skipped."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from cascade_core.signal_quality import auroc
from cascade_core.records.table import RecordTable
from cascade_core.formatting import json_number
from cascade_core.report.common import (Part, Progress, ReportSettings, local_indices, subtable, choose_and_report,
                                        evaluate_on, outcome, policy_thresholds, select_policy, split_tables,
                                        with_p_ik)
from cascade_core.report.probes import retrain_p_ik


@dataclass
class LabelFreeSection(Part):
    omit_none = True
    largest: str | None = None
    stages: list | None = None  # per routed stage: AUROCs of P(T), the gold probe, the label-free probe
    probes: dict | None = None
    cascades: dict | None = None  # gold_probe, label_free_probe, fully_label_free
    skipped: str | None = None  # the probes part only
    guarantee: dict | None = None  # `label_free_guarantee`


def label_free_guarantee(table: RecordTable, settings: ReportSettings, progress: Progress) -> dict | None:
    """The local cascade's label-free and labelled guarantees at the report's target and delta over
    `settings.resplits_others` re-splits (held shares, savings, the oracle's), and how often each
    smaller stage agrees with the largest one; None with fewer than two local stages."""
    from cascade_core.report.freeform import guarantee_study

    local = local_indices(table)
    if len(local) < 2:
        return None
    sub = table.stage_subset(local)
    resplits = int(settings.resplits_others)
    progress(f"label-free guarantee {' -> '.join(sub.names)}: {resplits} re-splits")
    args = (sub, settings.target_max_loss, settings.delta, resplits, settings.unit, settings.seed)
    return {"stages": list(sub.names), "target": settings.target_max_loss, "delta": settings.delta,
            "resplits": resplits, "unit": settings.unit,
            "agreement": {sub.names[s]: float(np.mean(sub.prediction[s] == sub.prediction[-1]))
                          for s in range(sub.n_stages - 1)},
            "label_free": guarantee_study(*args, label_free=True), "labelled": guarantee_study(*args)}


def agreement_labels(table: RecordTable) -> dict[int, np.ndarray]:
    """The label-free probes' targets: per routed local stage, "agrees with the largest local model"."""
    local = local_indices(table)
    return {s: table.prediction[s] == table.prediction[local[-1]] for s in local[:-1]}


def label_free_section(table: RecordTable, features, settings: ReportSettings, progress: Progress,
                       probes=None) -> LabelFreeSection:
    """Probes trained on "agrees with the largest local model's answer" (free from escalated
    traffic) vs gold-label probes, on the same test questions; and the full local cascade with
    each kind of probe (thresholds chosen with gold labels, and fully label-free). `probes`:
    `retrain_p_ik`'s result on the calibration rows with `agreement_labels`, already computed."""
    local = local_indices(table)
    largest = local[-1]
    routed = local[:-1]
    if not routed:
        return LabelFreeSection(stages=[])
    progress("label-free probes")
    agree = agreement_labels(table)
    cal = table.splits == "calibration"
    if probes is not None:
        p_free, info = probes
    else:
        p_free, info = retrain_p_ik(table, features, cal, settings, labels=agree, stages=routed)
    test = table.splits == "test"
    stages = []
    for s in routed:
        name = table.names[s]
        y = table.correct[s][test]
        gold = table.p_ik[s][test]
        stages.append({
            "stage": name,
            "agreement_rate_calibration": float(agree[s][cal].mean()),
            "label_free_auroc": json_number(auroc(p_free[s][test], y)) if name in info else None,
            "gold_auroc": json_number(auroc(gold, y)) if np.isfinite(gold).all() else None,
            "p_t_auroc": json_number(auroc(table.p_t[s][test], y)),
            "label_free_auroc_vs_agreement": json_number(auroc(p_free[s][test], agree[s][test]))
            if name in info else None,
        })
    p_ik = table.p_ik.copy()
    for s in routed:
        if table.names[s] in info:
            p_ik[s] = p_free[s]
    free_table = subtable(with_p_ik(table, p_ik), local)
    gold_table = subtable(table, local)
    cascades = {}
    for label, tab in (("gold_probe", gold_table), ("label_free_probe", free_table)):
        entry = choose_and_report(tab, list(range(tab.n_stages)), "both", settings.unit, settings)
        cascades[label] = {"thresholds": entry["thresholds"], "test": _short(entry["test"])}
    # Fully label-free: thresholds chosen on agreement with the largest model too.
    calib, test_t = split_tables(free_table)
    agree_correct = np.stack([calib.prediction[i] == calib.prediction[-1] for i in range(calib.n_stages)])
    calib_agree = dataclasses.replace(calib, correct=agree_correct, _costs={})
    sel = select_policy(calib_agree, target_max_loss=settings.target_max_loss, unit=settings.unit)
    res = evaluate_on(test_t, sel.policy)
    cascades["fully_label_free"] = {"thresholds": policy_thresholds(sel.policy, test_t),
                                    "test": _short(outcome(test_t, res, settings.unit, settings.n_resamples,
                                                           settings.seed))}
    return LabelFreeSection(largest=table.names[largest], stages=stages, probes=info, cascades=cascades)


def _short(test_outcome: dict) -> dict:
    keep = ("accuracy", "pd", "compute_reduction", "mcnemar", "escalation_rate", "reference_accuracy")
    return {k: test_outcome[k] for k in keep}

