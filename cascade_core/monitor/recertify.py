"""Online re-certification: the running policy's label-free loss with an anytime-valid bound.

The promise of a label-free policy file is "the mean disagreement D with the last stage's answer
is at most `target`" (`label_free`). On live traffic `audit` gives D for an unbiased sample: a
seeded coin per question; for a sampled question the cascade escalated to the last stage D = 0,
for a sampled question an earlier stage kept, the stages it skipped run in the background and
D = 1[kept answer not equivalent to the last stage's]. The sample's D_1, D_2, ... (in arrival
order) are i.i.d. draws of the traffic's loss while the traffic does not drift.

The bound is a betting confidence sequence (Waudby-Smith & Ramdas 2023, "Estimating means of
bounded random variables by betting", the hedged capital process with their predictable plug-in
bets for confidence sequences): for every candidate mean m on a grid,

    K+_t(m) = prod_{i<=t} (1 + min(lam_i, c/m) (D_i - m)),
    K-_t(m) = prod_{i<=t} (1 - min(lam_i, c/(1-m)) (D_i - m)),
    lam_i = sqrt(2 log(2/delta) / (var_{i-1} i log(1 + i)))   (predictable: only D_1..D_{i-1}),

are nonnegative martingales when the mean is m, so by Ville's inequality P(sup_t K+-_t(m) >= 2/delta)
<= delta/2. The confidence set at t is every m whose capitals are both below 2/delta at t: with
probability >= 1 - delta the true mean is in it AT EVERY t AT ONCE, so the bound may be
looked at after every question (the Monitor page refreshes every few seconds) without losing
validity. (The running intersection over t would be narrower, but stuck: after a drift it
could exclude the new mean for good; the set at t alone follows it.) (`risk.betting_pvalues` is the
same capital with bets tuned to a sample size fixed in advance, valid for that n only: re-run on a
growing sample it would not be.)

Status, against the policy's target:
- **broken**: the lower bound is above the target (the promise fails, with confidence 1 - delta);
- **holds**: the upper bound is at most the target (re-certified on live traffic);
- **at risk**: neither, and the observed mean is above the target;
- **not yet known**: neither, the observed mean at most the target (or nothing audited yet).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

STATUSES = ("holds", "not yet known", "at risk", "broken")
GRID = 2001  # candidate means 0, 0.0005, ..., 1: bounds are rounded outwards to this grid


class BettingCS:
    """The two-sided betting confidence sequence of a mean in [0, 1] (module docstring), updated
    one observation at a time; `lower`/`upper` are valid simultaneously for all t."""

    def __init__(self, delta: float, truncation: float = 0.5, grid: int = GRID):
        if not 0.0 < delta < 1.0:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        self.delta, self.c = float(delta), float(truncation)
        self.m = np.linspace(0.0, 1.0, grid)
        self._log_plus = np.zeros(grid)
        self._log_minus = np.zeros(grid)
        self._out_low = np.zeros(grid, dtype=bool)  # excluded as too small (K+ at 2/delta or above)
        self._out_high = np.zeros(grid, dtype=bool)  # excluded as too large (K- at 2/delta or above)
        self._threshold = math.log(2.0 / self.delta)
        self.n, self._sum = 0, 0.0
        self._mu, self._var_sum = 0.5, 0.25  # the plug-in's running mean and (1/4 + sum of squares)
        with np.errstate(divide="ignore"):
            self._cap_plus = np.where(self.m > 0, self.c / self.m, np.inf)
            self._cap_minus = np.where(self.m < 1, self.c / (1.0 - self.m), np.inf)

    def update(self, values) -> "BettingCS":
        for x in np.atleast_1d(np.asarray(values, dtype=np.float64)):
            if not 0.0 <= x <= 1.0:
                raise ValueError(f"observations must lie in [0, 1], got {x}")
            t = self.n + 1
            var = self._var_sum / t  # var_{t-1}: (1/4 + sum_{i<t} (x_i - mu_i)^2) / t
            lam = math.sqrt(2.0 * self._threshold / (var * t * math.log1p(t)))
            lp = np.minimum(lam, self._cap_plus)
            lm = np.minimum(lam, self._cap_minus)
            with np.errstate(divide="ignore", invalid="ignore"):
                self._log_plus += np.log(np.maximum(1.0 + lp * (x - self.m), 0.0))
                self._log_minus += np.log(np.maximum(1.0 - lm * (x - self.m), 0.0))
            self._out_low = self._log_plus >= self._threshold
            self._out_high = self._log_minus >= self._threshold
            self.n, self._sum = t, self._sum + x
            self._var_sum += (x - self._mu) ** 2
            self._mu = (0.5 + self._sum) / (t + 1)
        return self

    @property
    def mean(self) -> float:
        return self._sum / self.n if self.n else float("nan")

    def _inside(self) -> np.ndarray:
        return ~(self._out_low | self._out_high)

    @property
    def lower(self) -> float:
        """The largest grid value below every mean still in the set (0 when none is excluded)."""
        inside = np.flatnonzero(self._inside())
        if inside.size == 0:
            return float("nan")
        return float(self.m[max(int(inside[0]) - 1, 0)])

    @property
    def upper(self) -> float:
        inside = np.flatnonzero(self._inside())
        if inside.size == 0:
            return float("nan")
        return float(self.m[min(int(inside[-1]) + 1, len(self.m) - 1)])


@dataclass(frozen=True)
class Certification:
    """The re-certification at one look: status and the numbers behind it."""

    status: str
    target: float | None
    delta: float
    n_audited: int  # sampled questions whose loss is known, in arrival order
    loss_mean: float | None  # observed mean label-free loss of the sample
    lower: float | None  # the confidence sequence's bounds at level 1 - delta
    upper: float | None
    message: str

    def to_dict(self) -> dict:
        return asdict(self)


def status_of(n: int, mean: float, lower: float, upper: float, target: float | None) -> str:
    """The status rule of the module docstring (`target` None: a policy without a loss promise)."""
    if target is None:
        return "no target"
    if n == 0:
        return "not yet known"
    if math.isfinite(lower) and lower > target:
        return "broken"
    if math.isfinite(upper) and upper <= target:
        return "holds"
    if mean > target or not (math.isfinite(lower) and math.isfinite(upper)):
        return "at risk"
    return "not yet known"


def certification(cs: BettingCS, target: float | None) -> Certification:
    """The status and numbers of `cs` against `target` (a share, e.g. 0.01 for 1 point)."""
    n = cs.n
    mean = cs.mean if n else float("nan")
    lower, upper = (cs.lower, cs.upper) if n else (0.0, 1.0)
    status = status_of(n, mean, lower, upper, target)
    pct = lambda v: "n/a" if v is None or not math.isfinite(v) else f"{100 * v:.2f} pt"  # noqa: E731
    what = (f"label-free loss {pct(mean)} on {n:,} audited question(s); {100 * (1 - cs.delta):g}% anytime bound "
            f"[{pct(lower)}, {pct(upper)}]")
    if target is not None:
        what += f" against the target {pct(target)}"
    finite = lambda v: float(v) if v is not None and math.isfinite(v) else None  # noqa: E731
    return Certification(status=status, target=target, delta=cs.delta, n_audited=n, loss_mean=finite(mean),
                         lower=finite(lower), upper=finite(upper), message=f"{status}: {what}")


def certify(losses, target: float | None, delta: float) -> Certification:
    """The re-certification of a whole loss sequence (values in [0, 1], arrival order)."""
    return certification(BettingCS(delta).update(np.asarray(losses, dtype=np.float64)), target)
