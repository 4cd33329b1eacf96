"""Choose a policy on the calibration split; report it on the test split.

The choice searches the whole sweep, sub-cascades with stages switched off and single models
included, so the chosen cascade is never worse on calibration than the best single stage that
meets the same target. Two criteria:

- ``target_max_loss``: the cheapest policy whose accuracy >= accuracy(largest model) - target
  (always feasible: the largest model alone qualifies);
- ``cost_budget``: the most accurate policy whose mean cost per question <= the budget.

With `delta` (guarantee mode) the choice is Learn-then-Test (`cascade_core.choose.ltt_bounds`): the target
(or budget) then holds on new questions from the same distribution with probability >= 1 - delta
over the draw of the calibration questions, not just on calibration. Each rule gives every stage
one keep score (P(T); P(IK); min(P(T), P(IK)) for `both`; the fitted score for `learned` and
`loss_aware`), the routed stages of a sub-cascade share one threshold on a grid fixed before the
data, and each sub-cascade's thresholds are tested in order from "keep nothing" to "keep
everything" by fixed-sequence testing; the sub-cascades (in target mode those ending with the
reference, which alone is always a candidate: it loses nothing) share delta by Bonferroni. A fitted score
is fit on a seeded 30% of the calibration questions (FIT_SHARE) and certified on the rest, so the
score never saw the questions that certify it; where the questions have subjects it also reads
their subject prior (`policy.subject_prior`). On equal cost and accuracy the sub-cascade with
fewer stages wins (`_better`): a free stage that keeps nothing is never switched on. Per-group thresholds give each group delta / G
(G groups, the pooled small groups counting as one): all groups meet the target together with
probability >= 1 - delta, so the overall loss, a weighted mean of the groups' losses, does too.

Never report the calibration numbers as results: `evaluate_on` gives the held-out ones.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from cascade_core.cost import check_unit
from cascade_core.choose.frontier import SweepResult, sweep
from cascade_core.policy import (SCORED_RULES, CascadePolicy, LearnedCombiner, LossAwareScore, StagePolicy,
                                 fit_combiner, fit_loss_aware)
from cascade_core.records.table import RecordTable
from cascade_core.choose.replay import ReplayResult, check_policy, replay, route, summarise
from cascade_core.choose.ltt_bounds import (Guarantee, betting_pvalues, cost_pvalues, fixed_sequence, paired_loss_upper_bound,
                               sequence_pvalues)

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


# -- guarantee mode -----------------------------------------------------------------------------
# A fitted score is fit on FIT_SHARE of the calibration questions and certified on the rest: the
# certification's n is what the bound pays for, so the smaller share (measured on the committed
# records, 1.5B -> GPT-4, 200 re-splits: 0.3 saved more than 0.5 at the same held share).
FIT_SHARE = 0.3
# The subject prior's per-subject log-odds are in-sample on the fitting questions, so their
# weights need a strong L2 penalty (C = 0.01 against 1.0: 14% vs 8% of GPT-4 calls saved, same records).
SUBJECT_C = 0.01
KEEP_NONE = 2.0  # a threshold no keep score reaches (scores lie in [-1, 1])


class TableRows:
    """The arrays the guarantee search and `replay.route` read, for some questions of a table,
    without building a RecordTable (its checks cost more than the search in the re-split study's
    hot loop). `rows`: a bool mask or indices into `table`'s questions."""

    def __init__(self, table, rows=None):
        source = table._source if isinstance(table, TableRows) else table
        base = table._rows if isinstance(table, TableRows) else np.arange(table.n_questions)
        self._source = source
        self._rows = base if rows is None else base[rows]
        self.names, self.recorded, self.n_stages = source.names, source.recorded, source.n_stages
        self.n_questions = len(self._rows)
        self._cache: dict = {}

    def _get(self, name: str) -> np.ndarray:  # sliced on first use: most searches read few arrays
        if name not in self._cache:
            self._cache[name] = getattr(self._source, name)[..., self._rows]
        return self._cache[name]

    # Each sliced once, then a plain attribute (the searches read them in tight loops).
    correct = functools.cached_property(lambda self: self._get("correct"))
    p_t = functools.cached_property(lambda self: self._get("p_t"))
    p_ik = functools.cached_property(lambda self: self._get("p_ik"))
    margin = functools.cached_property(lambda self: self._get("margin"))
    entropy = functools.cached_property(lambda self: self._get("entropy"))
    subjects = functools.cached_property(lambda self: self._get("subjects"))

    def cost(self, unit: str) -> np.ndarray:
        key = f"cost:{unit}"
        if key not in self._cache:
            self._cache[key] = self._source.cost(unit)[:, self._rows]
        return self._cache[key]

    def cost_stack(self) -> np.ndarray:
        if "stack" not in self._cache:
            # Contiguous like a RecordTable's own: the sweep's products then add in the same order,
            # and ties in cost (a free local stage on or off) break the same way.
            self._cache["stack"] = np.ascontiguousarray(self._source.cost_stack()[:, :, self._rows])
        return self._cache["stack"]

    def subset(self, rows) -> "TableRows":
        return TableRows(self, rows)


