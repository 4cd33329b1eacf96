"""MMLU as shipped, its fixed split, the per-subject sample, and the loader for user files."""

import json

import pandas as pd
import pytest

from cascade_core.datasets import (
    CATEGORIES, COLUMNS, MMLU_CATEGORIES, MMLU_PATH, MMLU_SPLIT_PATH, load_mmlu,
    load_question_file, load_split, mmlu_category, to_questions,
)
from cascade_core.split import SPLIT_SEED, assign_split, read_split_json, split_document
from cascade_core.types import Question


@pytest.fixture(scope="module")
def mmlu():
    return load_mmlu()


def test_mmlu_rows_subjects_categories(mmlu):
    assert len(mmlu) == 14_042
    assert list(mmlu.columns) == COLUMNS
    assert mmlu["subject"].nunique() == 57 == len(MMLU_CATEGORIES)
    assert mmlu["qid"].is_unique
    assert set(mmlu["category"]) == set(CATEGORIES)
    # The published category sizes of the MMLU test set.
    assert mmlu["category"].value_counts().to_dict() == {
        "humanities": 4705, "other": 3242, "social sciences": 3077, "STEM": 3018,
    }
    assert mmlu["answer"].between(0, 3).all()
    assert all(isinstance(o, list) and len(o) == 4 for o in mmlu["options"])
    assert (mmlu.groupby("subject").size().min(), mmlu.groupby("subject").size().max()) == (100, 1534)
    first = mmlu[mmlu["qid"] == "abstract_algebra/0000"].iloc[0]
    assert first["question"].startswith("Find the degree for the given field extension Q(sqrt(2)")
    assert first["options"] == ["0", "4", "2", "6"] and first["answer"] == 1


def test_split_is_the_file_and_is_stratified_disjoint_covering(mmlu):
    split = load_split()
    assert set(split) == set(mmlu["qid"])  # covering; a dict cannot hold a qid twice: disjoint
    assert set(split.values()) == {"calibration", "test"}
    assert dict(zip(mmlu["qid"], mmlu["split"])) == split
    for subject, rows in mmlu.groupby("subject"):
        n_cal = int((rows["split"] == "calibration").sum())
        assert n_cal - (len(rows) - n_cal) in (0, 1), subject
    document = json.loads(MMLU_SPLIT_PATH.read_text())
    assert document["counts"] == {"calibration": 7032, "test": 7010, "subjects": 57}
    cal, test = load_mmlu(split="calibration"), load_mmlu(split="test")
    assert len(cal) + len(test) == len(mmlu) and not set(cal["qid"]) & set(test["qid"])


def test_split_is_reproduced_from_seed_and_method(mmlu):
    document = json.loads(MMLU_SPLIT_PATH.read_text())
    assert document["seed"] == SPLIT_SEED
    assert split_document(mmlu[["qid", "subject"]], SPLIT_SEED)["subjects"] == document["subjects"]
    other = assign_split(mmlu[["qid", "subject"]], seed=1)
    assert (other["split"].to_numpy() != mmlu["split"].to_numpy()).any()  # the seed matters


def test_per_subject_is_balanced_and_grows_by_extension():
    sets = {}
    for n in (1, 2, 5, 10, 120):
        frame = load_mmlu(per_subject=n)
        sizes = frame.groupby("subject").size()
        assert sizes.max() == n if n <= 100 else sizes.max() <= n
        for subject, rows in frame.groupby("subject"):
            n_cal = int((rows["split"] == "calibration").sum())
            assert n_cal - (len(rows) - n_cal) in (0, 1)
        sets[n] = set(frame["qid"])
    assert len(sets[2]) == 114 and len(sets[10]) == 570
    assert sets[1] < sets[2] < sets[5] < sets[10] < sets[120]
    # The split filter applies to the same per-subject sample.
    test10 = load_mmlu(split="test", per_subject=10)
    assert len(test10) == 285 and set(test10["qid"]) < sets[10]


def test_subject_filter_and_errors():
    frame = load_mmlu(subjects=["anatomy", "virology"])
    assert set(frame["subject"]) == {"anatomy", "virology"} and len(frame) == 135 + 166
    assert len(load_mmlu(subjects="anatomy")) == 135
    with pytest.raises(ValueError, match="unknown MMLU subject"):
        load_mmlu(subjects=["astrology"])
    with pytest.raises(ValueError, match="unknown split 'train'"):
        load_mmlu(split="train")
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="per_subject must be a positive integer"):
            load_mmlu(per_subject=bad)


def test_stale_split_file_is_named(tmp_path):
    document = json.loads(MMLU_SPLIT_PATH.read_text())
    document["subjects"]["anatomy"]["test"] = document["subjects"]["anatomy"]["test"][:-1]
    stale = tmp_path / "split.json"
    stale.write_text(json.dumps(document))
    with pytest.raises(ValueError, match="does not match"):
        load_mmlu(split_path=stale)
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read the split file"):
        read_split_json(tmp_path / "broken.json")


def test_to_questions(mmlu):
    questions = to_questions(mmlu.head(3))
    assert all(isinstance(q, Question) and len(q.options) == 4 for q in questions)
    row = mmlu.iloc[0]
    assert questions[0] == Question(text=row["question"], options=tuple(row["options"]),
                                    subject=row["subject"], answer=int(row["answer"]), qid=row["qid"])


