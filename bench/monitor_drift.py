"""Detection delay and false alarms of the monitor's drift alarm and re-certification (issue 25).

The scenario of `cascade_core.monitor.scenario`: SmolLM2-135M -> Qwen2.5-Coder-1.5B, calibrated
label-free (<= 15 pt at delta 0.1) on the easy arith groups' calibration questions; streams of
that policy's traffic replayed from the committed arith records through the real cascade runner,
the real monitor and a real SQLite file per run.

- shifted: `--easy` easy test questions, then `--hard` 4-5 digit ones; per seed, how many
  questions after the shift the drift alarm fired and the re-certification said "broken", at
  each audit share;
- unshifted: `--quiet` easy test questions (drawn with replacement); per seed, whether the drift
  alarm or "broken" fired at all (a false alarm).

Prints progress to stderr and ends with one JSON line.
Run: .venv/bin/python bench/monitor_drift.py [--seeds 20]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cascade_core.monitor.scenario import arith_scenario, run_stream, stream


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--easy", type=int, default=200)
    parser.add_argument("--hard", type=int, default=400)
    parser.add_argument("--quiet", type=int, default=1000)
    parser.add_argument("--shares", type=float, nargs="+", default=[0.02, 0.1])
    args = parser.parse_args()
    started = time.perf_counter()
    scn = arith_scenario()
    out = {"scenario": scn.info.description, "alpha": 1e-4, "delta": scn.info.delta, "seeds": args.seeds,
           "easy": args.easy, "hard": args.hard, "quiet": args.quiet, "shifted": {}, "unshifted": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for share in args.shares:
            drift, broken = [], []
            for seed in range(args.seeds):
                r = run_stream(scn, stream(scn, args.easy, args.hard, seed), Path(tmp) / f"s{share}-{seed}.db",
                               audit_share=share, seed=seed)
                first = r["first"]
                drift.append(None if first["drift"] is None else first["drift"] - args.easy)
                broken.append(None if first["broken"] is None else first["broken"] - args.easy)
                print(f"shifted share {share}: seed {seed} drift after {drift[-1]}, broken after {broken[-1]}",
                      file=sys.stderr, flush=True)
            out["shifted"][str(share)] = _delays(drift, broken, args.hard)
            falses_drift, falses_broken = 0, 0
            for seed in range(args.seeds):
                r = run_stream(scn, stream(scn, args.quiet, 0, 1000 + seed), Path(tmp) / f"q{share}-{seed}.db",
                               audit_share=share, seed=1000 + seed)
                falses_drift += r["first"]["drift"] is not None
                falses_broken += r["first"]["broken"] is not None
                print(f"unshifted share {share}: seed {seed} {r['first']}", file=sys.stderr, flush=True)
            out["unshifted"][str(share)] = {"runs": args.seeds, "drift_false_alarms": falses_drift,
                                            "broken_false_alarms": falses_broken}
    out["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(out))


def _delays(drift, broken, hard) -> dict:
    def stats(values):
        hit = [v for v in values if v is not None and v > 0]
        early = sum(1 for v in values if v is not None and v <= 0)
        return {"detected": len(hit), "before_shift": early, "median": float(np.median(hit)) if hit else None,
                "max": max(hit) if hit else None, "missed_within": hard if len(hit) < len(values) else None}

    return {"drift_alarm_delay": stats(drift), "broken_delay": stats(broken)}


if __name__ == "__main__":
    main()
