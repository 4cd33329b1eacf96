"""The background benchmark job (cascade_core.compose.background): one job per dataset, a job that
died is seen as dead, a failing job says why, Stop stops it. The jobs are real child processes;
the ones here end before loading a model (a refusal, a failure, a stop during start-up)."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time

import pytest

from cascade_core.compose import background as bg
from cascade_core.locations import locations
from cascade_core.records.registry import resolve_dataset
from cascade_core.presets import load_preset


@pytest.fixture
def registered(tmp_path):
    """A registered free-form dataset `sums` in a temporary results folder."""
    source = tmp_path / "sums.jsonl"
    source.write_text("".join(json.dumps({"question": f"What is {a} + {a}?", "answer": str(2 * a),
                                          "group": "even" if a % 2 == 0 else "odd"}) + "\n" for a in range(1, 7)),
                      encoding="utf-8")
    where = locations(tmp_path / "results", tmp_path / "features", tmp_path / "probes", tmp_path / "policies")
    resolve_dataset(str(source), where.results)
    return where, source


def wait_until_over(where, dataset: str, timeout_s: float = 120) -> bg.JobStatus:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = bg.read_status(where, dataset)
        if not status.active:
            return status
        time.sleep(0.2)
    raise AssertionError(f"the job still runs after {timeout_s} s: {bg.read_status(where, dataset)}")


def test_no_job_no_status(registered):
    where, _ = registered
    assert bg.read_status(where, "sums") is None


def test_a_second_job_on_the_same_dataset_is_refused_while_the_lock_is_held(registered):
    where, _ = registered
    files = bg.job_files(where, "sums")
    files.lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(files.lock, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running job holds it
        with pytest.raises(bg.JobRefused, match="already running on 'sums'"):
            bg.start(where, "sums", load_preset("default"), stages=["smollm2-135m"])
        assert not files.status.exists()  # a refused start writes nothing
    finally:
        os.close(fd)


def test_mmlu_and_unknown_datasets_and_presets_without_local_stages_are_refused(registered):
    where, _ = registered
    with pytest.raises(bg.JobRefused, match="make bench"):
        bg.start(where, "mmlu", load_preset("default"))
    with pytest.raises(ValueError, match="has no metadata"):
        bg.start(where, "nothing-here", load_preset("default"))
    with pytest.raises(bg.JobRefused, match="no local stage"):
        bg.start(where, "sums", load_preset("default"), stages=["not-a-stage"])


def test_a_status_saying_running_whose_lock_is_free_reads_as_died_and_stop_signals_nothing(registered):
    where, _ = registered
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a real PID that no longer runs (as after a kill -9 or an OOM)
    files = bg.job_files(where, "sums")
    files.status.write_text(json.dumps({"format": bg.FORMAT, "state": "running", "pid": dead.pid, "request": {},
                                        "started_at": time.time() - 60, "stages": [
                                            {"name": "smollm2-135m", "state": "running", "done": 2, "total": 6}]}))
    files.log.write_text("Loading weights\nsmollm2-135m 2/6\r smollm2-135m 3/6\n")
    status = bg.read_status(where, "sums")
    assert status.state == "died" and not status.active
    assert "ended without a word" in status.error
    assert status.log_tail.splitlines()[-1].strip() == "smollm2-135m 3/6"  # carriage returns resolved
    assert (status.done, status.total) == (2, 6)
    assert bg.stop(where, "sums").state == "died"  # nothing signalled: the lock is free


def test_a_failing_job_says_why_and_frees_the_dataset(registered):
    where, source = registered
    source.unlink()  # the registered file is gone: the job fails when it reads the questions
    bg.start(where, "sums", load_preset("default"), stages=["smollm2-135m"])
    status = wait_until_over(where, "sums")
    assert status.state == "failed"
    assert "ValueError" in status.error and "which is gone" in status.error
    assert "Traceback" in status.log_tail or "which is gone" in status.log_tail
    deadline = time.monotonic() + 30
    while bg.lock_held(bg.job_files(where, "sums").lock) and time.monotonic() < deadline:
        time.sleep(0.1)  # the last state is written just before the job exits
    assert not bg.lock_held(bg.job_files(where, "sums").lock)


def test_stop_stops_a_job_and_a_new_one_may_start(registered):
    where, _ = registered
    first = bg.start(where, "sums", load_preset("default"), stages=["smollm2-135m"], max_new_tokens=4)
    assert first.active and first.stages[0].name == "smollm2-135m"
    with pytest.raises(bg.JobRefused):
        bg.start(where, "sums", load_preset("default"), stages=["smollm2-135m"])
    stopped = bg.stop(where, "sums")
    assert stopped.state == "stopped" and not stopped.active
    assert not bg.lock_held(bg.job_files(where, "sums").lock)
