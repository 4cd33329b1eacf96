"""Many policies at once: the threshold sweep (its Pareto frontier: `frontier`; the baselines it
is compared with: `baselines`; the router metrics read off it: `router_metrics`).

The sweep evaluates every combination of per-stage quantile thresholds, for the full cascade and
for every sub-cascade with stages switched off, in one batched pass. The trick: for a cascade
whose stages before the last two are fixed (a "prefix" that lets the questions in R through),
the outcome over all thresholds of the second-to-last stage is one matrix product:

    correct count[p, k] = R[p] . (K[k] * y_a + ~K[k] * y_b)
    cost[p, k]          = R[p] . (c_a + ~K[k] * c_b)

with R the (prefix, N) 0/1 matrix of questions that reach stage a, K the (k, N) keep masks of
stage a's candidate thresholds. Counts of 0/1 values are exact in float64; costs equal the replay
up to float summation order. Each candidate's keep mask is computed for all thresholds at once
and equals `policy.keep_mask` (tests/test_frontier.py checks every rule), so every row of the
sweep is a policy that `replay` reproduces.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pandas

from cascade_core.blas import blas_threads as _blas_threads
from cascade_core.choose.frontier import pareto_frontier
from cascade_core.cost import COST_UNITS, check_unit
from cascade_core.policy import (RULES, SCORED_RULES, CascadePolicy, LearnedCombiner, StagePolicy, fit_combiner,
                                 fit_loss_aware)
from cascade_core.records.table import RecordTable

DEFAULT_QUANTILES = {"both": 8, "pt_only": 50, "pik_only": 50, "learned": 50, "loss_aware": 50}
_CHUNK_ROWS = 256
_HELD_LIMIT: list[int | None] = [None]  # the BLAS cap a caller holds for many sweeps (`blas_limit`)


@contextlib.contextmanager
def blas_limit(limit: int | None = 1):
    """Cap BLAS threads once around many sweeps (the report runs thousands): each sweep then
    skips setting and resetting the cap itself, which cost ~20% of the report's time."""
    if limit is None or _HELD_LIMIT[0] == limit:
        yield
        return
    with _blas_threads(limit):
        previous, _HELD_LIMIT[0] = _HELD_LIMIT[0], limit
        try:
            yield
        finally:
            _HELD_LIMIT[0] = previous


# -- candidates ---------------------------------------------------------------------------------
def _quantile_thresholds(values: np.ndarray, n: int) -> np.ndarray:
    """Up to n distinct thresholds taken from the data (quantile levels 0..1, 'lower' method)."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return np.array([0.0])
    return np.unique(np.quantile(finite, np.linspace(0.0, 1.0, n), method="lower"))


@dataclass(frozen=True)
class StageCandidates:
    """The thresholds tried at one stage and the keep mask each gives (one row per candidate)."""

    policies: tuple[StagePolicy, ...]
    keep: np.ndarray  # (c, N) bool

    @functools.cached_property
    def taus(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tau_t, tau_ik, tau_learned) per candidate, read once (every sub-cascade reuses them)."""
        return (np.array([p.tau_t for p in self.policies]), np.array([p.tau_ik for p in self.policies]),
                np.array([p.tau_learned for p in self.policies]))


