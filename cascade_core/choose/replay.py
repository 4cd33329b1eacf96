"""Replay: a policy's outcome on cached records, without running a model.

Each question goes through the enabled stages in order and stops at the first that keeps it (the
last enabled stage always answers); it pays every stage it visited. That is what the live runner
does question by question; here it is array operations over the whole table, and it is exact:
the same final stage and, per question, the same cost sum (added in stage order) as the loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cascade_core.cost import COST_UNITS, compute_reduction
from cascade_core.policy import CascadePolicy, keep_mask
from cascade_core.records.table import RecordTable


@dataclass(frozen=True)
class ReplayResult:
    """A policy's outcome on a record table.

    Per question (N,): `final_stage` (index into the table's stages), `correct`, and
    `cost_per_question[unit]`. Per stage (S,): `reach_rate` (share of all questions that reached
    it), `escalation_rate` (share of the questions that reached it that it passed on; NaN for a
    stage no question reached or that is switched off; 0 for the last enabled stage),
    `answer_rate` (share of all questions it answered). `mean_cost`/`total_cost` per unit;
    `compute_reduction[unit]` = 1 - cost / cost of the table's last stage alone.
    """

    policy: CascadePolicy | object
    final_stage: np.ndarray
    correct: np.ndarray
    accuracy: float
    cost_per_question: dict[str, np.ndarray]
    mean_cost: dict[str, float]
    total_cost: dict[str, float]
    reach_rate: np.ndarray
    escalation_rate: np.ndarray
    answer_rate: np.ndarray
    compute_reduction: dict[str, float]

    @property
    def n_questions(self) -> int:
        return len(self.final_stage)


def check_policy(table: RecordTable, policy: CascadePolicy) -> None:
    """A clear error when `policy` does not fit `table` (stage count, recorded stage not last)."""
    if not isinstance(policy, CascadePolicy):
        raise ValueError(f"expected a CascadePolicy, got {type(policy).__name__}")
    if len(policy) != table.n_stages:
        raise ValueError(f"the policy has {len(policy)} stages, the table {table.n_stages} ({list(table.names)})")
    enabled = policy.enabled_indices
    for s in enabled[:-1]:
        if table.recorded[s]:
            raise ValueError(f"stage {table.names[s]!r} is recorded (no probabilities): "
                             "it can only be the last enabled stage")


def stage_keep(table: RecordTable, policy: CascadePolicy, stage: int) -> np.ndarray:
    """Stage `stage`'s keep decisions on every question of the table (policy.keep_mask)."""
    return keep_mask(policy[stage], table.p_t[stage], table.p_ik[stage], table.margin[stage], table.entropy[stage],
                     table.subjects)


def route(table: RecordTable, policy: CascadePolicy) -> tuple[np.ndarray, np.ndarray]:
    """(final stage per question (N,), visited (S, N) bool): where each question went."""
    check_policy(table, policy)
    enabled = np.array(policy.enabled_indices)
    N = table.n_questions
    keep = np.ones((len(enabled), N), dtype=bool)  # the last enabled row stays all-True
    for row, s in enumerate(enabled[:-1]):
        keep[row] = stage_keep(table, policy, int(s))
    position = np.argmax(keep, axis=0)  # first keep among enabled stages
    visited = np.zeros((table.n_stages, N), dtype=bool)
    visited[enabled] = np.arange(len(enabled))[:, None] <= position[None, :]
    return enabled[position], visited


def summarise(table: RecordTable, policy, final_stage: np.ndarray, visited: np.ndarray) -> ReplayResult:
    """Accuracy, costs and rates from where each question went (shared by replay and per-subject)."""
    N, S = table.n_questions, table.n_stages
    columns = np.arange(N)
    correct = table.correct[final_stage, columns]
    stack = table.cost_stack()
    # Add the visited stages' costs one stage at a time, in stage order: a question's cost is then
    # bit-identical to `total += cost` in a loop over the stages it visited.
    summed = np.zeros((len(COST_UNITS), N))
    for s in np.flatnonzero(visited.any(axis=1)):
        np.add(summed, stack[:, s], out=summed, where=visited[s][None, :])
    per_question = {u: summed[k] for k, u in enumerate(COST_UNITS)}
    reached = visited.sum(axis=1)
    answered = np.bincount(final_stage, minlength=S)
    with np.errstate(invalid="ignore", divide="ignore"):
        escalation = np.where(reached > 0, (reached - answered) / np.maximum(reached, 1), np.nan)
    total = {u: float(v.sum()) for u, v in per_question.items()}
    reference = {u: float(stack[k, -1].sum()) for k, u in enumerate(COST_UNITS)}
    return ReplayResult(
        policy=policy, final_stage=final_stage, correct=correct,
        accuracy=float(np.count_nonzero(correct) / N),
        cost_per_question=per_question, mean_cost={u: t / N for u, t in total.items()}, total_cost=total,
        reach_rate=reached / N, escalation_rate=escalation, answer_rate=answered / N,
        compute_reduction={u: compute_reduction(total[u], reference[u]) for u in COST_UNITS},
    )


def replay(table: RecordTable, policy: CascadePolicy) -> ReplayResult:
    """Evaluate `policy` on every question of `table` (see the module docstring)."""
    final_stage, visited = route(table, policy)
    return summarise(table, policy, final_stage, visited)
