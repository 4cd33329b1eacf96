"""A benchmark that runs in the background: started from the app, it outlives the page.

Why a child process and files: a Streamlit script run is stopped and restarted on every click, and
a page reload is a new session; a thread or a session's state would not survive either, and would
die with the server. The job is a child process in its own session (it survives the page and the
server's reruns) that runs the same jobs as `python -m cascade_core bench` (`compose.jobs`: the
same records in the same places, resumable), and everything about it lives in three files beside
the dataset's records, which any session (or a shell) can read:

- `<results>/<dataset>/bench-job.json`, the status: the request, the state (`starting`,
  `loading`, `running`, `probes`, then `done`, `failed` or `stopped`), each stage's questions done
  and total, this run's rate and the stage's ETA, the error; rewritten atomically, at most about
  once a second, by the job only (and by `stop` once the job is gone);
- `bench-job.log`, the job's own output (its tail is shown, a traceback included);
- `bench-job.lock`, held with `flock` by the job for its whole life (the starter takes it, then
  hands the same lock to the child, and writes the child's pid into it so Stop can reach a job
  that has not written its status yet). The kernel frees it when the job ends in any way, so a
  second job on the same dataset is refused exactly while one runs, and a status still saying
  "running" whose lock is free is a job that died (killed, out of memory): it reads as `died`
  (its unfinished stages too), never as a stale PID that blocks a new job or that Stop would
  signal. Only the lock's holder writes the status: the job, or `stop` for a job that ended
  without writing its last state (it takes the free lock for that write).

`start`, `read_status` and `stop` are what the app calls; `python -m cascade_core.compose.background
--status FILE --lock-fd N` is the child (never run by hand).
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from cascade_core.locations import REPO_ROOT, Locations
from cascade_core.io import atomic_write_json, log_tail

FORMAT = "cascade-bench-job"
STEM = "bench-job"
ACTIVE = ("starting", "loading", "running", "probes")  # a live job's states
WRITE_EVERY_S = 1.0
LOG_TAIL_LINES = 20
STOP_GRACE_S = 10.0


class JobRefused(RuntimeError):
    """A job cannot start (one runs on this dataset, or the request is wrong); the message says why."""


@dataclass(frozen=True)
class JobFiles:
    """The three files of a dataset's background job (module docstring)."""

    status: Path
    log: Path
    lock: Path


def job_files(where: Locations, dataset: str) -> JobFiles:
    folder = where.results / dataset
    return JobFiles(folder / f"{STEM}.json", folder / f"{STEM}.log", folder / f"{STEM}.lock")


@dataclass(frozen=True)
class StageProgress:
    """One stage of the job: its state (`waiting`, `loading`, `running`, `done`, `skipped`), the
    questions done (records already there included) out of `total`, this run's rate (questions a
    second, from the first progress report on, so model loading is not counted) and ETA."""

    name: str
    state: str
    done: int
    total: int
    rate: float | None = None
    eta_s: float | None = None
    message: str = ""


@dataclass(frozen=True)
class JobStatus:
    """A dataset's job as its files say, with `state` corrected to `died` when the file says the
    job is live but its lock is free."""

    dataset: str
    state: str
    stages: tuple[StageProgress, ...]
    request: dict
    pid: int | None
    started_at: float | None
    updated_at: float | None
    finished_at: float | None
    error: str | None
    log_tail: str
    probes: tuple[str, ...] = field(default=())

    @property
    def active(self) -> bool:
        return self.state in ACTIVE

    @property
    def done(self) -> int:
        return sum(s.done for s in self.stages)

    @property
    def total(self) -> int:
        return sum(s.total for s in self.stages)

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 0.0

    @property
    def current(self) -> StageProgress | None:
        """The stage being loaded or run, if any."""
        return next((s for s in self.stages if s.state in ("loading", "running")), None)

    @property
    def elapsed_s(self) -> float | None:
        if self.started_at is None:
            return None
        return (self.finished_at or time.time()) - self.started_at


# ---- reading ------------------------------------------------------------------------------------
def lock_held(path: Path) -> bool:
    """True while some process holds the job's lock (probed with a non-blocking flock, released at once)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        if not _take_lock(fd):
            return True
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def _take_lock(fd: int) -> bool:
    """Take the lock without waiting; False while another open file holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return False
        raise
    return True


def _read_doc(path: Path) -> dict | None:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read the job status {path}: {err}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError(f"{path} is not a background job's status file")
    return doc


