"""How long the whole `report` takes, in CPU and wall time, on the committed records or a 14,042-question stand-in.

    .venv/bin/python bench/report_speed.py                                  # the committed records
    .venv/bin/python bench/report_speed.py --results-dir /tmp/snap/results  # a frozen copy of them
    .venv/bin/python bench/report_speed.py --standin                        # all of MMLU, resampled
    .venv/bin/python bench/report_speed.py --rows 14042                     # the records tiled

Times `build_report` (every section: the re-split study, OOD and label-free probes where the
records have features) after the records are loaded, prints the time at which each section
started, and ends with one JSON line: wall seconds, and CPU seconds (user + system) of this
process and of the report's worker processes together (`report/jobs.py`), so a figure measured
while other work shares the cores still says what the report costs. `--workers 1` runs it all
in one process.

`--standin` builds `bench/mmlu_standin.py`'s stand-in for the full MMLU (14,042 questions x 3
local stages + GPT-4, with one feature layer per stage, resampled from the committed records)
in a temporary folder, times the report on it and removes it: a timing input, its numbers mean
nothing. `--rows N` tiles the questions (new ids, same subjects and splits) instead, without
features.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cascade_core.compose.tables import load_report_inputs
from cascade_core.records.table import RecordTable
from cascade_core.report import ReportSettings, build_report


def tile(table: RecordTable, questions, rows: int):
    """The table repeated (with new question ids) up to `rows` questions; questions to match."""
    reps = int(np.ceil(rows / table.n_questions))
    take = np.tile(np.arange(table.n_questions), reps)[:rows]
    copy = np.repeat(np.arange(reps), table.n_questions)[:rows]
    qids = np.array([f"{q}#{c}" for q, c in zip(table.qids[take], copy)])
    fields = {f.name: getattr(table, f.name) for f in dataclasses.fields(table) if f.name != "_costs"}
    for name, value in fields.items():
        if isinstance(value, np.ndarray) and value.ndim == 2 and value.shape[1] == table.n_questions:
            fields[name] = value[:, take]
        elif isinstance(value, np.ndarray) and value.shape == (table.n_questions,):
            fields[name] = value[take]
    fields["qids"] = qids
    bigger = RecordTable(**fields)
    if questions is not None:
        by_qid = questions.set_index("qid").loc[table.qids[take]].reset_index()
        by_qid["qid"] = qids
        questions = by_qid
    return bigger, questions


def cpu_seconds() -> float:
    """User + system CPU of this process and of its finished children (the report's worker processes)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def time_report(results_dir, features_dir=None, rows: int = 0, resplits: int | None = None, workers: int = 2,
                preset: str = "default") -> dict:
    inputs = load_report_inputs(preset, "mmlu", results_dir, features_dir)
    table, questions = inputs["table"], inputs["questions"]
    features = inputs["features"]
    if rows:
        table, questions = tile(table, questions, rows)
        features = None
    settings = ReportSettings() if resplits is None else ReportSettings(resplits=resplits)
    cpu0, start = cpu_seconds(), time.perf_counter()

    def progress(message: str) -> None:
        print(f"{time.perf_counter() - start:7.1f} s  {message}", flush=True)

    build_report(table, questions=questions, features=features, meta=inputs["meta"], settings=settings,
                 progress=progress, workers=workers)
    wall, cpu = time.perf_counter() - start, cpu_seconds() - cpu0
    print(f"report on {table.n_questions:,} questions x {table.n_stages} stages: {wall:.1f} s wall, {cpu:.1f} s CPU")
    return {"report_s": round(wall, 2), "cpu_s": round(cpu, 2), "n_questions": table.n_questions,
            "n_stages": table.n_stages, "features": sorted(features or {}), "resplits": settings.resplits,
            "resplits_others": settings.resplits_others, "workers": workers, "tiled": bool(rows),
            "load_avg_1m": round(os.getloadavg()[0], 2), "cpus": os.cpu_count()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="default")
    parser.add_argument("--results-dir", default=None)
    parser.add_argument("--features-dir", default=None)
    parser.add_argument("--standin", action="store_true", help="time the report on a 14,042-question stand-in")
    parser.add_argument("--rows", type=int, default=0, help="tile the table to this many questions (0 = as recorded)")
    parser.add_argument("--resplits", type=int, default=None,
                        help="re-splits of the headline study (default: the report's)")
    parser.add_argument("--workers", type=int, default=2, help="report worker processes (1: all in this one)")
    args = parser.parse_args()
    if args.standin:
        from mmlu_standin import build_standin

        with tempfile.TemporaryDirectory(prefix="mmlu-standin-") as folder:
            summary = build_standin(folder, args.results_dir)
            print(f"stand-in: {summary}", flush=True)
            out = time_report(os.path.join(folder, "results"), args.features_dir, 0, args.resplits, args.workers,
                              args.preset)
        out["standin"] = True
    else:
        out = time_report(args.results_dir, args.features_dir, args.rows, args.resplits, args.workers, args.preset)
        out["standin"] = False
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