def threshold_grid(rule: str, steps: int = 200) -> np.ndarray:
    """The thresholds tried, from "keep nothing" down to "keep everything", fixed before the data
    (a data-chosen grid would make the order of the tests depend on the calibration questions)."""
    low = -1.0 if rule == "loss_aware" else 0.0
    return np.concatenate([[KEEP_NONE], np.linspace(1.0, low, steps * (2 if rule == "loss_aware" else 1) + 1)])


def keep_scores(table: RecordTable, stage: int, rule: str, combiner=None) -> np.ndarray:
    """One keep score per question for `rule` at `stage`, such that keep iff score >= tau is what
    `guarantee_stage_policy(rule, tau)` decides (NaN fallbacks of `policy.keep_mask` included)."""
    p_t, p_ik = table.p_t[stage], table.p_ik[stage]
    p_t = np.where(np.isnan(p_t), -np.inf, p_t)  # a NaN P(T) never passes
    if rule == "pt_only":
        return p_t
    if rule == "pik_only":
        return np.where(np.isnan(p_ik), p_t, p_ik)
    if rule == "both":
        return np.where(np.isnan(p_ik), p_t, np.minimum(p_t, p_ik))
    if combiner is None:
        raise ValueError(f"rule {rule!r} needs a fitted model for stage {table.names[stage]!r}")
    score = combiner.score(table.p_t[stage], p_ik, table.margin[stage], table.entropy[stage], table.subjects)
    return np.where(np.isnan(score), p_t, score)


def guarantee_stage_policy(rule: str, tau: float, combiner=None) -> StagePolicy:
    """The stage policy whose keep decision is `keep_scores(...) >= tau`."""
    if rule in SCORED_RULES:
        return StagePolicy(tau_t=tau, tau_learned=tau, rule=rule, combiner=combiner)
    return StagePolicy(tau_t=tau, tau_ik=tau, rule=rule)


def fit_scores(table: RecordTable, rule: str, stages) -> list:
    """Fitted keep-score models per stage (None where the rule fits nothing), with the subject
    prior (`policy.subject_prior`) when the questions have subjects, at SUBJECT_C."""
    models = [None] * table.n_stages
    if rule not in SCORED_RULES:
        return models
    subjects = table.subjects if (np.asarray(table.subjects) != "").any() else None
    C = SUBJECT_C if subjects is not None else 1.0
    for s in stages:
        args = (table.p_t[s], table.p_ik[s], table.margin[s], table.entropy[s], table.correct[s])
        models[s] = (fit_combiner(*args, C=C, subjects=subjects) if rule == "learned"
                     else fit_loss_aware(*args, reference_correct=table.correct[-1], C=C, subjects=subjects))
    return models


