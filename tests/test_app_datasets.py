"""The dataset picked travels, and a question runs with its dataset's policy (issue 20, items 6-7), with
streamlit.testing's AppTest (no browser, no model):

- the Route page routes a question of a dataset with its own calibrated policy file on that file
  (`compose.policies.policy_for_question`), else on its kind's, and says which file, which
  guarantee and why; the stages it offers are the ones that policy uses;
- `?dataset=` in a link (a shared /explore?dataset=arith) opens a fresh session on that dataset,
  the pages write it back into the URL, and the links between pages carry it.

The records and policy files are the committed arith ones, copied into temporary folders; the
mmlu-open "own" policy file is the arith file with another target written in (a fixture, to tell
the two apart: no figure of it is reported).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from cascade_core.compose.policies import guarantee_summary

REPO = Path(__file__).resolve().parent.parent
APP = str(REPO / "app.py")
ROUTE, EXPLORE, BENCH = "pages/1_Route_a_question.py", "pages/2_Explore_thresholds.py", "pages/3_Benchmarks.py"
ARITH_POLICY = REPO / "data" / "policies" / "arith" / "default.json"


@pytest.fixture
def folders(monkeypatch, tmp_path):
    for name, folder in (("RESULTS", "results"), ("POLICIES", "policies"), ("PROBES", "probes")):
        monkeypatch.setenv(f"CASCADE_{name}_DIR", str(tmp_path / folder))
    monkeypatch.setenv("CASCADE_APP_PRELOAD", "0")
    shutil.copytree(REPO / "data" / "results" / "arith", tmp_path / "results" / "arith")
    return tmp_path


def policy_file(folders: Path, dataset: str, target_pt: float | None = None) -> dict:
    """The committed arith policy file where `calibrate --dataset <dataset>` writes (another target
    written in when given); returns its content."""
    found = json.loads(ARITH_POLICY.read_text())
    if target_pt is not None:
        found["guarantee"]["target_pt"] = target_pt
    path = folders / "policies" / dataset / "default.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(found))
    return found


def no_exception(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]


def texts(elements) -> str:
    return "\n".join(str(e.value) for e in elements)


def route_page(dataset: str) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=180)
    at.run()
    at.switch_page(ROUTE).run()
    no_exception(at)
    at.selectbox(key="dataset@route").set_value(dataset).run()
    no_exception(at)
    return at


def policy_box(at: AppTest) -> str:
    """The Route page's 'Policy for this question' box: its title and caption."""
    title = next(m.value for m in at.markdown if m.value.startswith("**Policy for this question**"))
    caption = next(c.value for c in at.caption if c.value.startswith("File: "))
    return f"{title}\n{caption}"


def test_route_states_and_follows_arith_s_own_policy(folders):
    shipped = policy_file(folders, "arith")
    at = route_page("arith")
    assert at.radio(key="route_mode").value == "arith", "picking arith offers its questions"
    box = policy_box(at)
    assert "arith's own calibrated policy" in box
    assert "policies/arith/default.json" in box
    assert guarantee_summary(shipped["guarantee"]) in box and "label-free" in box
    assert "arith has its own calibrated policy file" in box
    # the stages offered are the ones the arith policy keeps on, and its off reasons are said
    enabled = [n for n, s in zip(shipped["stages"], shipped["policy"]["stages"]) if s["enabled"]]
    assert at.multiselect(key="stages::default@route").value == enabled
    for why in shipped["off_reasons"].values():
        assert why[1:] in texts(at.caption)


def test_route_falls_back_to_the_kind_s_policy_until_the_dataset_has_its_own(folders):
    shipped = policy_file(folders, "arith")
    at = route_page("mmlu-open")
    assert at.radio(key="route_mode").value == "picked"
    box = policy_box(at)
    assert "arith's policy (the fallback for free-form questions)" in box
    assert "mmlu-open has no calibrated policy file of its own" in box
    assert guarantee_summary(shipped["guarantee"]) in box

    own = policy_file(folders, "mmlu-open", target_pt=7.0)
    at.run()
    no_exception(at)
    box = policy_box(at)
    assert "mmlu-open's own calibrated policy" in box and "policies/mmlu-open/default.json" in box
    assert guarantee_summary(own["guarantee"]) in box and "at most 7 pt" in box


def test_a_typed_multiple_choice_question_runs_with_mmlu_s_policy(folders):
    at = route_page("arith")
    at.radio(key="route_mode").set_value("type").run()
    at.text_area(key="route_text").set_value("Which planet is red?")
    at.text_area(key="route_options").set_value("Venus\nMars").run()
    no_exception(at)
    box = policy_box(at)
    assert "the preset's own thresholds" in box and "a typed question comes from no dataset" in box
    assert "mmlu's" in box  # no MMLU policy file in this folder: it says which one it looked for
    policy_file(folders, "arith")
    at.text_area(key="route_options").set_value("").run()  # no options: a free-form question, arith's policy
    no_exception(at)
    assert "arith's policy (the fallback for free-form questions)" in policy_box(at)


