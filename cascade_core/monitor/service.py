"""The monitor the server calls: record each trace, audit a share, re-certify, watch for drift.

One `PolicyWatch` per running policy (multiple-choice questions run with one policy file,
free-form ones with another; a policy is named by its file's sha256) holds the running
confidence sequence (`recertify`), the drift detectors (`drift`) and the counters behind
/metrics. It is rebuilt from the database at start (`PolicyWatch.replay`), so a restarted server
goes on with the same numbers, and the terminal view and the Monitor page compute theirs the
same way from the file (`view`).

The loss stream enters the confidence sequence in arrival order (trace id), up to the first
sampled question whose audit is still running: every look sees a prefix of one fixed sequence,
which is what keeps the bound valid however often it is looked at.

The fallback (opt-in): when a policy's status becomes "broken", every later question runs with
the stated safer policy, **the last stage alone** (every early stage off: the label-free loss is
0 by definition), and every trace says so in its `thresholds` line, its `off` list and the
store's `fallback` column. The switch is written to the database, so a restart keeps it; it ends
only when a person re-calibrates (a new policy file has a new hash).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from dataclasses import dataclass, field

from cascade_core.graders import Grader, get_grader
from cascade_core.monitor.audit import Auditor, AuditJob, AuditSampler, answer_key, step_record
from cascade_core.monitor.drift import DEFAULT_ALPHA, DriftMonitor
from cascade_core.monitor.recertify import BettingCS, Certification, certification
from cascade_core.monitor.trace_store import TraceStore, text_hash

log = logging.getLogger("cascade_core.monitor")
ORPHAN_AFTER_S = 60.0  # an audit job whose response has not started it by then is started anyway


@dataclass(frozen=True)
class PolicyInfo:
    """What the monitor knows of one running policy (stored in the `policies` table as `info`)."""

    hash: str
    kind: str  # "mc" | "free"
    description: str
    stages: tuple[str, ...]  # enabled stages, in order; the last is the label-free reference
    target: float | None  # the promised label-free loss as a share (None: no promise)
    delta: float = 0.1
    grader: str = "mc"
    tolerance: float = 1e-6
    expectation: dict | None = None  # `drift.expectation`, or None
    expectation_note: str = ""  # why there is none

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "stages": list(self.stages)}

    @classmethod
    def from_dict(cls, data: dict) -> "PolicyInfo":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{**{k: v for k, v in data.items() if k in known}, "stages": tuple(data["stages"])})

    def get_grader(self) -> Grader:
        return get_grader(self.grader, self.tolerance)


@dataclass
class Counters:
    questions: int = 0
    errors: int = 0
    kept_early: int = 0
    flops: float = 0.0
    dollars: float = 0.0
    latency_s: float = 0.0
    sampled: int = 0
    audits: dict = field(default_factory=lambda: {"done": 0, "free": 0, "pending": 0, "skipped": 0, "failed": 0})
    audit_flops: float = 0.0
    audit_dollars: float = 0.0
    audit_seconds: float = 0.0
    pair_flops: list = field(default_factory=lambda: [0.0, 0.0])  # sampled rows: [cascade, last stage alone]
    pair_dollars: list = field(default_factory=lambda: [0.0, 0.0])
    fallback_questions: int = 0


class PolicyWatch:
    """The running numbers of one policy (module docstring)."""

    def __init__(self, info: PolicyInfo, alpha: float = DEFAULT_ALPHA):
        self.info = info
        self.cs = BettingCS(info.delta)
        self.drift = DriftMonitor(info.expectation or {}, alpha) if info.expectation else None
        self.counters = Counters()
        self._pending: set[int] = set()
        self._done: dict[int, int] = {}  # sampled id -> loss, not yet in the confidence sequence
        self._rows_cost: dict[int, tuple[float, float]] = {}  # pending id -> its cascade (flops, dollars)
        self.status = "not yet known" if info.target is not None else "no target"
        self.drift_alarm = False
        self.lock = threading.RLock()

    # -- feeding -------------------------------------------------------------------------------
    def add_row(self, row: dict) -> list[tuple[str, str, dict]]:
        """One stored trace row (a new one or, at start, an old one); the alarms it raises as
        (kind, message, numbers)."""
        with self.lock:
            c = self.counters
            c.questions += 1
            c.errors += row["status"] != "ok"
            c.kept_early += int(row["kept_early"])
            c.flops += row["flops"]
            c.dollars += row["dollars"]
            c.latency_s += row["latency_s"]
            c.fallback_questions += row.get("fallback") is not None
            alarms = []
            if self.drift is not None and row["status"] == "ok" and row.get("fallback") is None:
                if self.drift.observe(row["steps"]):
                    self.drift_alarm = True
                    alarms.append(("drift", self.drift.alarm_message(), self.drift.state().to_dict()))
            if row["sampled"]:
                c.sampled += 1
                rid = int(row["id"])
                if row["audit"] == "pending":
                    self._pending.add(rid)
                    self._rows_cost[rid] = (row["flops"], row["dollars"])
                    c.audits["pending"] += 1
                else:
                    alarms += self._audit_outcome(rid, row, (row["flops"], row["dollars"]))
            return alarms

    def audit_done(self, trace_id: int, columns: dict) -> list[tuple[str, str, dict]]:
        with self.lock:
            if trace_id not in self._pending:
                return []
            self._pending.discard(trace_id)
            self.counters.audits["pending"] -= 1
            return self._audit_outcome(trace_id, columns, self._rows_cost.pop(trace_id, (0.0, 0.0)))

    def _audit_outcome(self, rid: int, columns: dict, cascade_cost: tuple[float, float]) -> list:
        c = self.counters
        state = columns["audit"]
        c.audits[state] = c.audits.get(state, 0) + 1
        c.audit_flops += columns.get("audit_flops") or 0.0
        c.audit_dollars += columns.get("audit_dollars") or 0.0
        c.audit_seconds += columns.get("audit_seconds") or 0.0
        if state in ("done", "free") and columns.get("loss") is not None:
            self._done[rid] = int(columns["loss"])
            if columns.get("reference_flops") is not None:
                c.pair_flops[0] += cascade_cost[0]
                c.pair_flops[1] += columns["reference_flops"]
                c.pair_dollars[0] += cascade_cost[1]
                c.pair_dollars[1] += columns.get("reference_dollars") or 0.0
        return self._advance()

    def _advance(self) -> list:
        """Feed the confidence sequence the finished losses before the first running audit."""
        first_pending = min(self._pending) if self._pending else math.inf
        ready = sorted(i for i in self._done if i < first_pending)
        if not ready:
            return []
        self.cs.update([self._done.pop(i) for i in ready])
        before, cert = self.status, self.certification()
        self.status = cert.status
        if cert.status != before and cert.status == "broken":  # "at risk" is a status, not an alarm
            return [("recertification", cert.message, cert.to_dict())]
        return []

    # -- reading -------------------------------------------------------------------------------
    def certification(self) -> Certification:
        with self.lock:
            return certification(self.cs, self.info.target)

    def summary(self) -> dict:
        with self.lock:
            c = self.counters
            saved = {unit: (1.0 - pair[0] / pair[1]) if pair[1] > 0 else None
                     for unit, pair in (("flops", c.pair_flops), ("dollars", c.pair_dollars))}
            return {
                "policy": self.info.hash, "kind": self.info.kind, "description": self.info.description,
                "stages": list(self.info.stages), "certification": self.certification().to_dict(),
                "drift": None if self.drift is None else self.drift.state().to_dict(),
                "drift_note": self.info.expectation_note if self.drift is None else "",
                "questions": c.questions, "errors": c.errors,
                "kept_early_share": c.kept_early / c.questions if c.questions else None,
                "cost": {"flops": c.flops, "dollars": c.dollars,
                         "mean_latency_s": c.latency_s / c.questions if c.questions else None},
                "cost_saved_estimate": {**saved, "sample": c.audits["done"] + c.audits["free"]},
                "audit": {"sampled": c.sampled, **c.audits, "flops": c.audit_flops, "dollars": c.audit_dollars,
                          "seconds": c.audit_seconds},
                "fallback_questions": c.fallback_questions,
            }

    @classmethod
    def replay(cls, store: TraceStore, info: PolicyInfo, alpha: float = DEFAULT_ALPHA) -> "PolicyWatch":
        """The watch of `info` rebuilt from every stored row of its policy (alarms not re-raised)."""
        watch = cls(info, alpha)
        for row in store.rows(info.hash):
            watch.add_row(row)
        return watch


class Monitor:
    """What the server holds (module docstring). `policies`: kind -> PolicyInfo."""

    def __init__(self, store: TraceStore, policies: dict[str, PolicyInfo], *, audit_share: float = 0.02,
                 seed: int = 0, alpha: float = DEFAULT_ALPHA, fallback: bool = False, max_pending: int = 64,
                 inline_audits: bool = False):
        self.store, self.fallback_enabled, self.alpha = store, bool(fallback), float(alpha)
        self.sampler = AuditSampler(audit_share, seed)
        self.auditor = Auditor(self._audit_done, max_pending=max_pending, inline=inline_audits)
        self.policies = dict(policies)
        self.watches: dict[str, PolicyWatch] = {}
        self.by_hash: dict[str, str] = {}
        for kind, info in self.policies.items():
            store.register_policy(info.hash, kind, info.description, {**info.to_dict(), "alpha": self.alpha})
            for row in store.rows(info.hash, columns=("audit",)):  # audits of an earlier process never finish
                if row["audit"] == "pending":
                    store.update_audit(row["id"], audit="skipped")
            self.watches[kind] = PolicyWatch.replay(store, info, alpha)
            self.by_hash[info.hash] = kind
        self._jobs: dict[int, AuditJob] = {}
        self._lock = threading.Lock()

    @staticmethod
    def kind_of(question) -> str:
        return "mc" if question.is_multiple_choice else "free"

    # -- the fallback --------------------------------------------------------------------------
    def fallback_note(self, kind: str) -> str | None:
        info = self.policies.get(kind)
        if info is None:
            return None
        found = self.store.fallback(info.hash)
        if found is None:
            return None
        return (f"FALLBACK since {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(found['since']))} UTC: the last stage "
                f"answers every question because the policy {info.hash[:12]} was re-certified broken "
                f"({found['reason']}); "
                "until it is re-calibrated")

    def stages_for(self, model: str, stages, question):
        """The stages to run for this request: the served ones, or in fallback the last enabled
        one alone with every trace saying so; and the fallback note (None when none)."""
        if not model.startswith("cascade-"):
            return stages, None
        note = self.fallback_note(self.kind_of(question))
        if note is None:
            return stages, None
        free = not question.is_multiple_choice
        enabled = [i for i, s in enumerate(stages)
                   if (s.free_form_policy if free and s.free_form_policy is not None else s.policy).enabled]
        last = enabled[-1] if enabled else len(stages) - 1
        out = []
        for i, s in enumerate(stages):
            own = s.free_form_policy_source if free and s.free_form_policy is not None else s.policy_source
            source = f"{note} | {own}"
            if i == last:
                out.append(dataclasses.replace(s, policy_source=source, free_form_policy_source=source))
                continue
            ff = s.free_form_policy
            out.append(dataclasses.replace(
                s, policy=dataclasses.replace(s.policy, enabled=False), off_reason=note, policy_source=source,
                free_form_policy=None if ff is None else dataclasses.replace(ff, enabled=False),
                free_form_off_reason=note, free_form_policy_source=source))
        return out, note

    # -- recording -----------------------------------------------------------------------------
    def record(self, model: str, stages, question, trace, latency_s: float, note: str | None = None,
               status: str = "ok", max_new_tokens: int = 64) -> int:
        """Store one trace (committed when this returns) and feed the policy's watch; a sampled
        question an early stage kept gets an audit job, started by `after_response`. Never
        raises: a database that fails is logged, and the client still gets its answer (-1)."""
        try:
            return self._record(model, stages, question, trace, latency_s, note, status, max_new_tokens)
        except Exception:  # logged (with the traceback); the client still gets its answer
            log.exception("monitor: could not record a trace of %s", model)
            return -1

    def _record(self, model, stages, question, trace, latency_s, note, status, max_new_tokens) -> int:
        from cascade_core.cascade import for_free_form

        kind = self.kind_of(question)
        cascade = model.startswith("cascade-")
        info = self.policies.get(kind) if cascade else None
        grader = info.get_grader() if info is not None else get_grader("mc" if kind == "mc" else "exact")
        steps = [step_record(s, grader) for s in trace.steps]
        final = trace.answered_by
        effective = [for_free_form(s) for s in stages] if kind == "free" else list(stages)
        enabled = [s for s in effective if s.policy.enabled]
        kept_early = final is not None and final.decision == "keep"
        sampled = info is not None and note is None and status == "ok" and self.sampler.draw()
        row = {
            "model": model, "policy_hash": info.hash if info is not None else f"stage:{model}", "kind": kind,
            "question_hash": text_hash(f"{question.text}\x1f{chr(31).join(question.options)}"),
            "question": question.text + "".join(f"\n{chr(65 + i)}. {o}" for i, o in enumerate(question.options)),
            "answer": None if final is None else final.answer,
            "path": ",".join(f"{s.stage}:{s.decision}" for s in trace.steps), "steps": steps,
            "answered_by": None if final is None else final.stage, "kept_early": int(kept_early),
            "answer_key": None if final is None else answer_key(grader, final.answer),
            "flops": trace.total("flops"), "dollars": trace.total("dollars"),
            "tokens": int(trace.total("prompt_tokens") + trace.total("output_tokens")), "latency_s": float(latency_s),
            "status": status, "fallback": note, "sampled": int(sampled), "audit": "no",
        }
        job = None
        if sampled:
            if kept_early:
                row["audit"] = "pending"
                names = [s.name for s in enabled]
                skipped = enabled[names.index(final.stage) + 1:]
                job = AuditJob(0, info.hash, question, skipped, answer_key(grader, final.answer), grader,
                               max_new_tokens)
            else:  # the last stage answered: loss 0, its own cost is the reference
                last = trace.steps[-1]
                row.update(audit="free", loss=0, reference_flops=last.flops, reference_dollars=last.dollars)
        trace_id = self.store.add(row)
        if info is not None:
            self._raise(info.hash, self.watches[kind].add_row({**row, "id": trace_id}))
        if job is not None:
            job.trace_id = trace_id
            with self._lock:
                # The key is the trace object's id(): one already there belongs to a trace that is
                # gone (its response never ran its background task) and whose id was reused.
                replaced = self._jobs.pop(id(trace), None)
                self._jobs[id(trace)] = job
            self._submit_orphans([replaced] if replaced is not None else [])
        return trace_id

    def _submit_orphans(self, found: list[AuditJob]) -> None:
        """Start the audits whose response never came back for them (client gone), with `found`:
        a job left waiting would hold its trace "pending" and, with it, every later loss out of
        the confidence sequence."""
        now = time.monotonic()
        with self._lock:
            stale = [k for k, j in self._jobs.items() if now - j.created > ORPHAN_AFTER_S]
            found = found + [self._jobs.pop(k) for k in stale]
        for job in found:
            self.auditor.submit(job)

    def after_response(self, trace) -> None:
        """The response has been sent: start this trace's audit, if it has one (and any audit
        whose response never came back for it)."""
        if trace is None:
            self._submit_orphans([])
            return
        with self._lock:
            job = self._jobs.pop(id(trace), None)
        self._submit_orphans([job] if job is not None else [])

    def _audit_done(self, job: AuditJob, columns: dict) -> None:
        try:
            self.store.update_audit(job.trace_id, **columns)
        except Exception as err:  # noqa: BLE001 - the store failing must not kill the audit thread
            log.error("could not store the audit of trace %s: %s", job.trace_id, err)
        kind = self.by_hash.get(job.policy_hash)
        if kind is not None:
            self._raise(job.policy_hash, self.watches[kind].audit_done(job.trace_id, columns))

    def _raise(self, policy_hash: str, alarms) -> None:
        for kind, message, numbers in alarms:
            log.warning("monitor alarm (%s, policy %s): %s", kind, policy_hash[:12], message)
            try:
                self.store.add_alarm(policy_hash, kind, message, numbers)
            except Exception as err:  # noqa: BLE001 - logged above; the fallback below still applies
                log.error("monitor: could not store the alarm: %s", err)
            if kind == "recertification" and numbers.get("status") == "broken" and self.fallback_enabled:
                try:
                    self.store.set_fallback(policy_hash, message)
                except Exception:  # logged with the traceback; the alarm above stands (the caller's trace is stored)
                    log.exception("monitor: could not store the fallback of policy %s: it is NOT in force",
                                  policy_hash[:12])
                    continue
                log.warning("monitor: policy %s falls back to its last stage alone until re-calibrated",
                            policy_hash[:12])

    # -- reporting -----------------------------------------------------------------------------
    def health(self) -> dict:
        """For GET /health: per policy its status, the drift alarm and the fallback."""
        out = {"traces": str(self.store.path), "alarm": False, "policies": {}}
        for kind, watch in self.watches.items():
            cert = watch.certification()
            note = self.fallback_note(kind)
            alarm = watch.drift_alarm or cert.status == "broken"
            out["alarm"] = out["alarm"] or alarm
            out["policies"][kind] = {"policy": watch.info.hash, "status": cert.status, "message": cert.message,
                                     "drift_alarm": watch.drift_alarm, "fallback": note}
        return out

    def metrics(self) -> dict:
        """For GET /metrics: every policy's full summary and the audit backlog."""
        return {"traces": str(self.store.path), "audit_share": self.sampler.share,
                "audit_backlog": self.auditor.pending, "fallback_enabled": self.fallback_enabled,
                "policies": {kind: w.summary() for kind, w in self.watches.items()},
                "alarms": self.store.alarms(limit=20)}

    def close(self, wait: bool = False) -> None:
        self.auditor.close(wait=wait)
        self.store.close()
