"""Does the promise hold on fresh questions? The whole choice redone on many re-splits.

One split into calibration and test says little about a guarantee "with probability >= 1 - delta
over the calibration draw": the re-split study draws R subject-stratified halves (seeded), redoes
the whole choice on each calibration half (the rule by cross-validation inside it, then the
Learn-then-Test thresholds of `selection`), and measures on the other half whether the target
held and what was saved. Reported: the held share, the mean saving and its 5th percentile, for
the cross-validated choice and for each rule alone.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from cascade_core.records.table import RecordTable
from cascade_core.choose.replay import route
from cascade_core.choose.ltt import GUARANTEE_RULES, guaranteed_policy, usable_rules
from cascade_core.choose.table_rows import TableRows


def stratified_halves(subjects: np.ndarray, resplits: int, seed: int = 0) -> np.ndarray:
    """(R, N) bool: True = calibration. Each subject's questions are halved at random (an odd one
    goes to either half with equal chance), so every half covers every subject."""
    subjects = np.asarray(subjects).astype(str)
    _, group = np.unique(subjects, return_inverse=True)
    counts = np.bincount(group)
    rng = np.random.default_rng(seed)
    out = np.empty((resplits, len(subjects)), dtype=bool)
    for r in range(resplits):
        keys = rng.random(len(subjects))
        order = np.lexsort((keys, group))
        start = np.concatenate([[0], np.cumsum(counts)])[group[order]]
        rank = np.empty(len(subjects), dtype=np.int64)
        rank[order] = np.arange(len(subjects)) - start
        half = (counts + rng.integers(0, 2, size=len(counts))) // 2
        out[r] = rank < half[group]
    return out


def loss_and_saving(policy, test: RecordTable, unit: str) -> tuple[float, float]:
    """(accuracy loss against the last stage, saving) of `policy` on `test`."""
    final, visited = route(test, policy)
    right = test.correct[final, np.arange(test.n_questions)]
    loss = float(test.correct[-1].mean() - right.mean())
    last = test.n_stages - 1
    if unit == "calls":
        return loss, float(np.mean(final != last))
    cost = test.cost(unit)
    reference = cost[last].sum()
    paid = (cost * visited).sum()
    return loss, float(1 - paid / reference) if reference > 0 else float("nan")


def choose(calib, rules, target: float, delta: float, cost_unit: str, folds: int, seed: int, unit: str = "calls",
           bound: str = "binomial", fits: dict | None = None):
    """The whole choice on one calibration set: each rule's guaranteed policy, and the rule picked
    by `folds`-fold cross-validation (largest held-out saving in `unit` among rules whose held-out
    loss is within the target; the lowest held-out loss when none is).
    `fits`: a cache of fitted keep scores shared by calls on the same questions (`ltt.guaranteed_policy`).
    Returns (chosen rule, {rule: policy}, {rule: (CV loss, CV saving)})."""
    n = calib.n_questions
    fold = np.random.default_rng(seed).permutation(n) % folds
    cv = {}
    for rule in rules:
        loss = saving = 0.0
        for k in range(folds):
            train, held = calib.subset(fold != k), calib.subset(fold == k)
            policy, _, _ = guaranteed_policy(train, cost_unit, rule, target, None, delta, None, bound, seed=seed + k,
                                       pvalues=False, fits=fits)
            held_loss, held_saving = loss_and_saving(policy, held, unit)
            loss += held_loss * held.n_questions / n
            saving += held_saving * held.n_questions / n
        cv[rule] = (loss, saving)
    ok = [r for r in rules if cv[r][0] <= target + 1e-12]
    chosen = max(ok, key=lambda r: (cv[r][1], -rules.index(r))) if ok else min(rules, key=lambda r: cv[r][0])
    policies = {rule: guaranteed_policy(calib, cost_unit, rule, target, None, delta, None, bound, seed=seed,
                                  pvalues=False, fits=fits)[0] for rule in rules}
    return chosen, policies, cv


@dataclass
class ResplitStudy:
    """Held share and savings over R re-splits, for the CV-chosen rule and each rule alone."""

    stages: list
    unit: str
    target: float
    delta: float
    resplits: int
    folds: int
    chosen: dict  # held_share, saving_mean, saving_p05, loss_mean, rule_counts
    rules: dict = field(default_factory=dict)  # rule -> held_share, saving_mean, saving_p05, loss_mean

    def to_json(self) -> dict:
        return {"stages": self.stages, "unit": self.unit, "target": self.target, "delta": self.delta,
                "resplits": self.resplits, "folds": self.folds, "chosen": self.chosen, "rules": self.rules}


def _summary(loss: np.ndarray, saving: np.ndarray, target: float) -> dict:
    return {"held_share": float(np.mean(loss <= target + 1e-12)), "saving_mean": float(np.mean(saving)),
            "saving_p05": float(np.percentile(saving, 5)), "loss_mean": float(np.mean(loss))}


def coded_subjects(table: RecordTable) -> RecordTable:
    """The same table with each subject name replaced by one character, in the names' sorted order
    ("" stays ""). Every number of the study is the same (a subject prior groups questions by
    subject and never reads the name; the halves are drawn in the same group order), and the
    subject priors' lookups (`np.unique` of the subjects, thousands of times) are ~15x faster
    on one-character strings than on names of up to 35."""
    names, code = np.unique(np.asarray(table.subjects).astype(str), return_inverse=True)
    if len(names) > 20000:  # more subjects than the characters used: keep the names
        return table
    chars = np.array([chr(0x4E00 + i) for i in range(len(names))], dtype=str)
    chars[names == ""] = ""
    return dataclasses.replace(table, subjects=chars[code.ravel()], _costs={})


def resplit_study(table: RecordTable, target: float = 0.01, delta: float = 0.1, resplits: int = 200,
                  rules=GUARANTEE_RULES, unit: str = "calls", cost_unit: str = "dollars", folds: int = 2,
                  seed: int = 0, bound: str = "binomial", fits: dict | None = None) -> ResplitStudy:
    """Redo the guaranteed choice on `resplits` stratified halves of `table` (its committed split
    is ignored) and measure each on the other half. `unit` is what the saving counts ("calls" of
    the last stage, or a cost unit); `cost_unit` what the thresholds minimise. `fits`: a cache
    of fitted keep scores for studies of the same table (e.g. the same re-splits with another
    bound: the fits do not depend on the bound); give it a `coded_subjects` table every time."""
    rules = usable_rules(table, rules)
    if fits is None:
        table = coded_subjects(table)
    halves = stratified_halves(table.subjects, resplits, seed)
    loss = {r: np.empty(resplits) for r in rules}
    saving = {r: np.empty(resplits) for r in rules}
    c_loss, c_saving = np.empty(resplits), np.empty(resplits)
    counts = {r: 0 for r in rules}
    for i, cal in enumerate(halves):
        calib, test = TableRows(table, cal), TableRows(table, ~cal)
        chosen, policies, _ = choose(calib, rules, target, delta, cost_unit, folds, seed + i, unit, bound, fits)
        counts[chosen] += 1
        for rule, policy in policies.items():
            loss[rule][i], saving[rule][i] = loss_and_saving(policy, test, unit)
        c_loss[i], c_saving[i] = loss[chosen][i], saving[chosen][i]
    return ResplitStudy(stages=list(table.names), unit=unit, target=target, delta=delta, resplits=resplits,
                        folds=folds, chosen={**_summary(c_loss, c_saving, target), "rule_counts": counts},
                        rules={r: _summary(loss[r], saving[r], target) for r in rules})
