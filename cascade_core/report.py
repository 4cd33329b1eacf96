"""The paper's experiment as numbers: records in, one JSON-able dict out (docs/RESULTS.md renders it).

Every choice (thresholds, which stages run, the routing rule, the pre-generation router's
threshold, probes for the OOD and label-free studies) is made on the calibration split, and
every number reported is measured on the test split. Sections:

- `models`: each model alone: accuracy (Wilson 95% CI), mean cost, AUROC/ECE of P(T), P(IK);
- `cascades`: every 2-stage and the full local cascade at <= `target_max_loss` lost against its
  largest model (the paper's table): thresholds, accuracy, PD, compute reduction (bootstrap
  CI), escalation rates, McNemar p, and the oracle's saving for scale;
- `api`: local stage(s) -> recorded GPT-4: share of GPT-4 calls, tokens and dollars saved, for
  several variants (rule x thresholds global / per category / per subject x calibration
  target); the headline variant is picked by cross-validation INSIDE the calibration split;
- `ablations`: rule both / pt_only / pik_only / learned;
- `baselines`: random routing, the oracle and the pre-generation router, with AIQ and APGR;
- `ood`: probes and thresholds fit on three MMLU categories, reported on the fourth;
- `label_free`: a probe trained on "agrees with the largest model" against the gold probe.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from cascade_core.calibration import auroc, expected_calibration_error
from cascade_core.cost import COST_UNITS, compute_reduction
from cascade_core.frontier import aiq, apgr, oracle, random_routing, sweep
from cascade_core.policy import CascadePolicy
from cascade_core.records import RecordTable
from cascade_core.replay import ReplayResult, replay
from cascade_core.selection import SubjectPolicy, evaluate_on, select_policy
from cascade_core.stats import accuracy_ci, accuracy_difference_ci, compute_reduction_ci, mcnemar_exact

Progress = Callable[[str], None]
REPORT_FORMAT = "cascade-report-v1"


@dataclass(frozen=True)
class ReportSettings:
    """Knobs of the report; the defaults are what docs/RESULTS.md uses."""

    target_max_loss: float = 0.01  # accuracy lost against the largest model (1 point)
    unit: str = "flops"  # cost of the local cascades
    api_unit: str = "dollars"  # cost of the API scenario (only GPT-4 costs dollars)
    rules: tuple[str, ...] = ("both", "pt_only", "pik_only", "learned")
    api_groupings: tuple[str, ...] = ("global", "category", "subject")
    api_calibration_targets: tuple[float, ...] = (0.01, 0.005, 0.0)
    cv_folds: int = 3  # folds inside calibration that pick the API variant
    probe_folds: int = 5
    n_resamples: int = 2000
    min_group_questions: int = 30
    seed: int = 0
    ood: bool = True
    label_free: bool = True
    pregen: bool = True


# -- small helpers ------------------------------------------------------------------------------
def _num(x) -> float | None:
    """A float for JSON; None for NaN / inf / None."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _est(e) -> dict:
    return {"value": _num(e[0]), "low": _num(e[1]), "high": _num(e[2])}