def stage_candidates(table: RecordTable, stage: int, rule: str = "both", n_quantiles: int | None = None,
                     combiner: LearnedCombiner | None = None) -> StageCandidates:
    """Candidate policies for one stage from quantiles of its signals; duplicate masks dropped.

    `both` tries an n x n grid of (P(T), P(IK)) quantiles; a stage without P(IK) routes on P(T)
    alone and gets n x n quantiles of P(T) instead. Single-signal rules try n quantiles.
    """
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; rules: {', '.join(RULES)}")
    n = DEFAULT_QUANTILES[rule] if n_quantiles is None else int(n_quantiles)
    if n < 1:
        raise ValueError(f"n_quantiles must be >= 1, got {n}")
    p_t, p_ik = table.p_t[stage], table.p_ik[stage]
    has_pik = bool(np.isfinite(p_ik).any())
    # Keep masks for all candidates at once; `test_frontier` checks them against `policy.keep_mask`.
    no_pik = np.isnan(p_ik)
    with np.errstate(invalid="ignore"):
        if rule == "both" and has_pik:
            t, k = _quantile_thresholds(p_t, n), _quantile_thresholds(p_ik, n)
            policies = [dict(tau_t=a, tau_ik=b, rule=rule) for a, b in itertools.product(t, k)]
            by_pt = p_t[None, :] >= t[:, None]
            by_ik = (p_ik[None, :] >= k[:, None]) | no_pik[None, :]
            keep = (by_pt[:, None, :] & by_ik[None, :, :]).reshape(len(t) * len(k), -1)
        elif rule in ("both", "pt_only") or (rule == "pik_only" and not has_pik):
            t = _quantile_thresholds(p_t, n * n if rule == "both" else n)
            policies = [dict(tau_t=a, rule=rule) for a in t]
            keep = p_t[None, :] >= t[:, None]
        elif rule == "pik_only":
            k = _quantile_thresholds(p_ik, n)
            policies = [dict(tau_ik=b, rule=rule) for b in k]
            keep = np.where(no_pik[None, :], (p_t >= 0.0)[None, :], p_ik[None, :] >= k[:, None])
        else:
            if combiner is None:
                raise ValueError(f"rule {rule!r} needs a fitted model for stage {table.names[stage]!r}")
            score = combiner.score(p_t, p_ik, table.margin[stage], table.entropy[stage], table.subjects)
            t = _quantile_thresholds(score, n)
            policies = [dict(tau_learned=a, rule=rule, combiner=combiner) for a in t]
            keep = np.where(np.isnan(score)[None, :], (p_t >= 0.0)[None, :], score[None, :] >= t[:, None])
    if rule == "both" and has_pik:  # a grid of two thresholds: equal masks anywhere
        _, first = np.unique(np.packbits(keep, axis=1), axis=0, return_index=True)
        first = np.sort(first)
    else:  # one threshold, ascending: the masks are nested, so equal ones are neighbours
        first = np.flatnonzero(np.concatenate([[True], (keep[1:] != keep[:-1]).any(axis=1)]))
    # StagePolicy objects only for the distinct masks kept (building all of them cost more than the masks).
    return StageCandidates(policies=tuple(StagePolicy(**policies[i]) for i in first), keep=keep[first])


# The subject prior's per-subject log-odds are in-sample on the fitting questions, so their
# weights need a strong L2 penalty (C = 0.01 against 1.0: 14% vs 8% of GPT-4 calls saved, same records).
SUBJECT_C = 0.01


def fit_keep_scores(table: RecordTable, rule: str, stages, subject_prior: bool = False) -> list:
    """The per-stage combiner fit, one home for the sweep and the guarantee search: the fitted
    keep-score model (`policy.fit_combiner` for `learned`, `policy.fit_loss_aware` for
    `loss_aware`) of each stage in `stages`, None elsewhere and for rules that fit nothing.
    `subject_prior` (the guarantee search) adds the subject prior (`policy.subject_prior`) at
    SUBJECT_C when the questions have subjects; the sweep fits on the signals alone."""
    models = [None] * table.n_stages
    if rule not in SCORED_RULES:
        return models
    subjects = table.subjects if subject_prior and (np.asarray(table.subjects) != "").any() else None
    C = SUBJECT_C if subjects is not None else 1.0
    for s in stages:
        args = (table.p_t[s], table.p_ik[s], table.margin[s], table.entropy[s], table.correct[s])
        models[s] = (fit_combiner(*args, C=C, subjects=subjects) if rule == "learned"
                     else fit_loss_aware(*args, reference_correct=table.correct[-1], C=C, subjects=subjects))
    return models


def cascade_subsets(table: RecordTable, include_skips: bool = True) -> list[tuple[int, ...]]:
    """The stage subsets to sweep: all non-empty ordered subsets (or only the full cascade).

    A recorded stage has no P(T) to route on, so it appears only as the last stage of a subset.
    """
    S = table.n_stages
    if not include_skips:
        return [tuple(range(S))]
    subsets = []
    for size in range(1, S + 1):
        for combo in itertools.combinations(range(S), size):
            if not any(table.recorded[s] for s in combo[:-1]):
                subsets.append(combo)
    return subsets


