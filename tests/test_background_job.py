"""The background benchmark job (cascade_core.compose.background): one job per dataset, a job that
died is seen as dead, a failing job says why, Stop stops it. The jobs are real child processes;
the ones here end before loading a model (a refusal, a failure, a stop during start-up)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
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
                                        "started_at": time.time() - 60, "updated_at": time.time() - 30, "stages": [
                                            {"name": "smollm2-135m", "state": "running", "done": 2, "total": 6}]}))
    files.log.write_text("Loading weights\nsmollm2-135m 2/6\r smollm2-135m 3/6\n")
    status = bg.read_status(where, "sums")
    assert status.state == "died" and not status.active
    assert "ended without a word" in status.error
    assert status.log_tail.splitlines()[-1].strip() == "smollm2-135m 3/6"  # carriage returns resolved
    assert (status.done, status.total) == (2, 6)
    # Its stage is not shown as running with an ETA: it died with the job.
    assert status.current is None and status.stages[0].state == "died" and status.stages[0].eta_s is None
    assert 29 < status.elapsed_s < 31  # from its start to when it was last heard of, not to now
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


def test_a_log_tail_read_from_the_middle_of_a_long_log_shows_no_piece_of_a_line(tmp_path):
    from cascade_core.io import log_tail

    log = tmp_path / "bench-job.log"
    log.write_text("".join(f"line {i} " + "é" * 40 + "\n" for i in range(1000)), encoding="utf-8")
    shown = log_tail(log, lines=1000).splitlines()
    assert all(line.startswith("line ") for line in shown) and shown[-1].startswith("line 999 ")


def test_a_job_that_died_can_be_replaced_even_while_another_session_probes_its_lock(registered):
    """A reader's `lock_held` probe holds the free lock for an instant; a start that meets it
    must not take a dead job for a running one."""
    where, source = registered
    source.unlink()  # the new job fails at once, before any model loads
    files = bg.job_files(where, "sums")
    files.status.write_text(json.dumps({"format": bg.FORMAT, "state": "running", "pid": None, "request": {},
                                        "stages": [{"name": "smollm2-135m", "state": "running", "done": 2,
                                                    "total": 6}]}))
    fd = os.open(files.lock, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the probe, held longer than a real one for the test
    release = threading.Timer(0.2, os.close, (fd,))
    release.start()
    try:
        started = bg.start(where, "sums", load_preset("default"), stages=["smollm2-135m"])
    finally:
        release.join()
    assert started.state in bg.ACTIVE or started.state == "failed"
    assert wait_until_over(where, "sums").state == "failed"


def test_stop_reaches_a_job_that_has_not_written_its_pid_yet(registered, tmp_path, monkeypatch):
    """The child writes its pid first thing, but under load its start-up (imports) may take long;
    Stop must not wait for it and then leave the job running (the starter wrote the pid into the
    lock file)."""
    where, source = registered
    source.unlink()  # should the job ever get past its start-up, it fails before any model loads
    slow = tmp_path / "slow-python"
    slow.write_text(f"#!/bin/sh\nsleep 60\nexec {sys.executable} \"$@\"\n")
    slow.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(slow))
    first = bg.start(where, "sums", load_preset("default"), stages=["smollm2-135m"])
    assert first.state == "starting" and first.pid is None
    try:
        stopped = bg.stop(where, "sums", grace_s=5)
    finally:
        pid = int(bg.job_files(where, "sums").lock.read_text())
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)  # nothing left behind should the stop have failed
    # Before, Stop waited 10 s for a pid in the status file, then returned with the job still running.
    assert stopped.state == "stopped" and "before it could write its last state" in stopped.error
    assert not bg.lock_held(bg.job_files(where, "sums").lock)


def test_the_last_state_written_for_a_dead_job_never_overwrites_a_new_job(registered):
    where, _ = registered
    files = bg.job_files(where, "sums")
    new_job = {"format": bg.FORMAT, "state": "starting", "pid": None, "request": {"stages": ["new"]}, "stages": []}
    files.status.write_text(json.dumps(new_job))
    fd = os.open(files.lock, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the new job holds the dataset
        bg.finish_if_free(files, state="stopped", error="the old job")
        assert json.loads(files.status.read_text()) == new_job
    finally:
        os.close(fd)
    bg.finish_if_free(files, state="stopped", error="the old job")  # free now: written
    assert json.loads(files.status.read_text())["state"] == "stopped"
