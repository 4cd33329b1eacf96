"""Choose a policy on the calibration split; report it on the test split.

The choice searches the whole sweep, sub-cascades with stages switched off and single models
included, so the chosen cascade is never worse on calibration than the best single stage that
meets the same target. Two criteria:

- ``target_max_loss``: the cheapest policy whose accuracy >= accuracy(largest model) - target
  (always feasible: the largest model alone qualifies);
- ``cost_budget``: the most accurate policy whose mean cost per question <= the budget.

With `delta` (guarantee mode) the choice is Learn-then-Test (`cascade_core.choose.ltt`): the target
(or budget) then holds on new questions from the same distribution with probability >= 1 - delta
over the draw of the calibration questions, not just on calibration. Each rule gives every stage
one keep score (P(T); P(IK); min(P(T), P(IK)) for `both`; the fitted score for `learned` and
`loss_aware`), the routed stages of a sub-cascade share one threshold on a grid fixed before the
data, and each sub-cascade's thresholds are tested in order from "keep nothing" to "keep
everything" by fixed-sequence testing; the sub-cascades (in target mode those ending with the
reference, which alone is always a candidate: it loses nothing) share delta by Bonferroni. A fitted score
is fit on a seeded 30% of the calibration questions (`ltt.FIT_SHARE`) and certified on the rest, so the
score never saw the questions that certify it; where the questions have subjects it also reads
their subject prior (`policy.subject_prior`). On equal cost and accuracy the sub-cascade with
fewer stages wins (`ltt._better`): a free stage that keeps nothing is never switched on.
Per-group thresholds give each group delta / G (G groups, the pooled small groups counting as
one): all groups meet the target together with
probability >= 1 - delta, so the overall loss, a weighted mean of the groups' losses, does too.

Never report the calibration numbers as results: `evaluate_on` gives the held-out ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from cascade_core.cost import check_unit
from cascade_core.choose.sweep import SweepResult, sweep
from cascade_core.choose.ltt import Guarantee, guaranteed_policy
from cascade_core.choose.replay import ReplayResult, check_policy, replay, route, summarise
from cascade_core.choose.table_rows import TableRows
from cascade_core.policy import CascadePolicy, LearnedCombiner, LossAwareScore
from cascade_core.records.table import RecordTable

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
    guarantee: Guarantee | None = None  # guarantee mode: how the (default) policy was certified


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


def _choose(table: RecordTable, unit: str, rule: str, targets, budget: float | None,
            n_quantiles: int | None, combiners) -> list[tuple[CascadePolicy, float, float, int]]:
    """One sweep, one pick per target (or the budget's): [(policy, reference, min accuracy, n)]."""
    result = sweep(table, rule=rule, n_quantiles=n_quantiles, include_skips=True, combiners=combiners)
    reference = float(np.count_nonzero(table.correct[-1]) / table.n_questions)
    out = []
    for target in ([None] if budget is not None else targets):
        min_accuracy = None if budget is not None else reference - target
        index = _pick(result, unit, min_accuracy, budget)
        out.append((result.policy(index), reference, (np.nan if min_accuracy is None else min_accuracy), len(result)))
    return out


def select_policy(
    calib_table: RecordTable,
    target_max_loss: float | None = None,
    cost_budget: float | None = None,
    unit: str = "flops",
    rule: str = "both",
    per_subject: bool = False,
    n_quantiles: int | None = None,
    combiners: Sequence[LearnedCombiner | LossAwareScore | None] | None = None,
    min_subject_questions: int = 30,
    delta: float | None = None,
    bound: str = "binomial",
    seed: int = 0,
) -> Selection:
    """Choose thresholds (and which stages to use) on the calibration table.

    Give `target_max_loss` (accuracy points you accept to lose against the largest model, default
    0.01) or `cost_budget` (mean cost per question in `unit`), not both. `per_subject` chooses a
    policy per subject on that subject's questions with the same criterion (so the overall
    target or budget holds too); subjects with fewer than `min_subject_questions` questions share
    one policy chosen on their pooled questions (so the guarantee still holds), and a subject not
    seen in calibration gets the policy chosen on all questions (`SubjectPolicy.default`).

    `delta` (e.g. 0.1) switches to guarantee mode (module docstring): the target or budget then
    holds on new questions with probability >= 1 - delta; `bound` is the p-value of the paired
    loss ("binomial" or "hb", see `cascade_core.choose.ltt`); `seed` splits the calibration questions
    for a fitted score (`learned`, `loss_aware`). Per-subject groups get delta / G each.
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
    if delta is not None and not 0.0 < float(delta) < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    reference = float(np.count_nonzero(calib_table.correct[-1]) / calib_table.n_questions)
    if delta is not None:
        return _select_guaranteed(calib_table, target_max_loss, cost_budget, unit, rule, per_subject, combiners,
                                  min_subject_questions, float(delta), bound, seed, reference)
    return _select_plain(calib_table, [target_max_loss], cost_budget, unit, rule, per_subject, n_quantiles, combiners,
                         min_subject_questions)[0]


def select_policies(calib_table: RecordTable, targets: Sequence[float], unit: str = "flops", rule: str = "both",
                    per_subject: bool = False, n_quantiles: int | None = None, combiners=None,
                    min_subject_questions: int = 30) -> list[Selection]:
    """`select_policy(target_max_loss=t)` for every t in `targets`, sweeping each table (or
    subject) once: the choices are the same, the search is not repeated per target."""
    check_unit(unit)
    for t in targets:
        if not np.isfinite(t) or t < 0:
            raise ValueError(f"target_max_loss must be a number >= 0, got {t}")
    return _select_plain(calib_table, [float(t) for t in targets], None, unit, rule, per_subject, n_quantiles,
                         combiners, min_subject_questions)


def _select_plain(calib_table, targets, cost_budget, unit, rule, per_subject, n_quantiles, combiners,
                  min_subject_questions) -> list[Selection]:
    picks = _choose(calib_table, unit, rule, targets, cost_budget, n_quantiles, combiners)
    K = len(picks)
    subjects: list[dict[str, dict]] = [{} for _ in range(K)]
    chosen: list[CascadePolicy | SubjectPolicy] = [p[0] for p in picks]
    if per_subject:
        by_subject: list[dict[str, CascadePolicy]] = [{} for _ in range(K)]
        small = np.zeros(calib_table.n_questions, dtype=bool)
        shared = combiners or _combiners_of(picks[0][0])
        groups = []
        for subject in np.unique(calib_table.subjects):
            mask = calib_table.subjects == subject
            if mask.sum() < min_subject_questions:
                small |= mask
                continue
            groups.append(([str(subject)], TableRows(calib_table, mask), "own"))
        if small.any():  # the small subjects share one policy chosen on their pooled questions
            pooled = TableRows(calib_table, small)
            groups.append(([str(x) for x in np.unique(pooled.subjects)], pooled, "pooled"))
        for names, sub, kind in groups:
            sub_picks = _choose(sub, unit, rule, targets, cost_budget, n_quantiles, shared)
            for k, (sub_policy, sub_reference, _, count) in enumerate(sub_picks):
                for name in names:
                    by_subject[k][name] = sub_policy
                    subjects[k][name] = {"questions": int((sub.subjects == name).sum()), "policy": kind,
                                         "reference_accuracy": sub_reference, "n_policies": count}
        chosen = [SubjectPolicy(by_subject=by_subject[k], default=picks[k][0]) for k in range(K)]
    return [Selection(policy=chosen[k], calibration=evaluate_on(calib_table, chosen[k]), unit=unit, rule=rule,
                      reference_accuracy=picks[k][1], target_accuracy=float(picks[k][2]),
                      cost_budget=float("nan") if cost_budget is None else float(cost_budget),
                      n_policies=picks[k][3], subjects=subjects[k]) for k in range(K)]


def _select_guaranteed(table: RecordTable, target, budget, unit, rule, per_subject, combiners, min_questions,
                       delta, bound, seed, reference) -> Selection:
    """`select_policy` in guarantee mode; per group: delta / G each (Bonferroni over the groups)."""
    policy, guarantee, n_policies = guaranteed_policy(table, unit, rule, target, budget, delta, combiners, bound,
                                                      seed=seed)
    chosen: CascadePolicy | SubjectPolicy = policy
    subjects: dict[str, dict] = {}
    if per_subject:
        names, counts = np.unique(table.subjects, return_counts=True)
        own = names[counts >= min_questions]
        small = ~np.isin(table.subjects, own)
        G = len(own) + int(small.any())
        by_subject: dict[str, CascadePolicy] = {}
        for subject in own:
            sub = table.subset(table.subjects == subject)
            sub_policy, g, count = guaranteed_policy(sub, unit, rule, target, budget, delta / G, combiners, bound,
                                                     seed=seed)
            by_subject[str(subject)] = sub_policy
            subjects[str(subject)] = {"questions": int(sub.n_questions), "policy": "own", "certified": g.certified,
                                      "reference_accuracy": float(sub.correct[-1].mean()), "n_policies": count}
        if small.any():
            pooled = table.subset(small)
            pooled_policy, g, count = guaranteed_policy(pooled, unit, rule, target, budget, delta / G, combiners, bound,
                                                  seed=seed)
            for subject in np.unique(pooled.subjects):
                by_subject[str(subject)] = pooled_policy
                subjects[str(subject)] = {"questions": int((pooled.subjects == subject).sum()), "policy": "pooled",
                                          "certified": g.certified,
                                          "reference_accuracy": float(pooled.correct[-1].mean()),
                                          "n_policies": count}
        chosen = SubjectPolicy(by_subject=by_subject, default=policy)
    min_accuracy = float("nan") if budget is not None else reference - target
    return Selection(policy=chosen, calibration=evaluate_on(table, chosen), unit=unit, rule=rule,
                     reference_accuracy=reference, target_accuracy=min_accuracy,
                     cost_budget=float("nan") if budget is None else float(budget), n_policies=n_policies,
                     subjects=subjects, guarantee=guarantee)


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
    names, code = np.unique(table.subjects, return_inverse=True)
    groups: dict[CascadePolicy, list[int]] = {}  # the subjects of each distinct policy
    for i, subject in enumerate(names):
        groups.setdefault(policy.for_subject(subject), []).append(i)
    for pol, members in groups.items():  # route each group's questions only
        check_policy(table, pol)
        rows = np.flatnonzero(np.isin(code.ravel(), members))
        f, v = route(TableRows(table, rows), pol)
        final[rows] = f
        visited[:, rows] = v
    return summarise(table, policy, final, visited)