# -- the sweep ----------------------------------------------------------------------------------
@dataclass
class SweepResult:
    """Every swept policy's outcome. Arrays have one row per policy (P) and one column per stage (S).

    Thresholds are NaN where they do not apply (switched-off stages, the last enabled stage, the
    threshold a rule does not read). `mean_cost[unit]` is the mean cost per question.
    """

    names: tuple[str, ...]
    rule: str
    enabled: np.ndarray
    tau_t: np.ndarray
    tau_ik: np.ndarray
    tau_learned: np.ndarray
    accuracy: np.ndarray
    mean_cost: dict[str, np.ndarray]
    reach_rate: np.ndarray
    escalation_rate: np.ndarray
    n_questions: int
    combiners: tuple[LearnedCombiner | None, ...] = field(default=())

    def __len__(self) -> int:
        return len(self.accuracy)

    def policy(self, index: int) -> CascadePolicy:
        """Swept policy `index` as a CascadePolicy that `replay` reproduces."""
        stages = []
        for s in range(len(self.names)):
            value = lambda a: 0.0 if np.isnan(a[index, s]) else float(a[index, s])  # noqa: E731
            combiner = self.combiners[s] if self.combiners else None
            tau_learned = 0.5 if np.isnan(self.tau_learned[index, s]) else float(self.tau_learned[index, s])
            stages.append(StagePolicy(tau_t=value(self.tau_t), tau_ik=value(self.tau_ik), rule=self.rule,
                                      enabled=bool(self.enabled[index, s]), tau_learned=tau_learned,
                                      combiner=combiner))
        return CascadePolicy(tuple(stages))

    def cost(self, unit: str) -> np.ndarray:
        return self.mean_cost[check_unit(unit)]

    def frontier(self, unit: str = "flops") -> np.ndarray:
        """Indices of the non-dominated policies in (mean cost in `unit`, accuracy), by cost."""
        return pareto_frontier(self.cost(unit), self.accuracy)

    def frame(self) -> pandas.DataFrame:
        """One row per policy: stages used, thresholds, accuracy, mean costs, reach/escalation."""
        data: dict[str, np.ndarray] = {"policy": np.arange(len(self))}
        labels = np.array(self.names, dtype=object)
        data["stages"] = np.array([" -> ".join(labels[row]) for row in self.enabled], dtype=object)
        data["n_enabled"] = self.enabled.sum(axis=1)
        data["accuracy"] = self.accuracy
        for unit in COST_UNITS:
            data[f"cost_{unit}"] = self.mean_cost[unit]
        for s, name in enumerate(self.names):
            data[f"{name}:enabled"] = self.enabled[:, s]
            data[f"{name}:tau_t"] = self.tau_t[:, s]
            data[f"{name}:tau_ik"] = self.tau_ik[:, s]
            if self.rule in SCORED_RULES:
                data[f"{name}:tau_learned"] = self.tau_learned[:, s]
            data[f"{name}:reach"] = self.reach_rate[:, s]
            data[f"{name}:escalation"] = self.escalation_rate[:, s]
        return pandas.DataFrame(data)


