"""Counters for GET /metrics: requests by status, what each stage did, latency percentiles.

Thread-safe (the cascade runs in worker threads, responses are counted on the event loop).
Latencies are kept for the last `window` answered requests, so memory stays bounded.
"""

from __future__ import annotations

import threading
from collections import Counter, defaultdict, deque

import numpy as np

from cascade_core.types import Trace


class Metrics:
    def __init__(self, window: int = 10_000):
        self._lock = threading.Lock()
        self.by_status: Counter[str] = Counter()
        self.by_model: Counter[str] = Counter()
        self.stage: dict[str, Counter[str]] = defaultdict(Counter)
        self.latencies: deque[float] = deque(maxlen=window)

    def response(self, status: int, seconds: float) -> None:
        """One /v1 response left (any status); its latency counts when it was an answer (200)."""
        with self._lock:
            self.by_status[str(status)] += 1
            if status == 200:
                self.latencies.append(seconds)

    def trace(self, model: str, trace: Trace) -> None:
        """What a finished (or failed) cascade run did at each stage it visited."""
        with self._lock:
            self.by_model[model] += 1
            for step in trace.steps:
                counts = self.stage[step.stage]
                counts["visited"] += 1
                counts[step.decision] += 1
            final = trace.answered_by
            if final is not None:
                self.stage[final.stage]["answered"] += 1

    def snapshot(self) -> dict:
        with self._lock:
            latencies = np.asarray(self.latencies, dtype=np.float64)
            stages = {}
            for name, c in self.stage.items():
                visited = c["visited"]
                stages[name] = {
                    "visited": visited, "answered": c["answered"], "kept": c["keep"], "final": c["final"],
                    "escalated": c["escalate"], "errors": c["error"],
                    "escalation_rate": (c["escalate"] + c["error"]) / visited if visited else None,
                    "error_rate": c["error"] / visited if visited else None,
                }
            pct = {}
            for q in (50, 95, 99):
                pct[f"p{q}"] = float(np.percentile(latencies, q)) if latencies.size else None
            return {
                "requests": {"total": int(sum(self.by_status.values())), "by_status": dict(self.by_status),
                             "cascade_runs_by_model": dict(self.by_model)},
                "stages": stages,
                "latency_seconds": {"count": int(latencies.size), **pct,
                                    "mean": float(latencies.mean()) if latencies.size else None},
            }
