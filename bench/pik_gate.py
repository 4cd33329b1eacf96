"""What the live P(IK) gate saves: a free-form answer generated, against the prompt's pass alone.

For each question (the first `--questions` of `mmlu-open`'s test split, in its seeded order) one
model answers three ways, greedy, at most `--max-new-tokens` tokens:
- `one_phase`: `generate(layers=[L])`, as without a gate;
- `gate_open`: `generate(layers=[L], gate=lambda h: True)`: the prompt's pass, the gate, then the
  answer from that pass's cache; its tokens must equal one_phase's (checked, counted);
- `gate_closed`: `generate(layers=[L], gate=lambda h: False)`: the prompt's pass only (what a stage
  costs when P(IK) < tau_ik).
The order of the three is rotated per question so no mode always runs first. Seconds are wall
time of each call on this process's torch threads (`--threads`, 1 by default).

    .venv/bin/python bench/pik_gate.py [--model smollm2-135m] [--questions 20] [--max-new-tokens 16]

Prints one line per mode and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--questions", type=int, default=20)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    import tempfile

    import torch

    from cascade_core.compose.jobs import bench_questions
    from cascade_core.prompts import format_prompt
    from cascade_core.types import Question
    from models.hf import HFBackend

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as results:  # the registry writes the split beside records: not ours
        questions = bench_questions("mmlu-open", split="test", results_dir=results).head(args.questions)
    backend = HFBackend.from_packaged(args.model, dtype=args.dtype, progress=False)
    layer = backend.n_layers // 2
    modes = {
        "one_phase": lambda p: backend.generate(p, max_new_tokens=args.max_new_tokens, layers=[layer]),
        "gate_open": lambda p: backend.generate(p, max_new_tokens=args.max_new_tokens, layers=[layer],
                                                gate=lambda h: True),
        "gate_closed": lambda p: backend.generate(p, max_new_tokens=args.max_new_tokens, layers=[layer],
                                                  gate=lambda h: False),
    }
    modes["one_phase"](format_prompt(Question(text="Warm-up: what is 1 + 1?")))  # first-call costs out of the timing
    seconds = {m: [] for m in modes}
    tokens = {m: [] for m in modes}
    same = 0
    names = list(modes)
    for i, text in enumerate(questions["question"]):
        prompt = format_prompt(Question(text=text))
        out = {}
        for m in names[i % 3:] + names[:i % 3]:
            began = time.perf_counter()
            out[m] = modes[m](prompt)
            seconds[m].append(time.perf_counter() - began)
            tokens[m].append(out[m].output_tokens)
        same += out["gate_open"].tokens == out["one_phase"].tokens
    n = len(questions)
    result = {"bench": "pik_gate", "model": args.model, "dtype": args.dtype, "threads": args.threads,
              "questions": n, "max_new_tokens": args.max_new_tokens, "identical_answers": same}
    for m in names:
        result[f"{m}_seconds_mean"] = round(statistics.mean(seconds[m]), 4)
        result[f"{m}_output_tokens_mean"] = round(statistics.mean(tokens[m]), 2)
        print(f"{m:12s} {result[f'{m}_seconds_mean']:.3f} s a question, {result[f'{m}_output_tokens_mean']:.1f} "
              "output tokens", file=sys.stderr)
    one_phase = result["one_phase_seconds_mean"]
    result["closed_gate_saves_share"] = round(1 - result["gate_closed_seconds_mean"] / one_phase, 4)
    result["two_phase_overhead_share"] = round(result["gate_open_seconds_mean"] / one_phase - 1, 4)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
