"""The calibration/test split and the per-subject sample, fixed once and written down as ids.

Probes and thresholds are chosen on the calibration half and numbers are reported on the test
half; mixing them would report a number chosen on the split it is reported on. So the split is
not drawn at run time: `data/mmlu/split.json` lists the ids, and every run reads it.

Method (reproducible from the seed alone, with no random-number library whose stream could
change between versions): within each subject, order the qids by the SHA-256 hex digest of
"<seed>:<qid>"; positions 0, 2, 4, ... of that order are calibration, 1, 3, 5, ... are test.
Each subject is therefore split in halves (calibration gets the extra question of an odd
subject), and the first N of a subject's order hold ceil(N/2) calibration and floor(N/2) test
questions, so `--per-subject N` is balanced and growing N only adds questions.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd

SPLITS = ("calibration", "test")
SPLIT_SEED = 2602_22090  # the paper's arXiv number; any fixed integer would do
SPLIT_METHOD = (
    "per-subject seeded order: sort each subject's qids by sha256('<seed>:<qid>') hex digest; "
    "even positions of that order -> calibration, odd -> test; lists are stored in that order"
)


def order_key(qid: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}:{qid}".encode("utf-8")).hexdigest()


def seeded_ranks(frame: pd.DataFrame, seed: int = SPLIT_SEED) -> pd.Series:
    """Each row's position (0, 1, ...) in its subject's seeded order; needs columns qid, subject."""
    _require(frame, ("qid", "subject"))
    keys = frame["qid"].astype(str).map(lambda q: order_key(q, seed))
    ordered = pd.DataFrame({"subject": frame["subject"].astype(str), "key": keys}, index=frame.index)
    return ordered.groupby("subject")["key"].rank(method="first").astype(np.int64) - 1


def assign_split(frame: pd.DataFrame, seed: int = SPLIT_SEED) -> pd.DataFrame:
    """Columns qid, split, rank for `frame` (qid, subject) by the method above."""
    ranks = seeded_ranks(frame, seed)
    split = np.where(ranks.to_numpy() % 2 == 0, SPLITS[0], SPLITS[1])
    return pd.DataFrame({"qid": frame["qid"].astype(str).to_numpy(), "split": split, "rank": ranks.to_numpy()})


def split_document(frame: pd.DataFrame, seed: int = SPLIT_SEED) -> dict:
    """The JSON-ready split of `frame` (qid, subject): seed, method, counts and the qid lists."""
    assigned = assign_split(frame, seed)
    assigned["subject"] = frame["subject"].astype(str).to_numpy()
    subjects: dict[str, dict[str, list[str]]] = {}
    for subject, rows in sorted(assigned.groupby("subject"), key=lambda kv: kv[0]):
        rows = rows.sort_values("rank")
        subjects[subject] = {s: rows.loc[rows["split"] == s, "qid"].tolist() for s in SPLITS}
    counts = {s: int((assigned["split"] == s).sum()) for s in SPLITS}
    counts["subjects"] = len(subjects)
    return {"seed": seed, "method": SPLIT_METHOD, "counts": counts, "subjects": subjects}


def write_split_json(path: Path | str, document: dict) -> None:
    """Readable and diff-friendly: one line per subject and half."""
    from cascade_core.io import atomic_write_text

    lines = ["{", f'  "seed": {json.dumps(document["seed"])},', f'  "method": {json.dumps(document["method"])},',
             f'  "counts": {json.dumps(document["counts"], sort_keys=True)},', '  "subjects": {']
    items = list(document["subjects"].items())
    for i, (subject, halves) in enumerate(items):
        lines.append(f"    {json.dumps(subject)}: {{")
        lines.append(f'      "calibration": {json.dumps(halves["calibration"])},')
        lines.append(f'      "test": {json.dumps(halves["test"])}')
        lines.append("    }" + ("," if i < len(items) - 1 else ""))
    lines += ["  }", "}"]
    atomic_write_text(path, "\n".join(lines) + "\n")


def read_split_json(path: Path | str) -> pd.DataFrame:
    """qid, subject, split, rank from a split file; a damaged file raises ValueError naming it."""
    path = Path(path)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        rows = []
        for subject, halves in document["subjects"].items():
            for s_index, s in enumerate(SPLITS):
                for i, qid in enumerate(halves[s]):
                    rows.append((qid, subject, s, 2 * i + s_index))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"cannot read the split file {path}: {err}") from None
    frame = pd.DataFrame(rows, columns=["qid", "subject", "split", "rank"])
    if frame["qid"].duplicated().any():
        dup = frame.loc[frame["qid"].duplicated(), "qid"].iloc[0]
        raise ValueError(f"the split file {path} lists {dup!r} twice")
    frame.attrs["seed"] = document.get("seed")
    return frame


def take_per_subject(frame: pd.DataFrame, n: int) -> pd.DataFrame:
    """The first `n` questions of each subject's seeded order (all of a smaller subject).

    `frame` needs a `rank` column (from `assign_split` or the split file). Half of them are
    calibration and half test (calibration gets the odd one), and a larger `n` keeps every
    question a smaller `n` chose.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"per_subject must be a positive integer, got {n!r}")
    _require(frame, ("rank",))
    return frame[frame["rank"] < n]


def _require(frame: pd.DataFrame, columns) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"missing column(s) {missing}; found {list(frame.columns)}")


def select_rows(table: pd.DataFrame, split: str | None, per_subject: int | None, subjects,
                unknown_subjects) -> pd.DataFrame:
    """Some questions of a table with `subject` and `split` columns: some subjects (an unknown one
    raises `unknown_subjects(sorted unknown names)`), the first `per_subject` of each subject's
    seeded order (picked before the split filters them), one split ("calibration" / "test"; None
    or "all": both). MMLU's loader and the dataset registry select alike through this."""
    if split not in (None, "all") and split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of: all, {', '.join(SPLITS)}")
    if subjects is not None:
        wanted = [subjects] if isinstance(subjects, str) else list(subjects)
        unknown = sorted(set(wanted) - set(table["subject"]))
        if unknown:
            raise unknown_subjects(unknown)
        table = table[table["subject"].isin(wanted)]
    if per_subject is not None:
        table = take_per_subject(table, per_subject)
    if split in SPLITS:
        table = table[table["split"] == split]
    return table