def _path(table: RecordTable, subset: tuple[int, ...], scores: dict[int, np.ndarray], grid: np.ndarray, unit: str):
    """Along the grid (one shared threshold for the routed stages of `subset`): counts of paired
    losses +1 / -1 against the last stage, mean cost and accuracy, one value per threshold."""
    N = table.n_questions
    J = len(grid)
    ref = table.correct[-1]
    stage_cost = table.cost(unit)
    if len(subset) == 2:  # one routed stage: sort and cumulative sums, no (J, N) arrays
        a, b = subset
        order = np.argsort(-scores[a], kind="stable")
        kept = np.searchsorted(-scores[a][order], -grid, side="right")  # questions with score >= tau
        ya, yb = table.correct[a][order], table.correct[b][order]
        zero = np.zeros(1)
        cum = lambda x: np.concatenate([zero, np.cumsum(x, dtype=np.float64)])[kept]  # noqa: E731
        rb_plus = (ref & ~table.correct[b]).sum()
        rb_minus = (~ref & table.correct[b]).sum()
        refo = ref[order]
        n_plus = cum(refo & ~ya) + rb_plus - cum(refo & ~yb)
        n_minus = cum(~refo & ya) + rb_minus - cum(~refo & yb)
        right = (cum(ya) + yb.sum() - cum(yb)) / N
        total = stage_cost[a].sum() + stage_cost[b].sum() - cum(stage_cost[b][order])
        cost = stage_cost[a][None, :] + stage_cost[b][None, :]  # the most a question can cost here
        return n_plus.astype(np.int64), n_minus.astype(np.int64), total / N, right, cost
    # Several routed stages: question i ends at routed stage k for the thresholds j in
    # [e_k, min(e_1..e_{k-1})), where e_k is the first grid index with grid <= its score (the
    # grid descends), and at the last stage for j < min(e_1..e_K). Every per-threshold count is
    # then a sum over those intervals: difference arrays and one cumulative sum, O(N S + J).
    routed = subset[:-1]
    plus = np.zeros(J + 1)
    minus = np.zeros(J + 1)
    hits = np.zeros(J + 1)
    paid = np.zeros(J + 1)
    end = np.full(N, J, dtype=np.int64)
    spent = np.zeros(N)

    def add(start, stop, s, cost):
        ok = start < stop
        st, sp = start[ok], stop[ok]
        y = table.correct[s][ok]
        r = ref[ok]
        for arr, w in ((plus, (r & ~y).astype(float)), (minus, (~r & y).astype(float)), (hits, y.astype(float)),
                       (paid, cost[ok])):
            arr += np.bincount(st, weights=w, minlength=J + 1)[:J + 1]
            arr -= np.bincount(sp, weights=w, minlength=J + 1)[:J + 1]

    for s in routed:
        spent = spent + stage_cost[s]
        e = np.searchsorted(-grid, -scores[s], side="left")  # first j with grid[j] <= score
        add(e, end, s, spent)
        end = np.minimum(end, e)
    last = subset[-1]
    add(np.zeros(N, dtype=np.int64), end, last, spent + stage_cost[last])
    n_plus = np.rint(np.cumsum(plus)[:J]).astype(np.int64)
    n_minus = np.rint(np.cumsum(minus)[:J]).astype(np.int64)
    right = np.cumsum(hits)[:J] / N
    mean_cost = np.cumsum(paid)[:J] / N
    most = sum(stage_cost[s] for s in subset)[None, :]
    return n_plus, n_minus, mean_cost, right, most


def paired_losses(table, subset: tuple[int, ...], scores: dict[int, np.ndarray], grid: np.ndarray) -> np.ndarray:
    """(J, N) paired loss per threshold and question (1[reference right] - 1[cascade right]) of
    `subset` with one shared threshold: what `bound="wsr"` bets on; its row sums are `_path`'s
    n_plus - n_minus. The first routed stage that keeps a question answers it: the stages are
    applied from the last back, each overriding where it keeps."""
    reference = table.correct[-1].astype(np.int8)
    losses = np.broadcast_to(reference - table.correct[subset[-1]].astype(np.int8), (len(grid), table.n_questions))
    for s in reversed(subset[:-1]):
        keep = scores[s][None, :] >= grid[:, None]
        losses = np.where(keep, (reference - table.correct[s].astype(np.int8))[None, :], losses)
    return np.array(losses, dtype=np.int8)


