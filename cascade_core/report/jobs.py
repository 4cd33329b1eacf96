"""The report's independent pieces spread over worker processes, longest first.

Why: on the full MMLU most of the report is work that needs nothing from the rest (each studied
cascade's re-splits, each API cascade's variants, the text router, and one probe per (held-out
category, stage) for the OOD study and per stage for the label-free one). Two fixed halves
left one core idle for a long tail; a queue of small jobs, the longest started first, keeps
both busy until the end.

How: `run_jobs` forks `workers` processes (fork: they inherit the records, features and the job
list, nothing a user loads is pickled; only each job's result comes back through the pool's
pipe) and hands them job numbers in order of decreasing estimated cost. Every job is a pure,
seeded function of its inputs, so the numbers are the same with one worker (all in this
process, no fork) or several. Without fork (not Linux) it runs in this process.
"""

from __future__ import annotations

import multiprocessing
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence


@dataclass
class Job:
    """One independent piece: `fn(*args)`; `cost` orders the queue (larger first), in any unit."""

    name: str
    cost: float
    fn: Callable[..., Any]
    args: tuple = field(default_factory=tuple)


_JOBS: Sequence[Job] = ()  # the list the forked workers inherit (set only while `run_jobs` runs)


def _run(index: int):
    """In a worker: job `index` of the inherited list, its result or its failure named."""
    from cascade_core.choose.sweep import blas_limit

    job = _JOBS[index]
    try:
        with blas_limit(1):
            return index, "ok", job.fn(*job.args)
    except BaseException as err:  # noqa: BLE001 -- any failure goes back to the parent, named
        return index, "error", f"{type(err).__name__}: {err}\n{traceback.format_exc()}"


def run_jobs(jobs: Sequence[Job], workers: int = 2) -> dict[str, Any]:
    """{job name: result} of every job; `workers` processes (1: in this process, in queue order).
    A failed job raises RuntimeError naming it (with the worker's traceback)."""
    global _JOBS
    names = [job.name for job in jobs]
    if len(set(names)) != len(names):
        raise ValueError(f"job names must be unique, got {names}")
    order = sorted(range(len(jobs)), key=lambda i: (-jobs[i].cost, i))
    workers = min(int(workers), len(jobs))
    if workers < 2 or "fork" not in multiprocessing.get_all_start_methods():
        return {jobs[i].name: jobs[i].fn(*jobs[i].args) for i in order}
    _JOBS = jobs
    try:
        with multiprocessing.get_context("fork").Pool(processes=workers) as pool:
            outcomes = list(pool.imap_unordered(_run, order, chunksize=1))
    finally:
        _JOBS = ()
    results = {}
    for index, kind, value in outcomes:
        if kind == "error":
            raise RuntimeError(f"report job {jobs[index].name!r} failed in a worker process: {value}")
        results[jobs[index].name] = value
    return results
