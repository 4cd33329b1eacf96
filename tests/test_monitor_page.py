"""The Monitor page (pages/5_Monitor.py) with streamlit.testing's AppTest, on a real trace
database written by the arith drift scenario (`monitor.scenario`)."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from cascade_core.monitor.scenario import arith_scenario, run_stream, stream

PAGE = str(Path(__file__).resolve().parent.parent / "pages" / "5_Monitor.py")


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    path = tmp_path_factory.mktemp("monitor") / "traces.db"
    scn = arith_scenario()
    run_stream(scn, stream(scn, 200, 300, 0), path, audit_share=0.25, seed=0, fallback=True)
    return path


def test_page_shows_status_bound_drift_and_alarms(db, monkeypatch):
    monkeypatch.setenv("CASCADE_TRACES_DB", str(db))
    at = AppTest.from_file(PAGE, default_timeout=60).run()
    assert not at.exception, at.exception
    metrics = {m.label: m.value for m in at.metric}
    assert "broken" in metrics["Re-certification"] and metrics["Drift alarm"] == "ALARM"
    assert any("FALLBACK" in e.value for e in at.error)
    assert len(at.dataframe) == 2  # the drifted streams and the alarm history
    assert "500 questions" in " ".join(c.value for c in at.caption)


def test_page_without_a_database_says_how_to_start(tmp_path, monkeypatch):
    monkeypatch.setenv("CASCADE_TRACES_DB", str(tmp_path / "none.db"))
    at = AppTest.from_file(PAGE, default_timeout=60).run()
    assert not at.exception and "serve --traces" in at.info[0].value
