"""The record schema: every column a stage's records file may hold, its kind, and who writes it.

One place, read by the benchmark runner (`bench.py`, the columns it writes), the P(IK)
write-back (`compose.jobs`, the derived columns it adds), the loader (`validate_records`, run on
every file read) and the app (`ui_data.record_frames`, the inverse of the record table). A
violation names the file and the column, so a damaged or hand-edited file is refused at load
instead of bending every number computed from it.

`answer` is the right option's index, -1 for a dataset without answers (its `correct` is then
always false and only the label-free guarantee applies, `label_free`).

Kinds: "str", "int", "bool", "float", "list" (option probabilities). Ranges: probabilities in
[0, 1]; counts and costs >= 0. NaN: never in a required signal (`p_t`, `margin`); `p_ik` is NaN
where no probe has scored the question yet (questions benchmarked after the probe was trained).
"""

from __future__ import annotations

import functools
from pathlib import Path

from dataclasses import dataclass

import numpy as np
import pandas as pd

from cascade_core.io import CorruptFileError


@dataclass(frozen=True)
class Column:
    name: str
    kind: str
    low: float | None = None    # smallest allowed value (numbers)
    high: float | None = None   # largest allowed value
    nan_ok: bool = False        # whether a float column may hold NaN
    written_by: str = "bench"   # "bench" (the runner) or "derived" (added after the run)


COLUMNS: tuple[Column, ...] = (
    Column("qid", "str"), Column("subject", "str"), Column("category", "str"), Column("split", "str"),
    Column("stage", "str"), Column("model_id", "str"),
    Column("answer", "int", low=-1), Column("prediction", "int", low=-1), Column("correct", "bool"),
    Column("p_t", "float", 0.0, 1.0), Column("margin", "float", 0.0, 1.0), Column("entropy", "float", low=0.0),
    Column("option_probs", "list"),
    Column("prompt_tokens", "int", low=0), Column("output_tokens", "int", low=0),
    Column("flops", "float", low=0.0), Column("seconds", "float", low=0.0),
    Column("model_hash", "str"), Column("prompt_format", "str"), Column("dtype", "str"),
    Column("quantization", "str"), Column("code_version", "str"), Column("created_at", "str"),
    # Derived: P(IK) from the probe (`probes train`), dollars from the stage's prices, recorded flag.
    Column("p_ik", "float", 0.0, 1.0, nan_ok=True, written_by="derived"),
    Column("p_ik_source", "str", written_by="derived"),
    Column("dollars", "float", low=0.0, written_by="derived"),
    Column("recorded", "bool", written_by="derived"),
)
BY_NAME = {c.name: c for c in COLUMNS}
RUNNER_COLUMNS: tuple[str, ...] = tuple(c.name for c in COLUMNS if c.written_by == "bench")
DERIVED_COLUMNS: tuple[str, ...] = tuple(c.name for c in COLUMNS if c.written_by == "derived")
# What a records file must have to be read at all; a table also needs the costs (RecordTable.from_frames).
REQUIRED: tuple[str, ...] = ("qid", "correct", "prediction", "p_t")
TABLE_REQUIRED: tuple[str, ...] = ("qid", "correct", "prompt_tokens", "prediction", "p_t", "flops", "seconds")
TABLE_REQUIRED_RECORDED: tuple[str, ...] = ("qid", "correct", "prompt_tokens")
# Float columns a RecordTable carries, in its order.
TABLE_FLOATS: tuple[str, ...] = ("p_t", "p_ik", "margin", "entropy", "prompt_tokens", "output_tokens",
                                 "flops", "seconds", "dollars")


class RecordSchemaError(CorruptFileError):
    """Records that break the schema; the message names the file (or stage) and the column."""


def _first_bad(frame: pd.DataFrame, mask: np.ndarray) -> str:
    row = int(np.flatnonzero(mask)[0])
    qid = frame["qid"].iloc[row] if "qid" in frame.columns else row
    return f"{int(mask.sum())} row(s), e.g. question {qid!r}"


