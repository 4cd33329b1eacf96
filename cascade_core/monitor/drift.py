"""The drift alarm: keep rates and P(T)/P(IK) against what calibration expected.

**Expectation** (`expectation`): the policy replayed on its calibration records (`replay`) gives,
for every early stage (each enabled stage but the last), the share of the questions reaching it
that it keeps, and the distribution of its P(T) (and P(IK), where it has a probe) over those
questions, as shares of `BINS` bins cut at the calibration's own quantiles.

**Streams**: per question, every early stage it visited adds one 0/1 observation to each of its
streams: "kept", and "P(T) in bin b" for every bin (likewise P(IK)). Under no drift each stream's
rate is what calibration measured, up to the calibration's own sampling error; each stream is
tested against a band, expected +- `tolerance(q, n)` = max(0.02, 3 sqrt(q (1 - q) / n)), n the
calibration questions behind q.

**The test** (stated, sequential): an e-detector per stream, side and bet (Shin, Ramdas & Rinaldo
2024, "E-detectors: a nonparametric framework for sequential change detection"): the CUSUM
statistic M_t = max(M_{t-1}, 1) * (1 + lam (x_t - m)), m the band's edge, lam a fixed bet (a
share `BETS` of the largest that keeps the factor >= 0; minus the factor for the lower side).
Each factor has expectation <= 1 while the rate stays in the band, so each M is bounded by a
Shiryaev-Roberts e-detector, and so is the MEAN of all detectors, with E[SR_t] <= t. The alarm
fires when that mean reaches 1 / alpha: while nothing drifts, the average number of questions
before a false alarm is at least 1 / alpha (the default alpha = 1e-4: 10,000 questions). A
drift moves some stream out of its band and its detectors grow geometrically: the delay is a
few questions for a large shift (docs/BENCHMARKS.md measures it). Unlike a test on all data
since start, a CUSUM forgets a long quiet history: the delay does not grow with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

BINS = 5
BETS = (0.1, 0.3, 0.6, 0.9)
DEFAULT_ALPHA = 1e-4
TOLERANCE_FLOOR = 0.02


def tolerance(q: float, n: int) -> float:
    """The band around an expected rate `q` measured on `n` calibration questions (docstring)."""
    return max(TOLERANCE_FLOOR, 3.0 * math.sqrt(max(q * (1.0 - q), 0.0) / max(int(n), 1)))


def _bins(values: np.ndarray, bins: int) -> tuple[list[float], list[float]]:
    """Inner edges at the quantiles of `values` (ties merged) and each bin's share of them."""
    values = values[np.isfinite(values)]
    if values.size == 0:
        return [], []
    edges = np.unique(np.quantile(values, np.linspace(0, 1, bins + 1)[1:-1]))
    counts = np.bincount(np.searchsorted(edges, values, side="right"), minlength=len(edges) + 1)
    return [float(e) for e in edges], [float(c) / values.size for c in counts]


def bin_of(edges, value: float) -> int | None:
    """The bin of a live signal value (None when it is missing)."""
    if value is None or not math.isfinite(float(value)):
        return None
    return int(np.searchsorted(np.asarray(edges, dtype=np.float64), float(value), side="right"))


def expectation(table, policy, bins: int = BINS) -> dict:
    """What calibration expects of the live streams (module docstring), as plain JSON: per early
    stage its name, questions reaching it, keep rate and signal bins."""
    from cascade_core.choose.replay import replay

    final = replay(table, policy).final_stage
    enabled = [i for i, s in enumerate(policy.stages) if s.enabled]
    stages = []
    for k in enabled[:-1]:
        visited = final >= k
        n = int(visited.sum())
        if n == 0:
            continue
        entry = {"stage": table.names[k], "n": n, "keep_rate": float((final[visited] == k).mean())}
        for signal in ("p_t", "p_ik"):
            edges, shares = _bins(getattr(table, signal)[k, visited], bins)
            if edges or shares:
                entry[signal] = {"edges": edges, "shares": shares}
        stages.append(entry)
    return {"n_calibration": int(table.n_questions), "bins": int(bins), "stages": stages}


class Detector:
    """The e-detectors of one 0/1 stream: both sides of the band, every bet in `BETS`."""

    def __init__(self, expected: float, tol: float):
        self.expected, self.tol = float(expected), float(tol)
        self.n, self.ones, self.recent = 0, 0, 0.0  # recent: exponentially weighted rate (half-life ~35)
        self.high = self.expected + self.tol  # H0 of the upper side: rate <= high
        self.low = self.expected - self.tol  # H0 of the lower side: rate >= low
        self.bets_up = [f / self.high for f in BETS] if self.high < 1.0 else []
        self.bets_down = [f / (1.0 - self.low) for f in BETS] if self.low > 0.0 else []
        self.log_up = [-math.inf] * len(self.bets_up)  # log M of each CUSUM (M = 0 before any observation)
        self.log_down = [-math.inf] * len(self.bets_down)

    @property
    def count(self) -> int:
        return len(self.bets_up) + len(self.bets_down)

    def update(self, x: float) -> None:
        self.n += 1
        self.ones += int(x)
        self.recent = x if self.n == 1 else 0.98 * self.recent + 0.02 * x
        # in logs (a drifted stream's M overflows floats); every factor is >= 1 - max(BETS) > 0
        self.log_up = [max(m, 0.0) + math.log1p(lam * (x - self.high)) for m, lam in zip(self.log_up, self.bets_up)]
        self.log_down = [max(m, 0.0) + math.log1p(-lam * (x - self.low))
                         for m, lam in zip(self.log_down, self.bets_down)]

    def log_total(self) -> float:
        """log of the sum of this stream's detectors."""
        return _logsumexp(self.log_up + self.log_down)

    def direction(self) -> str:
        return "up" if _logsumexp(self.log_up) >= _logsumexp(self.log_down) else "down"


