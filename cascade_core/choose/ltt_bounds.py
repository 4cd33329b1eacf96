"""Learn-then-Test: thresholds whose accuracy loss (or cost) is guaranteed on new questions.

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
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import betaincinv

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
