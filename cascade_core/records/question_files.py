"""Read a user's question file (JSONL, CSV or parquet) into one checked table, or refuse it.

A benchmark run on a file costs hours of model time and its records are what every guarantee is
computed from, so a file is checked whole before anything is written: every bad row is refused
with the file, the row (a JSONL file's line) and the column named, and the first error stops the
read. Nothing here writes; `dataset_registry` writes the split only after this has passed.

Columns (the first name present wins, so a file with both `question` and `prompt` uses `question`):

- the question: `question`, `prompt` or `input` (required, non-empty);
- the options (multiple choice): a list column `options` or `choices` (in a CSV cell a JSON list),
  or letter columns `A`, `B`, ... (also `option_a`, `answer_a`, `choice_a`; an empty trailing
  letter is dropped per row, a gap is an error); 2 to 26 non-empty options per row. A file with
  neither is free-form;
- the answer, optional: `answer`, `answers`, `label` or `target`. Multiple choice: a letter
  (`B`), a 0-based index (`1`) or an option's text (`Paris`); a value that reads both as an index
  and as the text of another option (options `3, 5, 7, 9`, answer `3`) is refused as ambiguous.
  Free-form: a text or number, or a list of accepted aliases. Either every row has an answer or
  none has (a half-labelled file would make "accuracy" mean two things);
- the group: `subject`, `group` or `category` (optional; the split is stratified by it);
- the id: `id` or `qid` (optional, unique; default `<file stem>/<row:05d>`).

The table: qid, subject, category, question, options (list; empty for free-form), answer (the
option index, -1 when unknown or free-form), references (accepted answer texts; for multiple
choice the right option's text).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cascade_core.types import OPTION_LETTERS

QUESTION_COLUMNS = ("question", "prompt", "input")
OPTIONS_COLUMNS = ("options", "choices")
ANSWER_COLUMNS = ("answer", "answers", "label", "target")
GROUP_COLUMNS = ("subject", "group", "category")
ID_COLUMNS = ("id", "qid")
LETTER_PREFIXES = ("", "option_", "answer_", "choice_")
MIN_OPTIONS, MAX_OPTIONS = 2, len(OPTION_LETTERS)
SUFFIXES = (".jsonl", ".csv", ".parquet")
TABLE_COLUMNS = ["qid", "subject", "category", "question", "options", "answer", "references"]


class QuestionFileError(ValueError):
    """A question file that cannot be used; `row` (1-based) and `column` say where, when known."""

    def __init__(self, path: Path | str, message: str, row: int | None = None, column: str | None = None,
                 row_word: str = "row"):
        self.path, self.row, self.column = str(path), row, column
        where = "".join([f", {row_word} {row}" if row is not None else "",
                         f", column {column!r}" if column is not None else ""])
        super().__init__(f"{path}{where}: {message}")


@dataclass(frozen=True)
class QuestionFile:
    """A checked file: the table, whether it is multiple choice, whether it has answers, and which
    source columns were used (shown to the user, stored in the dataset's metadata)."""

    path: Path
    table: pd.DataFrame
    kind: str  # "mc" | "free"
    has_answers: bool
    columns: dict  # role -> source column(s)


# ------------------------------------------------------------------------------------ reading


def _decode(path: Path, data: bytes) -> str:
    """UTF-8 text (a leading BOM allowed); a bad byte is refused with its line and column."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise QuestionFileError(path, f"not UTF-8 text: byte 0x{data[err.start]:02x} at line {line}, character "
                                      f"{column}; save the file as UTF-8") from None


def _read_jsonl(path: Path, text: str) -> tuple[pd.DataFrame, list[int]]:
    """Rows and their line numbers; a line that is not one JSON object is refused by number."""
    rows, lines = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError as err:
            raise QuestionFileError(path, f"not valid JSON ({err.msg} at character {err.colno})", number,
                                    row_word="line") from None
        if not isinstance(value, dict):
            raise QuestionFileError(path, f"each line must be a JSON object, got {type(value).__name__}", number,
                                    row_word="line")
        rows.append(value)
        lines.append(number)
    return pd.DataFrame(rows), lines


def read_rows(path: Path | str) -> tuple[pd.DataFrame, list[int], str]:
    """The file's raw rows, the number a person would give each (JSONL: its line; CSV and
    parquet: its data row, the header not counted) and that word ("line" or "row")."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise QuestionFileError(path, f"unsupported file type {suffix or '(none)'!r}; use {', '.join(SUFFIXES)}")
    if not path.is_file():
        raise QuestionFileError(path, "no such file" if not path.exists() else "not a file")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise QuestionFileError(path, f"cannot read the file ({err.strerror or err})") from None
    if suffix == ".parquet":
        try:
            frame = pd.read_parquet(io.BytesIO(data))
        except Exception as err:  # noqa: BLE001 - pyarrow raises several types for a damaged file
            raise QuestionFileError(path, f"not a readable parquet file ({type(err).__name__}: {err})") from None
        return frame, list(range(1, len(frame) + 1)), "row"
    text = _decode(path, data)
    if suffix == ".jsonl":
        frame, lines = _read_jsonl(path, text)
        return frame, lines, "line"
    try:
        # dtype=str, keep_default_na=False: an option reading "None" or "NA" stays that text.
        frame = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise QuestionFileError(path, f"not a readable CSV file ({err})") from None
    return frame, list(range(1, len(frame) + 1)), "row"