def _betting_sequence(table, subset, scores, grid, order, target: float, level: float, exact: bool = True,
                      rows_at_once: int = 32, chunk: int = 8) -> np.ndarray:
    """`risk.betting_pvalues` along the grid up to the first candidate the sequence cannot certify
    at `level` (1.0 after it: never tested, the same outcome).

    Neighbouring thresholds often give the same paired losses (no question's score lies between
    them, or the ones that do are right or wrong at both stages alike): such a candidate shares
    the p-value of the one before it, computed once. The distinct ones are bet on a few at a
    time (`chunk`), so little is computed past the first failure. `exact=False` (fixed-sequence
    testing only needs p <= level) lets a certified candidate stop betting once it passes
    (`stop_below`): its value is then only known to be <= level."""
    ordered = TableRows(table, order)  # the questions in the betting order, once
    ordered_scores = {s: scores[s][order] for s in subset[:-1]}
    p = np.ones(len(grid))
    previous, previous_p = None, 1.0
    for start in range(0, len(grid), rows_at_once):
        losses = paired_losses(ordered, subset, ordered_scores, grid[start:start + rows_at_once])
        new = np.ones(len(losses), dtype=bool)
        new[1:] = (losses[1:] != losses[:-1]).any(axis=1)
        if previous is not None:
            new[0] = not np.array_equal(losses[0], previous)
        distinct = np.flatnonzero(new)
        values = np.empty(len(distinct))
        failed = False
        for c in range(0, len(distinct), chunk):
            part = distinct[c:c + chunk]
            values[c:c + chunk] = betting_pvalues(losses[part], target, level, stop_below=None if exact else level)
            if (values[c:c + chunk] > level).any():
                failed, distinct, values = True, distinct[:c + chunk], values[:c + chunk]
                break
        # Each candidate's value: that of the distinct row it repeats (0: the previous block's last).
        owner = np.cumsum(new)
        known = owner <= len(values)
        p[start:start + len(losses)][known] = np.concatenate([[previous_p], values])[owner[known]]
        if failed:
            break
        previous, previous_p = losses[-1], p[start + len(losses) - 1]
    return p


def _certified_prefix(n_plus, n_minus, n: int, target: float, level: float, chunk: int = 32) -> int:
    """How many candidates fixed-sequence testing at `level` certifies, bounding only up to the
    first failure (in chunks): the same count as `fixed_sequence` on the p-values."""
    for start in range(0, len(n_plus), chunk):
        ok = paired_loss_upper_bound(n_plus[start:start + chunk], n_minus[start:start + chunk], n, level) <= target
        if not ok.all():
            return start + int(np.argmin(ok))
    return len(n_plus)


def _fitted_scores(fit_table, rule: str, routed, fits: dict | None) -> list:
    """`fit_scores`, remembered in `fits` (when given) by the exact questions fitted on: studies
    that redo the same choice (the re-split study with another bound) fit each score once."""
    if fits is None or rule not in SCORED_RULES or not isinstance(fit_table, TableRows):
        return fit_scores(fit_table, rule, routed)
    rows = fit_table._rows
    key = (id(fit_table._source), rule, tuple(routed), hashlib.blake2b(rows.tobytes(), digest_size=16).digest(),
           rows.dtype.str, len(rows))
    if key not in fits:
        fits[key] = fit_scores(fit_table, rule, routed)
    return fits[key]