def read_status(where: Locations, dataset: str) -> JobStatus | None:
    """The dataset's job (None when none was ever started here); see `JobStatus`."""
    files = job_files(where, dataset)
    doc = _read_doc(files.status)
    if doc is None:
        return None
    state, error, finished_at = doc.get("state", "starting"), doc.get("error"), doc.get("finished_at")
    if state in ACTIVE and not lock_held(files.lock):
        # Re-read: the job may have written its last state between the two reads.
        doc = _read_doc(files.status) or doc
        state, error = doc.get("state", state), doc.get("error", error)
        if state in ACTIVE:
            state = "died"
            error = error or "the job ended without a word (killed, or out of memory?): see its log"
            # Its last word is when it was last heard of: its time does not run on after its death.
            finished_at = doc.get("updated_at") or doc.get("started_at")
        else:
            finished_at = doc.get("finished_at")
    stages = tuple(_stage(s, state, files.status) for s in doc.get("stages", []))
    return JobStatus(dataset=dataset, state=state, stages=stages, request=doc.get("request", {}), pid=doc.get("pid"),
                     started_at=doc.get("started_at"), updated_at=doc.get("updated_at"),
                     finished_at=finished_at, error=error, log_tail=log_tail(files.log, LOG_TAIL_LINES),
                     probes=tuple(doc.get("probes", [])))


def _stage(entry, job_state: str, path: Path) -> StageProgress:
    """One stage as the status file has it; a stage left loading or running by a job that is
    over (stopped, failed, died) takes the job's state and has no ETA."""
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        raise ValueError(f"{path}: a stage entry without a name: {entry!r}")
    state = entry.get("state") or "waiting"
    eta_s = entry.get("eta_s")
    if job_state not in ACTIVE and state in ("loading", "running"):
        state, eta_s = job_state, None
    return StageProgress(name=entry["name"], state=state, done=int(entry.get("done") or 0),
                         total=int(entry.get("total") or 0), rate=entry.get("rate"), eta_s=eta_s,
                         message=entry.get("message", ""))


def running_jobs(where: Locations) -> list[JobStatus]:
    """The jobs that run now, on any dataset under the results folder (a fresh session's way back
    to a job it did not start)."""
    out = []
    for path in sorted(where.results.glob(f"*/{STEM}.json")) if where.results.is_dir() else []:
        try:
            status = read_status(where, path.parent.name)
        except ValueError:
            continue
        if status is not None and status.active:
            out.append(status)
    return out


# ---- starting and stopping ------------------------------------------------------------------------
def _try_lock(fd: int, status_path: Path) -> bool:
    """Take the job's lock. A job that has written its last state but not exited yet is waited
    for, up to 5 s; otherwise up to 0.5 s, for `lock_held`'s probe (another session reading the
    status holds the free lock for an instant) must not pass for a running job."""
    began = time.monotonic()
    while not _take_lock(fd):
        try:
            finished = (_read_doc(status_path) or {}).get("state") not in ACTIVE
        except ValueError:
            finished = False
        if time.monotonic() - began > (5.0 if finished else 0.5):
            return False
        time.sleep(0.05)
    return True


def _lock_pid(path: Path) -> int | None:
    """The job's pid as its starter wrote it into the lock file (None before that)."""
    try:
        text = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None


