"""Atomic file writes and checked reads: nothing half-written ever passes for a whole file.

Every file a user or a later run loads (records, features, probes, reports) is written to a
temporary file in the same folder and renamed into place, which is atomic on POSIX filesystems.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pandas as pd


class CorruptFileError(ValueError):
    """A results, probe or feature file that cannot be read; the message names the file."""


@contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; results are meant to be shared
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def atomic_write_text(path: Path | str, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: Path | str, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n")


def atomic_write_parquet(frame: pd.DataFrame, path: Path | str) -> None:
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False, compression="zstd")


def atomic_write_npz(path: Path | str, **arrays: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.savez_compressed(handle, **arrays)


def read_parquet_checked(path: Path | str, required: Sequence[str] = ()) -> pd.DataFrame:
    """Read a parquet file; a corrupt or truncated one, or one missing columns, names the file."""
    path = Path(path)
    try:
        frame = pd.read_parquet(path)
    except FileNotFoundError:
        raise
    except Exception as err:  # noqa: BLE001 - pyarrow raises several types for damaged files
        raise CorruptFileError(f"cannot read {path}: not a valid parquet file ({err})") from None
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise CorruptFileError(f"{path} lacks columns {missing}")
    return frame


def log_tail(path: Path | str, lines: int = 20, max_bytes: int = 16_000) -> str:
    """The last `lines` non-blank lines of a child process's log (a background job's, a vLLM
    server's), read from its last `max_bytes` only (a long log is never read whole), progress
    bars' carriage returns resolved to what the terminal last showed; "" when there is no log."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            start = max(0, f.tell() - max_bytes)
            f.seek(start)
            text = f.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ""
    if start:  # begun mid-line (maybe mid-character): that piece of a line is not shown
        text = text.split("\n", 1)[-1]
    shown = [line.rstrip("\r").rsplit("\r", 1)[-1] for line in text.split("\n")]
    return "\n".join([line for line in shown if line.strip()][-lines:])