# ---------------------------------------------------------------------------------- checking


def _missing(value) -> bool:
    if value is None:
        return True
    if isinstance(value, (float, np.floating)) and np.isnan(value):
        return True
    return isinstance(value, str) and not value.strip()


def _first(columns, names) -> str | None:
    lower = {str(c).lower(): c for c in columns}
    return next((lower[n] for n in names if n in lower), None)


def _letter_columns(columns) -> list[str] | None:
    lower = {str(c).lower(): c for c in columns}
    for prefix in LETTER_PREFIXES:
        found = []
        for letter in OPTION_LETTERS.lower():
            if prefix + letter not in lower:
                break
            found.append(lower[prefix + letter])
        if len(found) >= 2:
            return found
    return None


def _as_list(value):
    """A list from a list-like cell (a JSON list in a text cell), else None."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, str) and value.strip().startswith("["):
        try:
            parsed = json.loads(value)
        except ValueError:
            return None
        return parsed if isinstance(parsed, list) else None
    return None


def _text(value) -> str:
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value).strip() if isinstance(value, str) else str(value)


def mc_answer_index(value, options: list[str]) -> int:
    """The option index an answer names (letter, 0-based index or option text); ValueError says why."""
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"answer {value!r} is true/false, not a letter, index or option")
    n = len(options)
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        value = int(value)
    text = str(value).strip()
    if isinstance(value, str) and len(text) == 1 and text.upper() in OPTION_LETTERS:
        index = OPTION_LETTERS.index(text.upper())
        if index >= n:
            raise ValueError(f"answer {text!r} names option {text.upper()} but the question has {n} options")
        other = [i for i, o in enumerate(options) if o.strip() == text and i != index]
        if other:
            raise ValueError(f"answer {text!r} is ambiguous: option letter {text.upper()} and the text of option "
                             f"{OPTION_LETTERS[other[0]]}; give the 0-based index")
        return index
    by_text = [i for i, o in enumerate(options) if o.strip() == text]
    if not by_text:
        by_text = [i for i, o in enumerate(options) if o.strip().casefold() == text.casefold()]
    as_index = int(text) if text.lstrip("-").isdigit() else None
    if as_index is not None and not by_text:
        if not 0 <= as_index < n:
            raise ValueError(f"answer index {as_index} is outside 0..{n - 1} (indices are 0-based)")
        return as_index
    if len(by_text) > 1:
        raise ValueError(f"answer {text!r} is the text of options {', '.join(OPTION_LETTERS[i] for i in by_text)}; "
                         "give the letter")
    if by_text:
        if as_index is not None and as_index != by_text[0] and 0 <= as_index < n:
            raise ValueError(f"answer {text!r} is ambiguous: the text of option {OPTION_LETTERS[by_text[0]]} and "
                             f"the 0-based index of option {OPTION_LETTERS[as_index]}; give the letter")
        return by_text[0]
    raise ValueError(f"answer {text!r} is not among the options (a letter A-{OPTION_LETTERS[n - 1]}, a 0-based "
                     f"index or an option's text)")


def _options(path, record, options_column, letters, row, word) -> list[str]:
    if letters is not None:
        values = ["" if _missing(record[c]) else _text(record[c]) for c in letters]
        while values and not values[-1].strip():
            values.pop()
        for i, value in enumerate(values):
            if not value.strip():
                raise QuestionFileError(path, f"option {OPTION_LETTERS[i]} is empty while a later one is not",
                                        row, letters[i], word)
        column = ",".join(map(str, letters))
    else:
        column = options_column
        raw = record[options_column]
        listed = _as_list(raw)
        if listed is None:
            shown = raw if not isinstance(raw, str) else raw[:60]
            raise QuestionFileError(path, f"the options must be a list (a JSON list in a CSV cell), got {shown!r}",
                                    row, options_column, word)
        values = []
        for i, option in enumerate(listed):
            if _missing(option):
                raise QuestionFileError(path, f"option {OPTION_LETTERS[i] if i < MAX_OPTIONS else i + 1} is empty",
                                        row, options_column, word)
            values.append(_text(option))
    if len(values) < MIN_OPTIONS:
        raise QuestionFileError(path, f"{len(values)} option(s): a multiple-choice question needs {MIN_OPTIONS} to "
                                      f"{MAX_OPTIONS}", row, column, word)
    if len(values) > MAX_OPTIONS:
        raise QuestionFileError(path, f"{len(values)} options: at most {MAX_OPTIONS} (A-Z) are supported",
                                row, column, word)
    return values


def _references(path, value, row, column, word) -> list[str]:
    listed = _as_list(value)
    values = listed if listed is not None else [value]
    out = []
    for v in values:
        if _missing(v):
            raise QuestionFileError(path, "an accepted answer in the list is empty", row, column, word)
        out.append(_text(v))
    if not out:
        raise QuestionFileError(path, "the list of accepted answers is empty", row, column, word)
    return out


def read_question_file(path: Path | str) -> QuestionFile:
    """Read and check `path` (module docstring); QuestionFileError names the file, row and column."""
    from cascade_core.records.mmlu import mmlu_category

    path = Path(path)
    raw, numbers, word = read_rows(path)
    columns = list(raw.columns)
    found = [str(c) for c in columns]
    question_column = _first(columns, QUESTION_COLUMNS)
    if question_column is None:
        raise QuestionFileError(path, f"no question column: name one {' or '.join(QUESTION_COLUMNS)} (found: {found})")
    if raw.empty:
        raise QuestionFileError(path, "the file has no rows")
    options_column = _first(columns, OPTIONS_COLUMNS)
    letters = None if options_column is not None else _letter_columns(columns)
    kind = "free" if options_column is None and letters is None else "mc"
    answer_column = _first(columns, ANSWER_COLUMNS)
    group_column = _first(columns, GROUP_COLUMNS)
    id_column = _first(columns, ID_COLUMNS)

    rows, seen, answered = [], {}, []
    for i, (record, row) in enumerate(zip(raw.to_dict("records"), numbers)):
        text = record[question_column]
        if _missing(text):
            raise QuestionFileError(path, "the question is empty", row, question_column, word)
        options = _options(path, record, options_column, letters, row, word) if kind == "mc" else []
        answer, references = -1, []
        value = record.get(answer_column) if answer_column is not None else None
        if not _missing(value) and not (isinstance(value, (list, np.ndarray)) and len(value) == 0):
            if kind == "mc":
                try:
                    answer = mc_answer_index(value, options)
                except ValueError as err:
                    raise QuestionFileError(path, str(err), row, answer_column, word) from None
                references = [options[answer]]
            else:
                references = _references(path, value, row, answer_column, word)
        answered.append(bool(references))
        if id_column is not None:
            if _missing(record[id_column]):
                raise QuestionFileError(path, "the id is empty", row, id_column, word)
            qid = _text(record[id_column])
        else:
            qid = f"{path.stem}/{i:05d}"
        if qid in seen:
            raise QuestionFileError(path, f"id {qid!r} is also the id of {word} {seen[qid]}", row,
                                    id_column or "(row number)", word)
        seen[qid] = row
        group = record.get(group_column) if group_column is not None else None
        subject = "" if _missing(group) else _text(group)
        rows.append((qid, subject, mmlu_category(subject), str(text), options, answer, references))
    if any(answered) and not all(answered):
        lacking = answered.index(False)
        raise QuestionFileError(path, f"the answer is missing while {sum(answered)} other {word}s have one; give "
                                      "every question an answer or none", numbers[lacking], answer_column, word)
    table = pd.DataFrame(rows, columns=TABLE_COLUMNS)
    table["answer"] = table["answer"].astype(np.int64)
    used = {"question": str(question_column), "options": str(options_column) if options_column is not None else
            ([str(c) for c in letters] if letters else None),
            "answer": None if answer_column is None else str(answer_column),
            "group": None if group_column is None else str(group_column),
            "id": None if id_column is None else str(id_column)}
    return QuestionFile(path=path, table=table, kind=kind, has_answers=all(answered), columns=used)
