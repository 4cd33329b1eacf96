"""Counters for GET /metrics: requests by status, what each stage did, latency percentiles.

Thread-safe (the cascade runs in worker threads, responses are counted on the event loop).
Latencies are kept for the last `window` answered requests, so memory stays bounded.
"""

from __future__ import annotations

import threading
import time
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
        self.cancelled: Counter[str] = Counter()
        self.cancelled_tokens = 0
        self.streams = 0

    def response(self, status: int, seconds: float, answer: bool = True) -> None:
        """One /v1 response left (any status); its latency counts when it was an answer: a 200 to
        a completion request (`answer`), not a listing of /v1/models."""
        with self._lock:
            self.by_status[str(status)] += 1
            if status == 200 and answer:
                self.latencies.append(seconds)

    def cancel(self, reason: str, tokens_generated: int) -> None:
        """A request's model work stopped early because it was abandoned (`reason`: "client
        disconnected" or "timeout"), after `tokens_generated` tokens."""
        with self._lock:
            self.cancelled[reason] += 1
            self.cancelled_tokens += int(tokens_generated)

    def stream(self) -> None:
        with self._lock:
            self.streams += 1

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
                "cancelled": {"total": int(sum(self.cancelled.values())), "by_reason": dict(self.cancelled),
                              "tokens_generated": self.cancelled_tokens},
                "streams": self.streams,
                "latency_seconds": {"count": int(latencies.size), **pct,
                                    "mean": float(latencies.mean()) if latencies.size else None},
            }


class StatusCounter:
    """Pure ASGI middleware: counts every /v1 response's status and latency into `metrics`.

    (Pure ASGI rather than @app.middleware: it adds no task of its own, so a client that hangs
    up mid-request cannot leave it waiting.) A streamed answer counts when its last byte is sent.
    """

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope.get("path", "").startswith("/v1/"):
            return await self.app(scope, receive, send)
        started, status = time.monotonic(), [500]

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            self.metrics.response(status[0], time.monotonic() - started, answer=scope.get("method") == "POST")
