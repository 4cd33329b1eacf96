"""Questions per second of the benchmark runner against the bare forward pass on the same batches.

`cascade_core.records.runner.run_stage` adds prompt formatting, signals, a feature chunk write and an
atomic rewrite of the records file to every batch; this measures what that costs next to
`backend.score_options` alone (target: runner overhead <= 5%), two ways:

- inside the run: the backend is wrapped so that the time spent in score_options during
  run_stage is measured; overhead = (run_stage wall time - that time) / that time. Both halves
  come from the same seconds, so a busy machine cannot fake a difference;
- paired passes: bare score_options over the same batches, then run_stage, repeat by repeat;
  overhead = median of the per-repeat ratios - 1 (noisy on a shared machine).

The runner rewrites the whole records file after
each batch (that is what makes a kill lose at most one batch), so the rewrite grows with the
file: the last figures are the rewrite time at 2,280 and 14,042 records, projected as overhead
per batch. Ends with one JSON line.

    .venv/bin/python bench/bench_throughput.py [--model smollm2-135m] [--questions 64] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cascade_core.records.runner import BenchPaths, run_stage
from cascade_core.records.mmlu import load_mmlu, to_questions
from cascade_core.io import atomic_write_parquet
from cascade_core.prompts import format_prompt


def bare_pass(backend, batches) -> float:
    """Seconds for score_options alone over the batches (prompts formatted beforehand)."""
    started = time.perf_counter()
    for prompts, n_options in batches:
        backend.score_options(prompts, n_options, None)
    return time.perf_counter() - started


class TimedBackend:
    """The backend, with the seconds spent in score_options added up (everything else delegated)."""

    def __init__(self, backend):
        self._backend = backend
        self.forward_seconds = 0.0

    def __getattr__(self, name):
        return getattr(self._backend, name)

    def score_options(self, prompts, n_options, layers=None):
        started = time.perf_counter()
        try:
            return self._backend.score_options(prompts, n_options, layers)
        finally:
            self.forward_seconds += time.perf_counter() - started


def runner_pass(backend, model: str, questions: pd.DataFrame, batch_size: int) -> tuple[float, float]:
    """(run_stage wall seconds, seconds of it inside score_options), from an empty results folder."""
    timed = TimedBackend(backend)
    with tempfile.TemporaryDirectory() as tmp:
        paths = BenchPaths.for_stage(Path(tmp) / "results", Path(tmp) / "features", "mmlu", model)
        started = time.perf_counter()
        run_stage(timed, model, questions, paths, batch_size=batch_size)
        return time.perf_counter() - started, timed.forward_seconds


def rewrite_seconds(records: pd.DataFrame, rows: int, repeats: int = 3) -> float:
    """Median time of one atomic rewrite of a records file with `rows` rows (like the runner's)."""
    frame = pd.concat([records] * (rows // len(records) + 1), ignore_index=True).iloc[:rows]
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(repeats):
            started = time.perf_counter()
            atomic_write_parquet(frame, Path(tmp) / "records.parquet")
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="a packaged model key")
    parser.add_argument("--questions", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()

    import torch

    from models.hf import HFBackend

    if args.threads:
        torch.set_num_threads(args.threads)
    backend = HFBackend.from_packaged(args.model, device="cpu", dtype="float32", quantization="none",
                                      batch_size=args.batch_size, progress=False)
    per_subject = max(2, -(-args.questions // 57))
    questions = load_mmlu(per_subject=per_subject).iloc[: args.questions].reset_index(drop=True)
    qs = to_questions(questions)
    batches = [([format_prompt(q) for q in qs[i:i + args.batch_size]],
                [len(q.options) for q in qs[i:i + args.batch_size]])
               for i in range(0, len(qs), args.batch_size)]

    bare_pass(backend, batches[:1])  # warm-up (first call allocates)
    bare, runner, inside = [], [], []
    for _ in range(args.repeats):
        bare.append(bare_pass(backend, batches))
        wall, forward = runner_pass(backend, args.model, questions, args.batch_size)
        runner.append(wall)
        inside.append(forward)
    bare_s, runner_s = statistics.median(bare), statistics.median(runner)
    overhead = statistics.median((w - f) / f for w, f in zip(runner, inside))
    overhead_paired = statistics.median(w / b - 1.0 for w, b in zip(runner, bare))
    n = len(questions)
    per_batch_bare = bare_s / len(batches)

    with tempfile.TemporaryDirectory() as tmp:
        paths = BenchPaths.for_stage(Path(tmp) / "r", Path(tmp) / "f", "mmlu", args.model)
        records = run_stage(backend, args.model, questions.iloc[: args.batch_size * 2], paths,
                            batch_size=args.batch_size)
    rewrite = {rows: rewrite_seconds(records, rows) for rows in (2_280, 14_042)}

    print(f"machine: {platform.processor() or platform.machine()}, python {platform.python_version()}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} torch threads")
    print(f"model {args.model}, {n} MMLU questions, batch {args.batch_size}, {len(batches)} batches, "
          f"median of {args.repeats} interleaved repeats")
    print(f"bare score_options: {n / bare_s:.2f} q/s ({bare_s:.2f} s; all runs {', '.join(f'{t:.2f}' for t in bare)})")
    print(f"run_stage:          {n / runner_s:.2f} q/s ({runner_s:.2f} s; all runs "
          f"{', '.join(f'{t:.2f}' for t in runner)})")
    print(f"runner overhead inside the run: {overhead * 100:+.2f}% (run_stage wall - time in score_options, "
          f"per repeat: {', '.join(f'{(w - f) / f * 100:+.2f}%' for w, f in zip(runner, inside))}; target <= 5%)")
    print(f"runner overhead, paired passes: {overhead_paired * 100:+.1f}% (median of per-repeat ratios; noisy when "
          "the machine is shared)")
    for rows, seconds in rewrite.items():
        print(f"records rewrite at {rows:,} rows: {seconds * 1000:.1f} ms per batch = "
              f"{seconds / per_batch_bare * 100:.1f}% of one batch's forward pass")
    print(json.dumps({
        "model": args.model, "questions": n, "batch_size": args.batch_size, "repeats": args.repeats,
        "bare_qps": round(n / bare_s, 3), "runner_qps": round(n / runner_s, 3),
        "overhead": round(overhead, 4), "overhead_paired": round(overhead_paired, 4),
        "rewrite_ms_2280": round(rewrite[2_280] * 1000, 2),
        "rewrite_ms_14042": round(rewrite[14_042] * 1000, 2),
        "forward_ms_per_batch": round(per_batch_bare * 1000, 1), "torch_threads": torch.get_num_threads(),
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