def _guaranteed(table: RecordTable, unit: str, rule: str, target: float | None, budget: float | None,
                delta: float, combiners, bound: str, include_skips: bool = True, seed: int = 0,
                pvalues: bool = True, fits: dict | None = None):
    """(policy, guarantee, n candidates): the Learn-then-Test choice on `table` (see the module docstring).

    `pvalues=False` skips computing the p-values and certifies the same prefix directly (fixed-
    sequence testing at level a rejects while p_j <= a, i.e. while the (1 - a) bound <= target):
    the re-split study's hot loop; the chosen policy is the same (tests/test_risk.py). `fits`: a
    cache of fitted keep scores (`_fitted_scores`)."""
    S = table.n_stages
    reference_only = CascadePolicy.single(S, S - 1)
    fit_table, test_table = table, table
    if rule in SCORED_RULES and combiners is None:
        half = np.random.default_rng(seed).permutation(table.n_questions) < int(table.n_questions * FIT_SHARE)
        fit_table, test_table = table.subset(half), table.subset(~half)
    # Target mode: sub-cascades that end with the reference (one that does not loses its accuracy
    # wherever nothing is kept, and would only take a share of delta); budget mode: all of them.
    subsets = [c for c in _subsets(table, include_skips)
               if budget is not None or (len(c) >= 2 and c[-1] == S - 1)]
    routed = sorted({s for c in subsets for s in c[:-1]})
    models = list(combiners) if combiners is not None else _fitted_scores(fit_table, rule, routed, fits)
    scores = {s: keep_scores(test_table, s, rule, models[s]) for s in routed}
    grid = threshold_grid(rule)
    n = test_table.n_questions
    m = max(len(subsets), 1)
    best = None  # (objective, policy, certified, p)
    if budget is None:  # the reference alone loses nothing: certified without a test, and may be cheapest
        best = ((float(test_table.cost(unit)[S - 1].mean()), -float(test_table.correct[S - 1].mean()), 1),
                reference_only, 0, float("nan"))
    order = np.random.default_rng(seed + 1).permutation(n) if bound == "wsr" else None
    for subset in subsets:
        n_plus, n_minus, mean_cost, accuracy, cost = _path(test_table, subset, scores, grid, unit)
        if budget is None:
            if bound == "wsr":
                p = _betting_sequence(test_table, subset, scores, grid, order, target, delta / m, exact=pvalues)
                k = fixed_sequence(p, delta / m)
                if not pvalues:  # certified values are bounds only (`_betting_sequence`)
                    p = np.full(len(p), np.nan)
            elif pvalues or bound != "binomial":
                p = sequence_pvalues(n_plus, n_minus, n, target, delta / m, bound=bound)
                k = fixed_sequence(p, delta / m)
            else:
                k = _certified_prefix(n_plus, n_minus, n, target, delta / m)
                p = np.full(len(n_plus), np.nan)
            if k == 0:
                continue
            j = int(np.argmin(mean_cost[:k] + 1e-12 * np.arange(k)))
            objective = (mean_cost[j], -accuracy[j], len(subset))
        else:
            order = np.arange(len(grid))[::-1]  # cheapest (keep everything) first
            cost_max = float(cost.max()) if cost.max() > 0 else 1.0
            binary = bool(np.isin(test_table.cost(unit)[list(subset)], (0.0, 1.0)).all())
            p = cost_pvalues(mean_cost[order], n, budget, cost_max, binary=binary)
            k = fixed_sequence(p, delta / m)
            if k == 0:
                continue
            j = int(order[:k][np.argmax(accuracy[order[:k]])])
            p = p[np.argsort(order)]
            objective = (-accuracy[j], mean_cost[j], len(subset))
        if best is None or _better(objective, best[0]):
            stages = [StagePolicy(enabled=False) for _ in range(S)]
            for s in subset[:-1]:
                stages[s] = guarantee_stage_policy(rule, float(grid[j]), models[s])
            stages[subset[-1]] = StagePolicy()
            best = (objective, CascadePolicy(tuple(stages)), k, float(p[j]))
    mode = "loss" if budget is None else "cost"
    if best is None:
        raise ValueError(f"no policy is certified to cost <= {budget:g} {unit} per question at delta {delta:g}")
    _, policy, k, p = best
    guarantee = Guarantee(mode, float(target if budget is None else budget), delta, bound if budget is None else "hb",
                          n, m, k, p)
    return policy, guarantee, m * len(grid)


def _better(new: tuple, old: tuple) -> bool:
    """Is objective `new` (two figures, then the number of stages) strictly better than `old`?
    The figures compare with a relative tolerance of 1e-9 (a sub-cascade's mean cost is summed
    in another order than its neighbour's): on equal cost and accuracy the fewer stages win, so
    a free stage that keeps nothing is never switched on."""
    for a, b in zip(new[:-1], old[:-1]):
        if abs(a - b) > 1e-9 * max(1.0, abs(a), abs(b)):
            return a < b
    return new[-1] < old[-1]


def _subsets(table: RecordTable, include_skips: bool) -> list[tuple[int, ...]]:
    from cascade_core.choose.frontier import cascade_subsets

    return cascade_subsets(table, include_skips)


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
    loss ("binomial" or "hb", see `cascade_core.choose.ltt_bounds`); `seed` splits the calibration questions
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
    policy, guarantee, n_policies = _guaranteed(table, unit, rule, target, budget, delta, combiners, bound, seed=seed)
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
            sub_policy, g, count = _guaranteed(sub, unit, rule, target, budget, delta / G, combiners, bound, seed=seed)
            by_subject[str(subject)] = sub_policy
            subjects[str(subject)] = {"questions": int(sub.n_questions), "policy": "own", "certified": g.certified,
                                      "reference_accuracy": float(sub.correct[-1].mean()), "n_policies": count}
        if small.any():
            pooled = table.subset(small)
            pooled_policy, g, count = _guaranteed(pooled, unit, rule, target, budget, delta / G, combiners, bound,
                                                  seed=seed)
            for subject in np.unique(pooled.subjects):
                by_subject[str(subject)] = pooled_policy
                subjects[str(subject)] = {"questions": int((pooled.subjects == subject).sum()), "policy": "pooled",
                                          "certified": g.certified, "reference_accuracy": float(pooled.correct[-1].mean()),
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
