"""One registry that turns a `--dataset` value into a dataset: a built-in name or a question file.

`bench`, `probes train`, `calibrate` and `report` all take `--dataset`; they all ask
`resolve_dataset` (the questions) or `dataset_name` (only where its files live), so a dataset
means the same questions, split and grader everywhere. A value is:

- a built-in name: `mmlu` (the shipped 14,042 questions and their committed split,
  `data/mmlu/split.json`, untouched here); `arith` and `mmlu-open`, the shipped free-form sets
  (`cascade_core.records.arith`, `cascade_core.records.mmlu_open`: files under `data/`, registered like a user's
  file but named by their built-in name);
- a path to a `.jsonl`, `.csv` or `.parquet` file (`question_files` reads and checks it whole);
  the dataset is named after the file (`my_questions.csv` -> `my_questions`);
- the name of a file dataset benchmarked before (its `dataset.json` records the file's path).

A file dataset lives in `<results>/<name>/` beside its records: `split.json`, the seeded
calibration/test split (`split.split_document`: stratified by the file's group column, one
stratum when it has none), written once and then only read, so a changed file cannot quietly move
questions between the halves; and `dataset.json`, its metadata (source, hash, kind, grader,
whether it has answers, the columns used). Both are written only after the whole file passed its
checks: a refused file writes nothing.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cascade_core.locations import DATA_DIR
from cascade_core.graders import default_grader, get_grader
from cascade_core.io import atomic_write_json
from cascade_core.records.question_files import SUFFIXES, read_question_file
from cascade_core.records.split import (SPLIT_SEED, SPLITS, read_split_json, select_rows, split_document,
                                        write_split_json)

BUILTIN = ("mmlu", "arith", "mmlu-open")
RESERVED: tuple[str, ...] = ()  # names kept for shipped sets not built yet (none now)
# Shipped question files that are built-in datasets: (file, grader, tolerance). Their metadata names
# the source "builtin:<name>", not a path, so a clone in any folder reads the committed records.
BUILTIN_FILES = {"arith": (DATA_DIR / "arith" / "arith.jsonl", "numeric", 0.0),
                 "mmlu-open": (DATA_DIR / "mmlu_open" / "mmlu_open.jsonl", "choices", 0.0)}
META_FILE = "dataset.json"
SPLIT_FILE = "split.json"
META_FORMAT = "cascade-dataset"


@dataclass(frozen=True)
class Dataset:
    """A resolved dataset: its name (the folder under the results), its questions with their split,
    and what the metadata says (kind "mc" or "free", grader, whether every question has an answer)."""

    name: str
    kind: str
    grader: dict
    has_answers: bool
    questions: pd.DataFrame  # qid, subject, category, split, question, options, answer, references, rank
    source: str  # "builtin" or the file's path
    split_path: Path | None


def _results(results_dir) -> Path:
    from cascade_core.locations import locations

    return locations(results_dir).results


def _slug(stem: str) -> str:
    return re.sub(r"[^a-z0-9._-]+", "-", stem.lower()).strip("-.") or "dataset"


def looks_like_file(spec: str) -> bool:
    """True when `spec` names a file (a known suffix, or a path separator) rather than a dataset name."""
    return Path(spec).suffix.lower() in SUFFIXES or "/" in spec or "\\" in spec


def dataset_name(spec: str, results_dir: Path | str | None = None) -> str:
    """The folder name of `spec` (module docstring), without reading the questions; an unknown name
    is refused with the names that exist."""
    spec = str(spec).strip()
    if spec in BUILTIN:
        return spec
    if spec in RESERVED:
        raise ValueError(f"dataset {spec!r} is planned (issue 20) but not built yet; available: "
                         f"{', '.join(known_datasets(results_dir))}, or a .jsonl/.csv/.parquet file")
    if looks_like_file(spec):
        name = _slug(Path(spec).stem)
        if name in BUILTIN + RESERVED:
            raise ValueError(f"{spec}: a file dataset would be named {name!r}, which is a built-in dataset's name; "
                             "rename the file")
        return name
    if (_results(results_dir) / spec / META_FILE).is_file():
        return spec
    raise ValueError(f"unknown dataset {spec!r}; available: {', '.join(known_datasets(results_dir))}, "
                     "or a path to a .jsonl, .csv or .parquet file")


def known_datasets(results_dir: Path | str | None = None) -> list[str]:
    """The built-in names and the file datasets found under the results folder."""
    root = _results(results_dir)
    stored = sorted(p.parent.name for p in root.glob(f"*/{META_FILE}")) if root.is_dir() else []
    return list(BUILTIN) + [s for s in stored if s not in BUILTIN]


def read_metadata(name: str, results_dir: Path | str | None = None) -> dict:
    """A dataset's metadata: MMLU's is fixed; a file dataset's is its `dataset.json`."""
    if name == "mmlu":
        return {"format": META_FORMAT, "name": "mmlu", "source": "builtin", "kind": "mc", "grader": {"name": "mc"},
                "has_answers": True}
    path = _results(results_dir) / name / META_FILE
    if name in BUILTIN_FILES and not path.exists():  # a shipped set not benchmarked here yet
        found = resolve_dataset(name, results_dir, write=False)
        return {"format": META_FORMAT, "name": name, "source": f"builtin:{name}", "kind": found.kind,
                "grader": found.grader, "has_answers": found.has_answers, "questions": int(len(found.questions))}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"dataset {name!r} has no metadata at {path}; run `bench --dataset FILE` first") from None
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read the dataset metadata {path}: {err}") from None
    if not isinstance(data, dict) or data.get("format") != META_FORMAT:
        raise ValueError(f"{path} is not a dataset metadata file (format "
                         f"{data.get('format') if isinstance(data, dict) else None!r})")
    return data