def _clean(obj):
    """Recursively turn numpy scalars/arrays into plain Python and NaN into None (JSON-safe)."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return [_clean(v) for v in obj.tolist()]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return _num(obj)
    return obj


def split_tables(table: RecordTable) -> tuple[RecordTable, RecordTable]:
    """(calibration, test) halves; a clear error when either is empty."""
    for name in ("calibration", "test"):
        if not (table.splits == name).any():
            raise ValueError(f"the records have no question in the {name} split: a report needs both")
    return table.subset("calibration"), table.subset("test")


def with_groups(table: RecordTable, groups: np.ndarray) -> RecordTable:
    """The same table with `subjects` replaced (per-category thresholds reuse the per-subject code)."""
    return dataclasses.replace(table, subjects=np.asarray(groups).astype(str), _costs={})


def with_p_ik(table: RecordTable, p_ik: np.ndarray) -> RecordTable:
    """The same table with other P(IK) values (e.g. from an OOD or label-free probe)."""
    return dataclasses.replace(table, p_ik=np.asarray(p_ik, dtype=np.float64),
                               has_hidden=np.isfinite(p_ik).any(axis=1) | table.has_hidden, _costs={})


def _subtable(table: RecordTable, stages: Sequence[int]) -> RecordTable:
    return table.stage_subset(list(stages))


def policy_thresholds(policy: CascadePolicy | SubjectPolicy, table: RecordTable) -> list[dict]:
    """Per stage: on/off, rule and thresholds (a SubjectPolicy shows its default policy).

    `routes_on` says what the stage's decision actually reads: a stage without P(IK) routes on
    P(T) alone whatever its rule, and the last enabled stage answers everything that reaches it.
    """
    base = policy.default if isinstance(policy, SubjectPolicy) else policy
    has_pik = np.isfinite(table.p_ik).all(axis=1)
    last = base.last_enabled
    out = []
    for s, (name, stage) in enumerate(zip(table.names, base.stages)):
        if not stage.enabled:
            routes_on = "off"
        elif s == last:
            routes_on = "answers the rest"
        elif stage.rule == "learned":
            routes_on = "learned"
        elif stage.rule == "pt_only" or not has_pik[s]:
            routes_on = "p_t"
        else:
            routes_on = {"both": "p_t+p_ik", "pik_only": "p_ik"}[stage.rule]
        row = {"stage": name, "enabled": stage.enabled, "rule": stage.rule, "routes_on": routes_on,
               "tau_t": stage.tau_t, "tau_ik": stage.tau_ik}
        if stage.rule == "learned":
            row["tau_learned"] = stage.tau_learned
            if stage.combiner is not None:
                row["combiner_features"] = list(stage.combiner.features)
        out.append(row)
    return out


def policy_dict(policy: CascadePolicy | SubjectPolicy) -> dict:
    kind = "per-group" if isinstance(policy, SubjectPolicy) else "global"
    return {"kind": kind, **policy.to_dict()}


def policy_from_dict(data: dict) -> CascadePolicy | SubjectPolicy:
    """Inverse of `policy_dict`: the report's chosen policy, ready to replay."""
    if data.get("kind") == "per-group":
        return SubjectPolicy.from_dict(data)
    return CascadePolicy.from_dict(data)


# -- one outcome on the test split --------------------------------------------------------------
def outcome(test: RecordTable, result: ReplayResult, unit: str, n_resamples: int, seed: int) -> dict:
    """A policy's test numbers against the table's last stage alone (the reference)."""
    ref_correct = test.correct[-1]
    p, b, c = mcnemar_exact(result.correct, ref_correct)
    reference_cost = test.cost(unit)[-1]
    if reference_cost.sum() > 0:
        reduction = _est(compute_reduction_ci(result.cost_per_question[unit], reference_cost,
                                              n_resamples=n_resamples, seed=seed))
    else:
        reduction = {"value": None, "low": None, "high": None}
    return {
        "n_questions": test.n_questions,
        "accuracy": _est(accuracy_ci(result.correct)),
        "reference": test.names[-1],
        "reference_accuracy": float(ref_correct.mean()),
        "pd": _est(accuracy_difference_ci(result.correct, ref_correct, n_resamples=n_resamples, seed=seed)),
        "mcnemar": {"p_value": p, "cascade_only_right": b, "reference_only_right": c},
        "unit": unit,
        "compute_reduction": reduction,
        "reductions": {u: _num(result.compute_reduction[u]) for u in COST_UNITS},
        "mean_cost": {u: result.mean_cost[u] for u in COST_UNITS},
        "escalation_rate": {n: _num(r) for n, r in zip(test.names, result.escalation_rate)},
        "answer_rate": {n: float(r) for n, r in zip(test.names, result.answer_rate)},
        "reach_rate": {n: float(r) for n, r in zip(test.names, result.reach_rate)},
    }


# -- section: each model alone ------------------------------------------------------------------
def model_section(table: RecordTable) -> list[dict]:
    calib, test = split_tables(table)
    rows = []
    for s, name in enumerate(table.names):
        y = test.correct[s]
        row = {
            "stage": name, "model_id": table.model_ids[s], "recorded": bool(table.recorded[s]),
            "n_test": test.n_questions, "accuracy": _est(accuracy_ci(y)),
            "calibration_accuracy": float(calib.correct[s].mean()),
            "mean_cost": {u: float(test.cost(u)[s].mean()) for u in COST_UNITS},
            "p_t": None, "p_ik": None,
        }
        for signal in ("p_t", "p_ik"):
            values = getattr(test, signal)[s]
            if np.isfinite(values).all():
                row[signal] = {"auroc": auroc(values, y), "ece": expected_calibration_error(np.clip(values, 0, 1), y),
                               "mean": float(values.mean())}
        rows.append(row)
    return rows