def validate_records(frame: pd.DataFrame, source: str, required: tuple[str, ...] = REQUIRED) -> pd.DataFrame:
    """Check `frame` against the schema; return it unchanged, or raise RecordSchemaError naming
    `source` (the file) and the column. Columns outside the schema are allowed and not checked."""
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise RecordSchemaError(f"{source} lacks column(s) {missing}")
    if frame.empty:
        return frame
    for name in frame.columns:
        column = BY_NAME.get(name)
        if column is None or column.kind in ("str", "list"):
            continue
        values = frame[name]
        if column.kind == "bool":
            if values.isna().any():
                raise RecordSchemaError(f"{source}: column {name!r} has missing values "
                                        f"({_first_bad(frame, values.isna().to_numpy())})")
            if not (pd.api.types.is_bool_dtype(values) or set(pd.unique(values)) <= {0, 1, True, False}):
                raise RecordSchemaError(f"{source}: column {name!r} must be true/false, got dtype {values.dtype}")
            continue
        if not pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values):
            raise RecordSchemaError(f"{source}: column {name!r} must be numeric, got dtype {values.dtype} "
                                    f"(e.g. {values.iloc[0]!r})")
        array = values.to_numpy(dtype=np.float64, na_value=np.nan)
        nan = np.isnan(array)
        if nan.any() and not column.nan_ok:
            raise RecordSchemaError(f"{source}: column {name!r} has NaN or missing values ({_first_bad(frame, nan)})")
        if column.kind == "int" and (~nan & (array != np.round(array))).any():
            raise RecordSchemaError(f"{source}: column {name!r} must hold whole numbers "
                                    f"({_first_bad(frame, ~nan & (array != np.round(array)))})")
        with np.errstate(invalid="ignore"):
            too_low = ~nan & (array < column.low) if column.low is not None else np.zeros(len(array), bool)
            too_high = ~nan & (array > column.high) if column.high is not None else np.zeros(len(array), bool)
            infinite = np.isinf(array)
        bad = too_low | too_high | infinite
        if bad.any():
            span = (f"in [{column.low:g}, {column.high:g}]" if column.high is not None
                    else f">= {column.low:g}")
            row = int(np.flatnonzero(bad)[0])
            raise RecordSchemaError(f"{source}: column {name!r} must be {span}, got {array[row]!r} "
                                    f"({_first_bad(frame, bad)})")
    if "option_probs" in frame.columns and "prediction" in frame.columns:
        # Multiple choice: the prediction (and a known answer) is one of the question's options.
        n_options = frame["option_probs"].map(lambda p: len(p) if p is not None else 0).to_numpy()
        for name in ("prediction", "answer"):
            if name not in frame.columns:
                continue
            values = frame[name].to_numpy()
            outside = (n_options > 0) & (values >= n_options)
            if outside.any():
                row = int(np.flatnonzero(outside)[0])
                raise RecordSchemaError(f"{source}: column {name!r} names option {int(values[row])} of a question with "
                                        f"{int(n_options[row])} options ({_first_bad(frame, outside)})")
    if "p_ik" in frame.columns and "p_ik_source" in frame.columns:
        scored = frame["p_ik_source"].fillna("").astype(str).str.len().to_numpy() > 0
        lost = scored & frame["p_ik"].isna().to_numpy()
        if lost.any():
            raise RecordSchemaError(f"{source}: column 'p_ik' is NaN where p_ik_source says a probe scored it "
                                    f"({_first_bad(frame, lost)})")
    return frame


def labelled_rows(frame: pd.DataFrame) -> np.ndarray:
    """Which records have a right answer to be graded against: for multiple choice an option index
    (`answer` >= 0), for free-form answers (`references`, a JSON list) at least one accepted answer."""
    if "references" in frame.columns:
        return (frame["references"].astype(str) != "[]").to_numpy()
    if "answer" in frame.columns:
        return (frame["answer"] >= 0).to_numpy()
    return np.ones(len(frame), dtype=bool)


def records_dtype(path: Path | str) -> str | None:
    """The `dtype` column of a records file ("bfloat16"; "bfloat16+float32" if mixed); None without one."""
    path = Path(path)
    try:
        stat = path.stat()
    except OSError:
        return None
    return _records_dtype(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=64)
def _records_dtype(path: str, mtime_ns: int, size: int) -> str | None:
    import pandas as pd

    try:
        column = pd.read_parquet(path, columns=["dtype"])["dtype"].astype(str)
    except Exception:  # noqa: BLE001 - no column, unreadable: the format is unknown, never an error here
        return None
    found = sorted(set(column) - {"", "None", "nan"})
    return "+".join(found) or None
