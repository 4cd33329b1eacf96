"""The Route page writes each routed question's trace to the trace store the Monitor page reads
(`cascade_core.monitor.app_traces`), with streamlit.testing's AppTest, the real SmolLM2-135M and a
real SQLite file; with no database configured nothing is written."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from _records import write_synthetic_records
from cascade_core.monitor.app_traces import ENV, traces_db
from cascade_core.monitor.trace_store import TraceStore

APP = str(Path(__file__).resolve().parent.parent / "app.py")
ROUTE = "pages/1_Route_a_question.py"


def test_no_database_configured_means_none(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert traces_db() is None
    monkeypatch.setenv(ENV, "  ")
    assert traces_db() is None


@pytest.mark.model
def test_a_routed_question_becomes_one_trace_row(tmp_path, monkeypatch, smollm2_path):
    results = tmp_path / "results"
    write_synthetic_records(results)
    db = tmp_path / "traces.db"
    monkeypatch.setenv("CASCADE_RESULTS_DIR", str(results))
    monkeypatch.setenv("CASCADE_POLICIES_DIR", str(tmp_path / "policies"))
    monkeypatch.setenv("CASCADE_APP_PRELOAD", "0")
    monkeypatch.setenv(ENV, str(db))
    at = AppTest.from_file(APP, default_timeout=120).run()
    at.switch_page(ROUTE).run()
    assert not at.exception, [e.value for e in at.exception]
    at.radio(key="route_mode").set_value("type").run()
    at.multiselect(key="stages::default@route").set_value(["smollm2-135m"])
    at.text_area(key="route_text").set_value("Which planet is known as the Red Planet?")
    at.text_area(key="route_options").set_value("Venus\nMars\nJupiter\nSaturn")
    at.button(key="route_button").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert {m.label: m.value for m in at.metric}["Stages visited"] == "1"
    with TraceStore(db, read_only=True) as store:
        rows = store.rows()
        policies = store.policies()
    assert len(rows) == 1
    row = rows[0]
    assert row["model"] == "cascade-default" and row["kind"] == "mc" and row["status"] == "ok"
    assert row["path"] == "smollm2-135m:final" and row["answered_by"] == "smollm2-135m"
    assert len(row["policy_hash"]) == 64 and [p["hash"] for p in policies] == [row["policy_hash"]]
    assert row["question"] is None  # texts only with store_questions
    at.run()  # a rerun redraws the stored trace: no second row
    with TraceStore(db, read_only=True) as store:
        assert store.count() == 1
