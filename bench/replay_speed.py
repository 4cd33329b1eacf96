"""How fast replay and the threshold sweep are on an MMLU-sized table (14,042 questions x 3 stages).

The Threshold explorer replays a policy on every slider move and sweeps thousands of policies for
the frontier, so both must stay interactive. The table is synthetic (seeded): speed does not
depend on what the numbers mean. Ends with one JSON line.

    .venv/bin/python bench/replay_speed.py [--questions 14042] [--stages 3] [--repeats 200]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cascade_core.choose.sweep import sweep
from cascade_core.policy import CascadePolicy
from cascade_core.records.table import synthetic_table
from cascade_core.choose.replay import replay


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=14_042)
    parser.add_argument("--stages", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--rule", default="both")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    table = synthetic_table(args.questions, args.stages, seed=args.seed)
    rng = np.random.default_rng(args.seed)
    policies = [CascadePolicy.from_lists(list(rng.uniform(0.3, 0.9, args.stages)),
                                         list(rng.uniform(0.2, 0.8, args.stages)),
                                         rule=args.rule) for _ in range(args.repeats)]
    replay(table, policies[0])  # warm the cost cache, as the app does once per table
    times = []
    for policy in policies:
        started = time.perf_counter()
        replay(table, policy)
        times.append(time.perf_counter() - started)
    replay_ms = float(np.median(times) * 1e3)

    sweep(table, rule=args.rule)  # warm-up
    sweep_times = []
    for _ in range(5):
        started = time.perf_counter()
        result = sweep(table, rule=args.rule)
        sweep_times.append(time.perf_counter() - started)
    sweep_s = float(np.median(sweep_times))

    print(f"machine: {platform.processor() or platform.machine()}, python {platform.python_version()}, numpy "
          f"{np.__version__}")
    print(f"table: {args.questions} questions x {args.stages} stages (synthetic, seed {args.seed}), rule {args.rule}")
    print(f"replay, one policy: median {replay_ms:.3f} ms over {args.repeats} policies")
    print(f"sweep: {len(result)} policies in {sweep_s:.3f} s (median of 5), "
          f"{sweep_s / len(result) * 1e6:.1f} us per policy; frontier (flops) {len(result.frontier('flops'))} points")
    print(json.dumps({"replay_ms_per_policy": round(replay_ms, 4), "sweep_seconds": round(sweep_s, 4),
                      "sweep_policies": len(result), "questions": args.questions, "stages": args.stages,
                      "rule": args.rule}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