# -- section: local cascades (the paper's table) ------------------------------------------------
def _local_indices(table: RecordTable) -> list[int]:
    return [s for s in range(table.n_stages) if not table.recorded[s]]


def choose_and_report(table: RecordTable, stages: Sequence[int], rule: str, unit: str, settings: ReportSettings,
                      target: float | None = None, grouping: np.ndarray | None = None) -> dict:
    """Select a policy on calibration for the sub-cascade `stages`, report it on test."""
    sub = _subtable(table, stages)
    if grouping is not None:
        sub = with_groups(sub, grouping)
    calib, test = split_tables(sub)
    selection = select_policy(calib, target_max_loss=settings.target_max_loss if target is None else target,
                              unit=unit, rule=rule, per_subject=grouping is not None,
                              min_subject_questions=settings.min_group_questions)
    result = evaluate_on(test, selection.policy)
    return {
        "stages": list(sub.names), "rule": rule, "unit": unit,
        "target_max_loss": settings.target_max_loss if target is None else target,
        "policy": policy_dict(selection.policy),
        "thresholds": policy_thresholds(selection.policy, sub),
        "calibration": {"accuracy": selection.calibration.accuracy,
                        "reference_accuracy": selection.reference_accuracy,
                        "compute_reduction": _num(selection.calibration.compute_reduction[unit]),
                        "n_policies": selection.n_policies},
        "test": outcome(test, result, unit, settings.n_resamples, settings.seed),
        "_result": result, "_test": test,
    }


def _strip(entry: dict) -> dict:
    return {k: v for k, v in entry.items() if not k.startswith("_")}


def oracle_saving(test: RecordTable, unit: str, target: float) -> dict:
    """The oracle's accuracy and saving, and its saving at the cascade's own target (reference - target):
    the most any router could save there, the yardstick for "half of the oracle's saving"."""
    o = oracle(test, unit)
    cost, acc = oracle_curve(test, unit, points=None)
    ok = np.flatnonzero(acc >= test.correct[-1].mean() - target - 1e-12)
    reference = test.cost(unit)[-1].mean()
    at_target = compute_reduction(cost[ok[0]], reference) if ok.size else float("nan")
    return {"accuracy": o.accuracy, "compute_reduction": _num(o.compute_reduction[unit]),
            "compute_reduction_at_target": _num(at_target)}


def cascade_section(table: RecordTable, settings: ReportSettings, progress: Progress) -> list[dict]:
    local = _local_indices(table)
    subsets = [list(c) for size in range(2, len(local) + 1) for c in itertools.combinations(local, size)]
    out = []
    for stages in subsets:
        progress(f"cascade {' -> '.join(table.names[s] for s in stages)}")
        entry = choose_and_report(table, stages, "both", settings.unit, settings)
        test = entry["_test"]
        o = oracle_saving(test, settings.unit, settings.target_max_loss)
        saving = entry["test"]["reductions"][settings.unit]
        entry["oracle"] = o
        entry["share_of_oracle_saving"] = (_num(saving / o["compute_reduction_at_target"])
                                           if saving is not None and o["compute_reduction_at_target"] else None)
        entry["best_single_stage"] = _best_single(test, settings)
        out.append(_strip(entry))
    return out


def _best_single(test: RecordTable, settings: ReportSettings) -> dict:
    acc = test.correct.mean(axis=1)
    s = int(np.argmax(acc))
    return {"stage": test.names[s], "accuracy": float(acc[s]),
            "compute_reduction": _num(compute_reduction(test.cost(settings.unit)[s].sum(),
                                                        test.cost(settings.unit)[-1].sum()))}


# -- section: the API scenario ------------------------------------------------------------------
def _api_metrics(test: RecordTable, result: ReplayResult) -> dict:
    """GPT-4 (the last stage) calls, tokens and dollars saved; a question reaches it iff it answers it."""
    last = test.n_stages - 1
    reached = result.final_stage == last
    tokens = test.cost("tokens")[last]
    dollars = test.cost("dollars")[last]
    return {
        "calls_saved": float(1.0 - reached.mean()),
        "tokens_saved": _num(1.0 - tokens[reached].sum() / tokens.sum()) if tokens.sum() > 0 else None,
        "dollars_saved": _num(1.0 - dollars[reached].sum() / dollars.sum()) if dollars.sum() > 0 else None,
        "accuracy_loss": float(test.correct[last].mean() - result.accuracy),
    }


