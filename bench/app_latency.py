"""Time from a threshold-slider change to the re-rendered explorer page, server side.

The explorer runs under streamlit.testing's AppTest: each measured step sets one τ slider and
reruns the page script in full (cached records and sweep, replay, statistics, the chart option,
the element tree). In the browser a threshold change reruns only the explorer's st.fragment, so
this is more than the server does between a slider event and sending the new page; AppTest also
parses the page's elements, so the figures are an upper bound.

Records: the default preset's three stages on all 14,042 MMLU questions (split "all"). Real
records are used when every stage has all 14,042 in data/results; otherwise synthetic ones
(records.synthetic_table(14042, 3)) written as the benchmark writes them into a temporary folder.

    .venv/bin/python bench/app_latency.py [--steps 30] [--target-ms 300]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

STAGES = ("smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b")
N_MMLU = 14042


def real_records_complete() -> bool:
    import pandas as pd

    for stage in STAGES:
        path = REPO / "data" / "results" / "mmlu" / f"{stage}.parquet"
        if not path.exists() or len(pd.read_parquet(path, columns=["qid"])) < N_MMLU:
            return False
    return True


def write_synthetic(root: Path) -> None:
    from cascade_core.records.mmlu import load_mmlu
    from cascade_core.io import atomic_write_parquet
    from cascade_core.records.table import synthetic_table
    from app_ui.view_model import record_frames

    mmlu = load_mmlu()
    table = synthetic_table(len(mmlu), len(STAGES), seed=0)
    frames = record_frames(table, qids=mmlu["qid"].to_numpy(), splits=mmlu["split"].to_numpy())
    for name, frame in zip(STAGES, frames):
        frame = frame.assign(stage=name, model_id=name, subject=mmlu["subject"].to_numpy())
        atomic_write_parquet(frame, root / "mmlu" / f"{name}.parquet")


def explorer_failed(at) -> bool:
    """True (and says why on stderr) when the last run of the page raised."""
    if at.exception:
        print("the explorer failed:", [e.value for e in at.exception], file=sys.stderr)
    return bool(at.exception)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="slider changes to time")
    parser.add_argument("--target-ms", type=float, default=300.0)
    parser.add_argument("--end", default="",
                        help="end the cascade with a recorded stage, e.g. gpt-4-recorded (4 stages)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        if real_records_complete():
            source = "real records (data/results)"
        else:
            source = "synthetic records (records.synthetic_table(14042, 3)); full real records do not exist yet"
            os.environ["CASCADE_RESULTS_DIR"] = str(Path(tmp) / "results")
            write_synthetic(Path(tmp) / "results")

        from streamlit.testing.v1 import AppTest

        at = AppTest.from_file(str(REPO / "app.py"), default_timeout=300)
        at.query_params.update({"split": "all", **({"end": args.end} if args.end else {})})
        at.run()
        at.switch_page("pages/2_Explore_thresholds.py")
        started = time.perf_counter()
        at.run()
        first = time.perf_counter() - started
        if explorer_failed(at):
            return 1
        shown = next(m for m in at.metric if m.label == "Accuracy").help or ""
        if f"over {N_MMLU:,} questions" not in shown:
            print(f"the explorer does not show {N_MMLU:,} questions: {shown!r}", file=sys.stderr)
            return 1
        key = "x::default::smollm2-135m::tau_t"
        values = [0.30 + 0.6 * (i % 20) / 19 for i in range(args.steps + 3)]
        times = []
        accuracies = set()
        for i, value in enumerate(values):
            at.slider(key=key).set_value(round(value, 3))
            t0 = time.perf_counter()
            at.run()
            elapsed = time.perf_counter() - t0
            if explorer_failed(at):
                return 1
            accuracies.add(next(m.value for m in at.metric if m.label == "Accuracy"))
            if i >= 3:  # the first reruns warm Python's own caches
                times.append(elapsed)

    times_ms = sorted(t * 1000 for t in times)
    median = statistics.median(times_ms)
    p90 = times_ms[int(0.9 * (len(times_ms) - 1))]
    print(f"records: {source}")
    stages = len(STAGES) + bool(args.end)
    print(f"explorer, 14,042 questions x {stages} stages{' (ending with ' + args.end + ')' if args.end else ''}, "
          f"split all: first render with cold caches {first:.2f} s")
    print(f"slider change -> re-rendered page, {len(times_ms)} changes: median {median:.0f} ms, "
          f"p90 {p90:.0f} ms, max {times_ms[-1]:.0f} ms (target <= {args.target_ms:.0f} ms)")
    print(f"distinct accuracies shown: {len(accuracies)}")
    print(json.dumps({"median_ms": round(median, 1), "p90_ms": round(p90, 1), "max_ms": round(times_ms[-1], 1),
                      "first_render_s": round(first, 2), "steps": len(times_ms), "questions": N_MMLU,
                      "stages": stages, "records": "real" if source.startswith("real") else "synthetic",
                      "target_ms": args.target_ms, "meets_target": median <= args.target_ms}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
