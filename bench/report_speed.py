"""How long the whole `report` takes on the committed records (and on a table tiled to a larger size).

    .venv/bin/python bench/report_speed.py --results-dir /work/snap5700/results
    .venv/bin/python bench/report_speed.py --results-dir /work/snap5700/results --rows 14042

Times `build_report` (every section, the re-split study included) after the records are loaded,
prints the time at which each section started, and ends with one JSON line. `--rows N` tiles the
questions (new ids, same subjects and splits) to N questions to show how the report scales to the
full MMLU before its records exist; the numbers of a tiled table mean nothing, only the time does.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cascade_core.compose.tables import load_report_inputs  # noqa: E402
from cascade_core.records import RecordTable  # noqa: E402
from cascade_core.report import ReportSettings, build_report  # noqa: E402


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="default")
    parser.add_argument("--results-dir", default=None)
    parser.add_argument("--rows", type=int, default=0, help="tile the table to this many questions (0 = as recorded)")
    parser.add_argument("--resplits", type=int, default=None, help="re-splits of the headline study (default: the report's)")
    args = parser.parse_args()
    inputs = load_report_inputs(args.preset, "mmlu", args.results_dir, None)
    table, questions = inputs["table"], inputs["questions"]
    if args.rows:
        table, questions = tile(table, questions, args.rows)
    settings = ReportSettings() if args.resplits is None else ReportSettings(resplits=args.resplits)
    start = time.perf_counter()
    marks = []

    def progress(message: str) -> None:
        marks.append((time.perf_counter() - start, message))
        print(f"{marks[-1][0]:7.1f} s  {message}", flush=True)

    build_report(table, questions=questions, features=inputs["features"], meta=inputs["meta"],
                 settings=settings, progress=progress)
    total = time.perf_counter() - start
    print(f"report on {table.n_questions:,} questions x {table.n_stages} stages: {total:.1f} s")
    print(json.dumps({"report_s": round(total, 2), "n_questions": table.n_questions, "n_stages": table.n_stages,
                      "resplits": settings.resplits, "resplits_others": settings.resplits_others,
                      "tiled": bool(args.rows), "cpus": os.cpu_count()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
