"""MMLU as shipped, its fixed split and the per-subject sample (user files: tests/test_question_files.py)."""

import json

import pytest

from cascade_core.records.mmlu import (
    CATEGORIES, COLUMNS, MMLU_CATEGORIES, MMLU_PATH, MMLU_SPLIT_PATH, load_mmlu,
    load_split, mmlu_category, to_questions,
)
from cascade_core.records.split import SPLIT_SEED, assign_split, read_split_json, split_document
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


def test_shipped_files_exist():
    assert MMLU_PATH.is_file() and MMLU_SPLIT_PATH.is_file()
    assert MMLU_PATH.stat().st_size < 5_000_000
