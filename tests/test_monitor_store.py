"""The trace store (a real SQLite file), the audit coin and the anytime-valid bound (issue 25)."""

from __future__ import annotations

import sqlite3
import threading
import time

import numpy as np
import pytest

from cascade_core.monitor.audit import AuditSampler
from cascade_core.monitor.recertify import BettingCS, certify, status_of
from cascade_core.monitor.trace_store import TraceStore, TraceStoreError, redact


def row(i: int = 0, **extra) -> dict:
    return {"model": "cascade-x", "policy_hash": "p" * 64, "kind": "free", "question_hash": f"{i:016x}",
            "question": f"What is {i} + 1? my key is sk-abcdefghijklmnop1234", "answer": str(i + 1),
            "path": "a:keep", "steps": [{"stage": "a", "decision": "keep", "answer": str(i + 1), "p_t": 0.9}],
            "answered_by": "a", "kept_early": 1, "answer_key": "k", "flops": 1.0, "dollars": 0.0, "tokens": 3,
            "latency_s": 0.01, "status": "ok", **extra}


def test_wal_and_64_concurrent_writers_lose_nothing(tmp_path):
    store = TraceStore(tmp_path / "t.db")
    barrier = threading.Barrier(64)

    def write(i):
        barrier.wait()
        store.add(row(i))

    threads = [threading.Thread(target=write, args=(i,)) for i in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.count() == 64
    assert sorted(r["question_hash"] for r in store.rows()) == sorted(f"{i:016x}" for i in range(64))
    store.close()
    with sqlite3.connect(tmp_path / "t.db") as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_texts_only_behind_the_flag_and_credentials_masked(tmp_path):
    plain = TraceStore(tmp_path / "plain.db")
    plain.add(row(1))
    (stored,) = plain.rows()
    assert stored["question"] is None and stored["answer"] is None and stored["steps"][0]["answer"] is None
    raw = (tmp_path / "plain.db").read_bytes() + (tmp_path / "plain.db-wal").read_bytes()
    assert b"What is 1" not in raw and b"sk-abcdef" not in raw
    texts = TraceStore(tmp_path / "texts.db", store_questions=True)
    texts.add(row(2))
    (stored,) = texts.rows()
    assert stored["question"].startswith("What is 2 + 1?") and "sk-abc" not in stored["question"]
    assert "[redacted]" in stored["question"] and stored["steps"][0]["answer"] == "3"
    assert redact("Authorization: Bearer abcdefghij123") == "Authorization: [redacted]"
    assert redact("password=hunter2 ok") == "[redacted] ok"


def test_retention_by_rows_and_age(tmp_path):
    store = TraceStore(tmp_path / "r.db", max_rows=10)
    for i in range(25):
        store.add(row(i))
    assert store.prune() >= 0 and store.count() == 10
    assert [r["question_hash"] for r in store.rows()][0] == f"{15:016x}"
    aged = TraceStore(tmp_path / "a.db", retention_days=1)
    aged.add(row(1, created=time.time() - 3 * 86400))
    aged.add(row(2))
    assert aged.prune() == 1 and aged.count() == 1


def test_bad_files_are_refused(tmp_path):
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not sqlite at all" * 100)
    with pytest.raises(TraceStoreError, match="junk.db"):
        TraceStore(junk)
    with pytest.raises(FileNotFoundError, match="missing.db"):
        TraceStore(tmp_path / "missing.db", read_only=True)
    with pytest.raises(ValueError, match="unknown trace column"):
        TraceStore(tmp_path / "ok.db").add({**row(), "secret": 1})


def test_audit_coin_is_seeded_and_near_its_share():
    a, b = AuditSampler(0.02, seed=7), AuditSampler(0.02, seed=7)
    draws = [a.draw() for _ in range(20_000)]
    assert draws == [b.draw() for _ in range(20_000)]
    assert 0.015 < np.mean(draws) < 0.025
    with pytest.raises(ValueError, match="share"):
        AuditSampler(1.5)


@pytest.mark.parametrize("p", [0.02, 0.1, 0.3])
def test_confidence_sequence_covers_at_every_look(p):
    """Seeded draws with a known loss p: the share of runs where p leaves [lower, upper] at ANY of
    400 looks (one after every observation) stays below delta."""
    delta, runs, misses = 0.1, 60, 0
    rng = np.random.default_rng(int(p * 1000))
    for _ in range(runs):
        cs = BettingCS(delta, grid=401)
        missed = False
        for x in (rng.random(400) < p).astype(float):
            cs.update(x)
            if not cs.lower <= p <= cs.upper:
                missed = True
        misses += missed
    assert misses / runs <= delta


def test_statuses():
    assert status_of(0, float("nan"), 0.0, 1.0, 0.05) == "not yet known"
    assert status_of(100, 0.3, 0.2, 0.4, 0.05) == "broken"
    assert status_of(100, 0.01, 0.0, 0.04, 0.05) == "holds"
    assert status_of(10, 0.1, 0.0, 0.5, 0.05) == "at risk"
    assert status_of(10, 0.02, 0.0, 0.5, 0.05) == "not yet known"
    assert status_of(10, 0.02, 0.0, 0.5, None) == "no target"
    assert certify([0] * 2000, 0.01, 0.1).status == "holds"
    assert certify([1] * 20, 0.05, 0.1).status == "broken"
