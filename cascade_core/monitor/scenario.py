"""The drift scenario of issue 25, item 7, on the shipped `arith` records.

Cascade: SmolLM2-135M -> Qwen2.5-Coder-1.5B (the 1.5B is the label-free reference). Policy:
chosen by `calibrated.calibrate_policy` label-free (`label_free`: disagreement with the 1.5B's
answer by the dataset's `numeric` grader) on the calibration questions of the EASY groups only
(1-digit composites, 2-digit + - x), rule pt_only, target `target`, delta `delta`. SmolLM2 is
least sure of itself on those, and confidently wrong on 4-5 digit sums and differences (HARD):
there its P(T) is higher, it keeps far more, and almost every kept answer disagrees with the
1.5B's. So a stream of easy test questions followed by hard ones is a shift the promise does not
survive, and an easy stream alone is the calibration distribution.

`run_stream` drives the real monitor (`service.Monitor`, a real SQLite file) with the real
cascade runner (`cascade.run_cascade`) over stages that replay the models' recorded answers
(`replay_stage`); audits run inline so a seed fixes everything. Used by tests/test_drift.py and
bench/monitor_drift.py.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

EASY = ("1DC", "2D+", "2D-", "2Dx")
HARD = ("4D+", "4D-", "5D+", "5D-")
STAGES = ("smollm2-135m", "qwen2.5-coder-1.5b")


@dataclass
class Scenario:
    policy: object  # CascadePolicy
    info: object  # service.PolicyInfo
    stages: list  # RuntimeStage, replaying records
    texts: dict  # qid -> question text
    easy_test: list  # qids
    hard: list  # qids
    calibration: dict  # the chosen policy's calibration figures


def arith_scenario(results_dir: Path | str = "data/results", arith_file: Path | str = "data/arith/arith.jsonl",
                   target: float = 0.15, delta: float = 0.1) -> Scenario:
    """The policy, its expectation and the replaying stages (module docstring)."""
    from cascade_core.records.runner import load_records
    from cascade_core.choose.calibrated_policy import calibrate_policy
    from cascade_core.cascade import RuntimeStage
    from cascade_core.records.registry import read_metadata
    from cascade_core.graders import grader_from_dict
    from cascade_core.choose.label_free import disagreement_loss, label_free_table
    from cascade_core.monitor.drift import expectation
    from cascade_core.monitor.replay_stage import RecordedAnswers, arith_questions
    from cascade_core.monitor.service import PolicyInfo
    from cascade_core.records.table import RecordTable

    folder = Path(results_dir) / "arith"
    frames = [load_records(folder / f"{name}.parquet") for name in STAGES]
    table = RecordTable.from_frames(frames, names=STAGES)
    answers = [f.assign(qid=f["qid"].astype(str)).set_index("qid").loc[table.qids, "answer_text"].tolist()
               for f in frames]
    g = read_metadata("arith", Path(results_dir))["grader"]
    grader = grader_from_dict(g)
    lf = label_free_table(table, disagreement_loss(answers, equivalent=grader.equivalent))
    easy = np.isin(table.subjects, EASY)
    calib_mask = easy & (table.splits == "calibration")
    chosen = calibrate_policy(lf.subset(calib_mask), target_max_loss=target, delta=delta, rules=("pt_only",),
                              unit="flops")
    expected = expectation(table.subset(calib_mask), chosen.policy)
    digest = hashlib.sha256(json.dumps(chosen.policy.to_dict(), sort_keys=True, default=str).encode()).hexdigest()
    description = (f"scenario: label-free <= {target * 100:g} pt at delta {delta:g} on "
                   f"{int(calib_mask.sum())} easy arith calibration questions")
    info = PolicyInfo(hash=digest, kind="free", description=description, stages=STAGES, target=target, delta=delta,
                      grader=g["name"], tolerance=float(g.get("tolerance", 1e-6)), expectation=expected)
    items = arith_questions(arith_file)
    texts = {q: items[q]["question"] for q in table.qids}
    stages = [RuntimeStage(name, RecordedAnswers(folder / f"{name}.parquet", texts), policy=chosen.policy.stages[i],
                           policy_source=description) for i, name in enumerate(STAGES)]
    easy_test = [str(q) for q in table.qids[easy & (table.splits == "test")]]
    hard = [str(q) for q in table.qids[np.isin(table.subjects, HARD)]]
    return Scenario(chosen.policy, info, stages, texts, easy_test, hard, dict(chosen.calibration))


def stream(scn: Scenario, n_easy: int, n_hard: int, seed: int) -> list[str]:
    """`n_easy` easy test questions then `n_hard` hard ones, each drawn (with replacement when
    more are asked than exist) in a seeded order."""
    rng = np.random.default_rng(seed)
    pick = lambda pool, n: [pool[i] for i in (rng.permutation(len(pool))[:n] if n <= len(pool)  # noqa: E731
                                               else rng.integers(0, len(pool), n))]
    return pick(scn.easy_test, n_easy) + pick(scn.hard, n_hard)


def run_stream(scn: Scenario, qids, db: Path | str, *, audit_share: float = 0.02, seed: int = 0,
               alpha: float | None = None, fallback: bool = False) -> dict:
    """Feed `qids` through the cascade and the monitor; when the drift alarm first fired and when
    the re-certification first said "at risk" / "broken" (question numbers, 1-based; None:
    never), and the final summary."""
    from cascade_core.cascade import run_cascade
    from cascade_core.monitor.drift import DEFAULT_ALPHA
    from cascade_core.monitor.service import Monitor
    from cascade_core.monitor.trace_store import TraceStore
    from cascade_core.types import Question

    store = TraceStore(db)
    monitor = Monitor(store, {"free": scn.info}, audit_share=audit_share, seed=seed,
                      alpha=DEFAULT_ALPHA if alpha is None else alpha, fallback=fallback, inline_audits=True)
    watch = monitor.watches["free"]
    first = {"drift": None, "at risk": None, "broken": None}
    try:
        for i, qid in enumerate(qids, start=1):
            question = Question(text=scn.texts[qid])
            stages, note = monitor.stages_for("cascade-arith", scn.stages, question)
            trace = run_cascade(stages, question, max_new_tokens=16)
            monitor.record("cascade-arith", stages, question, trace, 0.0, note, max_new_tokens=16)
            monitor.after_response(trace)
            if watch.drift_alarm and first["drift"] is None:
                first["drift"] = i
            status = watch.status
            for key in ("at risk", "broken"):
                if first[key] is None and (status == key or (key == "at risk" and status == "broken")):
                    first[key] = i
        return {"first": first, "summary": watch.summary()}
    finally:
        monitor.close()
