"""The app calibrates an uploaded file (issue 20, item 6), with streamlit.testing's AppTest: upload a
question file and see its checked preview (or the row and column at fault), register it (the
sidebar's dataset picker follows), benchmark it in the background with SmolLM2 (a real child
process; a fresh AppTest session, as after a page reload, finds its progress), then calibrate a
dataset and explore it. Everything is written to temporary folders ($CASCADE_RESULTS_DIR, ...)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

REPO = Path(__file__).resolve().parent.parent
APP = str(REPO / "app.py")
BENCH, EXPLORE, ROUTE = "pages/3_Benchmarks.py", "pages/2_Explore_thresholds.py", "pages/1_Route_a_question.py"

# Aliases on purpose: `prompt` for the question, `target` for the answer, `category` for the group.
SUMS = "".join(json.dumps({"prompt": f"What is {a} + {b}? Answer with the number only.", "target": str(a + b),
                           "category": "one digit" if a < 10 else "two digits"}) + "\n"
               for a, b in ((2, 3), (4, 1), (3, 3), (12, 30), (25, 14), (41, 17)))


@pytest.fixture
def folders(monkeypatch, tmp_path):
    for name, folder in (("RESULTS", "results"), ("POLICIES", "policies"), ("PROBES", "probes")):
        monkeypatch.setenv(f"CASCADE_{name}_DIR", str(tmp_path / folder))
    monkeypatch.setenv("CASCADE_APP_PRELOAD", "0")
    return tmp_path


def no_exception(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]


def texts(elements) -> str:
    return "\n".join(str(e.value) for e in elements)


def bench_page() -> AppTest:
    """A fresh session (a new browser tab, or a reload) on the Benchmarks page."""
    at = AppTest.from_file(APP, default_timeout=180)
    at.run()
    no_exception(at)
    at.switch_page(BENCH).run()
    no_exception(at)
    return at


def upload(at: AppTest, name: str, content: str) -> AppTest:
    at.file_uploader(key="bench_upload").set_value((name, content.encode(), "application/jsonl")).run()
    no_exception(at)
    return at


def test_upload_shows_the_checked_preview_and_registering_picks_the_dataset(folders):
    at = upload(bench_page(), "sums.jsonl", SUMS)
    assert "6 free-form questions in 2 group(s), with answers" in texts(at.success)
    preview = at.dataframe[-1].value
    assert list(preview["question"])[:1] == ["What is 2 + 3? Answer with the number only."]
    assert at.selectbox(key="dataset@bench").value == "mmlu"
    at.button(key="bench_register").click().run()
    no_exception(at)
    assert at.selectbox(key="dataset@bench").value == "sums"  # the sidebar follows the registered file
    assert "Registered as `sums`: 6 questions, graded `numeric`" in texts(at.success)
    assert "bench --dataset sums --max-new-tokens 16" in at.code[0].value
    assert "Benchmark sums in the background" in texts(at.subheader)
    assert at.multiselect(key="job_stages").value == ["smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"]
    assert (folders / "results" / "sums" / "split.json").exists()
    # Every page shows the same choice.
    for page in (EXPLORE, ROUTE, "pages/4_Settings.py"):
        at.switch_page(page).run()
        no_exception(at)
        assert [s.value for s in at.selectbox if s.label == "Dataset"] == ["sums"], page
    # The Route page offers the picked dataset's questions.
    at.switch_page(ROUTE).run()
    at.radio(key="route_mode").set_value("picked").run()
    no_exception(at)
    assert any(c.value.startswith("sums `") and "(free-form); the right answer is " in c.value for c in at.caption)


@pytest.mark.parametrize("content, where", [
    ('{"question": "2+2?", "answer": "4"}\n{"question": "", "answer": "1"}\n', "line 2, column 'question'"),
    ('{"question": "Pick", "options": ["only one"], "answer": 0}\n', "line 1, column 'options'"),
    ('{"question": "Pick", "options": ["a", "b"], "answer": "c"}\n', "line 1, column 'answer'"),
])
def test_a_bad_file_is_refused_with_its_line_and_column_and_nothing_is_kept(folders, content, where):
    at = upload(bench_page(), "bad.jsonl", content)
    shown = texts(at.error)
    assert shown.startswith("Not taken: bad.jsonl") and where in shown, shown
    assert "bench_register" not in [b.key for b in at.button]
    assert not list((folders / "uploads").glob("bad*")) and not (folders / "results" / "bad").exists()


def wait_for(at: AppTest, predicate, timeout_s: float = 900) -> AppTest:
    """Rerun the page (what the progress fragment does every 2 s in a browser) until `predicate`."""
    deadline = time.monotonic() + timeout_s
    while not predicate(at):
        assert time.monotonic() < deadline, f"timed out; captions: {texts(at.caption)}; errors: {texts(at.error)}"
        time.sleep(2)
        at.run()
        no_exception(at)
    return at


@pytest.mark.model
def test_a_background_benchmark_shows_its_progress_after_a_reload_until_done(folders, smollm2_path):
    at = upload(bench_page(), "sums.jsonl", SUMS)
    at.button(key="bench_register").click().run()
    at.multiselect(key="job_stages").set_value(["smollm2-135m"])
    at.number_input(key="job_max_new_tokens").set_value(6)
    at.button(key="FormSubmitter:job_form-Start the benchmark in the background").click().run()
    no_exception(at)
    assert len(at.get("progress")) == 1 and "Job on **sums**" in texts(at.caption)
    # A second job on the same dataset is refused while this one runs (the form is gone meanwhile).
    from cascade_core.compose import background
    from cascade_core.locations import locations
    from cascade_core.presets import load_preset

    if background.read_status(locations(), "sums").active:
        with pytest.raises(background.JobRefused, match="already running"):
            background.start(locations(), "sums", load_preset("default"), stages=["smollm2-135m"])

    reloaded = bench_page()  # a new session: nothing of the first one's state
    reloaded.selectbox(key="dataset@bench").set_value("sums").run()
    no_exception(reloaded)
    assert len(reloaded.get("progress")) == 1 and "Job on **sums**" in texts(reloaded.caption)
    wait_for(reloaded, lambda a: "The benchmark of sums is done" in texts(a.success))
    assert "sums questions (test split)" in texts(reloaded.caption)  # the records are in the tables now
    job = next(d.value for d in reloaded.dataframe if "questions / s (this run)" in d.value.columns)
    assert list(job["stage"]) == ["smollm2-135m"] and list(job["questions"]) == ["6 / 6"]
    assert list(job["state"]) == ["done"] and job["result"].iloc[0].startswith("6 records, accuracy")
    assert (folders / "results" / "sums" / "smollm2-135m.parquet").exists()
    assert "Probes: " in texts(reloaded.caption)  # 6 questions are too few: it says so, the job still ends "done"


def shipped_arith(folders: Path) -> None:
    """The committed arith records (three default models) in the temporary results folder."""
    shutil.copytree(REPO / "data" / "results" / "arith", folders / "results" / "arith")


def test_calibrate_a_dataset_label_free_and_explore_it(folders):
    shipped_arith(folders)
    at = bench_page()
    at.selectbox(key="dataset@bench").set_value("arith").run()
    no_exception(at)
    assert "arith questions" in texts(at.caption)
    assert at.checkbox(key="cal_label_free").value is False  # arith has answers: labelled by default
    at.checkbox(key="cal_label_free").check()
    at.number_input(key="cal_target").set_value(5.0)
    at.selectbox(key="cal_rule").set_value("pt_only")
    at.button(key="FormSubmitter:calibrate_form-Calibrate").click().run()
    no_exception(at)
    done = texts(at.success)
    assert "label-free" in done and "policies/arith/default.json" in done, done
    policy = json.loads((folders / "policies" / "arith" / "default.json").read_text())
    assert policy["guarantee"]["loss"] == "label_free"

    at.switch_page(EXPLORE).run()
    no_exception(at)
    assert any(s.value == "arith" for s in at.selectbox if s.label == "Dataset")
    assert "No benchmark records" not in texts(at.info)
    assert at.metric, "the explorer shows the replayed cascade on arith's records"
