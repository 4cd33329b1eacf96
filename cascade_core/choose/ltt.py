"""Learn-then-Test: thresholds whose accuracy loss (or cost) is guaranteed on new questions: the
search (`guaranteed_policy`) and the bounds it tests with, in one place.

The promise "at most `target` accuracy lost against the reference, with probability >= 1 - delta
over the draw of the calibration questions" is a multiple-testing problem (Angelopoulos, Bates et
al. 2021, "Learn then Test"): each candidate policy j is a null hypothesis H_j: "its risk on the
distribution exceeds the target"; rejecting H_j certifies j. With a valid p-value per candidate
and a family-wise error control at delta, every certified policy meets the target together with
probability >= 1 - delta, so the cheapest certified one does too.

- Order and FWER: candidates are ordered from safest to cheapest on a grid FIXED before the data
  (threshold values, not quantiles of the calibration scores), and tested by fixed-sequence
  testing (MAPIE's `control_fwer(..., "fixed_sequence")`): test in order at level delta, stop at
  the first candidate not certified. Several sequences (stage subsets) share delta by Bonferroni.
- The paired loss of a question is L = 1[reference right] - 1[cascade right], in {-1, 0, 1}; its
  mean is the accuracy lost. Its p-value here: the union (Bonferroni, delta/2 each) of two exact
  one-sided Clopper-Pearson bounds, an upper bound on P(L = +1) and a lower bound on P(L = -1):
  risk <= UCB(+) - LCB(-). Why not Hoeffding-Bentkus on (L + 1) / 2 in [0, 1] (MAPIE's
  `compute_hoeffding_bentkus_p_value`, also offered as `bound="hb"`): the rescaled loss sits at
  1/2 for most questions, and HB's binomial tail assumes the worst variance at that mean (1/4),
  while the real variance is (P(+) + P(-)) / 4 with both shares a few percent; on 2,850 questions
  HB needs the observed loss several points BELOW zero before it certifies anything. The two
  binomial bounds adapt to the small shares and are exact at any n (valid whatever the
  dependence between the two counts, by the union bound).
- `bound="wsr"`: a betting p-value (Waudby-Smith & Ramdas 2023, "Estimating means of bounded
  random variables by betting"): the questions in a seeded order, the capital
  K_t = prod_{i<=t} (1 + lambda_i (m - x_i)) of x = (L + 1) / 2 against m = (1 + target) / 2, with
  lambda_i predictable (their plug-in: sqrt(2 log(1/level) / (n var_{i-1})), truncated at
  1/2 / (1 - m)); under H0 (mean >= m) K is a nonnegative supermartingale, so by Ville's
  inequality p = 1 / max_t K_t is valid at any n. It adapts to the loss's variance
  (P(+) + P(-)), not to each share separately; it needs the per-question losses, not counts.
- Budget mode: the per-question cost divided by a bound `cost_max` lies in [0, 1]; its p-value is
  MAPIE's Hoeffding-Bentkus one (`binary=True` when the cost is a 0/1 call count).
- The search (`guaranteed_policy`): each rule gives every stage one keep score (`keep_scores`),
  the routed stages of a sub-cascade share one threshold on `threshold_grid`, and
  `threshold_path` counts each threshold's paired losses and cost in one pass; a fitted score is
  fit on FIT_SHARE of the calibration questions and certified on the rest.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
from scipy.special import betaincinv

from cascade_core.choose.sweep import cascade_subsets, fit_keep_scores
from cascade_core.choose.table_rows import TableRows
from cascade_core.policy import SCORED_RULES, CascadePolicy, StagePolicy
from cascade_core.records.table import RecordTable

BOUNDS = ("binomial", "hb", "wsr")


def _cp_upper(k: np.ndarray, n: int, level: np.ndarray) -> np.ndarray:
    """Exact one-sided upper (1 - level) Clopper-Pearson bound on a proportion, k successes of n."""
    k = np.asarray(k, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = betaincinv(k + 1, np.maximum(n - k, 1e-300), 1.0 - level)
    return np.where(k >= n, 1.0, out)


def _cp_lower(k: np.ndarray, n: int, level: np.ndarray) -> np.ndarray:
    k = np.asarray(k, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = betaincinv(np.maximum(k, 1e-300), n - k + 1, level)
    return np.where(k <= 0, 0.0, out)


def paired_loss_upper_bound(n_plus, n_minus, n: int, delta: float) -> np.ndarray:
    """A (1 - delta) upper confidence bound on the mean paired loss: UCB_{delta/2}(P(L=+1)) -
    LCB_{delta/2}(P(L=-1)), from the counts of +1 and -1 losses among n questions."""
    level = np.full(np.shape(n_plus), delta / 2.0)
    return _cp_upper(n_plus, n, level) - _cp_lower(n_minus, n, level)


def paired_loss_pvalues(n_plus, n_minus, n: int, target: float, bound: str = "binomial") -> np.ndarray:
    """Valid p-values of H0 "mean paired loss > target", one per candidate.

    `binomial`: the smallest delta at which `paired_loss_upper_bound` <= target (the bound
    shrinks as delta grows, so the rejection set is [p, 1]); found by bisection on log10(delta).
    `hb`: MAPIE's Hoeffding-Bentkus p-value of the rescaled loss (L + 1) / 2.
    """
    n_plus = np.atleast_1d(np.asarray(n_plus, dtype=np.float64))
    n_minus = np.atleast_1d(np.asarray(n_minus, dtype=np.float64))
    if n < 1:
        raise ValueError("a p-value needs at least one calibration question")
    if bound == "hb":
        from mapie.risk_control.methods import compute_hoeffding_bentkus_p_value

        r_hat = (1.0 + (n_plus - n_minus) / n) / 2.0
        return compute_hoeffding_bentkus_p_value(r_hat, n, (1.0 + target) / 2.0)[:, 0]
    if bound != "binomial":
        raise ValueError(f"unknown bound {bound!r}; bounds: {', '.join(BOUNDS)}")
    pairs, back = np.unique(np.stack([n_plus, n_minus], axis=1), axis=0, return_inverse=True)
    a, b = pairs[:, 0], pairs[:, 1]
    lo = np.full(len(pairs), -8.0)  # log10 delta: 1e-8 ... 1 (smaller p-values print as 1e-8)
    hi = np.zeros(len(pairs))
    ok_at_one = paired_loss_upper_bound(a, b, n, 1.0) <= target
    for _ in range(16):  # p to within 0.03% of its value (a factor 10^(8 / 2^16))
        mid = (lo + hi) / 2.0
        ok = paired_loss_upper_bound(a, b, n, 10.0 ** mid) <= target
        hi = np.where(ok, mid, hi)
        lo = np.where(ok, lo, mid)
    return np.where(ok_at_one, 10.0 ** hi, 1.0)[np.ravel(back)]


def betting_pvalues(losses, target: float, level: float, truncation: float = 0.5,
                    stop_below: float | None = None, block: int = 1024) -> np.ndarray:
    """The `wsr` p-values of H0 "mean paired loss > target", one per row of `losses` (J, n):
    per-question paired losses in {-1, 0, 1}, in an order fixed independently of the outcomes
    (module docstring). `level` only tunes the bets (validity holds for any level).

    The capital is computed over blocks of questions (`block`, doubling), each block's running
    sums carried into the next, so every value is the one a single pass over the whole row
    gives, bit for bit. `stop_below`: a row stops once its p-value is sure to be <= stop_below
    (its capital has passed 1 / stop_below); its value is then an upper bound <= stop_below,
    not the exact p-value: enough for a test at that level (fixed-sequence testing), at a
    fraction of the cost (a safe candidate passes early)."""
    L = np.atleast_2d(np.asarray(losses))
    J, n = L.shape
    if n < 1:
        raise ValueError("a p-value needs at least one calibration question")
    m = (1.0 + target) / 2.0
    # The bets in float32 (any predictable bet keeps the test valid; they need no precision), the
    # capital in float64. x is 0, 1/2 or 1, so its running sum is exact in float32.
    x = (L.astype(np.float32) + 1.0) / 2.0
    scale = np.float32(2.0 * np.log(1.0 / level) / n)
    cap = truncation / (1.0 - m)
    total = np.zeros(J, dtype=np.float32)  # running sums carried from block to block
    spread = np.zeros(J, dtype=np.float32)
    last_var = np.full(J, 0.25, dtype=np.float32)  # the variance up to i - 1 (0.25 before any question)
    capital = np.zeros(J)
    best = np.full(J, -np.inf)  # the largest log capital so far
    stop = np.inf if stop_below is None else float(np.log(1.0 / stop_below)) + 1e-9
    active = np.arange(J)
    start, size = 0, max(1, int(block))
    while start < n and active.size:
        end = min(n, start + size)
        xb = x[active, start:end] if active.size < J else x[:, start:end]
        t = np.arange(start + 2, end + 2, dtype=np.float32)
        mean = (0.5 + (np.cumsum(xb, axis=1) + total[active, None])) / t
        d = (xb - mean) ** 2
        d[:, 0] += spread[active]
        cum = np.cumsum(d, axis=1)
        var = (0.25 + cum) / t
        previous = np.concatenate([last_var[active, None], var[:, :-1]], axis=1)
        lam = np.minimum(np.sqrt(scale / previous), cap)
        gain = np.log1p(lam.astype(np.float64) * (m - xb.astype(np.float64)))
        gain[:, 0] += capital[active]
        log_capital = np.cumsum(gain, axis=1)
        total[active] += xb.sum(axis=1)
        spread[active], last_var[active], capital[active] = cum[:, -1], var[:, -1], log_capital[:, -1]
        best[active] = np.maximum(best[active], log_capital.max(axis=1))
        active = active[best[active] < stop]
        start, size = end, size * 2
    return np.minimum(1.0, np.exp(-np.maximum(best, 0.0)))


def sequence_pvalues(n_plus, n_minus, n: int, target: float, level: float, bound: str = "binomial") -> np.ndarray:
    """`paired_loss_pvalues` for a fixed sequence tested at `level`: exact up to and including the
    first candidate the sequence cannot certify; 1.0 after it (the sequence never tests those, so
    the outcome is the same, at a fraction of the bisection's cost)."""
    n_plus = np.atleast_1d(np.asarray(n_plus))
    n_minus = np.atleast_1d(np.asarray(n_minus))
    if bound == "hb":
        return paired_loss_pvalues(n_plus, n_minus, n, target, bound="hb")
    ok = paired_loss_upper_bound(n_plus, n_minus, n, level) <= target
    stop = int(np.argmin(ok)) if not ok.all() else len(ok) - 1
    out = np.ones(len(ok))
    out[:stop + 1] = paired_loss_pvalues(n_plus[:stop + 1], n_minus[:stop + 1], n, target)
    return out


def cost_pvalues(mean_cost, n: int, budget: float, cost_max: float, binary: bool = False) -> np.ndarray:
    """Valid p-values of H0 "mean cost per question > budget" for costs in [0, cost_max]
    (MAPIE's Hoeffding-Bentkus p-value of cost / cost_max)."""
    from mapie.risk_control.methods import compute_hoeffding_bentkus_p_value

    if not cost_max > 0:
        raise ValueError(f"cost_max must be > 0, got {cost_max}")
    r_hat = np.clip(np.atleast_1d(np.asarray(mean_cost, dtype=np.float64)) / cost_max, 0.0, 1.0)
    alpha = min(max(budget / cost_max, 1e-12), 1.0 - 1e-12)
    return compute_hoeffding_bentkus_p_value(r_hat, n, alpha, binary=binary)[:, 0]


def fixed_sequence(p_values, delta: float) -> int:
    """How many candidates fixed-sequence testing certifies (they are a prefix of the order):
    MAPIE's `control_fwer(p, delta, "fixed_sequence")`."""
    from mapie.risk_control import control_fwer

    p = np.asarray(p_values, dtype=np.float64)
    if p.size == 0:
        return 0
    valid = np.asarray(control_fwer(p, delta, fwer_method="fixed_sequence"))
    if valid.size == 0:
        return 0
    count = int(valid.max()) + 1
    assert count == valid.size, "fixed-sequence rejections must be a prefix"
    return count


@dataclass(frozen=True)
class Guarantee:
    """What a guaranteed choice promises and how it was certified."""

    mode: str  # "loss" (target) or "cost" (budget)
    target: float  # accuracy points (as a share) or the budget per question
    delta: float
    bound: str
    n_calibration: int
    n_sequences: int  # stage subsets / groups sharing delta by Bonferroni
    certified: int  # candidates certified in the chosen sequence
    p_value: float  # the chosen candidate's p-value (NaN for the always-safe reference)

    def to_dict(self) -> dict:
        return {"mode": self.mode, "target": self.target, "delta": self.delta, "bound": self.bound,
                "n_calibration": self.n_calibration, "n_sequences": self.n_sequences,
                "certified": self.certified,
                "p_value": None if not np.isfinite(self.p_value) else float(self.p_value)}

    @classmethod
    def from_dict(cls, data: dict) -> "Guarantee":
        return cls(mode=str(data["mode"]), target=float(data["target"]), delta=float(data["delta"]),
                   bound=str(data["bound"]), n_calibration=int(data["n_calibration"]),
                   n_sequences=int(data["n_sequences"]), certified=int(data["certified"]),
                   p_value=float("nan") if data.get("p_value") is None else float(data["p_value"]))


# -- guarantee mode -----------------------------------------------------------------------------
# A fitted score is fit on FIT_SHARE of the calibration questions and certified on the rest: the
# certification's n is what the bound pays for, so the smaller share (measured on the committed
# records, 1.5B -> GPT-4, 200 re-splits: 0.3 saved more than 0.5 at the same held share).
FIT_SHARE = 0.3
KEEP_NONE = 2.0  # a threshold no keep score reaches (scores lie in [-1, 1])
# The rules the guarantee search chooses among (`calibrated_policy`, `resplit`); `policy.RULES`
# has `pik_only` too, which the sweep still offers.
GUARANTEE_RULES = ("pt_only", "both", "learned", "loss_aware")


def usable_rules(table, rules) -> tuple[str, ...]:
    """`rules` less those that read P(IK) (`both`, `pik_only`) when no routed stage of `table`
    has one: without a probe they would only repeat `pt_only`."""
    has_pik = np.isfinite(table.p_ik[:-1]).any()
    return tuple(r for r in rules if r not in ("both", "pik_only") or has_pik)


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


def threshold_path(table: RecordTable, subset: tuple[int, ...], scores: dict[int, np.ndarray], grid: np.ndarray,
                   unit: str):
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
    `subset` with one shared threshold: what `bound="wsr"` bets on; its row sums are `threshold_path`'s
    n_plus - n_minus. The first routed stage that keeps a question answers it: the stages are
    applied from the last back, each overriding where it keeps."""
    reference = table.correct[-1].astype(np.int8)
    losses = np.broadcast_to(reference - table.correct[subset[-1]].astype(np.int8), (len(grid), table.n_questions))
    for s in reversed(subset[:-1]):
        keep = scores[s][None, :] >= grid[:, None]
        losses = np.where(keep, (reference - table.correct[s].astype(np.int8))[None, :], losses)
    return np.array(losses, dtype=np.int8)


def betting_sequence(table, subset, scores, grid, order, target: float, level: float, exact: bool = True,
                      rows_at_once: int = 32, chunk: int = 8) -> np.ndarray:
    """`betting_pvalues` along the grid up to the first candidate the sequence cannot certify
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
    """`fit_keep_scores` with the subject prior, remembered in `fits` (when given) by the exact
    questions fitted on: studies that redo the same choice (the re-split study with another
    bound) fit each score once."""
    if fits is None or rule not in SCORED_RULES or not isinstance(fit_table, TableRows):
        return fit_keep_scores(fit_table, rule, routed, subject_prior=True)
    rows = fit_table._rows
    key = (id(fit_table._source), rule, tuple(routed), hashlib.blake2b(rows.tobytes(), digest_size=16).digest(),
           rows.dtype.str, len(rows))
    if key not in fits:
        fits[key] = fit_keep_scores(fit_table, rule, routed, subject_prior=True)
    return fits[key]


def guaranteed_policy(table: RecordTable, unit: str, rule: str, target: float | None, budget: float | None,
                delta: float, combiners, bound: str, include_skips: bool = True, seed: int = 0,
                pvalues: bool = True, fits: dict | None = None):
    """(policy, guarantee, n candidates): the Learn-then-Test choice on `table` (module docstring;
    `selection.select_policy` is its front door, per subject included).

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
    subsets = [c for c in cascade_subsets(table, include_skips)
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
        n_plus, n_minus, mean_cost, accuracy, cost = threshold_path(test_table, subset, scores, grid, unit)
        if budget is None:
            if bound == "wsr":
                p = betting_sequence(test_table, subset, scores, grid, order, target, delta / m, exact=pvalues)
                k = fixed_sequence(p, delta / m)
                if not pvalues:  # certified values are bounds only (`betting_sequence`)
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