def _thresholds(candidates: StageCandidates, rule: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    t, ik, learned = candidates.taus
    nan = np.full(len(t), np.nan)
    if rule == "pt_only":
        return t, nan, nan
    if rule == "pik_only":
        return t, ik, nan
    if rule in SCORED_RULES:
        return t, nan, learned
    return t, ik, nan


def _evaluate_subset(table: RecordTable, subset: tuple[int, ...], candidates: dict[int, StageCandidates],
                     rule: str) -> dict[str, np.ndarray]:
    """All threshold combinations of one sub-cascade (stages `subset` on, the rest off)."""
    S, N = table.n_stages, table.n_questions
    U = len(COST_UNITS)
    costs = table.cost_stack()  # (U, S, N)
    y = table.correct
    m = len(subset)
    if m == 1:
        s = subset[0]
        P = 1
        acc = np.array([np.count_nonzero(y[s]) / N])
        mean_cost = costs[:, s].sum(axis=1)[None, :] / N
        reach = np.zeros((1, S))
        reach[0, s] = 1.0
        choice: list[np.ndarray] = []
    else:
        routed = subset[:-1]
        prefix, (a, b) = subset[:-2], subset[-2:]
        # Prefix: explicit reach masks R (P_pre, N), with what the prefix stages answered and cost.
        R = np.ones((1, N), dtype=bool)
        acc_pre = np.zeros(1)
        cost_pre = np.zeros((1, U))
        reach_pre: list[np.ndarray] = []
        for s in prefix:
            K = candidates[s].keep
            Rf = R.astype(np.float64)
            reach_pre.append(Rf.sum(axis=1))
            acc_pre = (acc_pre[:, None] + Rf @ (K & y[s]).T.astype(np.float64)).ravel()
            cost_pre = (cost_pre + Rf @ costs[:, s].T)[:, None, :].repeat(len(K), axis=1).reshape(-1, U)
            reach_pre = [r.repeat(len(K)) for r in reach_pre]
            R = (R[:, None, :] & ~K[None, :, :]).reshape(-1, N)
        K = candidates[a].keep
        c = len(K)
        # W (N, c * (2 + U)) written block by block into one C-ordered array (the blocks are
        # computed from K transposed once, so no block is transposed or copied again).
        Kt = np.ascontiguousarray(K.T)  # (N, c)
        notK = (~Kt).astype(np.float64)
        W = np.empty((N, c * (2 + U)))
        np.add(Kt & y[a][:, None], notK * y[b][:, None], out=W[:, :c])
        W[:, c:2 * c] = notK
        for u in range(U):
            np.add(costs[u, a][:, None], notK * costs[u, b][:, None], out=W[:, (2 + u) * c:(3 + u) * c])
        P_pre = len(R)
        out = np.empty((P_pre, W.shape[1]))
        reach_a = np.empty(P_pre)
        for start in range(0, P_pre, _CHUNK_ROWS):
            Rf = R[start:start + _CHUNK_ROWS].astype(np.float64)
            out[start:start + _CHUNK_ROWS] = Rf @ W
            reach_a[start:start + _CHUNK_ROWS] = Rf.sum(axis=1)
        out = out.reshape(P_pre, 2 + U, c)
        P = P_pre * c
        acc = (acc_pre[:, None] + out[:, 0]).ravel() / N
        mean_cost = (cost_pre[:, None, :] + out[:, 2:].transpose(0, 2, 1)).reshape(P, U) / N
        reach = np.zeros((P, S))
        for s, r in zip(prefix, reach_pre):
            reach[:, s] = np.repeat(r, c) / N
        reach[:, a] = np.repeat(reach_a, c) / N
        reach[:, b] = out[:, 1].ravel() / N
        # Which candidate each routed stage uses in each policy (row-major over the product).
        sizes = [len(candidates[s].keep) for s in routed]
        choice = list(np.unravel_index(np.arange(P), sizes))
    enabled = np.zeros((P, S), dtype=bool)
    enabled[:, list(subset)] = True
    tau = {k: np.full((P, S), np.nan) for k in ("t", "ik", "learned")}
    for s, pick in zip(subset[:-1], choice):
        t, ik, learned = _thresholds(candidates[s], rule)
        tau["t"][:, s], tau["ik"][:, s], tau["learned"][:, s] = t[pick], ik[pick], learned[pick]
    escalation = np.full((P, S), np.nan)
    for j, s in enumerate(subset):
        nxt = reach[:, subset[j + 1]] if j + 1 < m else np.zeros(P)
        with np.errstate(invalid="ignore", divide="ignore"):
            escalation[:, s] = np.where(reach[:, s] > 0, nxt / np.where(reach[:, s] > 0, reach[:, s], 1), np.nan)
    return {"enabled": enabled, "tau_t": tau["t"], "tau_ik": tau["ik"], "tau_learned": tau["learned"],
            "accuracy": acc, "mean_cost": mean_cost, "reach_rate": reach, "escalation_rate": escalation}


def sweep(
    table: RecordTable,
    rule: str = "both",
    n_quantiles: int | None = None,
    include_skips: bool = True,
    combiners: Sequence[LearnedCombiner | None] | None = None,
    max_policies: int = 500_000,
    blas_threads: int | None = 1,
) -> SweepResult:
    """Evaluate every threshold combination of every (sub-)cascade of `table`.

    Candidates per stage come from quantiles of its own signals (`stage_candidates`); the last
    stage of each sub-cascade always answers. `include_skips` adds every cascade with stages
    switched off, single models included, so a choice over the sweep is never worse than its best
    single stage. For `rule="learned"` without `combiners`, one is fitted per stage on `table`
    itself: sweep the calibration split, never the test split.

    `blas_threads` caps the BLAS threads of the matrix products (None = BLAS default): the
    products are small, and on a machine that is also running models, extra BLAS threads fight
    for the cores (measured: 1.0 s with 2 threads vs 0.19 s with 1 on the busy 2-core machine).
    """
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; rules: {', '.join(RULES)}")
    subsets = cascade_subsets(table, include_skips)
    routed = sorted({s for subset in subsets for s in subset[:-1]})
    if rule in SCORED_RULES:
        if combiners is None:
            combiners = fit_keep_scores(table, rule, routed)
        if len(combiners) != table.n_stages:
            raise ValueError(f"{len(combiners)} combiners for {table.n_stages} stages")
    combiners = tuple(combiners) if combiners is not None else ()
    candidates = {s: stage_candidates(table, s, rule, n_quantiles, combiners[s] if combiners else None) for s in routed}
    total = sum(int(np.prod([len(candidates[s].keep) for s in subset[:-1]])) for subset in subsets)
    if total > max_policies:
        raise ValueError(f"the sweep would evaluate {total} policies (max_policies={max_policies}); "
                         "lower n_quantiles or switch include_skips off")
    with blas_limit(blas_threads):
        parts = [_evaluate_subset(table, subset, candidates, rule) for subset in subsets]
    joined = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    mean_cost = {u: np.ascontiguousarray(joined["mean_cost"][:, k]) for k, u in enumerate(COST_UNITS)}
    return SweepResult(names=table.names, rule=rule, enabled=joined["enabled"], tau_t=joined["tau_t"],
                       tau_ik=joined["tau_ik"], tau_learned=joined["tau_learned"], accuracy=joined["accuracy"],
                       mean_cost=mean_cost, reach_rate=joined["reach_rate"],
                       escalation_rate=joined["escalation_rate"], n_questions=table.n_questions,
                       combiners=combiners)