def _groups(table: RecordTable, grouping: str, categories: np.ndarray) -> np.ndarray | None:
    if grouping == "global":
        return None
    if grouping == "category":
        return categories
    if grouping == "subject":
        return table.subjects
    raise ValueError(f"unknown grouping {grouping!r}")


def _cv_variant(calib: RecordTable, rule: str, per_group: bool, target: float, unit: str,
                settings: ReportSettings) -> dict:
    """Cross-validate one variant inside the calibration split: pooled held-out loss and savings."""
    order = np.random.default_rng(settings.seed).permutation(calib.n_questions)
    final = np.empty(calib.n_questions, dtype=np.int64)
    correct = np.empty(calib.n_questions, dtype=bool)
    for part in np.array_split(order, settings.cv_folds):
        train_mask = np.ones(calib.n_questions, dtype=bool)
        train_mask[part] = False
        held_mask = ~train_mask
        selection = select_policy(calib.subset(train_mask), target_max_loss=target, unit=unit, rule=rule,
                                  per_subject=per_group, min_subject_questions=settings.min_group_questions)
        result = evaluate_on(calib.subset(held_mask), selection.policy)
        final[held_mask] = result.final_stage
        correct[held_mask] = result.correct
    last = calib.n_stages - 1
    reached = final == last
    dollars = calib.cost(unit)[last]
    return {"accuracy_loss": float(calib.correct[last].mean() - correct.mean()),
            "calls_saved": float(1.0 - reached.mean()),
            "cost_saved": _num(1.0 - dollars[reached].sum() / dollars.sum()) if dollars.sum() > 0 else None}


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
                progress: Progress) -> dict:
    """One local cascade -> GPT-4 (last stage of `stages`): every variant, and the CV-chosen one."""
    unit = settings.api_unit
    sub = _subtable(table, stages)
    calib_full, test_full = split_tables(sub)
    variants = []
    tried, skipped = _variants(settings, calib_full, categories[sub.splits == "calibration"])
    for rule, grouping, target in tried:
        groups = _groups(sub, grouping, categories)
        table_g = sub if groups is None else with_groups(sub, groups)
        calib, test = split_tables(table_g)
        cv = _cv_variant(calib, rule, groups is not None, target, unit, settings)
        selection = select_policy(calib, target_max_loss=target, unit=unit, rule=rule, per_subject=groups is not None,
                                  min_subject_questions=settings.min_group_questions)
        result = evaluate_on(test, selection.policy)
        variants.append({
            "name": f"{rule}/{grouping}/target {target * 100:g} pt", "rule": rule, "grouping": grouping,
            "calibration_target": target, "cv": cv,
            "policy": policy_dict(selection.policy), "thresholds": policy_thresholds(selection.policy, sub),
            "calibration": {"accuracy": selection.calibration.accuracy,
                            "reference_accuracy": selection.reference_accuracy,
                            **{k: v for k, v in _api_metrics(calib, selection.calibration).items()}},
            "test": {**_api_metrics(test, result),
                     **{k: v for k, v in outcome(test, result, unit, settings.n_resamples, settings.seed).items()
                        if k in ("accuracy", "pd", "mcnemar", "reference_accuracy", "answer_rate", "compute_reduction")}},
        })
    chosen = pick_variant(variants, settings.target_max_loss)
    progress(f"api {' -> '.join(sub.names)}: {len(variants)} variants, chosen {variants[chosen]['name']}")
    best = variants[chosen]
    return {
        "stages": list(sub.names), "unit": unit, "target_max_loss": settings.target_max_loss,
        "gpt4_accuracy": float(test_full.correct[-1].mean()),
        "variants": variants, "skipped_groupings": skipped, "chosen": best["name"],
        "chosen_test": best["test"],
        "target_met_on_test": best["test"]["accuracy_loss"] <= settings.target_max_loss + 1e-12,
        "oracle_calls_saved": float(np.mean(test_full.correct[:-1].any(axis=0) | ~test_full.correct[-1])),
    }