def _mmlu() -> Dataset:
    from cascade_core.records.mmlu import MMLU_SPLIT_PATH, mmlu_table, MMLU_PATH

    table = mmlu_table(str(MMLU_PATH), str(MMLU_SPLIT_PATH)).copy()
    table["options"] = [list(o) for o in table["options"]]
    table["references"] = [[o[a]] for o, a in zip(table["options"], table["answer"])]
    return Dataset("mmlu", "mc", {"name": "mc"}, True, table, "builtin", MMLU_SPLIT_PATH)


def _split_of(table: pd.DataFrame, split_path: Path, source: Path) -> tuple[pd.DataFrame, bool]:
    """The table's split: the stored one when it exists (it must list exactly these questions in
    the same groups), else a new one; and whether it is new (to be written)."""
    keys = table[["qid", "subject"]]
    if not split_path.exists():
        return _ranked(keys, split_document(keys, SPLIT_SEED)), True
    stored = read_split_json(split_path)
    mine = dict(zip(table["qid"], table["subject"]))
    theirs = dict(zip(stored["qid"], stored["subject"]))
    if mine != theirs:
        extra = sorted(set(mine) - set(theirs))
        gone = sorted(set(theirs) - set(mine))
        moved = sorted(q for q in set(mine) & set(theirs) if mine[q] != theirs[q])
        detail = "; ".join(part for part in (
            f"{len(extra)} question(s) of the file are not in it (e.g. {extra[0]!r})" if extra else "",
            f"{len(gone)} of its questions are not in the file (e.g. {gone[0]!r})" if gone else "",
            f"{len(moved)} question(s) changed group (e.g. {moved[0]!r})" if moved else "") if part)
        raise ValueError(f"{source}: the stored split {split_path} was made for other questions: {detail}. Bench the "
                         f"new file under another name, or delete {split_path.parent} (its records too) to start over")
    return stored[["qid", "split", "rank"]], False


def _ranked(keys: pd.DataFrame, document: dict) -> pd.DataFrame:
    rows = []
    for halves in document["subjects"].values():
        for s_index, s in enumerate(SPLITS):
            rows += [(qid, s, 2 * i + s_index) for i, qid in enumerate(halves[s])]
    return pd.DataFrame(rows, columns=["qid", "split", "rank"])


