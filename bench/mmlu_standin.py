"""A stand-in for the full MMLU's records (all 14,042 test questions), made to TIME the report.

    .venv/bin/python bench/mmlu_standin.py /tmp/standin          # -> /tmp/standin/{results,hidden}/mmlu/...

Its numbers are not results: they are the committed records resampled. Why it exists: issue 19
wants `report` on 14,042 x 4 in at most 60 s before the full benchmark has finished, so its
speed is measured on a folder shaped like the finished run's (`bench/report_speed.py --standin`).
Never commit its output (write it under a temporary folder).

How it is made, per question of MMLU's test set (real qid, subject, split and answer):
- a question every local stage has answered (the joined records) keeps its own real rows;
- any other question takes, for all local stages together, the rows of one joined question of
  the same subject drawn at random (seeded, with replacement): correctness, P(T), margin,
  entropy, P(IK), tokens, FLOPs and seconds are that question's, the prediction is moved so
  that it is right (or wrong) against this question's own answer as it was against the source's;
- GPT-4's outcomes are the recorded ones (they exist for every question);
- hidden-state features, one layer per stage as a clone has them (`data/hidden/`): SmolLM2's
  committed layer of the source question; stages without committed features for the joined
  questions get the source's SmolLM2 row through a fixed random projection to their width plus
  noise (float16), so the probes train on rows of the real width and a learnable signal.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cascade_core.locations import locations
from cascade_core.records.mmlu import load_mmlu
from cascade_core.records.features import export_layer, load_layer
from cascade_core.presets import load_preset

# The probes' layers and widths of the default models (data/probes/*.npz metadata).
LAYERS = {"smollm2-135m": (13, 576), "qwen2.5-coder-0.5b": (17, 896), "qwen2.5-coder-1.5b": (24, 1536)}
SOURCE_FEATURES = "smollm2-135m"  # the only stage whose committed layer covers every joined question


def _load(path: Path) -> pd.DataFrame:
    frame = pd.read_parquet(path)
    if frame["qid"].duplicated().any():
        raise ValueError(f"{path}: duplicated qids")
    return frame.set_index("qid", drop=False)


def build_standin(out: Path | str, results_dir: Path | str | None = None, hidden_dir: Path | str | None = None,
                  seed: int = 0, preset: str = "default") -> dict:
    """Write the stand-in under `out` (results/mmlu/<stage>.parquet, hidden/mmlu/<stage>/); returns
    a summary (questions, real joined questions, resampled ones). Reads the committed records
    (or `results_dir`) and the committed features (or `hidden_dir`)."""
    out = Path(out)
    where = locations(results_dir)
    hidden_root = Path(hidden_dir) if hidden_dir else where.hidden_dir("mmlu")
    stages = [c.name for c in load_preset(preset).stages if c.enabled and c.backend != "recorded"]
    frames = {s: _load(where.record_path(s)) for s in stages}
    joined = sorted(set.intersection(*(set(f.index) for f in frames.values())))
    questions = load_mmlu()
    subjects = questions["subject"].to_numpy(dtype=str)
    qids = questions["qid"].to_numpy(dtype=str)
    source_subject = frames[stages[0]].loc[joined, "subject"].to_numpy(dtype=str)
    joined = np.asarray(joined, dtype=str)
    rng = np.random.default_rng(seed)
    is_joined = np.isin(qids, joined)
    source = qids.copy()
    for subject in np.unique(subjects):
        pool = joined[source_subject == subject]
        need = (subjects == subject) & ~is_joined
        if need.any():
            if pool.size == 0:
                raise ValueError(f"subject {subject!r} has no joined records to resample from")
            source[need] = rng.choice(pool, size=int(need.sum()), replace=True)
    answers = questions["answer"].to_numpy(dtype=np.int64)
    for stage, frame in frames.items():
        rows = frame.loc[source].reset_index(drop=True)
        old_answer = rows["answer"].to_numpy(dtype=np.int64)
        old_pred = rows["prediction"].to_numpy(dtype=np.int64)
        n_options = rows["option_probs"].map(len).to_numpy()
        shift = (answers - old_answer) % n_options  # the same offset from the answer as the source had
        rows["prediction"] = ((old_pred + shift) % n_options).astype(rows["prediction"].dtype)
        rows["option_probs"] = [np.roll(np.asarray(p), int(k)) for p, k in zip(rows["option_probs"], shift)]
        rows["qid"], rows["subject"], rows["answer"] = qids, subjects, answers
        rows["category"] = questions["category"].to_numpy(dtype=str)
        rows["split"] = questions["split"].to_numpy(dtype=str)
        if not np.array_equal(rows["prediction"].to_numpy() == answers, rows["correct"].to_numpy()):
            raise AssertionError(f"{stage}: moving the predictions changed correctness")
        path = out / "results" / "mmlu" / f"{stage}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        rows.to_parquet(path, index=False)
    base_qids, base_layers = load_layer(hidden_root / SOURCE_FEATURES)
    (base,) = base_layers.values()
    position = pd.Series(np.arange(len(base_qids)), index=base_qids)
    missing = np.setdiff1d(source, base_qids)
    if missing.size:
        raise ValueError(f"{SOURCE_FEATURES}: {missing.size} source questions have no committed features "
                         f"(e.g. {missing[0]!r})")
    source_rows = base[position.loc[source].to_numpy()]
    for stage in stages:
        layer, width = LAYERS[stage]
        if stage == SOURCE_FEATURES:
            rows = source_rows
        else:
            stage_rng = np.random.default_rng([seed, width])
            projection = stage_rng.standard_normal((source_rows.shape[1], width)).astype(np.float32)
            rows = source_rows @ projection / np.sqrt(source_rows.shape[1])
            rows = rows + 0.5 * rows.std() * stage_rng.standard_normal(rows.shape).astype(np.float32)
        export_layer(out / "hidden" / "mmlu" / stage, qids, qids, rows, layer=layer, model_id=stage)
    summary = {"questions": int(len(qids)), "joined_real": int(is_joined.sum()),
               "resampled": int((~is_joined).sum()), "stages": stages, "seed": seed}
    (out / "STANDIN.json").write_text(json.dumps({**summary, "note": "timing input, not results"}, indent=1))
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="folder to write (a temporary one: never commit it)")
    parser.add_argument("--results-dir", default=None, help="records to resample (default: the committed ones)")
    parser.add_argument("--hidden-dir", default=None, help="committed features (default: data/hidden/mmlu)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(json.dumps(build_standin(args.out, args.results_dir, args.hidden_dir, args.seed)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