def pick_variant(variants: Sequence[dict], target: float) -> int:
    """The variant with the largest cross-validated saving among those whose CV loss <= target;
    if none holds the target, the one with the smallest CV loss. Calibration numbers only."""
    ok = [i for i, v in enumerate(variants) if v["cv"]["accuracy_loss"] <= target + 1e-12]
    if ok:
        return max(ok, key=lambda i: ((variants[i]["cv"]["cost_saved"] or 0.0), variants[i]["cv"]["calls_saved"], -i))
    return min(range(len(variants)), key=lambda i: (variants[i]["cv"]["accuracy_loss"], i))


def api_section(table: RecordTable, categories: np.ndarray, settings: ReportSettings, progress: Progress) -> list[dict]:
    if not table.recorded[-1]:
        return []
    local = _local_indices(table)
    last = table.n_stages - 1
    cascades = [[s, last] for s in local]
    if len(local) > 1:
        cascades.append(local + [last])
    return [api_cascade(table, stages, categories, settings, progress) for stages in cascades]


# -- section: ablations -------------------------------------------------------------------------
def ablation_section(table: RecordTable, settings: ReportSettings, progress: Progress) -> list[dict]:
    """Rule both / pt_only / pik_only / learned on the full local cascade and the largest local -> GPT-4."""
    local = _local_indices(table)
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
                row["api"] = _api_metrics(entry["_test"], entry["_result"])
            rows.append(row)
        out.append({"stages": [table.names[s] for s in stages], "unit": unit, "rules": rows})
    return out


# -- section: baselines, AIQ and APGR -----------------------------------------------------------
def oracle_curve(test: RecordTable, unit: str, points: int | None = 200) -> tuple[np.ndarray, np.ndarray]:
    """The best accuracy any router reaches at each budget, knowing the answers: start with every
    question at its cheapest stage, then move questions to their cheapest correct stage, cheapest
    move first (each move gains one right answer, so this order is optimal)."""
    cost = test.cost(unit)
    N = test.n_questions
    cols = np.arange(N)
    base = np.argmin(cost, axis=0)
    base_cost = cost[base, cols]
    base_right = test.correct[base, cols]
    cheapest_right = np.where(test.correct, cost, np.inf).min(axis=0)
    movable = ~base_right & np.isfinite(cheapest_right)
    delta = np.sort(cheapest_right[movable] - base_cost[movable])
    c0, a0 = base_cost.sum() / N, base_right.mean()
    cum_cost = c0 + np.concatenate([[0.0], np.cumsum(delta)]) / N
    cum_acc = a0 + np.arange(len(delta) + 1) / N
    if points is None:  # every step
        return cum_cost, cum_acc
    pick = np.unique(np.round(np.linspace(0, len(delta), min(points, len(delta) + 1))).astype(int))
    return cum_cost[pick], cum_acc[pick]


def _curve_metrics(cost: np.ndarray, acc: np.ndarray, weak: tuple[float, float], strong: tuple[float, float]) -> dict:
    """AIQ over [weak cost, strong cost] and APGR of the points in that range with both ends added."""
    cost, acc = np.asarray(cost, dtype=np.float64), np.asarray(acc, dtype=np.float64)
    lo, hi = weak[0], strong[0]
    out = {"aiq": None, "apgr": None, "n_points": int(len(cost))}
    if not hi > lo:
        return out
    all_cost = np.concatenate([cost, [weak[0], strong[0]]])
    all_acc = np.concatenate([acc, [weak[1], strong[1]]])
    out["aiq"] = _num(aiq((all_cost, all_acc), cost_range=(lo, hi)))
    inside = (cost >= lo - 1e-12 * abs(hi)) & (cost <= hi * (1 + 1e-12))
    if strong[1] != weak[1]:
        out["apgr"] = _num(apgr((np.concatenate([[lo], cost[inside], [hi]]),
                                 np.concatenate([[weak[1]], acc[inside], [strong[1]]])), weak, strong))
    return out