def finish_if_free(files: JobFiles, **fields) -> None:
    """Write the last state of a job that ended without writing it. The free lock is taken for
    the write, so a new job that took the dataset meanwhile is never overwritten."""
    fd = os.open(files.lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if not _take_lock(fd):
            return  # a job holds it: its status is its own
        doc = _read_doc(files.status)
        if doc is not None and doc.get("state") in ACTIVE:
            now = time.time()
            atomic_write_json(files.status, {**doc, "updated_at": now, "finished_at": now, **fields})
    finally:
        os.close(fd)


def start(where: Locations, dataset: str, preset, stages: Sequence[str] | None = None,
          per_subject: int | None = None, max_new_tokens: int | None = None, probes: bool = True,
          nice: int = 5) -> JobStatus:
    """Start the benchmark of `preset`'s local stages (or the ones named) on a registered dataset
    in a child process; returns its first status. Refused (`JobRefused`) while a job runs on this
    dataset, for MMLU (its runs are `make bench`'s), and for a preset without a local stage.
    `probes`: then train the P(IK) probes on the records (when the dataset has answers)."""
    from cascade_core.compose.formats import emulated_stages
    from cascade_core.compose.jobs import bench_configs
    from cascade_core.number_format import ALLOW_EMULATED_ENV, emulated_bf16_refusal
    from cascade_core.records.registry import read_metadata

    if dataset == "mmlu":
        raise JobRefused("MMLU is benchmarked with `make bench` / `python -m cascade_core bench`, "
                         "not as a background job")
    meta = read_metadata(dataset, where.results)  # a registered dataset, or a clear error
    # The named stages, else the preset's enabled ones (not its extra stages); recorded ones never run.
    configs = [c for c in bench_configs(preset, stages)
               if c.backend != "recorded" and (stages or (c.enabled and c in preset.stages))]
    if not configs:
        raise JobRefused(f"preset {preset.name!r} has no local stage to benchmark"
                         + (f" among {', '.join(stages)}" if stages else ""))
    emulated = emulated_stages(configs)
    if emulated and os.environ.get(ALLOW_EMULATED_ENV, "").strip() != "1":  # the child inherits this environment
        raise JobRefused(emulated_bf16_refusal(emulated))
    files = job_files(where, dataset)
    files.lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(files.lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if not _try_lock(fd, files.status):
            raise JobRefused(f"a benchmark job is already running on {dataset!r}; stop it or wait for it")
        request = {"dataset": dataset, "preset": json.loads(preset.model_dump_json()),
                   "stages": [c.name for c in configs], "per_subject": per_subject,
                   "max_new_tokens": max_new_tokens, "probes": bool(probes), "nice": int(nice),
                   "results": str(where.results), "features": str(where.features), "probes_dir": str(where.probes),
                   "hidden": str(where.hidden), "policies": str(where.policies)}
        now = time.time()
        atomic_write_json(files.status, {
            "format": FORMAT, "state": "starting", "request": request, "pid": None, "started_at": now,
            "updated_at": now, "finished_at": None, "error": None, "probes": [],
            # The total until the child has selected the questions: all of them, when it runs all.
            "stages": [{"name": c.name, "state": "waiting", "done": 0,
                        "total": int(meta.get("questions") or 0) if per_subject is None else 0} for c in configs]})
        try:
            with open(files.log, "wb") as log:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "cascade_core.compose.background", "--status", str(files.status),
                     "--lock-fd", str(fd)],
                    cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    pass_fds=(fd,), start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        except OSError as err:
            atomic_write_json(files.status, {**_read_doc(files.status), "state": "failed", "finished_at": time.time(),
                                             "error": f"the job could not start: {err}"})
            raise JobRefused(f"the job could not start: {err}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{proc.pid}\n".encode("ascii"), 0)  # Stop's way to the job before it writes its status
        # Reap it when it ends (no zombie left in a long-lived server); nothing waits for this thread.
        threading.Thread(target=proc.wait, name=f"bench-job-{dataset}", daemon=True).start()
    finally:
        os.close(fd)  # the child holds the lock from here on
    return read_status(where, dataset)


def stop(where: Locations, dataset: str, grace_s: float = STOP_GRACE_S) -> JobStatus | None:
    """Stop the dataset's job: SIGTERM to its process group (it writes `stopped` and exits after
    the batch in flight), SIGKILL after `grace_s`. Only a job whose lock is held is signalled, so a
    stale PID is never touched. The records so far stay (a rerun resumes from them)."""
    files = job_files(where, dataset)
    status = read_status(where, dataset)
    if status is None or not status.active:
        return status
    pid = status.pid or _lock_pid(files.lock)
    if pid is None:  # a job started by an older version that has not written its pid yet
        deadline = time.monotonic() + 10
        while pid is None and lock_held(files.lock) and time.monotonic() < deadline:
            time.sleep(0.1)
            pid = (_read_doc(files.status) or {}).get("pid") or _lock_pid(files.lock)
    if not lock_held(files.lock):
        return read_status(where, dataset)
    if pid is None:
        raise JobRefused(f"the job on {dataset!r} holds {files.lock} but no process id is known after 10 s; "
                         "try again, or end it from a shell")
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while lock_held(files.lock) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not lock_held(files.lock):
            break
    finish_if_free(files, state="stopped", error="stopped before it could write its last state "
                                                  "(killed, or ended by the signal during start-up)")
    return read_status(where, dataset)


# ---- the child ------------------------------------------------------------------------------------
class Stopped(BaseException):
    """Raised in the child by SIGTERM/SIGINT (a BaseException: no library's `except Exception` eats it)."""


class _Status:
    """The child's status document, written atomically, at most every WRITE_EVERY_S unless forced."""

    def __init__(self, path: Path):
        self.path = path
        self.doc = _read_doc(path) or {}
        self.written = 0.0

    def stage(self, name: str) -> dict:
        return next(s for s in self.doc["stages"] if s["name"] == name)

    def write(self, force: bool = False, **fields) -> None:
        self.doc.update(fields)
        now = time.time()
        if force or now - self.written >= WRITE_EVERY_S:
            self.doc["updated_at"] = now
            atomic_write_json(self.path, self.doc)
            self.written = now


def _progress(status: _Status, name: str):
    """A `compose.jobs` progress callback that keeps the stage's done/total, rate and ETA."""
    first: list = []

    def report(done: int, total: int) -> None:
        now = time.time()
        if not first:
            first.append((now, done))
        t0, d0 = first[0]
        rate = (done - d0) / (now - t0) if done > d0 and now > t0 else None
        stage = status.stage(name)
        stage.update(state="running", done=int(done), total=int(total), rate=rate,
                     eta_s=(total - done) / rate if rate else None)
        status.write(force=done >= total, state="running")

    return report


def run_job(status_path: Path) -> int:
    """The child: benchmark each requested stage, then (optionally) train the probes; every step
    is in the status file. Returns the exit code."""
    def on_signal(signum, frame):
        # Once: a second SIGTERM must not break off the handler that writes `stopped`.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise Stopped(signal.Signals(signum).name)

    # Before the first write: a Stop that comes at once is a `stopped` job, not a killed one.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    status = _Status(status_path)
    request = status.doc["request"]
    try:
        status.write(force=True, pid=os.getpid())
        if request.get("nice"):
            os.nice(int(request["nice"]))
        code = _run(status, request)
    except Stopped as why:
        print(f"stopped ({why})", flush=True)
        status.write(force=True, state="stopped", finished_at=time.time())
        return 1
    except Exception as err:  # noqa: BLE001 - the status says what failed; the log has the traceback
        traceback.print_exc()
        status.write(force=True, state="failed", error=f"{type(err).__name__}: {err}", finished_at=time.time())
        return 1
    return code


def _run(status: _Status, request: dict) -> int:
    from cascade_core.compose.jobs import bench_questions, bench_stage, train_probes
    from cascade_core.presets import parse_preset
    from cascade_core.records.schema import labelled_rows

    preset = parse_preset(request["preset"], "the background job's preset")
    where = Locations(results=Path(request["results"]), features=Path(request["features"]),
                      hidden=Path(request["hidden"]), probes=Path(request["probes_dir"]),
                      policies=Path(request["policies"]))
    dataset = request["dataset"]
    configs = {c.name: c for c in preset.stages + preset.extra_stages}
    chosen = [configs[n] for n in request["stages"]]  # checked by `start` (emulated bfloat16 refused there)
    questions = bench_questions(dataset, per_subject=request.get("per_subject"), results_dir=where.results)
    for entry in status.doc["stages"]:
        entry["total"] = len(questions)
    print(f"{dataset}: {len(questions)} questions, stages {', '.join(request['stages'])}", flush=True)
    labelled = False
    for config in chosen:
        status.stage(config.name).update(state="loading")
        status.write(force=True, state="loading")
        records = bench_stage(config, questions, where, dataset, progress=_progress(status, config.name),
                              max_new_tokens=request.get("max_new_tokens"))
        graded = labelled_rows(records)
        labelled = labelled or bool(graded.any())
        accuracy = f"accuracy {records['correct'][graded].mean():.1%}" if graded.any() else "no answers"
        message = f"{len(records)} records, {accuracy}"
        print(f"{config.name}: {message}", flush=True)
        status.stage(config.name).update(state="done", done=len(questions), eta_s=0.0, message=message)
        status.write(force=True)
        del records
    if request.get("probes") and labelled:
        status.write(force=True, state="probes")
        lines = []
        try:
            for outcome in train_probes(preset, where, dataset, stages=request["stages"]):
                lines.append(f"{outcome.stage}: {outcome.message}")
                print(lines[-1], flush=True)
        except ValueError as err:  # e.g. too few calibration records: the records stand, P(IK) waits
            lines.append(f"probes not trained: {err}")
            print(lines[-1], flush=True)
        status.write(force=True, probes=lines)
    status.write(force=True, state="done", finished_at=time.time())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="the background benchmark job (started by `start`)")
    parser.add_argument("--status", required=True, type=Path)
    parser.add_argument("--lock-fd", required=True, type=int, help="the inherited descriptor holding the job's lock")
    args = parser.parse_args(argv)
    os.set_inheritable(args.lock_fd, False)  # held for life; not passed on to anything it starts
    code = run_job(args.status)
    os.close(args.lock_fd)  # the last state is written: the dataset is free from here
    return code


if __name__ == "__main__":
    sys.exit(main())