@dataclass
class DriftState:
    """The result of a look: the alarm statistic, whether (and when) it fired, and per stream."""

    statistic: float
    threshold: float
    fired_at: int | None  # questions observed when the alarm first fired
    questions: int
    streams: list = field(default_factory=list)  # dicts: stage, what, expected, band, observed, recent, n, score

    @property
    def alarm(self) -> bool:
        return self.fired_at is not None

    def to_dict(self) -> dict:
        return {"alarm": self.alarm, "statistic": self.statistic, "threshold": self.threshold,
                "fired_at": self.fired_at, "questions": self.questions, "streams": self.streams}


class DriftMonitor:
    """The streams and detectors of one policy's expectation; `observe` one question at a time."""

    def __init__(self, expected: dict, alpha: float = DEFAULT_ALPHA):
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        self.alpha, self.expected = float(alpha), expected
        self.detectors: dict[tuple[str, str], Detector] = {}
        self.meta: dict[tuple[str, str], dict] = {}
        for entry in expected.get("stages", []):
            n = int(entry["n"])
            self._add(entry["stage"], "kept", entry["keep_rate"], n)
            for signal, label in (("p_t", "P(T)"), ("p_ik", "P(IK)")):
                spec = entry.get(signal)
                if not spec:
                    continue
                edges = [-math.inf, *spec["edges"], math.inf]
                for b, share in enumerate(spec["shares"]):
                    self._add(entry["stage"], f"{label} in [{_edge(edges[b])}, {_edge(edges[b + 1])})", share, n)
        self.questions = 0
        self.fired_at: int | None = None
        self.statistic, self.log_statistic = 0.0, -math.inf

    def _add(self, stage: str, what: str, q: float, n: int) -> None:
        det = Detector(q, tolerance(q, n))
        if det.count:
            self.detectors[(stage, what)] = det
            self.meta[(stage, what)] = {"stage": stage, "what": what}

    @property
    def n_detectors(self) -> int:
        return sum(d.count for d in self.detectors.values())

    def observe(self, steps) -> bool:
        """One question: `steps` the stages it visited, dicts with `stage`, `decision`, `p_t`,
        `p_ik`. True when this question fires the alarm (first time only)."""
        self.questions += 1
        by_stage = {e["stage"]: e for e in self.expected.get("stages", [])}
        for step in steps:
            entry = by_stage.get(step.get("stage"))
            if entry is None or step.get("decision") not in ("keep", "escalate"):
                continue
            stage = entry["stage"]
            self._update(stage, "kept", 1.0 if step["decision"] == "keep" else 0.0)
            for signal, label in (("p_t", "P(T)"), ("p_ik", "P(IK)")):
                spec = entry.get(signal)
                b = bin_of(spec["edges"], step.get(signal)) if spec else None
                if b is None:
                    continue
                edges = [-math.inf, *spec["edges"], math.inf]
                for j in range(len(spec["shares"])):
                    self._update(stage, f"{label} in [{_edge(edges[j])}, {_edge(edges[j + 1])})",
                                 1.0 if j == b else 0.0)
        count = self.n_detectors
        self.log_statistic = (_logsumexp([d.log_total() for d in self.detectors.values()]) - math.log(count)
                              if count else -math.inf)
        self.statistic = math.exp(min(self.log_statistic, 700.0))
        if self.fired_at is None and self.log_statistic >= -math.log(self.alpha):
            self.fired_at = self.questions
            return True
        return False

    def _update(self, stage: str, what: str, x: float) -> None:
        det = self.detectors.get((stage, what))
        if det is not None:
            det.update(x)

    def state(self) -> DriftState:
        count = max(self.n_detectors, 1)
        streams = []
        for key, det in self.detectors.items():
            log_score = det.log_total() - math.log(count)
            streams.append({**self.meta[key], "expected": det.expected, "band": [max(det.low, 0.0), min(det.high, 1.0)],
                            "observed": det.ones / det.n if det.n else None,
                            "recent": det.recent if det.n else None, "n": det.n,
                            "log_score": None if log_score == -math.inf else log_score,
                            "direction": det.direction()})
        streams.sort(key=lambda s: math.inf if s["log_score"] is None else -s["log_score"])
        return DriftState(statistic=self.statistic, threshold=1.0 / self.alpha, fired_at=self.fired_at,
                          questions=self.questions, streams=streams)

    def alarm_message(self) -> str:
        """The alarm in words: the stream that drifted most, expected against observed."""
        top = self.state().streams[0] if self.detectors else None
        if top is None:
            return "drift: no expectation to compare with"
        recent = top["recent"] if top["recent"] is not None else float("nan")
        return (f"drift at question {self.fired_at}: {top['stage']} {top['what']} rate {recent:.1%} lately "
                f"(exponentially weighted), calibration expected {top['expected']:.1%} "
                f"(band {top['band'][0]:.1%}-{top['band'][1]:.1%}); statistic {self.statistic:.3g} >= 1/alpha "
                f"= {1.0 / self.alpha:.3g}")  # statistic capped at e^700 for display


def _logsumexp(values) -> float:
    finite = [v for v in values if v != -math.inf]
    if not finite:
        return -math.inf
    top = max(finite)
    return top + math.log(sum(math.exp(v - top) for v in finite))


def _edge(value: float) -> str:
    return "-inf" if value == -math.inf else "inf" if value == math.inf else f"{value:.3g}"
