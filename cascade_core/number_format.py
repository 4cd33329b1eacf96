"""The number format a stage computes in, said where it matters (one home for the sentence).

The project's evidence (the committed records, the probes and the calibrated policy files) was
made in bfloat16. dtype "auto" resolves to bfloat16 only where the CPU computes it natively and
to float32 elsewhere (`models.hf.resolve_dtype`), and the two formats give a different answer on
about 5% of MMLU questions (Qwen2.5-Coder-1.5B, 114 questions: the same letter on 94.7%, P(T)
within 0.034; issue 18). So `route`, the app and `serve`'s `/v1/models` say the live format per
stage and, when it differs from the format the policy was calibrated on, say so plainly:

    float32 here; calibrated on bfloat16 records: about 5% of answers may differ

They all call `format_note`; `bench` refuses emulated bfloat16 with `emulated_bf16_refusal`.
Pure strings in, strings out: the composition layer (`compose/formats.py`) resolves the formats.
"""

from __future__ import annotations

from typing import Sequence

RECORDS_DTYPE = "bfloat16"  # the canonical format of the committed records
ANSWERS_DIFFER = 0.053  # share of MMLU answers that change between bfloat16 and float32 (1 - 94.7%)
EMULATED_SLOWDOWN = ("measured on a 2-core AVX2-only EPYC (docs/BENCHMARKS.md): SmolLM2-135M 4.9 s vs 0.72 s "
                     "and Qwen2.5-Coder-1.5B 51 s vs 9.9 s per MMLU question, bfloat16 vs float32")
ALLOW_EMULATED_FLAG = "--allow-emulated-bf16"
ALLOW_EMULATED_ENV = "CASCADE_ALLOW_EMULATED_BF16"  # =1: the same for `make bench` / `make bench-full`


def differs(live: str | None, calibrated: str | None) -> bool:
    """Whether a stage computes in another format than the one its policy was calibrated on
    (False when either is unknown: a remote or recorded stage, or records without a format)."""
    return bool(live) and bool(calibrated) and live != calibrated


def format_note(live: str | None, calibrated: str | None = None, emulated: bool = False,
                basis: str = "calibrated on") -> str:
    """One stage's number format in words: "float32", or, when it differs from the records' format,
    "float32 here; calibrated on bfloat16 records: about 5% of answers may differ". `emulated`: the
    live format is bfloat16 on a CPU that only emulates it (several times slower). `basis`: how the
    records relate to the thresholds ("calibrated on" for a policy file, "records made in" else).
    "" when the live format is unknown (a remote or recorded stage)."""
    if not live:
        return ""
    text = live
    if differs(live, calibrated):
        records = (f"calibrated on {calibrated} records" if basis == "calibrated on"
                   else f"the records were made in {calibrated}")
        text = f"{live} here; {records}: about {ANSWERS_DIFFER:.0%} of answers may differ"
    if emulated:
        text += " (emulated on this CPU: several times slower than float32)"
    return text


def emulated_bf16_refusal(stages: Sequence[str]) -> str:
    """Why `bench` will not run: these stages would compute in bfloat16 on a CPU without native
    bfloat16, where torch emulates it, and how to run anyway."""
    return (f"{', '.join(stages)} would run in EMULATED bfloat16: this CPU has no native bfloat16 (no avx512_bf16 "
            f"or amx_bf16 flag), where it is 5-7x slower than float32 ({EMULATED_SLOWDOWN}). Benchmark on a CPU "
            f"with native bfloat16 (the committed records are bfloat16), into another --results-dir in float32 "
            f"(CASCADE_AUTO_DTYPE=float32), or force it with {ALLOW_EMULATED_FLAG} "
            f"({ALLOW_EMULATED_ENV}=1 for make bench / make bench-full)")
