"""Question files: each format with the column aliases, and every bad row refused by row and column."""

import json

import pandas as pd
import pytest

from cascade_core.records.question_files import QuestionFileError, mc_answer_index, read_question_file


def _write(tmp_path, name, frame):
    path = tmp_path / name
    if name.endswith(".csv"):
        frame.to_csv(path, index=False)
    elif name.endswith(".jsonl"):
        frame.to_json(path, orient="records", lines=True, force_ascii=False)
    else:
        frame.to_parquet(path)
    return path


@pytest.mark.parametrize("name", ["q.csv", "q.jsonl", "q.parquet"])
def test_letter_columns_and_aliases_in_every_format(tmp_path, name):
    frame = pd.DataFrame({
        "prompt": ["2+2?", "Capital of France?", "Pick"],
        "A": ["3", "Paris", "None"], "B": ["4", "Rome", "NA"], "C": ["5", "", "z"], "D": ["6", "", ""],
        "label": ["B", "Paris", "2"],  # a letter, an option's text, a 0-based index
        "group": ["math", "geo", "geo"], "id": ["m1", "g1", "g2"],
    })
    read = read_question_file(_write(tmp_path, name, frame))
    assert read.kind == "mc" and read.has_answers
    assert read.columns == {"question": "prompt", "options": ["A", "B", "C", "D"], "answer": "label",
                            "group": "group", "id": "id"}
    table = read.table
    assert table["options"].tolist() == [["3", "4", "5", "6"], ["Paris", "Rome"], ["None", "NA", "z"]]
    assert table["answer"].tolist() == [1, 0, 2]
    assert table["references"].tolist() == [["4"], ["Paris"], ["z"]]
    assert table["qid"].tolist() == ["m1", "g1", "g2"] and table["subject"].tolist() == ["math", "geo", "geo"]


@pytest.mark.parametrize("name", ["lists.jsonl", "lists.parquet"])
def test_options_list_column_choices_and_no_answers(tmp_path, name):
    frame = pd.DataFrame({"input": ["Q1", "Q2"], "choices": [["a", "b", "c"], ["d", "e"]], "category": ["x", "y"]})
    read = read_question_file(_write(tmp_path, name, frame))
    assert read.kind == "mc" and not read.has_answers
    assert read.table["options"].tolist() == [["a", "b", "c"], ["d", "e"]]
    assert read.table["answer"].tolist() == [-1, -1]
    assert read.table["qid"].tolist() == ["lists/00000", "lists/00001"]


def test_csv_json_list_cell_and_free_form_with_aliases(tmp_path):
    csv = tmp_path / "cells.csv"
    csv.write_text('question,options,answer\nQ1,"[""a"", ""b""]",1\n', encoding="utf-8")
    assert read_question_file(csv).table["answer"].tolist() == [1]
    free = tmp_path / "free.jsonl"
    free.write_text('{"question": "3+4?", "answer": 7}\n{"question": "Name him", "answer": ["Bob", "Robert"]}\n')
    read = read_question_file(free)
    assert read.kind == "free" and read.has_answers
    assert read.table["options"].tolist() == [[], []]
    assert read.table["references"].tolist() == [["7"], ["Bob", "Robert"]]


def test_answer_forms_and_ambiguity():
    options = ["3", "5", "7", "9"]
    assert mc_answer_index("b", options) == 1
    assert mc_answer_index(2, options) == 2
    assert mc_answer_index(2.0, options) == 2
    assert mc_answer_index("9", options) == 3  # text of D; as an index 9 is out of range
    with pytest.raises(ValueError, match="ambiguous"):
        mc_answer_index("3", options)  # text of A and index of D
    with pytest.raises(ValueError, match="ambiguous"):
        mc_answer_index("b", ["b", "a"])  # letter B and text of A
    with pytest.raises(ValueError, match="not among the options"):
        mc_answer_index("Lyon", ["Paris", "Rome"])
    with pytest.raises(ValueError, match="outside 0..1"):
        mc_answer_index("4", ["Paris", "Rome"])


def _frame(**columns):
    base = {"question": ["Q1", "Q2", "Q3"], "A": ["x", "x", "x"], "B": ["y", "y", "y"], "answer": ["A", "B", "A"]}
    base.update(columns)
    return pd.DataFrame(base)