def _random_points(test: RecordTable, unit: str, grid: int = 11) -> tuple[np.ndarray, np.ndarray]:
    """(mean cost, accuracy) of random routing over every sub-cascade and a grid of escalation rates."""
    rates = np.linspace(0, 1, grid)
    cost: list[float] = []
    acc: list[float] = []
    S = test.n_stages
    for size in range(1, S + 1):
        for subset in itertools.combinations(range(S), size):
            if any(test.recorded[s] for s in subset[:-1]):
                continue
            enabled = np.zeros(S, dtype=bool)
            enabled[list(subset)] = True
            for combo in itertools.product(rates, repeat=size - 1):
                r = np.zeros(S)
                r[list(subset[:-1])] = combo
                base = random_routing(test, r, enabled=enabled)
                acc.append(base.accuracy)
                cost.append(base.mean_cost[unit])
    return np.array(cost), np.array(acc)


def baseline_entry(table: RecordTable, stages: Sequence[int], rule: str, unit: str, settings: ReportSettings,
                   questions: pd.DataFrame | None, progress: Progress) -> dict:
    sub = _subtable(table, stages)
    calib, test = split_tables(sub)
    progress(f"baselines on {' -> '.join(sub.names)}")
    cost_test = test.cost(unit)
    singles_cost = cost_test.mean(axis=1)
    singles_acc = test.correct.mean(axis=1)
    cheapest = np.flatnonzero(singles_cost == singles_cost.min())
    w = int(cheapest[np.argmax(singles_acc[cheapest])])
    weak = (float(singles_cost[w]), float(singles_acc[w]))
    strong = (float(singles_cost[-1]), float(singles_acc[-1]))
    methods: dict[str, dict] = {}

    # The cascade: the calibration frontier's policies, each replayed on test.
    selection = select_policy(calib, target_max_loss=settings.target_max_loss, unit=unit, rule=rule)
    chosen = replay(test, selection.policy)
    swept = sweep(calib, rule=rule)
    front = swept.frontier(unit)
    results = [replay(test, swept.policy(int(i))) for i in front]
    c_cost = np.array([r.mean_cost[unit] for r in results])
    c_acc = np.array([r.accuracy for r in results])
    methods["cascade"] = {"operating_point": _point(test, chosen, unit),
                          **_curve_metrics(c_cost, c_acc, weak, strong)}

    # Random routing at the chosen policy's escalation rates, and its curve over rate grids.
    rand = random_routing(test, chosen)
    r_cost, r_acc = _random_points(test, unit)
    methods["random"] = {"operating_point": {"accuracy": rand.accuracy, "mean_cost": rand.mean_cost[unit],
                                             "compute_reduction": _num(rand.compute_reduction[unit]),
                                             "pd": float(rand.accuracy - test.correct[-1].mean())},
                         **_curve_metrics(r_cost, r_acc, weak, strong)}

    # The oracle.
    o = oracle(test, unit)
    o_cost, o_acc = oracle_curve(test, unit)
    methods["oracle"] = {"operating_point": {"accuracy": o.accuracy, "mean_cost": o.mean_cost[unit],
                                             "compute_reduction": _num(o.compute_reduction[unit]),
                                             "pd": float(o.accuracy - test.correct[-1].mean())},
                         **_curve_metrics(o_cost, o_acc, weak, strong)}

    # The pre-generation router.
    if questions is not None and settings.pregen:
        from cascade_core import pregen_router as pg

        texts_cal = pg.question_texts(calib.qids, questions)
        texts_test = pg.question_texts(test.qids, questions)
        oof = pg.out_of_fold_proba(texts_cal, calib.correct, folds=settings.probe_folds, seed=settings.seed)
        tau = pg.select_threshold(calib, oof, settings.target_max_loss, unit)
        router = pg.PregenRouter().fit(texts_cal, calib.correct)
        proba = router.predict_proba(texts_test)
        result = pg.evaluate(test, pg.route(proba, tau))
        points = pg.curve(test, proba, pg.candidate_thresholds(oof))
        router_auroc = {n: auroc(proba[s], test.correct[s]) for s, n in enumerate(sub.names) if not sub.recorded[s]}
        methods["pregen_router"] = {"tau": tau, "operating_point": _point(test, result, unit),
                                    "text_auroc": router_auroc,
                                    **_curve_metrics(points[f"cost_{unit}"].to_numpy(), points["accuracy"].to_numpy(),
                                                     weak, strong)}
    return {"stages": list(sub.names), "unit": unit, "rule": rule,
            "weak": {"stage": sub.names[w], "mean_cost": weak[0], "accuracy": weak[1]},
            "strong": {"stage": sub.names[-1], "mean_cost": strong[0], "accuracy": strong[1]},
            "methods": methods}


