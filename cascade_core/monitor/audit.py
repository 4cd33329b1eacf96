"""The audit share: a seeded sample of the traffic whose label-free loss is known.

A coin with probability `share` (default 2%) is flipped for every question the running policy
routes, from a generator seeded once (`AuditSampler`): which questions are sampled depends on
the seed and the arrival order, never on the question or on what the cascade did with it, so
the sample is an unbiased draw of the traffic. For a sampled question:

- the cascade escalated to its last stage: its loss is 0 and nothing more runs ("free");
- an earlier stage kept its answer: the stages it skipped (each alone, the last one included)
  run in a background thread AFTER the client has its answer (the server starts the job from
  the response's background task), and the loss is 1 when the kept answer is not equivalent to
  the last stage's by the dataset's grader (`label_free.disagreement_loss`). Running the
  intermediate stages too gives the audited question a full record, which
  `calibrate --from-traces` needs. What an audit costs (FLOPs, dollars, seconds) is counted in
  its own columns, never in the cascade's cost.

Audits run one at a time; at most `max_pending` wait. A job arriving at a full backlog is
recorded as "skipped" (it depends on the load, not on the question, so the sample stays
unbiased, only smaller).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from cascade_core.graders import Grader
from cascade_core.choose.label_free import disagreement_loss
from cascade_core.monitor.trace_store import text_hash

log = logging.getLogger(__name__)
DEFAULT_SHARE = 0.02


class AuditSampler:
    """The seeded coin (module docstring): the i-th call draws the i-th number of one generator."""

    def __init__(self, share: float = DEFAULT_SHARE, seed: int = 0):
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"the audit share must be in [0, 1], got {share}")
        self.share, self.seed = float(share), int(seed)
        self._rng = np.random.default_rng(self.seed)
        self._lock = threading.Lock()

    def draw(self) -> bool:
        with self._lock:
            return bool(self._rng.random() < self.share)


def answer_key(grader: Grader, answer) -> str | None:
    """What the trace store keeps of an answer: a hash of the grader's key (equal hashes =
    equivalent answers, `graders`); None for a missing answer."""
    if answer is None:
        return None
    return text_hash(repr(grader.key(answer)))


def step_record(step, grader: Grader) -> dict:
    """One stage's row as the monitor stores it (the answer text is dropped by the store unless
    texts are kept)."""
    nan = lambda v: None if v is None or (isinstance(v, float) and not np.isfinite(v)) else float(v)  # noqa: E731
    return {"stage": step.stage, "model_id": step.model_id, "decision": step.decision,
            "key": answer_key(grader, step.answer) if step.error is None else None,
            "index": step.answer_index, "answer": step.answer, "p_t": nan(step.p_t), "p_ik": nan(step.p_ik),
            "margin": nan(step.margin), "entropy": nan(step.entropy), "flops": float(step.flops),
            "dollars": float(step.dollars), "seconds": float(step.seconds), "prompt_tokens": int(step.prompt_tokens),
            "output_tokens": int(step.output_tokens), "error": step.error is not None}


def alone(stage):
    """`stage` switched on as a cascade of one, for multiple-choice and free-form questions alike."""
    ff = stage.free_form_policy
    return dataclasses.replace(stage, policy=dataclasses.replace(stage.policy, enabled=True), off_reason="",
                               free_form_policy=None if ff is None else dataclasses.replace(ff, enabled=True),
                               free_form_off_reason="")


@dataclass
class AuditJob:
    """One sampled question an early stage kept: what to run and what to compare."""

    trace_id: int
    policy_hash: str
    question: object  # types.Question
    stages: Sequence  # the skipped stages, the reference (last) stage last
    kept_key: str | None
    grader: Grader
    max_new_tokens: int = 64
    created: float = dataclasses.field(default_factory=time.monotonic)


def run_audit(job: AuditJob) -> dict:
    """Run the skipped stages of `job` (each alone) and return the audit's columns."""
    from cascade_core.cascade import run_cascade

    steps, flops, dollars, seconds = [], 0.0, 0.0, 0.0
    for stage in job.stages:
        trace = run_cascade([alone(stage)], job.question, max_new_tokens=job.max_new_tokens)
        step = trace.steps[-1]
        steps.append(step_record(step, job.grader))
        flops, dollars, seconds = flops + step.flops, dollars + step.dollars, seconds + step.seconds
    last = steps[-1]
    loss = int(disagreement_loss([[job.kept_key], [last["key"]]], equivalent=lambda a, b: a == b)[0, 0])
    return {"audit": "done", "loss": loss, "audit_steps": steps, "audit_flops": flops, "audit_dollars": dollars,
            "audit_seconds": seconds, "reference_flops": last["flops"], "reference_dollars": last["dollars"]}


class Auditor:
    """Runs audit jobs one at a time in a background thread; `on_done(job, columns)` gets each
    outcome (also "skipped" and "failed" ones)."""

    def __init__(self, on_done: Callable[[AuditJob, dict], None], max_pending: int = 64, inline: bool = False):
        """`inline`: run each job in the caller's thread at `submit` (seeded simulations, where
        the order of audits must not depend on thread timing)."""
        self.on_done, self.max_pending, self.inline = on_done, int(max_pending), bool(inline)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cascade-audit")
        self._pending = 0
        self._lock = threading.Lock()
        self._closed = False

    @property
    def pending(self) -> int:
        with self._lock:
            return self._pending

    def submit(self, job: AuditJob) -> None:
        with self._lock:
            full = self._closed or self._pending >= self.max_pending
            if not full:
                self._pending += 1
        if full:
            self.on_done(job, {"audit": "skipped"})
            return
        if self.inline:
            self._run(job)
            return
        self._executor.submit(self._run, job)

    def _run(self, job: AuditJob) -> None:
        try:
            columns = run_audit(job)
        except Exception as err:  # noqa: BLE001 - a failed audit is recorded, never raised into the server
            log.warning("audit of trace %s failed: %s: %s", job.trace_id, type(err).__name__, err)
            columns = {"audit": "failed"}
        finally:
            with self._lock:
                self._pending -= 1
        self.on_done(job, columns)

    def close(self, wait: bool = False) -> None:
        with self._lock:
            self._closed = True
        self._executor.shutdown(wait=wait, cancel_futures=not wait)
