"""The app's Route page writes its traces to the same trace store `serve --traces DB` writes.

Why: the Monitor page (and `python -m cascade_core monitor DB`) should see every routed question,
whether it came through the server or through the app. Where: the database named by the
environment variable `CASCADE_TRACES_DB` (the one the Monitor page opens); unset or empty, nothing
is written and nothing fails. The row is built by the server's own `Monitor.record`, so both write
the same columns; the policy is named by the sha256 of its policy file when the page runs one,
else (thresholds recalibrated on the page, the explorer's, the preset's own) by the sha256 of the
thresholds it ran with, as `setup.policy_infos` names a preset's own thresholds. The app audits
nothing (no audit share) and sets no target: the promise is re-certified on served traffic.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import threading
from pathlib import Path

from cascade_core.monitor.service import Monitor, PolicyInfo
from cascade_core.monitor.trace_store import TraceStore, TraceStoreError

log = logging.getLogger("cascade_core.monitor")
ENV = "CASCADE_TRACES_DB"
_stores: dict[str, TraceStore] = {}
_monitors: dict[tuple[str, str, str], Monitor] = {}
_lock = threading.Lock()


def traces_db() -> Path | None:
    """The configured trace database (`CASCADE_TRACES_DB`), or None when none is configured."""
    value = os.environ.get(ENV, "").strip()
    return Path(value) if value else None


def policy_hash(stages, policy_file: Path | str | None = None) -> str:
    """The policy's name in the store: its file's sha256, else that of the thresholds run."""
    if policy_file is not None and Path(policy_file).is_file():
        from cascade_core.choose.policy_file import file_sha256

        return file_sha256(Path(policy_file))
    return hashlib.sha256(json.dumps([s.policy.to_dict() for s in stages], sort_keys=True,
                                     default=str).encode()).hexdigest()


def _monitor(db: Path, digest: str, kind: str, stages, description: str) -> Monitor:
    """Open (or reuse, per process) the store at `db` and a monitor for this policy."""
    key = str(db.resolve())
    with _lock:
        store = _stores.get(key)
        if store is None:
            store = _stores[key] = TraceStore(db)
        monitor = _monitors.get((key, digest, kind))
        if monitor is None:
            enabled = tuple(s.name for s in stages if s.policy.enabled)
            info = PolicyInfo(hash=digest, kind=kind, description=description, stages=enabled, target=None,
                              grader="mc" if kind == "mc" else "exact",
                              expectation_note="routed in the app: no drift expectation")
            monitor = _monitors[(key, digest, kind)] = Monitor(store, {kind: info}, audit_share=0.0)
        return monitor


def record_route(preset_name: str, stages, question, trace, *, policy_file: Path | str | None = None,
                 description: str = "", failure: str | None = None, db: Path | str | None = None) -> int | None:
    """Write one finished Route trace (module docstring); its row id, None when no database is
    configured or it cannot be opened (logged: the page still shows its answer). `stages`: the
    runtime stages the trace ran with (free-form ones as run)."""
    db = Path(db) if db is not None else traces_db()
    if db is None or trace is None:
        return None
    kind = Monitor.kind_of(question)
    digest = policy_hash(stages, policy_file)
    try:
        monitor = _monitor(db, digest, kind, stages, description or f"app Route page, preset {preset_name}")
    except (OSError, TraceStoreError, sqlite3.Error, ValueError):
        log.exception("monitor: the Route page cannot write to the trace database %s", db)
        return None
    return monitor.record(f"cascade-{preset_name}", stages, question, trace, trace.total("seconds"),
                          status="error" if failure else "ok")
