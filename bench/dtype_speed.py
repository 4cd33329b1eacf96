"""Seconds per MMLU question of a packaged model in each CPU dtype, one torch thread.

    .venv/bin/python bench/dtype_speed.py [KEY] [--questions 8] [--dtypes float32,bfloat16]

Why: bfloat16 is 3.8x faster than float32 on a CPU with AVX512-BF16, but where the CPU lacks
native bfloat16 torch emulates it and it is several times slower; `dtype = "auto"` picks by the
CPU's flags (`models.hf.cpu_has_native_bf16`). One warm-up question, then one batch of N real
MMLU prompts per dtype. Prints one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("key", nargs="?", default="smollm2-135m")
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    args = parser.parse_args()

    import torch

    from cascade_core.records.mmlu import load_mmlu, to_questions
    from cascade_core.prompts import format_prompt
    from models.hf import HFBackend, cpu_has_native_bf16

    torch.set_num_threads(1)
    questions = to_questions(load_mmlu(per_subject=1))[: args.questions]
    prompts = [format_prompt(q) for q in questions]
    figures: dict = {"model": args.key, "questions": len(prompts), "native_bf16": cpu_has_native_bf16(),
                     "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    for dtype in args.dtypes.split(","):
        backend = HFBackend.from_packaged(args.key, progress=False, device="cpu", dtype=dtype, quantization="none")
        backend.score_options(prompts[:1], [len(questions[0].options)], None)
        began = time.perf_counter()
        backend.score_options(prompts, [len(q.options) for q in questions], None)
        seconds = (time.perf_counter() - began) / len(prompts)
        figures[f"{dtype}_s_per_question"] = round(seconds, 3)
        print(f"{args.key} {dtype}: {seconds:.3f} s per question", flush=True)
        del backend
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
