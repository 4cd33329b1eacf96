"""Issue 25, item 7, at the level of the monitor modules: the committed arith records replayed
through the real cascade runner, the real monitor and a real SQLite file (`monitor.scenario`).

Stated numbers (bench/monitor_drift.py measures them over 20 seeds, docs/BENCHMARKS.md):
easy questions, then 4-5 digit sums and differences: the drift alarm fires within 20 questions of
the shift (measured: 8), never before it; at a 25% audit share the re-certification says
"broken" within 300 questions of the shift. On easy questions alone, no drift alarm in 5 seeded
runs of 600 questions (alpha = 1e-4).
"""

from __future__ import annotations

import pytest

from cascade_core.monitor.scenario import arith_scenario, run_stream, stream
from cascade_core.monitor.view import render_text, summarise


@pytest.fixture(scope="module")
def scn():
    return arith_scenario()


def test_the_scenario_policy_keeps_on_easy_questions(scn):
    assert scn.policy.stages[0].enabled and scn.policy.stages[0].rule == "pt_only"
    (stage,) = scn.info.expectation["stages"]
    assert stage["stage"] == "smollm2-135m" and 0.0 < stage["keep_rate"] < 0.2


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_drift_alarm_fires_soon_after_the_shift(scn, tmp_path, seed):
    r = run_stream(scn, stream(scn, 200, 60, seed), tmp_path / "s.db", audit_share=0.02, seed=seed)
    fired = r["first"]["drift"]
    assert fired is not None and 200 < fired <= 220
    top = r["summary"]["drift"]["streams"][0]
    assert top["direction"] == "up" and top["recent"] > top["band"][1]


def test_the_bound_crosses_the_target_and_falls_back(scn, tmp_path):
    db = tmp_path / "b.db"
    r = run_stream(scn, stream(scn, 200, 300, 0), db, audit_share=0.25, seed=0, fallback=True)
    broken = r["first"]["broken"]
    assert broken is not None and 200 < broken <= 500
    cert = r["summary"]["certification"]
    assert cert["status"] == "broken" and cert["lower"] > cert["target"]
    assert r["summary"]["fallback_questions"] == 500 - broken  # every later question ran the last stage alone
    view = summarise(db)
    (policy,) = view["policies"]
    assert policy["fallback"] and {a["kind"] for a in policy["alarms"]} == {"drift", "recertification"}
    assert "FALLBACK" in render_text(view) and "broken" in render_text(view)


def test_unshifted_streams_stay_quiet(scn, tmp_path):
    alarms = 0
    for seed in range(5):
        r = run_stream(scn, stream(scn, 600, 0, 100 + seed), tmp_path / f"q{seed}.db", audit_share=0.02, seed=seed)
        alarms += r["first"]["drift"] is not None
    assert alarms == 0