def test_a_shared_explore_link_opens_on_its_dataset(folders):
    at = AppTest.from_file(APP, default_timeout=180)
    at.switch_page(EXPLORE)
    at.query_params["dataset"] = "arith"
    at.run()
    no_exception(at)
    assert at.selectbox(key="dataset@explore").value == "arith"
    assert "arith" in texts(at.caption) or at.metric, "the explorer shows arith's records"
    assert not any("dataset" in w.value for w in at.warning), texts(at.warning)  # a known link parameter
    assert at.query_params["dataset"] in ("arith", ["arith"]), "the URL keeps the dataset with the thresholds"


def test_an_unknown_dataset_in_a_link_is_said_and_mmlu_shown(folders):
    at = AppTest.from_file(APP, default_timeout=180)
    at.query_params["dataset"] = "nope"
    at.run()
    no_exception(at)
    assert "dataset='nope' is not a dataset here" in texts(at.warning)
    assert at.selectbox(key="dataset@home").value == "mmlu"


def test_links_between_pages_carry_the_dataset(folders):
    at = route_page("arith")
    links = {p.proto.page: p.proto.query_string for p in at.get("page_link")}
    assert links.get("explore") == "dataset=arith", links
    at.switch_page(BENCH).run()
    no_exception(at)
    assert at.selectbox(key="dataset@bench").value == "arith"
    links = {p.proto.page: p.proto.query_string for p in at.get("page_link")}
    assert links.get("explore") == "dataset=arith", links
    # the picker wins over an old URL value: the user's choice afterwards is kept
    at.selectbox(key="dataset@bench").set_value("mmlu").run()
    no_exception(at)
    at.switch_page(EXPLORE).run()
    assert at.selectbox(key="dataset@explore").value == "mmlu"
    assert "dataset" not in at.query_params


@pytest.mark.model
def test_a_question_of_a_dataset_with_its_own_policy_routes_on_it_live(folders, smollm2_path):
    """An mmlu-open question, mmlu-open having its own policy file: routed on SmolLM2 (chosen by hand),
    the result says the policy it ran with."""
    policy_file(folders, "arith")
    own = policy_file(folders, "mmlu-open", target_pt=7.0)
    at = route_page("mmlu-open")
    at.multiselect(key="stages::default@route").set_value(["smollm2-135m"])
    at.button(key="route_button").click().run()
    no_exception(at)
    assert len(at.status) == 1 and "free-form answer" in texts(at.info)
    assert f"Routed with mmlu-open's own calibrated policy: {guarantee_summary(own['guarantee'])}." in texts(at.caption)


def test_explorer_thresholds_route_the_questions_of_the_dataset_they_were_chosen_on(folders):
    at = AppTest.from_file(APP, default_timeout=180)
    at.switch_page(EXPLORE)
    at.query_params["dataset"] = "arith"
    at.run()
    at.slider(key="x::default::smollm2-135m::tau_t").set_value(0.91).run()
    no_exception(at)
    at.switch_page(ROUTE).run()
    no_exception(at)
    assert at.radio(key="route_mode").value == "arith"
    assert at.dataframe[0].value["routing"].iloc[0].startswith("keep when P(T) >= 0.91")
    assert "Routed here with other thresholds: from the threshold explorer" in texts(at.caption)
    at.radio(key="route_mode").set_value("mmlu").run()  # an MMLU question: not chosen on its records
    no_exception(at)
    assert "0.91" not in at.dataframe[0].value["routing"].iloc[0]


def test_an_uploaded_multiple_choice_set_routes_on_mmlu_s_policy_until_it_has_its_own(folders):
    """A registered multiple-choice file: MMLU's policy (the promise and explorer of the page) until
    `calibrate --dataset` writes its own, then that one (here MMLU's file with SmolLM2 switched on at
    P(T) >= 0.9 written in, to tell them apart), in the stages offered and the thresholds table."""
    from cascade_core.records.registry import resolve_dataset

    questions = folders / "capitals.jsonl"
    questions.write_text("".join(json.dumps({"question": f"Capital of {c}?", "options": o, "answer": a}) + "\n"
                                 for c, o, a in (("France", ["Paris", "Rome"], "Paris"),
                                                 ("Italy", ["Paris", "Rome"], "Rome"),
                                                 ("Spain", ["Madrid", "Oslo"], "Madrid"),
                                                 ("Norway", ["Madrid", "Oslo"], "Oslo"))))
    name = resolve_dataset(str(questions), folders / "results").name
    mmlu = json.loads((REPO / "data" / "policies" / "default.json").read_text())
    (folders / "policies").mkdir(exist_ok=True)
    (folders / "policies" / "default.json").write_text(json.dumps(mmlu))
    at = route_page(name)
    assert at.radio(key="route_mode").value == "picked"
    box = policy_box(at)
    assert "mmlu's policy (the fallback for multiple-choice questions)" in box
    assert f"{name} has no calibrated policy file of its own" in box and "labelled: at most" in box

    own = json.loads(json.dumps(mmlu))
    own["policy"]["stages"][0].update(enabled=True, rule="pt_only", tau_t=0.9)
    own["off_reasons"].pop("smollm2-135m", None)
    (folders / "policies" / name).mkdir()
    (folders / "policies" / name / "default.json").write_text(json.dumps(own))
    at.run()
    no_exception(at)
    assert f"{name}'s own calibrated policy" in policy_box(at)
    assert at.multiselect(key="stages::default@route").value[0] == "smollm2-135m"
    assert at.dataframe[0].value["routing"].iloc[0] == "keep when P(T) >= 0.9"