@pytest.mark.parametrize(
    "name, frame, row, column, message",
    [
        ("bad.csv", _frame(question=["Q1", " ", "Q3"]), 2, "question", "the question is empty"),
        ("bad.csv", _frame(A=["x", "only", "x"], B=["y", "", "y"]), 2, "A,B", r"1 option\(s\)"),
        ("bad.csv", _frame(answer=["A", "C", "A"]), 2, "answer", "names option C but the question has 2"),
        ("bad.csv", _frame(answer=["A", "B", "maybe"]), 3, "answer", "not among the options"),
        ("bad.csv", _frame(answer=["A", "", "B"]), 2, "answer", "the answer is missing while 2 other"),
        ("bad.csv", _frame(id=["a", "b", "a"]), 3, "id", "'a' is also the id of row 1"),
        ("bad.csv", _frame(A=["x", "x", "x"], B=["y", "", "y"], C=["z", "z", "z"]), 2, "B",
         "option B is empty while a later one is not"),
        ("bad.jsonl", pd.DataFrame({"question": ["Q1", "Q2"], "options": [["a", "b"], ["a"] * 27]}), 2, "options",
         "27 options: at most 26"),
        ("bad.jsonl", pd.DataFrame({"question": ["Q1", "Q2"], "options": [["a", "b"], ["a"]]}), 2, "options",
         r"1 option\(s\)"),
        ("bad.jsonl", pd.DataFrame({"question": ["Q1", "Q2"], "options": [["a", "b"], "a, b"]}), 2, "options",
         "must be a list"),
        ("bad.parquet", pd.DataFrame({"question": ["Q1", "Q2"], "options": [["a", "b"], ["a", ""]]}), 2, "options",
         "option B is empty"),
    ],
)
def test_every_bad_row_is_refused_by_file_row_and_column(tmp_path, name, frame, row, column, message):
    path = _write(tmp_path, name, frame)
    with pytest.raises(QuestionFileError, match=message) as caught:
        read_question_file(path)
    error = caught.value
    assert (error.row, error.column) == (row, column)
    word = "line" if name.endswith(".jsonl") else "row"
    assert str(error).startswith(f"{path}, {word} {row}, column {column!r}: ")


def test_file_level_errors(tmp_path):
    with pytest.raises(QuestionFileError, match="no such file"):
        read_question_file(tmp_path / "absent.csv")
    (tmp_path / "q.txt").write_text("hello")
    with pytest.raises(QuestionFileError, match="unsupported file type '.txt'"):
        read_question_file(tmp_path / "q.txt")
    (tmp_path / "broken.jsonl").write_text('{"question": "Q", "options": ["a", "b"]}\n{broken\n')
    with pytest.raises(QuestionFileError, match=r"line 2: not valid JSON") as caught:
        read_question_file(tmp_path / "broken.jsonl")
    assert caught.value.row == 2
    (tmp_path / "array.jsonl").write_text('["Q", "a"]\n')
    with pytest.raises(QuestionFileError, match="line 1: each line must be a JSON object"):
        read_question_file(tmp_path / "array.jsonl")
    (tmp_path / "latin1.csv").write_bytes("question,A,B\nQ,caf\xe9,b\n".encode("latin-1"))
    with pytest.raises(QuestionFileError, match=r"not UTF-8 text: byte 0xe9 at line 2, character 6"):
        read_question_file(tmp_path / "latin1.csv")
    (tmp_path / "damaged.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(QuestionFileError, match="not a readable parquet file"):
        read_question_file(tmp_path / "damaged.parquet")
    (tmp_path / "noq.csv").write_text("text,A,B\nQ,a,b\n")
    with pytest.raises(QuestionFileError, match="no question column"):
        read_question_file(tmp_path / "noq.csv")
    (tmp_path / "empty.csv").write_text("question,A,B\n")
    with pytest.raises(QuestionFileError, match="no rows"):
        read_question_file(tmp_path / "empty.csv")


def test_utf8_with_bom_and_non_ascii_text_is_read(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes("\ufeffquestion,A,B,answer\nQuelle ville ?,Orléans,Zürich,b\n".encode("utf-8"))
    table = read_question_file(path).table
    assert table["options"].tolist() == [["Orléans", "Zürich"]] and table["answer"].tolist() == [1]
    jsonl = tmp_path / "u.jsonl"
    jsonl.write_text(json.dumps({"question": "¿Qué?", "options": ["sí", "no"], "answer": "sí"},
                                ensure_ascii=False) + "\n",
                     encoding="utf-8")
    assert read_question_file(jsonl).table["answer"].tolist() == [0]