def test_category_lookup():
    assert mmlu_category("high_school_us_history") == "humanities"
    assert mmlu_category("High School Physics") == "STEM"
    assert mmlu_category("cooking") == ""


# ------------------------------------------------------------------------------ user files


def _write(tmp_path, name, frame):
    path = tmp_path / name
    if name.endswith(".csv"):
        frame.to_csv(path, index=False)
    elif name.endswith(".jsonl"):
        frame.to_json(path, orient="records", lines=True)
    else:
        frame.to_parquet(path)
    return path


@pytest.mark.parametrize("name", ["q.csv", "q.jsonl", "q.parquet"])
def test_letter_columns_in_every_format(tmp_path, name):
    frame = pd.DataFrame({
        "question": ["2+2?", "Capital of France?", "Pick"],
        "A": ["3", "Paris", "None"], "B": ["4", "Rome", "NA"], "C": ["5", "", ""], "D": ["6", "", ""],
        "answer": ["B", "a", "1"],
        "subject": ["elementary_mathematics", "geography", ""],
    })
    loaded = load_question_file(_write(tmp_path, name, frame))
    assert list(loaded.columns) == COLUMNS
    assert loaded["options"].tolist() == [["3", "4", "5", "6"], ["Paris", "Rome"], ["None", "NA"]]
    assert loaded["answer"].tolist() == [1, 0, 1]
    assert loaded["category"].tolist() == ["STEM", "", ""]
    assert loaded["qid"].tolist() == ["q/00000", "q/00001", "q/00002"]
    assert set(loaded["split"]) <= {"calibration", "test"}


def test_options_list_column_and_qids(tmp_path):
    frame = pd.DataFrame({"qid": ["x1", "x2"], "question": ["Q1", "Q2"],
                          "options": [["a", "b", "c"], ["d", "e"]], "answer": [2, 0]})
    loaded = load_question_file(_write(tmp_path, "lists.jsonl", frame))
    assert loaded["qid"].tolist() == ["x1", "x2"] and loaded["answer"].tolist() == [2, 0]
    csv = tmp_path / "lists.csv"
    csv.write_text('question,options,answer\nQ1,"[""a"", ""b""]",B\n')
    assert load_question_file(csv)["options"].tolist() == [["a", "b"]]
    assert to_questions(load_question_file(csv))[0].answer == 1


def test_answer_is_optional_when_asked(tmp_path):
    path = _write(tmp_path, "noanswer.csv", pd.DataFrame({"question": ["Q"], "A": ["x"], "B": ["y"]}))
    with pytest.raises(ValueError, match="missing column 'answer'"):
        load_question_file(path)
    loaded = load_question_file(path, require_answer=False)
    assert to_questions(loaded)[0].answer is None


@pytest.mark.parametrize(
    "frame, message",
    [
        (pd.DataFrame({"text": ["Q"], "A": ["x"], "B": ["y"], "answer": ["A"]}), "missing column 'question'"),
        (pd.DataFrame({"question": ["Q"], "answer": ["A"]}), "missing the options"),
        (pd.DataFrame({"question": ["Q"], "A": ["x"], "B": ["y"], "answer": ["C"]}), "row 1: answer 'C' but the question has only 2 options"),
        (pd.DataFrame({"question": ["Q"], "A": ["x"], "B": ["y"], "answer": ["maybe"]}), "row 1: answer 'maybe' is neither"),
        (pd.DataFrame({"question": ["Q", "R"], "A": ["x", "x"], "B": ["y", "y"], "answer": ["A", "7"]}), "row 2: answer index 7 is outside 0..1"),
        (pd.DataFrame({"question": ["Q", "R"], "A": ["x", "x"], "B": ["y", "y"], "answer": ["A", ""]}), "row 2: the answer is missing"),
        (pd.DataFrame({"question": ["", "R"], "A": ["x", "x"], "B": ["y", "y"], "answer": ["A", "A"]}), "row 1: the question is empty"),
        (pd.DataFrame({"question": ["Q"], "A": ["x"], "B": [""], "answer": ["A"]}), "row 1: no options|at least 2 options"),
        (pd.DataFrame({"question": ["Q"], "A": ["x"], "B": [""], "C": ["z"], "answer": ["A"]}), "row 1: option B is empty"),
        (pd.DataFrame({"qid": ["a", "a"], "question": ["Q", "R"], "A": ["x", "x"], "B": ["y", "y"], "answer": ["A", "A"]}), "qid 'a' appears more than once"),
    ],
)
def test_loader_errors_name_the_problem(tmp_path, frame, message):
    path = _write(tmp_path, "bad.csv", frame)
    with pytest.raises(ValueError, match=message):
        load_question_file(path)


def test_loader_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such question file"):
        load_question_file(tmp_path / "absent.csv")
    (tmp_path / "q.txt").write_text("hello")
    with pytest.raises(ValueError, match="unsupported file type '.txt'"):
        load_question_file(tmp_path / "q.txt")
    (tmp_path / "q.jsonl").write_text("{broken\n")
    with pytest.raises(ValueError, match="cannot read .* as JSON lines"):
        load_question_file(tmp_path / "q.jsonl")
    (tmp_path / "folder").mkdir()
    with pytest.raises(ValueError, match="folder"):
        load_question_file(tmp_path / "folder")


def test_shipped_files_exist():
    assert MMLU_PATH.is_file() and MMLU_SPLIT_PATH.is_file()
    assert MMLU_PATH.stat().st_size < 5_000_000
