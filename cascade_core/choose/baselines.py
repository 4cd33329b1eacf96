"""The baselines a cascade is compared with: each model alone, random routing at a policy's
escalation rates, and the oracle (the cheapest model that gets each question right).

Each is exact on a record table (random routing in expectation, analytically), so no baseline
needs a sweep or a seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas

from cascade_core.choose.replay import ReplayResult
from cascade_core.cost import COST_UNITS, check_unit, compute_reduction
from cascade_core.policy import CascadePolicy
from cascade_core.records.table import RecordTable


def single_models(table: RecordTable) -> pandas.DataFrame:
    """Each stage alone on every question: accuracy, mean cost per unit, compute reduction."""
    rows = []
    N = table.n_questions
    for s in range(table.n_stages):
        row = {"stage": table.names[s], "model_id": table.model_ids[s],
               "accuracy": np.count_nonzero(table.correct[s]) / N}
        for unit in COST_UNITS:
            row[f"cost_{unit}"] = float(table.cost(unit)[s].sum() / N)
        for unit in COST_UNITS:
            row[f"reduction_{unit}"] = compute_reduction(table.cost(unit)[s].sum(), table.cost(unit)[-1].sum())
        rows.append(row)
    return pandas.DataFrame(rows)


@dataclass(frozen=True)
class BaselineResult:
    """A baseline's accuracy and mean cost per unit (and, for the oracle, who answered what)."""

    name: str
    accuracy: float
    mean_cost: dict[str, float]
    reach_rate: np.ndarray
    compute_reduction: dict[str, float]
    answered_by: np.ndarray | None = None
    correct: np.ndarray | None = None


def _reductions(table: RecordTable, mean_cost: dict[str, float]) -> dict[str, float]:
    return {u: compute_reduction(mean_cost[u], table.cost(u)[-1].mean()) for u in COST_UNITS}


def random_routing(table: RecordTable, rates, enabled: Sequence[bool] | None = None) -> BaselineResult:
    """Expected outcome when each stage escalates a random share of what reaches it.

    `rates` are per-stage escalation rates (conditional on reaching the stage), e.g. a policy's
    `ReplayResult` (its rates and enabled stages are used). A stage that is off, or whose rate
    is NaN, is skipped; the last enabled stage answers everything that reaches it. Because the
    choice ignores the question, the questions a stage answers are a random sample of all, so the
    expectation is analytic: accuracy = sum_s reach_s (1 - r_s) acc_s, cost = sum_s reach_s c_s.
    """
    if isinstance(rates, ReplayResult):
        if enabled is None and isinstance(rates.policy, CascadePolicy):
            enabled = [s.enabled for s in rates.policy.stages]
        rates = rates.escalation_rate
    rates = np.asarray(rates, dtype=np.float64)
    S = table.n_stages
    if rates.shape != (S,):
        raise ValueError(f"rates must have one value per stage ({S}), got shape {rates.shape}")
    on = np.ones(S, dtype=bool) if enabled is None else np.asarray(enabled, dtype=bool)
    on = on & ~np.isnan(rates) if enabled is None else on
    if not on.any():
        raise ValueError("random routing needs at least one enabled stage")
    if np.any((rates[on] < 0) | (rates[on] > 1)):
        raise ValueError("escalation rates must lie in [0, 1]")
    stages = np.flatnonzero(on)
    reach = np.zeros(S)
    remaining, accuracy = 1.0, 0.0
    mean_cost = {u: 0.0 for u in COST_UNITS}
    for j, s in enumerate(stages):
        r = 0.0 if j == len(stages) - 1 else float(np.nan_to_num(rates[s]))
        reach[s] = remaining
        accuracy += remaining * (1 - r) * table.correct[s].mean()
        for u in COST_UNITS:
            mean_cost[u] += remaining * float(table.cost(u)[s].mean())
        remaining *= r
    return BaselineResult("random", float(accuracy), mean_cost, reach, _reductions(table, mean_cost))


def oracle(table: RecordTable, unit: str = "flops") -> BaselineResult:
    """Each question answered by the model that gets it right at the lowest cost (in `unit`) on
    that question; if none does, by the cheapest model. It pays that model's cost ONLY.

    This is the lower bound a router could reach: any cascade that answers a question correctly
    visited at least one model that gets it right and paid at least that model's cost, so no
    policy reaches the oracle's accuracy at a lower cost in `unit`. Ties go to the earlier stage.
    """
    check_unit(unit)
    cost = table.cost(unit)
    N = table.n_questions
    penalised = np.where(table.correct, cost, np.inf)
    any_right = table.correct.any(axis=0)
    pick = np.where(any_right, np.argmin(penalised, axis=0), np.argmin(cost, axis=0))
    columns = np.arange(N)
    correct = table.correct[pick, columns]
    mean_cost = {u: float(table.cost(u)[pick, columns].sum() / N) for u in COST_UNITS}
    reach = np.bincount(pick, minlength=table.n_stages) / N
    return BaselineResult("oracle", float(np.count_nonzero(correct) / N), mean_cost, reach,
                          _reductions(table, mean_cost), answered_by=pick, correct=correct)