def _file_dataset(path: Path, results_dir, grader: str | None, tolerance: float | None, write: bool,
                  builtin: str | None = None) -> Dataset:
    import hashlib

    name = builtin or dataset_name(str(path), results_dir)
    read = read_question_file(path)  # every check before anything is written
    folder = _results(results_dir) / name
    meta_path, split_path = folder / META_FILE, folder / SPLIT_FILE
    old = read_metadata(name, results_dir) if meta_path.exists() else None
    if builtin is None and old is not None and Path(old.get("source", "")).resolve() != path.resolve():
        raise ValueError(f"{path}: dataset {name!r} already exists for another file ({old.get('source')}); "
                         "rename the file or bench into another --results-dir")
    chosen = grader or (old or {}).get("grader", {}).get("name") or default_grader(read.kind, read.table["references"])
    if read.kind == "mc" and chosen != "mc":
        raise ValueError(f"{path}: a multiple-choice dataset is graded by 'mc', not {chosen!r}")
    if read.kind == "free" and chosen == "mc":
        raise ValueError(f"{path}: a free-form dataset (no options) cannot use the 'mc' grader")
    if tolerance is None:
        tolerance = float((old or {}).get("grader", {}).get("tolerance", 1e-6))
    grader_dict = get_grader(chosen, tolerance).to_dict()
    split, new_split = _split_of(read.table, split_path, path)
    table = read.table.merge(split, on="qid", how="left", validate="one_to_one")
    table["rank"] = table["rank"].astype(np.int64)
    meta = {"format": META_FORMAT, "name": name, "source": f"builtin:{name}" if builtin else str(path.resolve()),
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "kind": read.kind, "grader": grader_dict,
            "has_answers": read.has_answers, "questions": int(len(table)),
            "groups": int(table["subject"].nunique()), "columns": read.columns, "split": SPLIT_FILE,
            "split_seed": SPLIT_SEED}
    if write:
        if new_split:
            write_split_json(split_path, split_document(read.table[["qid", "subject"]], SPLIT_SEED))
        if meta != old:
            atomic_write_json(meta_path, meta)
    columns = ["qid", "subject", "category", "split", "question", "options", "answer", "references", "rank"]
    return Dataset(name, read.kind, grader_dict, read.has_answers, table[columns], str(path), split_path)


def resolve_dataset(spec: str, results_dir: Path | str | None = None, grader: str | None = None,
                    tolerance: float | None = None, write: bool = True) -> Dataset:
    """The dataset `spec` names (module docstring). For a file: checks it whole, then (with
    `write`) stores its split and metadata under `<results>/<name>/`; `grader` overrides the
    default one (`graders.default_grader`) and is stored."""
    spec = str(spec).strip()
    name = dataset_name(spec, results_dir)
    if name == "mmlu":
        if grader not in (None, "mc"):
            raise ValueError(f"MMLU is multiple choice and graded by 'mc', not {grader!r}")
        return _mmlu()
    if name in BUILTIN_FILES:
        path, default, default_tolerance = BUILTIN_FILES[name]
        return _file_dataset(path, results_dir, grader or default,
                             default_tolerance if tolerance is None else tolerance, write, builtin=name)
    if looks_like_file(spec):
        return _file_dataset(Path(spec), results_dir, grader, tolerance, write)
    source = read_metadata(name, results_dir).get("source", "")
    if not Path(source).is_file():
        raise ValueError(f"dataset {name!r} was made from {source}, which is gone; give the file's path")
    return _file_dataset(Path(source), results_dir, grader, tolerance, write)


def store_upload(filename: str, content: bytes, results_dir: Path | str | None = None):
    """Check an uploaded question file whole and keep it as `<results>/../uploads/<name><suffix>`
    (the app's upload; the CLI takes a path instead); returns (stored path, `QuestionFile`).

    A file that fails any check (`question_files`) is refused with the uploaded file's name, row
    and column, and nothing is kept. The stored copy is what `resolve_dataset` then registers, so
    the dataset's source stays readable after the browser's copy is gone."""
    from cascade_core.records.question_files import QuestionFileError

    suffix = Path(filename).suffix.lower()
    if suffix not in SUFFIXES:
        raise ValueError(f"{filename}: not a question file; upload a {', '.join(SUFFIXES)} file")
    name = _slug(Path(filename).stem)
    if name in BUILTIN + RESERVED:
        raise ValueError(f"{filename}: a dataset would be named {name!r}, a built-in dataset's name; rename the file")
    folder = Path(_results(results_dir)).parent / "uploads"
    folder.mkdir(parents=True, exist_ok=True)
    checking = folder / f".{name}.checking{suffix}"
    checking.write_bytes(content)
    try:
        checked = read_question_file(checking)
    except QuestionFileError as err:
        checking.unlink(missing_ok=True)
        raise ValueError(str(err).replace(str(checking), filename)) from None
    final = folder / f"{name}{suffix}"
    checking.replace(final)
    return final, checked


def select_questions(dataset: Dataset, split: str | None = None, per_subject: int | None = None,
                     subjects=None) -> pd.DataFrame:
    """Some of a dataset's questions: a split ("calibration" / "test"; None or "all": both), the
    first `per_subject` of each group's seeded order, some groups; in the file's order."""
    groups = sorted(set(dataset.questions["subject"]))
    table = select_rows(dataset.questions, split, per_subject, subjects,
                        lambda unknown: ValueError(f"dataset {dataset.name!r} has no group(s) {unknown}; groups: "
                                                   f"{groups}"))
    out = table.reset_index(drop=True).copy()
    out["options"] = [list(o) for o in out["options"]]
    return out
