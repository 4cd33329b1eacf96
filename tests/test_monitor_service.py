"""monitor.service beyond the scenarios of test_drift.py: an audit job is never lost (its trace
would stay "pending" and hold every later loss out of the confidence sequence), and a fallback the
database cannot store neither raises nor loses the trace. Real monitor, real SQLite file, the
shipped arith records replayed through the real cascade runner (`monitor.scenario`)."""

from __future__ import annotations

import sqlite3

import pytest

from cascade_core.cascade import run_cascade
from cascade_core.monitor.scenario import arith_scenario
from cascade_core.monitor.service import Monitor
from cascade_core.monitor.trace_store import TraceStore
from cascade_core.types import Question


@pytest.fixture(scope="module")
def scn():
    return arith_scenario()


def _kept_early(scn, monitor):
    """A question of the hard groups that the first stage keeps, and its trace."""
    for qid in scn.hard:
        question = Question(text=scn.texts[qid])
        stages, _ = monitor.stages_for("cascade-arith", scn.stages, question)
        trace = run_cascade(stages, question, max_new_tokens=16)
        if trace.answered_by is not None and trace.answered_by.decision == "keep":
            return question, stages, trace
    raise AssertionError("no hard question kept by the first stage")


def test_an_audit_whose_trace_object_id_is_reused_is_still_run(scn, tmp_path):
    """The waiting jobs are keyed by the trace object's id(); a response that never ran its
    background task (client gone) leaves its job there, and a later trace may get the same id.
    Recording the same object twice stands for that reuse."""
    monitor = Monitor(TraceStore(tmp_path / "t.db"), {"free": scn.info}, audit_share=1.0, inline_audits=True)
    try:
        question, stages, trace = _kept_early(scn, monitor)
        first = monitor.record("cascade-arith", stages, question, trace, 0.0, max_new_tokens=16)
        second = monitor.record("cascade-arith", stages, question, trace, 0.0, max_new_tokens=16)
        monitor.after_response(trace)
        rows = {r["id"]: r["audit"] for r in monitor.store.rows(columns=("audit",))}
        assert rows == {first: "done", second: "done"}
        assert monitor.watches["free"].counters.audits["pending"] == 0
    finally:
        monitor.close()


def test_a_fallback_the_database_cannot_store_is_logged_and_the_trace_kept(scn, tmp_path, monkeypatch, caplog):
    monitor = Monitor(TraceStore(tmp_path / "f.db"), {"free": scn.info}, audit_share=0.0, fallback=True)
    try:
        def locked(*args, **kwargs):
            raise sqlite3.OperationalError("database is locked")

        monkeypatch.setattr(monitor.store, "set_fallback", locked)
        monitor._raise(scn.info.hash, [("recertification", "the bound crossed the target", {"status": "broken"})])
        assert "NOT in force" in caplog.text
        assert [a["kind"] for a in monitor.store.alarms()] == ["recertification"]  # the alarm stands
        question = Question(text=scn.texts[scn.easy_test[0]])
        stages, note = monitor.stages_for("cascade-arith", scn.stages, question)
        assert note is None  # no fallback in force, and none claimed
        trace = run_cascade(stages, question, max_new_tokens=16)
        assert monitor.record("cascade-arith", stages, question, trace, 0.0, note, max_new_tokens=16) > 0
    finally:
        monitor.close()