def _point(test: RecordTable, result: ReplayResult, unit: str) -> dict:
    return {"accuracy": result.accuracy, "mean_cost": result.mean_cost[unit],
            "compute_reduction": _num(result.compute_reduction[unit]),
            "pd": float(result.accuracy - test.correct[-1].mean())}


def baseline_section(table: RecordTable, settings: ReportSettings, questions, api_rule: str | None,
                     progress: Progress) -> list[dict]:
    local = _local_indices(table)
    out = [baseline_entry(table, local, "both", settings.unit, settings, questions, progress)]
    if table.recorded[-1]:
        out.append(baseline_entry(table, local + [table.n_stages - 1], api_rule or "both", settings.api_unit,
                                  settings, questions, progress))
    return out


# -- probes for the OOD and label-free studies ----------------------------------------------------
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
    from cascade_core.probe_training import align_features, train_probe

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


def ood_section(table: RecordTable, features, categories: np.ndarray, settings: ReportSettings,
                progress: Progress) -> dict:
    """For each category C: probes and thresholds fit on the calibration questions of the other
    three, reported on the test questions of C, next to the in-distribution choice on the same questions."""
    local = _local_indices(table)
    setups = [(local, settings.unit)]
    if table.recorded[-1]:
        setups.append(([local[-1], table.n_stages - 1], settings.api_unit))
    cats = [c for c in pd.unique(categories) if c]
    is_cal, is_test = table.splits == "calibration", table.splits == "test"
    rows = []
    for held in cats:
        progress(f"ood: held-out category {held}")
        train_mask = is_cal & (categories != held)
        target_rows = is_test & (categories == held)
        if not target_rows.any() or not train_mask.any():
            continue
        # Stages without features get NaN (route on P(T) alone): their records' probe saw category C.
        p_ik, info = retrain_p_ik(table, features, train_mask, settings, stages=local)
        ood_table = with_p_ik(table, p_ik)
        entry = {"held_out": held, "n_test": int(target_rows.sum()), "n_train": int(train_mask.sum()),
                 "probes": {}, "cascades": []}
        for s in local:
            name = table.names[s]
            y = table.correct[s][target_rows]
            entry["probes"][name] = {
                "ood_auroc": _num(auroc(p_ik[s][target_rows], y)) if name in info else None,
                "in_distribution_auroc": _num(auroc(table.p_ik[s][target_rows], y))
                if np.isfinite(table.p_ik[s][target_rows]).all() else None,
                "p_t_auroc": _num(auroc(table.p_t[s][target_rows], y)),
            }
        for stages, unit in setups:
            ood_sub = _subtable(ood_table, stages)
            id_sub = _subtable(table, stages)
            sel_ood = select_policy(ood_sub.subset(train_mask), target_max_loss=settings.target_max_loss, unit=unit)
            sel_id = select_policy(id_sub.subset("calibration"), target_max_loss=settings.target_max_loss, unit=unit)
            test_ood, test_id = ood_sub.subset(target_rows), id_sub.subset(target_rows)
            r_ood, r_id = evaluate_on(test_ood, sel_ood.policy), evaluate_on(test_id, sel_id.policy)
            entry["cascades"].append({
                "stages": list(ood_sub.names), "unit": unit,
                "reference_accuracy": float(test_ood.correct[-1].mean()),
                "ood": {"accuracy": r_ood.accuracy, "pd": float(r_ood.accuracy - test_ood.correct[-1].mean()),
                        "compute_reduction": _num(r_ood.compute_reduction[unit]),
                        "thresholds": policy_thresholds(sel_ood.policy, ood_sub)},
                "in_distribution": {"accuracy": r_id.accuracy, "pd": float(r_id.accuracy - test_id.correct[-1].mean()),
                                    "compute_reduction": _num(r_id.compute_reduction[unit])},
            })
        rows.append(entry)
    return {"categories": rows}


