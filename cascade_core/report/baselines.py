"""Section 5: random routing, the oracle and the pre-generation router beside the cascade, with AIQ and APGR."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd

from cascade_core.signal_quality import auroc
from cascade_core.choose.baselines import oracle, random_routing
from cascade_core.choose.router_metrics import aiq, apgr
from cascade_core.choose.sweep import sweep
from cascade_core.records.table import RecordTable
from cascade_core.choose.replay import ReplayResult, replay
from cascade_core.formatting import json_number
from cascade_core.report.common import (Part, Progress, ReportSettings, local_indices, subtable, select_policy,
                                        split_tables)


@dataclass
class BaselineBlock(Part):
    stages: list
    unit: str
    rule: str
    weak: dict  # the cheapest stage: stage, mean_cost, accuracy
    strong: dict  # the last stage
    methods: dict  # name -> operating_point, aiq, apgr, n_points (+ the router's tau, text_auroc)


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
    out["aiq"] = json_number(aiq((all_cost, all_acc), cost_range=(lo, hi)))
    inside = (cost >= lo - 1e-12 * abs(hi)) & (cost <= hi * (1 + 1e-12))
    if strong[1] != weak[1]:
        out["apgr"] = json_number(apgr((np.concatenate([[lo], cost[inside], [hi]]),
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


def router_predictions(table: RecordTable, questions: pd.DataFrame, settings: ReportSettings):
    """The text router fit once for every stage of `table`: (out-of-fold P(right) on calibration
    (S, N_cal), P(right) on test (S, N_test)). Its per-stage regressions are independent, so a
    sub-cascade's router is these rows (the report used to fit it again per cascade)."""
    from cascade_core.choose import pregen_router as pg

    calib, test = split_tables(table)
    terms_cal = pg.question_terms(pg.question_texts(calib.qids, questions))  # tokenised once for every fit
    texts_test = pg.question_texts(test.qids, questions)
    oof = pg.out_of_fold_proba(terms_cal, calib.correct, folds=settings.probe_folds, seed=settings.seed)
    proba = pg.PregenRouter().fit(terms_cal, calib.correct).predict_proba(texts_test)
    return oof, proba


def baseline_entry(table: RecordTable, stages: Sequence[int], rule: str, unit: str, settings: ReportSettings,
                   questions: pd.DataFrame | None, progress: Progress, router=None) -> BaselineBlock:
    sub = subtable(table, stages)
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
                                             "compute_reduction": json_number(rand.compute_reduction[unit]),
                                             "pd": float(rand.accuracy - test.correct[-1].mean())},
                         **_curve_metrics(r_cost, r_acc, weak, strong)}

    # The oracle.
    o = oracle(test, unit)
    o_cost, o_acc = oracle_curve(test, unit)
    methods["oracle"] = {"operating_point": {"accuracy": o.accuracy, "mean_cost": o.mean_cost[unit],
                                             "compute_reduction": json_number(o.compute_reduction[unit]),
                                             "pd": float(o.accuracy - test.correct[-1].mean())},
                         **_curve_metrics(o_cost, o_acc, weak, strong)}

    # The pre-generation router.
    if questions is not None and settings.pregen:
        from cascade_core.choose import pregen_router as pg

        oof_all, proba_all = router if router is not None else router_predictions(table, questions, settings)
        oof, proba = oof_all[list(stages)], proba_all[list(stages)]
        tau = pg.select_threshold(calib, oof, settings.target_max_loss, unit)
        result = pg.evaluate(test, pg.route(proba, tau))
        points = pg.curve(test, proba, pg.candidate_thresholds(oof))
        router_auroc = {n: auroc(proba[s], test.correct[s]) for s, n in enumerate(sub.names) if not sub.recorded[s]}
        methods["pregen_router"] = {"tau": tau, "operating_point": _point(test, result, unit),
                                    "text_auroc": router_auroc,
                                    **_curve_metrics(points[f"cost_{unit}"].to_numpy(), points["accuracy"].to_numpy(),
                                                     weak, strong)}
    return BaselineBlock(stages=list(sub.names), unit=unit, rule=rule,
                         weak={"stage": sub.names[w], "mean_cost": weak[0], "accuracy": weak[1]},
                         strong={"stage": sub.names[-1], "mean_cost": strong[0], "accuracy": strong[1]},
                         methods=methods)


def _point(test: RecordTable, result: ReplayResult, unit: str) -> dict:
    return {"accuracy": result.accuracy, "mean_cost": result.mean_cost[unit],
            "compute_reduction": json_number(result.compute_reduction[unit]),
            "pd": float(result.accuracy - test.correct[-1].mean())}


def wants_router(questions, settings: ReportSettings) -> bool:
    return questions is not None and settings.pregen


def baseline_section(table: RecordTable, settings: ReportSettings, questions, api_rule: str | None,
                     progress: Progress, router=None) -> list[BaselineBlock]:
    """`router`: `router_predictions(...)` already computed (else it is computed here when wanted)."""
    local = local_indices(table)
    if router is None and wants_router(questions, settings):
        router = router_predictions(table, questions, settings)
    out = [baseline_entry(table, local, "both", settings.unit, settings, questions, progress, router)]
    if table.recorded[-1]:
        out.append(baseline_entry(table, local + [table.n_stages - 1], api_rule or "both", settings.api_unit,
                                  settings, questions, progress, router))
    return out

