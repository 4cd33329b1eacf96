"""Choose a policy on the calibration split; report it on the test split.

The choice searches the whole sweep, sub-cascades with stages switched off and single models
included, so the chosen cascade is never worse on calibration than the best single stage that
meets the same target. Two criteria:

- ``target_max_loss``: the cheapest policy whose accuracy >= accuracy(largest model) - target
  (always feasible: the largest model alone qualifies);
- ``cost_budget``: the most accurate policy whose mean cost per question <= the budget.

Never report the calibration numbers as results: `evaluate_on` gives the held-out ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from cascade_core.cost import check_unit
from cascade_core.frontier import SweepResult, sweep
from cascade_core.policy import CascadePolicy, LearnedCombiner
from cascade_core.records import RecordTable
from cascade_core.replay import ReplayResult, check_policy, replay, route, summarise

_SLACK = 1e-12


@dataclass(frozen=True)
class SubjectPolicy:
    """A policy per subject (chosen on that subject's calibration questions, or on the pooled
    questions of the small subjects) and a default for subjects calibration never saw."""

    by_subject: dict[str, CascadePolicy]
    default: CascadePolicy

    def for_subject(self, subject: str) -> CascadePolicy:
        return self.by_subject.get(str(subject), self.default)

    def to_dict(self) -> dict:
        return {"default": self.default.to_dict(),
                "by_subject": {k: v.to_dict() for k, v in sorted(self.by_subject.items())}}

    @classmethod
    def from_dict(cls, data: dict) -> "SubjectPolicy":
        return cls(by_subject={str(k): CascadePolicy.from_dict(v) for k, v in data.get("by_subject", {}).items()},
                   default=CascadePolicy.from_dict(data["default"]))


@dataclass(frozen=True)
class Selection:
    """The chosen policy and how it did on the calibration split it was chosen on."""

    policy: CascadePolicy | SubjectPolicy
    calibration: ReplayResult
    unit: str
    rule: str
    reference_accuracy: float  # the largest (last) model alone, on calibration
    target_accuracy: float  # NaN in budget mode
    cost_budget: float  # NaN in target mode
    n_policies: int
    subjects: dict[str, dict] = field(default_factory=dict)  # per-subject mode: what each chose


def _pick(result: SweepResult, unit: str, min_accuracy: float | None, budget: float | None) -> int:
    """Sweep index of the choice; ties: cheaper, then more accurate, then fewer stages."""
    cost, acc = result.cost(unit), result.accuracy
    n_enabled = result.enabled.sum(axis=1)
    if budget is not None:
        ok = np.flatnonzero(cost <= budget * (1 + _SLACK) + _SLACK)
        if ok.size == 0:
            raise ValueError(f"no policy costs <= {budget:g} {unit} per question; the cheapest costs {cost.min():g}")
        return int(ok[np.lexsort((ok, n_enabled[ok], cost[ok], -acc[ok]))[0]])
    ok = np.flatnonzero(acc >= min_accuracy - _SLACK)
    if ok.size == 0:  # cannot happen when the sweep includes the largest model alone
        raise ValueError(f"no policy reaches accuracy {min_accuracy:.4f}")
    return int(ok[np.lexsort((ok, n_enabled[ok], -acc[ok], cost[ok]))[0]])


def _choose(table: RecordTable, unit: str, rule: str, target: float | None, budget: float | None,
            n_quantiles: int | None, combiners) -> tuple[CascadePolicy, float, float, int]:
    result = sweep(table, rule=rule, n_quantiles=n_quantiles, include_skips=True, combiners=combiners)
    reference = float(np.count_nonzero(table.correct[-1]) / table.n_questions)
    min_accuracy = None if budget is not None else reference - target
    index = _pick(result, unit, min_accuracy, budget)
    return result.policy(index), reference, (np.nan if min_accuracy is None else min_accuracy), len(result)


def select_policy(
    calib_table: RecordTable,
    target_max_loss: float | None = None,
    cost_budget: float | None = None,
    unit: str = "flops",
    rule: str = "both",
    per_subject: bool = False,
    n_quantiles: int | None = None,
    combiners: Sequence[LearnedCombiner | None] | None = None,
    min_subject_questions: int = 30,
) -> Selection:
    """Choose thresholds (and which stages to use) on the calibration table.

    Give `target_max_loss` (accuracy points you accept to lose against the largest model, default
    0.01) or `cost_budget` (mean cost per question in `unit`), not both. `per_subject` chooses a
    policy per subject on that subject's questions with the same criterion (so the overall
    target or budget holds too); subjects with fewer than `min_subject_questions` questions share
    one policy chosen on their pooled questions (so the guarantee still holds), and a subject not
    seen in calibration gets the policy chosen on all questions (`SubjectPolicy.default`).
    """
    check_unit(unit)
    if target_max_loss is not None and cost_budget is not None:
        raise ValueError("give target_max_loss or cost_budget, not both")
    if cost_budget is None:
        target_max_loss = 0.01 if target_max_loss is None else float(target_max_loss)
        if not np.isfinite(target_max_loss) or target_max_loss < 0:
            raise ValueError(f"target_max_loss must be a number >= 0, got {target_max_loss}")
    elif not np.isfinite(cost_budget) or cost_budget < 0:
        raise ValueError(f"cost_budget must be a number >= 0, got {cost_budget}")
    policy, reference, min_accuracy, n_policies = _choose(
        calib_table, unit, rule, target_max_loss, cost_budget, n_quantiles, combiners)
    subjects: dict[str, dict] = {}
    chosen: CascadePolicy | SubjectPolicy = policy
    if per_subject:
        by_subject: dict[str, CascadePolicy] = {}
        small = np.zeros(calib_table.n_questions, dtype=bool)
        shared = combiners or _combiners_of(policy)
        for subject in np.unique(calib_table.subjects):
            mask = calib_table.subjects == subject
            if mask.sum() < min_subject_questions:
                small |= mask
                continue
            sub = calib_table.subset(mask)
            sub_policy, sub_reference, _, count = _choose(sub, unit, rule, target_max_loss, cost_budget, n_quantiles, shared)
            by_subject[str(subject)] = sub_policy
            subjects[str(subject)] = {"questions": int(mask.sum()), "policy": "own",
                                      "reference_accuracy": sub_reference, "n_policies": count}
        if small.any():  # the small subjects share one policy chosen on their pooled questions
            pooled = calib_table.subset(small)
            pooled_policy, pooled_reference, _, count = _choose(pooled, unit, rule, target_max_loss, cost_budget,
                                                                n_quantiles, shared)
            for subject in np.unique(pooled.subjects):
                by_subject[str(subject)] = pooled_policy
                subjects[str(subject)] = {"questions": int((pooled.subjects == subject).sum()), "policy": "pooled",
                                          "reference_accuracy": pooled_reference, "n_policies": count}
        chosen = SubjectPolicy(by_subject=by_subject, default=policy)
    return Selection(policy=chosen, calibration=evaluate_on(calib_table, chosen), unit=unit, rule=rule,
                     reference_accuracy=reference, target_accuracy=float(min_accuracy),
                     cost_budget=float("nan") if cost_budget is None else float(cost_budget),
                     n_policies=n_policies, subjects=subjects)


def _combiners_of(policy: CascadePolicy):
    """Per-subject sweeps of the learned rule reuse the combiners fitted on all questions."""
    combiners = [s.combiner for s in policy.stages]
    return combiners if any(c is not None for c in combiners) else None


def evaluate_on(table: RecordTable, policy: CascadePolicy | SubjectPolicy) -> ReplayResult:
    """Replay a chosen policy on another table (the test split): the number to report."""
    if isinstance(policy, CascadePolicy):
        return replay(table, policy)
    if not isinstance(policy, SubjectPolicy):
        raise ValueError(f"expected a CascadePolicy or SubjectPolicy, got {type(policy).__name__}")
    final = np.empty(table.n_questions, dtype=np.int64)
    visited = np.zeros((table.n_stages, table.n_questions), dtype=bool)
    groups: dict[CascadePolicy, np.ndarray] = {}
    for subject in np.unique(table.subjects):
        mask = table.subjects == subject
        pol = policy.for_subject(subject)
        groups[pol] = groups[pol] | mask if pol in groups else mask
    for pol, mask in groups.items():
        check_policy(table, pol)
        f, v = route(table, pol)
        final[mask] = f[mask]
        visited[:, mask] = v[:, mask]
    return summarise(table, policy, final, visited)