def label_free_section(table: RecordTable, features, settings: ReportSettings, progress: Progress) -> dict:
    """Probes trained on "agrees with the largest local model's answer" (free from escalated
    traffic) vs gold-label probes, on the same test questions; and the full local cascade with
    each kind of probe (thresholds chosen with gold labels, and fully label-free)."""
    local = _local_indices(table)
    largest = local[-1]
    routed = local[:-1]
    if not routed:
        return {"stages": []}
    progress("label-free probes")
    agree = {s: table.prediction[s] == table.prediction[largest] for s in routed}
    cal = table.splits == "calibration"
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
            "label_free_auroc": _num(auroc(p_free[s][test], y)) if name in info else None,
            "gold_auroc": _num(auroc(gold, y)) if np.isfinite(gold).all() else None,
            "p_t_auroc": _num(auroc(table.p_t[s][test], y)),
            "label_free_auroc_vs_agreement": _num(auroc(p_free[s][test], agree[s][test])) if name in info else None,
        })
    p_ik = table.p_ik.copy()
    for s in routed:
        if table.names[s] in info:
            p_ik[s] = p_free[s]
    free_table = _subtable(with_p_ik(table, p_ik), local)
    gold_table = _subtable(table, local)
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
    return {"largest": table.names[largest], "stages": stages, "probes": info, "cascades": cascades}


def _short(test_outcome: dict) -> dict:
    keep = ("accuracy", "pd", "compute_reduction", "mcnemar", "escalation_rate", "reference_accuracy")
    return {k: test_outcome[k] for k in keep}


# -- the whole report ---------------------------------------------------------------------------
def build_report(
    table: RecordTable,
    questions: pd.DataFrame | None = None,
    features: Mapping[str, tuple[np.ndarray, dict]] | None = None,
    categories: np.ndarray | None = None,
    settings: ReportSettings = ReportSettings(),
    meta: Mapping | None = None,
    progress: Progress | None = None,
) -> dict:
    """Every number of docs/RESULTS.md from the records (see the module docstring).

    `table`: the local stages (smallest first), optionally ending with one recorded stage
    (GPT-4) for the API scenario. `questions` (qid, subject, question, options) feeds the
    pre-generation router; `features` (stage -> (qids, {layer: array}), as bench.load_features
    gives) the OOD and label-free probes; `categories` per question (default: MMLU's, from the
    subjects). Sections whose inputs are missing say so instead of guessing.
    """
    progress = progress or (lambda message: None)
    local = _local_indices(table)
    if not local:
        raise ValueError("the table has no local stage: nothing to cascade")
    if any(table.recorded[s] for s in range(table.n_stages - 1)):
        raise ValueError("a recorded stage can only be the last stage of the table")
    calib, test = split_tables(table)
    if categories is None:
        from cascade_core.datasets import mmlu_category

        categories = np.array([mmlu_category(s) for s in table.subjects], dtype=object).astype(str)
    categories = np.asarray(categories).astype(str)
    if categories.shape != (table.n_questions,):
        raise ValueError(f"categories must have one entry per question ({table.n_questions}), got {categories.shape}")

    report: dict = {
        "format": REPORT_FORMAT,
        "meta": {**dict(meta or {}), "stages": list(table.names), "model_ids": list(table.model_ids),
                 "recorded": [bool(r) for r in table.recorded],
                 "n_questions": {"calibration": calib.n_questions, "test": test.n_questions},
                 "has_p_ik": {n: bool(np.isfinite(table.p_ik[s]).all()) for s, n in enumerate(table.names)},
                 "settings": dataclasses.asdict(settings)},
    }
    progress("models")
    report["models"] = model_section(table)
    report["cascades"] = cascade_section(table, settings, progress)
    report["api"] = api_section(table, categories, settings, progress)
    report["ablations"] = ablation_section(table, settings, progress)
    api_rule = None
    if report["api"]:
        full = report["api"][-1]
        api_rule = next(v["rule"] for v in full["variants"] if v["name"] == full["chosen"])
    report["baselines"] = baseline_section(table, settings, questions, api_rule, progress)
    has_features = features is not None and any(table.names[s] in features for s in local)
    if settings.ood and has_features and len(set(categories) - {""}) >= 2:
        report["ood"] = ood_section(table, features, categories, settings, progress)
    else:
        report["ood"] = {"skipped": "no hidden-state features" if not has_features else "fewer than 2 categories"}
    if settings.label_free and has_features and len(local) >= 2:
        report["label_free"] = label_free_section(table, features, settings, progress)
    else:
        report["label_free"] = {"skipped": "no hidden-state features" if not has_features else "one local stage"}
    return _clean(report)
