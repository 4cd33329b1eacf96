"""The Streamlit app, page by page, with streamlit.testing's AppTest (no browser).

Records: synthetic (records.synthetic_table) on real MMLU question ids and splits, written as the
benchmark runner writes them into a temporary results folder ($CASCADE_RESULTS_DIR), so the
pages run their real loading path and the numbers can be checked against cascade_core. Live
routing uses the real SmolLM2-135M.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from _records import DEFAULT_STAGES as STAGES
from _records import write_synthetic_records
from app_ui import state
from cascade_core.policy import CascadePolicy, StagePolicy
from cascade_core.records.table import RecordTable
from cascade_core.choose.replay import replay
from cascade_core.choose.selection import evaluate_on, select_policy
from app_ui.view_model import StageSetting

APP = str(Path(__file__).resolve().parent.parent / "app.py")
ROUTE, EXPLORE, BENCH, SETTINGS = ("pages/1_Route_a_question.py", "pages/2_Explore_thresholds.py",
                                   "pages/3_Benchmarks.py", "pages/4_Settings.py")


@pytest.fixture(scope="module")
def synthetic_results(tmp_path_factory):
    root = tmp_path_factory.mktemp("results")
    return root, write_synthetic_records(root)


@pytest.fixture(autouse=True)
def no_policy_files(monkeypatch, tmp_path):
    """No calibrated policy file unless a test writes one (the shipped ones are for the real records)."""
    monkeypatch.setenv("CASCADE_POLICIES_DIR", str(tmp_path / "policies"))
    monkeypatch.setenv("CASCADE_APP_PRELOAD", "0")  # no background loading unless a test asks for it
    return tmp_path / "policies"


@pytest.fixture
def app(monkeypatch, synthetic_results):
    monkeypatch.setenv("CASCADE_RESULTS_DIR", str(synthetic_results[0]))
    return AppTest.from_file(APP, default_timeout=120)


@pytest.fixture
def empty_app(monkeypatch, tmp_path):
    monkeypatch.setenv("CASCADE_RESULTS_DIR", str(tmp_path / "results"))
    return AppTest.from_file(APP, default_timeout=120)


def no_exception(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]


def metrics(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def texts(elements) -> str:
    return "\n".join(str(e.value) for e in elements)


def open_page(at: AppTest, page: str) -> AppTest:
    at.run()
    no_exception(at)
    at.switch_page(page).run()
    no_exception(at)
    return at


def chart_option(at: AppTest) -> dict:
    """The explorer's ECharts option, as the page sent it."""
    return json.loads(at.get("echarts_chart")[0].proto.spec)


def chart_point(at: AppTest, name: str) -> tuple[float, float]:
    """A one-point series of the explorer chart in the records' units: cost (the x axis is drawn in
    thousands, millions, ... named in its title) and accuracy (drawn in %)."""
    from app_ui.charts import SI_WORDS

    option = chart_option(at)
    factor = next((f for f, words in SI_WORDS if f"({words} " in option["xAxis"]["name"]), 1.0)
    x, y = next(s for s in option["series"] if s["name"] == name)["data"][0]
    return x * factor, y / 100.0


def key(stage: str, what: str, preset: str = "default") -> str:
    return f"x::{preset}::{stage}::{what}"


def expected_metrics(result, table: RecordTable) -> dict[str, str]:
    reference = table.correct[-1]
    return {"Accuracy": f"{result.accuracy:.2%}",
            "Compute saved (FLOPs)": f"{result.compute_reduction['flops']:.2%}",
            f"PD vs {table.names[-1]}": f"{result.accuracy - reference.mean():+.2%}"}


# ---- every page renders -------------------------------------------------------------------------------
@pytest.mark.parametrize("page", [None, ROUTE, EXPLORE, BENCH, SETTINGS])
def test_every_page_renders_with_records(app, page):
    at = open_page(app, page) if page else app.run()
    no_exception(at)
    assert not at.error, texts(at.error)


@pytest.mark.parametrize("n_stages", [1, 2])
@pytest.mark.parametrize("end", ["(none)", "gpt-4-recorded"])
def test_explorer_works_with_the_stages_that_have_records(monkeypatch, tmp_path, n_stages, end):
    table = write_synthetic_records(tmp_path / "results", n=600, names=STAGES[:n_stages])
    monkeypatch.setenv("CASCADE_RESULTS_DIR", str(tmp_path / "results"))
    app = AppTest.from_file(APP, default_timeout=120)
    app.query_params.update({"end": end})
    at = open_page(app, EXPLORE)
    assert f"No records yet for {', '.join(STAGES[n_stages:])}" in texts(at.warning)
    from cascade_core.compose.tables import GPT4_STAGE, load_preset_table

    expected = load_preset_table("default", results_dir=tmp_path / "results", skip_missing=True, split="test",
                                 include_recorded=GPT4_STAGE if end != "(none)" else False)
    assert expected.names[:n_stages] == table.names
    result = replay(expected, CascadePolicy(tuple(StagePolicy(0.5, 0.5) for _ in expected.names)))
    assert metrics(at)["Accuracy"] == f"{result.accuracy:.2%}"
    for page in (BENCH, ROUTE, SETTINGS):
        at.switch_page(page).run()
        no_exception(at)


@pytest.mark.parametrize("page", [None, EXPLORE, BENCH])
def test_pages_without_records_say_so(empty_app, page):
    at = open_page(empty_app, page) if page else empty_app.run()
    no_exception(at)
    assert "No benchmark records" in texts(at.info)


def test_home_headline_is_the_calibration_choice_reported_on_test(app, synthetic_results):
    _, table = synthetic_results
    at = app.run()
    no_exception(at)
    chosen = select_policy(table.subset("calibration"), target_max_loss=0.01, unit="flops")
    result = evaluate_on(table.subset("test"), chosen.policy)
    shown = metrics(at)
    assert shown["Test questions"] == f"{int((table.splits == 'test').sum()):,}"
    assert shown["Cascade accuracy"] == f"{result.accuracy:.1%}"
    assert shown["Compute reduction (FLOPs)"] == f"{result.compute_reduction['flops']:.1%}"


# ---- the explorer -----------------------------------------------------------------------------------
def test_explorer_slider_moves_the_operating_point_to_the_replayed_values(app, synthetic_results):
    _, table = synthetic_results
    test = table.subset("test")
    at = open_page(app, EXPLORE)
    before = metrics(at)
    point_before = chart_point(at, "these thresholds")

    at.slider(key=key("smollm2-135m", "tau_t")).set_value(0.8).run()
    no_exception(at)
    policy = CascadePolicy((StagePolicy(0.8, 0.5), StagePolicy(0.5, 0.5), StagePolicy(0.0, 0.0)))
    result = replay(test, policy)
    after = metrics(at)
    for label, value in expected_metrics(result, test).items():
        assert after[label] == value, label
    assert after != before
    point = chart_point(at, "these thresholds")
    assert point[0] == pytest.approx(result.mean_cost["flops"], rel=1e-12)
    assert point[1] == pytest.approx(result.accuracy, abs=1e-12)
    assert point[0] != point_before[0]
    option = chart_option(at)  # drawn last and highest, with where it was, faint, just below it
    assert [s["name"] for s in option["series"]][-2:] == ["previous position", "these thresholds"]
    assert option["series"][-1]["z"] > max(s["z"] for s in option["series"][:-1])
    assert chart_point(at, "previous position") == pytest.approx(point_before, rel=1e-12)
    rates = at.dataframe[0].value
    assert list(rates["escalation rate"])[0] == f"{result.escalation_rate[0]:.1%}"
    assert at.query_params["t.smollm2-135m"] in ("0.8", ["0.8"])


def test_explorer_exact_box_sets_the_threshold_and_a_stale_box_value_does_not_undo_the_slider(app, synthetic_results):
    _, table = synthetic_results
    test = table.subset("test")
    at = open_page(app, EXPLORE)
    box = key("smollm2-135m", "tau_t") + "#n"
    at.number_input(key=box).set_value(0.4567).run()  # typed: the slider takes the exact value
    no_exception(at)
    assert at.slider(key=key("smollm2-135m", "tau_t")).value == pytest.approx(0.4567)
    result = replay(test, CascadePolicy((StagePolicy(0.4567, 0.5), StagePolicy(0.5, 0.5), StagePolicy(0.0, 0.0))))
    assert metrics(at)["Accuracy"] == f"{result.accuracy:.2%}"
    # A held arrow key: the browser sends the slider's new value with the box's value from before the
    # last rerun reached it. The slider's value wins, and the box follows it.
    at.slider(key=key("smollm2-135m", "tau_t")).set_value(0.47)
    at.number_input(key=box).set_value(0.4)
    at.run()
    no_exception(at)
    assert at.slider(key=key("smollm2-135m", "tau_t")).value == pytest.approx(0.47)
    assert at.number_input(key=box).value == pytest.approx(0.47)


def test_explorer_takes_thresholds_rule_and_unit_from_the_url(app, synthetic_results):
    _, table = synthetic_results
    app.query_params.update({"t.qwen2.5-coder-0.5b": "0.65", "ik.smollm2-135m": "0.3", "rule": "both",
                             "split": "calibration", "unit": "tokens", "on.smollm2-135m": "1"})
    at = open_page(app, EXPLORE)
    assert at.slider(key=key("qwen2.5-coder-0.5b", "tau_t")).value == pytest.approx(0.65)
    assert at.slider(key=key("smollm2-135m", "tau_ik")).value == pytest.approx(0.3)
    result = replay(table.subset("calibration"),
                    CascadePolicy((StagePolicy(0.5, 0.3), StagePolicy(0.65, 0.5), StagePolicy(0.0, 0.0))))
    shown = metrics(at)
    assert shown["Accuracy"] == f"{result.accuracy:.2%}"
    assert shown["Compute saved (tokens)"] == f"{result.compute_reduction['tokens']:.2%}"


def test_explorer_ignores_a_bad_url_value_with_a_warning(app):
    app.query_params.update({"t.smollm2-135m": "lots", "rule": "magic"})
    at = open_page(app, EXPLORE)
    warnings = texts(at.warning)
    assert "t.smollm2-135m" in warnings and "magic" in warnings
    assert at.slider(key=key("smollm2-135m", "tau_t")).value == pytest.approx(0.5)


def test_explorer_notes_every_unknown_or_invalid_link_parameter(app):
    app.query_params.update({"preset": "nope", "unit": "furlongs", "split": "train", "end": "gpt-5",
                             "colour": "red", "t.no-such-stage": "0.5", "on.smollm2-135m": "maybe"})
    at = open_page(app, EXPLORE)
    notes = [w for w in texts(at.warning).splitlines() if w.startswith("Ignored from the link")]
    for needle in ("preset='nope'", "unit='furlongs'", "split='train'", "end='gpt-5'", "colour='red'",
                   "t.no-such-stage", "on.smollm2-135m='maybe'"):
        assert any(needle in n for n in notes), (needle, notes)
    assert at.sidebar.selectbox(key="preset@explore").value == "default"  # the page still opens
    assert at.sidebar.selectbox(key="unit@explore").value == "flops"


def test_explorer_rule_and_switched_off_stage_replay_exactly(app, synthetic_results):
    _, table = synthetic_results
    test = table.subset("test")
    at = open_page(app, EXPLORE)
    at.radio(key="x::default::*::rule").set_value("pt_only").run()
    at.checkbox(key=key("qwen2.5-coder-0.5b", "on")).uncheck().run()
    no_exception(at)
    policy = CascadePolicy((StagePolicy(0.5, 0.5, "pt_only"), StagePolicy(0.5, 0.5, "pt_only", enabled=False),
                            StagePolicy(0.0, 0.0, "pt_only")))
    result = replay(test, policy)
    for label, value in expected_metrics(result, test).items():
        assert metrics(at)[label] == value
    assert at.query_params["on.qwen2.5-coder-0.5b"] in ("0", ["0"])


def test_a_shared_link_opens_in_a_fresh_session_exactly_as_the_sender_saw_it(app, synthetic_results, no_policy_files):
    """Issue 22: the fresh page opens on the calibrated policy (the 0.5B stage off); the sender had
    switched it on and moved a threshold; the link restores both, to the last digit."""
    write_policy_with_a_stage_off(no_policy_files)
    at = open_page(app, EXPLORE)
    assert at.checkbox(key=key(STAGES[1], "on")).value is False
    at.checkbox(key=key(STAGES[1], "on")).check().run()
    at.number_input(key=key(STAGES[0], "tau_t") + "#n").set_value(0.6137).run()
    no_exception(at)
    link = {k: v[0] if isinstance(v, list) else v for k, v in at.query_params.items()}
    assert link[f"on.{STAGES[1]}"] == "1" and link[f"on.{STAGES[0]}"] == "1"
    # switched on by hand, the stage calibration switched off starts at the preset's thresholds, not 0 / 0
    assert (link[f"t.{STAGES[1]}"], link[f"ik.{STAGES[1]}"]) == ("0.5", "0.5")
    assert "Calibration switched this stage off; switched on here" in texts(at.caption)
    fresh = AppTest.from_file(APP, default_timeout=120)
    fresh.query_params.update(link)
    opened = open_page(fresh, EXPLORE)
    assert opened.checkbox(key=key(STAGES[1], "on")).value is True
    assert opened.number_input(key=key(STAGES[0], "tau_t") + "#n").value == pytest.approx(0.6137, abs=0)
    assert metrics(opened) == metrics(at)  # accuracy, cost, PD, McNemar: to the last digit shown
    assert chart_point(opened, "these thresholds") == chart_point(at, "these thresholds")
    assert not [w for w in texts(opened.warning).splitlines() if w.startswith("Ignored from the link")]


def test_explorer_all_stages_off_is_a_message(app):
    at = open_page(app, EXPLORE)
    for stage in STAGES:
        at.checkbox(key=key(stage, "on")).uncheck()
    at.run()
    no_exception(at)
    assert "Every stage is switched off" in texts(at.error)


def test_explorer_target_control_moves_the_sliders_to_the_calibrated_policy(app, synthetic_results):
    from cascade_core.choose.calibrated_policy import calibrate_policy

    _, table = synthetic_results
    at = open_page(app, EXPLORE)
    at.number_input(key="cal_target").set_value(2.0)
    at.number_input(key="cal_delta").set_value(0.2)
    at.button(key="cal_button").click().run()
    no_exception(at)
    chosen = calibrate_policy(table.subset("calibration"), target_max_loss=0.02, delta=0.2, unit="flops")
    assert at.radio(key="x::default::*::rule").value == chosen.rule
    for name, stage in zip(STAGES, chosen.policy.stages):
        assert at.checkbox(key=key(name, "on")).value == stage.enabled
    for name, stage in zip(STAGES[:-1], chosen.policy.stages[:-1]):
        if not stage.enabled:
            continue
        if chosen.rule in ("learned", "loss_aware"):
            assert at.slider(key=key(name, "tau_score")).value == pytest.approx(stage.tau_learned)
        else:
            assert at.slider(key=key(name, "tau_t")).value == pytest.approx(min(max(stage.tau_t, 0), 1))
            assert at.number_input(key=key(name, "tau_t") + "#n").value == pytest.approx(min(max(stage.tau_t, 0), 1))
    on_test = replay(table.subset("test"), chosen.policy)
    assert metrics(at)["Accuracy"] == f"{on_test.accuracy:.2%}"  # chosen on calibration, shown on test
    assert "calibrated for <= 2 pt at delta 0.2" in texts(at.success).lower()


def test_explorer_budget_is_typed_in_the_chart_s_unit(app, synthetic_results):
    """Issue 22: the chart shows (say) billions of FLOPs; the budget box takes the same unit."""
    from app_ui.charts import SI_WORDS
    from cascade_core.choose.calibrated_policy import calibrate_policy

    _, table = synthetic_results
    at = open_page(app, EXPLORE)
    at.radio(key="cal_mode").set_value("cost budget").run()
    no_exception(at)
    axis = chart_option(at)["xAxis"]["name"]
    factor, words = next((f, w) for f, w in SI_WORDS if f"({w} " in axis)
    box = next(n for n in at.number_input if n.label.startswith("Budget ("))
    assert f"{words} FLOPs per question, as on the chart" in box.label
    largest = float(table.subset("test").cost("flops")[-1].mean())  # the page shows the test split
    assert box.value == pytest.approx(float(f"{largest / factor / 2:.3g}"))  # half the largest stage, in the axis' unit
    budget = round(0.8 * largest / factor, 3)
    box.set_value(budget).run()
    at.button(key="cal_button").click().run()
    no_exception(at)
    assert not at.error, texts(at.error)
    chosen = calibrate_policy(table.subset("calibration"), target_max_loss=None, cost_budget=budget * factor, delta=0.1,
                              unit="flops")
    assert metrics(at)["Accuracy"] == f"{replay(table.subset('test'), chosen.policy).accuracy:.2%}"


def write_policy_file(results_root: Path, policies: Path, target_pt: float = 3.0):
    """A real policy file (`calibrate` on the synthetic records) in a temporary policies folder."""
    from cascade_core.locations import locations
    from cascade_core.compose.policies import calibrate

    path, found = calibrate("default", where=locations(results_dir=results_root, policies_dir=policies),
                            target_pt=target_pt, rule="both")
    return CascadePolicy.from_dict(found.policy), found


def test_explorer_opens_on_the_calibrated_thresholds(app, synthetic_results, no_policy_files):
    root, table = synthetic_results
    policy, found = write_policy_file(root, no_policy_files)
    at = open_page(app, EXPLORE)
    assert at.radio(key="x::default::*::rule").value == "both"
    for name, stage in zip(STAGES, policy.stages):
        assert at.checkbox(key=key(name, "on")).value == stage.enabled
        if stage.enabled and name != STAGES[-1]:
            assert at.slider(key=key(name, "tau_t")).value == pytest.approx(min(max(stage.tau_t, 0), 1))
            assert at.slider(key=key(name, "tau_ik")).value == pytest.approx(min(max(stage.tau_ik, 0), 1))
    assert metrics(at)["Accuracy"] == f"{replay(table.subset('test'), policy).accuracy:.2%}"
    assert f"On the preset's calibrated policy ({found.description})" in texts(at.caption)
    assert "back_to_calibrated" not in [b.key for b in at.button]

    # Issue 22: a threshold moved is "you left the calibrated policy", with a way back; the stale
    # "opened on the calibrated policy" caption is gone.
    moved = next(n for n, s in zip(STAGES, policy.stages) if s.enabled and n != STAGES[-1])
    at.slider(key=key(moved, "tau_t")).set_value(0.99).run()
    no_exception(at)
    assert "You left the calibrated policy" in texts(at.markdown)
    assert "On the preset's calibrated policy" not in texts(at.caption)
    at.button(key="back_to_calibrated").click().run()
    no_exception(at)
    assert at.slider(key=key(moved, "tau_t")).value == pytest.approx(min(max(policy.stages[STAGES.index(moved)].tau_t,
                                                                             0), 1))
    assert f"On the preset's calibrated policy ({found.description})" in texts(at.caption)
    assert metrics(at)["Accuracy"] == f"{replay(table.subset('test'), policy).accuracy:.2%}"


def write_policy_with_a_stage_off(policies: Path, records_dtype: str | None = None) -> tuple[CascadePolicy, str]:
    """A policy file whose 0.5B stage calibration switched off (written as `calibrate` writes one);
    `records_dtype`: the number format its records were made in (provenance.records_dtype)."""
    from cascade_core.choose.policy_file import PolicyFile, write_policy_file

    policy = CascadePolicy((StagePolicy(0.62, 0.41), StagePolicy(0.0, 0.0, enabled=False), StagePolicy(0.0, 0.0)))
    why = "calibration switched it off: no threshold of this stage was certified to keep the loss <= 1 pt at delta 0.1"
    provenance = {"dataset": "mmlu", "split": "calibration", "questions": 401}
    if records_dtype:
        provenance["records_dtype"] = {name: records_dtype for name in STAGES}
    write_policy_file(policies / "default.json", PolicyFile(
        preset="default", stages=tuple(STAGES), policy=policy.to_dict(),
        guarantee={"mode": "target", "target_pt": 1.0, "delta": 0.1, "unit": "flops"},
        provenance=provenance, off_reasons={STAGES[1]: why}))
    return policy, why


def test_every_page_says_when_calibration_switched_a_stage_off(app, synthetic_results, no_policy_files):
    _, table = synthetic_results
    policy, why = write_policy_with_a_stage_off(no_policy_files)
    at = app.run()  # Home: the headline is the calibrated cascade, and it says a stage is off
    no_exception(at)
    result = replay(table.subset("test"), policy)
    assert metrics(at)["Cascade accuracy"] == f"{result.accuracy:.1%}"
    assert "Calibration switched off qwen2.5-coder-0.5b" in texts(at.info)
    assert "calibrated for <= 1 pt at delta 0.1 on 401 calibration questions" in texts(at.caption)
    at.switch_page(EXPLORE).run()
    no_exception(at)
    assert at.checkbox(key=key(STAGES[1], "on")).value is False
    assert at.slider(key=key(STAGES[0], "tau_t")).value == pytest.approx(0.62)
    assert at.number_input(key=key(STAGES[0], "tau_ik") + "#n").value == pytest.approx(0.41)
    at.switch_page(ROUTE).run()
    no_exception(at)
    captions = texts(at.caption)
    assert "Thresholds: calibrated for <= 1 pt at delta 0.1 on 401 calibration questions." in captions
    assert f"Qwen2.5-Coder-0.5B-Instruct: off**. {why[0].upper()}{why[1:]}." in captions
    assert at.multiselect(key="stages::default@route").value == [STAGES[0], STAGES[2]]
    routing = list(at.dataframe[0].value["routing"])
    assert routing == ["keep when P(T) >= 0.62 and P(IK) >= 0.41", f"off: {why}", "last stage: always answers"]


@pytest.mark.parametrize("live", ["float32", "bfloat16"])
def test_home_route_and_settings_say_the_number_format_against_the_calibration(app, no_policy_files, monkeypatch, live):
    """Issue 18: the live format per stage, and plainly when it is not the calibration records' (bfloat16)."""
    import models.hf as hf
    from app_ui import backends

    backends.unload_all()  # the format of a model loaded by another test would be its own
    monkeypatch.setenv("CASCADE_AUTO_DTYPE", live)
    monkeypatch.setattr(hf, "cpu_has_native_bf16", lambda cpuinfo=None: live == "bfloat16")
    write_policy_with_a_stage_off(no_policy_files, records_dtype="bfloat16")
    differs = "float32 here; calibrated on bfloat16 records: about 5% of answers may differ"
    at = app.run()
    no_exception(at)
    for page in (None, ROUTE, SETTINGS):
        if page:
            at.switch_page(page).run()
            no_exception(at)
        said = texts(at.info) if live == "float32" else texts(at.caption)
        assert "**Number format**: SmolLM2-135M-Instruct" in said, page
        if live == "float32":
            assert f"Qwen2.5-Coder-1.5B-Instruct: {differs}." in said, page
        else:
            assert re.search(r"Qwen2\.5-Coder-1\.5B-Instruct[^:]*: bfloat16\.", said) and "may differ" not in said, page
            assert "Number format" not in texts(at.info)


def test_route_runs_a_stage_calibration_switched_off_at_the_preset_s_thresholds_when_chosen(app, no_policy_files,
                                                                                         monkeypatch, smollm2_path):
    """Issue 22: re-enabled on Route, the 0.5B stage ran at 0 / 0 ("Keep: P(T) 0.87 >= tau_T 0.00")
    while the table said "off". It runs with the preset's thresholds, and the page says which."""
    from app_ui import backends
    from cascade_core.presets import load_preset

    _, why = write_policy_with_a_stage_off(no_policy_files)
    given, build = {}, backends.lazy_stage

    def capture(config, policy):
        given[config.name] = policy
        if config.name == STAGES[-1]:
            raise RuntimeError("captured")  # stop before any model loads: the page shows it as a message
        return build(config, policy)  # lazy: loads nothing

    monkeypatch.setattr(backends, "lazy_stage", capture)
    at = open_page(app, ROUTE)
    at.multiselect(key="stages::default@route").set_value(list(STAGES)).run()
    no_exception(at)
    preset = {c.name: c for c in load_preset("default").stages}[STAGES[1]]
    wanted = f"keep when P(T) >= {preset.tau_t:.4g} and P(IK) >= {preset.tau_ik:.4g}"
    routing = list(at.dataframe[0].value["routing"])
    assert routing[1] == f"switched on here: {wanted} (the preset's thresholds)"
    assert "Qwen2.5-Coder-0.5B-Instruct: switched on here** although calibration switched it off" in texts(at.caption)
    ask(at, "What is 2 + 2?", "3\n4", stages=STAGES)
    assert "captured" in texts(at.error)
    assert given[STAGES[0]] == StagePolicy(0.62, 0.41)  # the calibrated stage as calibrated
    assert given[STAGES[1]].enabled and (given[STAGES[1]].tau_t, given[STAGES[1]].tau_ik) == (preset.tau_t,
                                                                                              preset.tau_ik)


def test_explorer_can_end_with_the_recorded_gpt4_stage(app, synthetic_results):
    root, _ = synthetic_results
    at = open_page(app, EXPLORE)
    at.selectbox(key="end::default@explore").set_value("gpt-4-recorded").run()
    no_exception(at)
    assert "GPT-4-1106-preview (recorded)" in [c.label.strip("*") for c in at.checkbox]  # labelled as recorded
    # the preset's last stage now passes questions on: it starts at 0.5 / 0.5, not "keep everything"
    assert at.slider(key=key("qwen2.5-coder-1.5b", "tau_t")).value == pytest.approx(0.5)
    assert "PD vs gpt-4-recorded" in metrics(at)
    assert "gpt-4-recorded costs nothing in FLOPs" in texts(at.info)  # its size is unknown: pick another unit
    at.selectbox(key="unit@explore").set_value("dollars").run()
    no_exception(at)
    assert metrics(at)["Compute saved (dollars)"] != "–"


# ---- thresholds follow the explorer on the Route page -----------------------------------------------------
def test_route_follows_the_explorer_thresholds(app):
    at = open_page(app, EXPLORE)
    at.slider(key=key("smollm2-135m", "tau_t")).set_value(0.91).run()
    at.switch_page(ROUTE).run()
    no_exception(at)
    shown = at.dataframe[0].value
    assert shown["routing"].iloc[0] == "keep when P(T) >= 0.91 and P(IK) >= 0.5"
    assert "Thresholds: from the threshold explorer." in texts(at.caption)


# ---- Route a question -------------------------------------------------------------------------------------
def ask(at: AppTest, text: str, options: str = "", stages=("smollm2-135m",)) -> AppTest:
    if at.radio(key="route_mode").value != "type":
        at.radio(key="route_mode").set_value("type").run()
    at.multiselect(key="stages::default@route").set_value(list(stages))
    at.text_area(key="route_text").set_value(text)
    at.text_area(key="route_options").set_value(options)
    at.button(key="route_button").click().run()
    no_exception(at)
    return at


@pytest.mark.model
def test_route_one_stage_on_smollm2_shows_one_card(app, smollm2_path):
    at = open_page(app, ROUTE)
    ask(at, "Which planet is known as the Red Planet?", "Venus\nMars\nJupiter\nSaturn")
    assert [s.label for s in at.status] == ["SmolLM2-135M-Instruct: answered (last stage)"]
    assert metrics(at)["Stages visited"] == "1"
    assert "The cascade answers" in texts(at.info)
    # P(T) and P(IK): the probe in data/probes/ was trained by `probes train` on the cached results
    assert [c.key for c in at.get("plotly_chart")] == ["gauge_pt_smollm2-135m", "gauge_pik_smollm2-135m"]
    assert "No P(IK)" not in texts(at.info)
    at.run()  # a rerun draws the same trace again
    no_exception(at)
    assert len(at.status) == 1


@pytest.mark.model
def test_route_two_stages_one_card_per_stage_visited(app, smollm2_path):
    app.session_state[state.ADDED_KEY] = {"default": [{"name": "smollm2-b", "backend": "packaged",
                                                       "model": "smollm2-135m", "label": "SmolLM2 again"}]}
    app.session_state[state.POLICY_KEY] = {"default": {"rule": "pt_only", "stages": {
        "smollm2-135m": StageSetting(1.0, 0.0)}}}
    at = open_page(app, ROUTE)
    ask(at, "What is 2 + 2?", "3\n4\n5\n22", stages=("smollm2-135m", "smollm2-b"))
    assert [s.label for s in at.status] == ["SmolLM2-135M-Instruct: escalated", "SmolLM2 again: answered (last stage)"]
    assert metrics(at)["Stages visited"] == "2"
    assert "Escalate" in texts(at.warning)
    # the added stage has no probe: its card shows P(T) alone and says why
    assert [c.key for c in at.get("plotly_chart")] == ["gauge_pt_smollm2-135m", "gauge_pik_smollm2-135m",
                                                       "gauge_pt_smollm2-b"]
    assert "No P(IK)" in texts(at.info)
    assert "not reached" not in at.get("graphviz_chart")[0].proto.spec

    at.session_state[state.POLICY_KEY] = {"default": {"rule": "pt_only",
                                                      "stages": {"smollm2-135m": StageSetting(0.0, 0.0)}}}
    at.button(key="route_button").click().run()
    no_exception(at)
    assert [s.label for s in at.status] == ["SmolLM2-135M-Instruct: kept its answer"]
    assert "not reached" in at.get("graphviz_chart")[0].proto.spec


@pytest.mark.model
def test_route_free_form_question_on_smollm2(app, smollm2_path):
    at = open_page(app, ROUTE)
    ask(at, "Name a primary colour.")
    assert len(at.status) == 1
    assert "free-form answer" in texts(at.info)
    assert at.text[-1].value.strip()


@pytest.mark.model
def test_route_mmlu_question_shows_the_right_answer(app, smollm2_path):
    at = open_page(app, ROUTE)
    at.radio(key="route_mode").set_value("mmlu").run()
    at.multiselect(key="stages::default@route").set_value(["smollm2-135m"])
    at.button(key="route_button").click().run()
    no_exception(at)
    assert "The right answer is" in texts(at.success) + texts(at.error)


@pytest.mark.model
def test_route_arith_question_runs_free_form(app, smollm2_path):
    """A shipped arithmetic question: free-form, routed, its right answer shown with it."""
    at = open_page(app, ROUTE)
    at.radio(key="route_mode").set_value("arith").run()
    no_exception(at)
    assert at.selectbox(key="route_arith_task").value == "2D+"
    assert any("arith `arith-2D+-" in c.value and "the right answer is" in c.value for c in at.caption)
    at.multiselect(key="stages::default@route").set_value(["smollm2-135m"])
    at.button(key="route_button").click().run()
    no_exception(at)
    assert len(at.status) == 1 and "free-form answer" in texts(at.info)


def test_route_shows_an_mmlu_question_s_options_one_per_line(app):
    at = open_page(app, ROUTE)
    at.radio(key="route_mode").set_value("mmlu").run()
    no_exception(at)
    options = next(m.value for m in at.markdown if m.value.startswith("A. "))
    lines = options.split("  \n")  # markdown hard line breaks: one option a line
    assert [line[:3] for line in lines] == ["A. ", "B. ", "C. ", "D. "]
    assert "\n" not in "".join(lines)


@pytest.mark.parametrize("text, options, message", [
    ("   ", "", "the question is empty"),
    ("Pick one", "y" * 1500 + "\nno", "too long"),
    ("Pick one", "same\nsame", "are the same"),
    ("Pick one", "only one", "at least 2 options"),
    ("bell \x07 here", "", "control characters"),
])
def test_route_bad_question_is_a_message(app, text, options, message):
    at = open_page(app, ROUTE)
    ask(at, text, options)
    assert message in texts(at.error)
    assert len(at.status) == 0


def test_route_refuses_an_over_long_paste_with_the_limit_and_its_length(app):
    from cascade_core.server.common import DEFAULT_MAX_PROMPT_CHARS

    text = "Is this long? " * 3000  # 42,000 characters: over the servers' prompt limit
    at = open_page(app, ROUTE)
    ask(at, text, "yes\nno")
    shown = texts(at.error)
    assert f"{len(text) + 5:,} characters" in shown and f"limit of {DEFAULT_MAX_PROMPT_CHARS:,}" in shown
    assert at.text_area(key="route_text").value == text  # kept, not dropped
    assert not at.status  # nothing ran


def test_route_recorded_stage_needs_an_mmlu_question(app):
    app.session_state[state.PRESET_KEY] = "api-recorded"
    at = open_page(app, ROUTE)
    at.multiselect(key="stages::api-recorded@route").set_value(["gpt-4-recorded"])
    at.radio(key="route_mode").set_value("type").run()
    at.text_area(key="route_text").set_value("What is 2 + 2?")
    at.text_area(key="route_options").set_value("3\n4")
    at.button(key="route_button").click().run()
    no_exception(at)
    assert "MMLU" in texts(at.error)

    at.radio(key="route_mode").set_value("mmlu").run()
    at.button(key="route_button").click().run()
    no_exception(at)
    assert [s.label for s in at.status] == ["GPT-4-1106-preview (recorded): answered (last stage)"]
    assert "Recorded outcome" in texts(at.info)


def test_route_opens_on_the_tightest_promise_that_routes_with_a_keep_and_an_escalation(app, synthetic_results,
                                                                                       no_policy_files):
    """Issue 22, item 3: with a shipped policy that runs the last stage alone, the Route page opens on
    the tightest target (<= 3 / 5 / 10 pt) whose Learn-then-Test policy keeps something early, says
    the promise, runs that policy, and offers a test question it keeps and one it escalates (both
    computed by cascade_core on the records)."""
    from app_ui import data
    from cascade_core.choose.policy_file import PolicyFile, write_policy_file
    from app_ui.view_model import ROUTE_TARGETS_PT, policy_for_target, route_examples

    root, table = synthetic_results
    alone = CascadePolicy((StagePolicy(0.0, 0.0, enabled=False), StagePolicy(0.0, 0.0, enabled=False),
                           StagePolicy(0.0, 0.0)))
    write_policy_file(no_policy_files / "default.json", PolicyFile(
        preset="default", stages=tuple(STAGES), policy=alone.to_dict(),
        guarantee={"mode": "target", "target_pt": 1.0, "delta": 0.1, "unit": "flops"},
        provenance={"dataset": "mmlu", "split": "calibration", "questions": 800}, off_reasons={}))
    calib, test = table.subset("calibration"), table.subset("test")
    chosen = next(found for t in ROUTE_TARGETS_PT[1:] if (found := policy_for_target(calib, t)).routes)

    at = open_page(app, ROUTE)
    promise = at.radio(key="route_target::default")
    assert promise.value == chosen.target_pt and list(promise.options) == [f"≤ {t:g} pt" + (" (the shipped "
                                                                                            "policy)" if t == 1 else "")
                                                                            for t in ROUTE_TARGETS_PT]
    assert f"at most **{chosen.target_pt:g} accuracy points**" in texts(at.caption)
    assert f"{chosen.description} (recalibrated here)".capitalize() + "." in texts(at.caption)
    enabled = [n for n, s in zip(STAGES, chosen.policy.stages) if s.enabled]
    assert at.multiselect(key="stages::default@route").value == enabled
    assert at.radio(key="route_mode").value == "example"
    pool = data.mmlu_questions("test")
    expected = route_examples(test, chosen.policy, {q: len(t) + sum(map(len, o)) for q, t, o in
                                                    zip(pool["qid"], pool["question"], pool["options"])})
    assert set(expected) == {"keep", "escalate"}
    for kind in ("keep", "escalate"):
        at.radio(key="route_example").set_value(kind).run()
        no_exception(at)
        assert f"MMLU `{expected[kind].qid}` (test split)" in texts(at.caption)
    # the shipped promise: the last stage alone, so no example to show; the stages follow the policy
    at.radio(key="route_target::default").set_value(1.0).run()
    no_exception(at)
    assert "example" not in at.radio(key="route_mode").options
    assert at.multiselect(key="stages::default@route").value == [STAGES[-1]]
    assert "the shipped policy file" in texts(at.caption)


def test_route_a_new_run_clears_the_previous_result(app):
    app.session_state[state.PRESET_KEY] = "api-recorded"
    at = open_page(app, ROUTE)
    at.multiselect(key="stages::api-recorded@route").set_value(["gpt-4-recorded"])
    at.radio(key="route_mode").set_value("mmlu").run()
    at.button(key="route_button").click().run()
    no_exception(at)
    assert len(at.status) == 1 and "Routing path" in [h.value for h in at.subheader]
    at.radio(key="route_mode").set_value("type").run()
    assert len(at.status) == 1  # a rerun without a run still shows the last result
    at.text_area(key="route_text").set_value("   ")
    at.button(key="route_button").click().run()
    no_exception(at)
    assert "the question is empty" in texts(at.error)
    assert not at.status and "Routing path" not in [h.value for h in at.subheader]  # the old cards are gone


def _slot_of_the_result(at: AppTest) -> int:
    """The top-level position of the block that holds the Route page's result (its status cards)."""
    def holds_status(node) -> bool:
        return getattr(node, "type", "") == "status" or any(holds_status(c) for c in getattr(node, "children",
                                                                                             {}).values())

    found = [i for i, node in at.main.children.items() if holds_status(node)]
    assert len(found) == 1, found
    return found[0]


def test_route_a_new_run_draws_where_the_previous_result_was_not(app):
    """Issue 22: the previous answer and path stayed on screen, faded, for the whole next run, the new
    cards replacing the old ones one by one: Streamlit updates a container drawn where the last run
    drew one, old children first. A run draws into the other of two slots, and the slot of the
    previous result is left empty, which clears it at once (checked in Chromium: gone after 0.5 s)."""
    app.session_state[state.PRESET_KEY] = "api-recorded"
    at = open_page(app, ROUTE)
    at.multiselect(key="stages::api-recorded@route").set_value(["gpt-4-recorded"])
    at.radio(key="route_mode").set_value("mmlu").run()
    at.button(key="route_button").click().run()
    no_exception(at)
    first = _slot_of_the_result(at)
    at.run()  # a rerun without a run draws the stored result where it was
    assert _slot_of_the_result(at) == first
    at.number_input(key=next(n.key for n in at.number_input if n.key.startswith("route_mmlu_n::"))).set_value(2)
    at.button(key="route_button").click().run()
    no_exception(at)
    second = _slot_of_the_result(at)
    assert second != first and at.main.children[first].type == "empty"
    assert len(at.status) == 1


def test_start_up_preloads_only_the_stages_the_policy_uses(app, no_policy_files, monkeypatch):
    """With preloading on, the first page starts loading the stages the calibrated policy keeps on,
    not one calibration switched off (recorded here instead of loading 1.5 B parameters)."""
    from app_ui import backends

    write_policy_with_a_stage_off(no_policy_files)  # qwen2.5-coder-0.5b off
    monkeypatch.setenv("CASCADE_APP_PRELOAD", "1")
    started: list[list[str]] = []
    monkeypatch.setattr(backends, "start_preload", lambda stages: started.append([s.name for s in stages]))
    at = app.run()
    no_exception(at)
    import time

    waited = time.monotonic()
    while not started and time.monotonic() - waited < 60:  # planned off the page's thread
        time.sleep(0.1)
    # the Route page opens on the tightest promise that routes: its stages load too, the 0.5B only if
    # that policy uses it (here: recalibrated on the synthetic records)
    from app_ui import data
    from cascade_core.presets import load_preset

    preset = load_preset("default")
    _, opening = data.route_targets(preset)
    found = data.policy_at_target(preset, opening)[0]
    wanted = [n for n, p in zip(STAGES, found.policy.stages) if p.enabled or n != STAGES[1]]
    assert started and started[0] == wanted


@pytest.mark.model
def test_route_a_question_kept_by_stage_1_loads_only_stage_1(app, smollm2_path):
    from app_ui import backends
    from cascade_core.presets import StageConfig

    # a second stage with its own backend (another dtype, so another cache entry than any earlier test's)
    extra = {"name": "smollm2-b", "backend": "packaged", "model": "smollm2-135m", "label": "SmolLM2 again",
             "dtype": "bfloat16"}
    app.session_state[state.ADDED_KEY] = {"default": [extra]}
    app.session_state[state.POLICY_KEY] = {"default": {"rule": "pt_only", "stages": {
        "smollm2-135m": StageSetting(0.0, 0.0)}}}  # stage 1 keeps every answer
    second = StageConfig(**extra)
    assert not backends.is_loaded(second)
    at = open_page(app, ROUTE)
    ask(at, "What is 2 + 2?", "3\n4\n5\n22", stages=("smollm2-135m", "smollm2-b"))
    assert [s.label for s in at.status] == ["SmolLM2-135M-Instruct: kept its answer"]
    assert backends.is_loaded(StageConfig(name="smollm2-135m", backend="packaged", model="smollm2-135m", dtype="auto"))
    assert not backends.is_loaded(second)  # never reached, never loaded
    assert "not reached" in at.get("graphviz_chart")[0].proto.spec


def test_route_missing_model_is_a_message(app, monkeypatch, tmp_path):
    monkeypatch.setenv("CASCADE_CACHE_DIR", str(tmp_path / "empty-cache"))
    at = open_page(app, ROUTE)
    ask(at, "What is 2 + 2?", "3\n4")
    assert "not fetched yet" in texts(at.error)
    assert len(at.status) == 0


@pytest.mark.model
def test_route_failing_last_stage_is_a_message_with_the_trace(app, smollm2_path):
    app.session_state[state.ADDED_KEY] = {"default": [{
        "name": "broken-api", "backend": "openai", "model": "nothing", "api_base": "http://127.0.0.1:9/v1",
        "max_retries": 0, "timeout_s": 2}]}
    app.session_state[state.POLICY_KEY] = {"default": {"rule": "pt_only",
                                                       "stages": {"smollm2-135m": StageSetting(1.0, 0.0)}}}
    at = open_page(app, ROUTE)
    ask(at, "What is 2 + 2?", "3\n4", stages=("smollm2-135m", "broken-api"))
    assert [s.state for s in at.status] == ["complete", "error"]
    assert "could not answer" in texts(at.error)


# ---- Benchmarks ---------------------------------------------------------------------------------------------
def test_benchmarks_numbers_come_from_cascade_core(app, synthetic_results):
    _, table = synthetic_results
    test = table.subset("test")
    at = open_page(app, BENCH)
    shown = at.dataframe[0].value
    assert list(shown["accuracy"]) == [f"{test.correct[s].mean():.1%}" for s in range(3)]
    from cascade_core.signal_quality import auroc

    assert list(shown["AUROC P(T)"]) == [f"{auroc(test.p_t[s], test.correct[s]):.3f}" for s in range(3)]
    assert len(at.get("plotly_chart")) == 3  # P(T) and P(IK) reliability, subject heatmap


def test_benchmarks_shows_the_report_when_there_is_one(app, monkeypatch, tmp_path):
    from app_ui import data

    at = open_page(app, BENCH)
    assert "python -m cascade_core report" in texts(at.info)
    report = tmp_path / "RESULTS.md"
    report.write_text("# Results\n\nintro\n\n## Summary\n\n- the headline line\n\n## 1. Each model alone\n\n"
                      "| model | accuracy |\n|---|---|\n| `m` | 0.5 |\n\n## 2. Cascades\n\nmore\n", encoding="utf-8")
    monkeypatch.setattr(data, "report_path", lambda: report)
    at.run()
    no_exception(at)
    shown = texts(at.markdown)
    assert "the headline line" in shown and "| `m` | 0.5 |" in shown


def test_benchmarks_run_asks_for_a_number_first(app):
    at = open_page(app, BENCH)
    at.button(key="FormSubmitter:bench_form-Run benchmark").click().run()
    no_exception(at)
    assert "0 runs nothing" in texts(at.info)


@pytest.mark.model
def test_benchmarks_run_a_small_benchmark_with_progress(monkeypatch, tmp_path, smollm2_path):
    monkeypatch.setenv("CASCADE_RESULTS_DIR", str(tmp_path / "results"))
    at = open_page(AppTest.from_file(APP, default_timeout=120), BENCH)
    at.number_input(key="bench_per_subject").set_value(2)
    at.multiselect(key="bench_subjects").set_value(["astronomy"])
    at.button(key="FormSubmitter:bench_form-Run benchmark").click().run()
    no_exception(at)
    assert "2 records" in texts(at.success)
    assert len(at.get("progress")) == 1
    written = tmp_path / "results" / "mmlu" / "smollm2-135m.parquet"
    assert written.exists()
    at.run()
    assert "2 MMLU questions" in texts(at.caption) or "questions" in texts(at.caption)


# ---- Settings ---------------------------------------------------------------------------------------------
def test_settings_add_and_remove_an_endpoint_stage(app):
    at = open_page(app, SETTINGS)
    at.radio(key="add_kind").set_value("openai").run()
    at.text_input(key="add_api_model").set_value("gpt-4o-mini")
    at.text_input(key="add_api_base").set_value("http://127.0.0.1:8000/v1")
    at.text_input(key="add_api_env").set_value("CASCADE_TEST_UNSET_KEY")
    at.text_input(key="add_name").set_value("remote")
    at.button(key="FormSubmitter:add_stage-Add stage").click().run()
    no_exception(at)
    assert "CASCADE_TEST_UNSET_KEY is not set" in texts(at.success)
    assert [s["name"] for s in at.session_state[state.ADDED_KEY]["default"]] == ["remote"]
    assert "remote" in str(at.dataframe[0].value["stage"].tolist())

    at.text_input(key="add_api_env").set_value("sk-live-123")  # a key where the NAME belongs
    at.text_input(key="add_name").set_value("remote2")
    at.button(key="FormSubmitter:add_stage-Add stage").click().run()
    assert "cannot be added" in texts(at.error)
    at.text_input(key="add_api_env").set_value("MY_KEY")
    at.text_input(key="add_name").set_value("remote")  # repeated name
    at.button(key="FormSubmitter:add_stage-Add stage").click().run()
    assert "Stage name: 'remote' is already a stage of this preset" in texts(at.error)
    at.text_input(key="add_name").set_value("")  # no name: the form's own message, not a preset error
    at.text_input(key="add_api_base").set_value("127.0.0.1:8000")
    at.button(key="FormSubmitter:add_stage-Add stage").click().run()
    shown = texts(at.error)
    assert "Stage name: give the stage a name" in shown and "must start with http://" in shown
    assert "repeated" not in shown

    at.button(key="remove_stage_0").click().run()
    no_exception(at)
    assert at.session_state[state.ADDED_KEY]["default"] == []


@pytest.mark.model
def test_settings_unload_refreshes_the_table_and_says_how_stages_run(app, smollm2_path):
    from app_ui import backends
    from cascade_core.presets import load_preset

    config = load_preset("default").stages[0]
    backends.get_backend(config)
    at = open_page(app, SETTINGS)
    rows = at.dataframe[0].value
    assert rows["loaded"].iloc[0].startswith("yes")
    assert rows["runs as"].iloc[0].startswith("cpu, float32, from GGUF Q4_1")  # as loaded: "auto" resolved
    at.button(key="unload_models").click().run()
    no_exception(at)
    rows = at.dataframe[0].value
    assert rows["loaded"].iloc[0] == "no" and rows["weights in memory"].iloc[0] == "–"
    assert "Model weights in memory: none" in texts(at.caption)
    assert rows["runs as"].iloc[0].startswith("not loaded: will run on cpu, float32")


def test_benchmarks_page_takes_an_uploaded_file_and_registers_it(empty_app):
    at = open_page(empty_app, BENCH)
    at.file_uploader(key="bench_upload").set_value(("sums.csv", b"question,answer,group\n2+2?,4,easy\n40*3?,120,hard\n",
                                                     "text/csv")).run()
    no_exception(at)
    assert any("2 free-form questions in 2 group(s), with answers" in s.value for s in at.success)
    at.button(key="bench_register").click().run()
    no_exception(at)
    assert any("Registered as `sums`" in s.value and "graded `numeric`" in s.value for s in at.success)
    assert "bench --dataset sums --max-new-tokens 16" in at.code[0].value and "--rule pt_only" in at.code[0].value
    at.file_uploader(key="bench_upload").set_value(("bad.csv", b"question,answer\n,4\n", "text/csv")).run()
    assert any(e.value.startswith("Not taken: bad.csv, row") for e in at.error)



@pytest.mark.model
def test_a_live_run_stops_within_a_few_tokens_when_cancelled(smollm2_path):
    """Issue 22, item 4: the Route page's worker (app_ui.route_run) streams a free-form answer and,
    cancelled with the server's CancelToken after its first piece of text, stops generating: the
    run ends as cancelled with far fewer tokens than it was allowed."""
    from app_ui.route_run import LiveRun
    from cascade_core.cascade import RuntimeStage
    from cascade_core.types import Question
    from models.hf import HFBackend

    backend = HFBackend(smollm2_path, device="cpu", dtype="float32", quantization="none", model_id="smollm2-135m")
    stage = RuntimeStage(name="smollm2-135m", backend=backend, policy=StagePolicy(0.0, 0.0))
    live = LiveRun([stage], Question(text="Write a long story about a dragon who bakes bread."),
                   max_new_tokens=200).start()
    kinds, finished = [], None
    for event in live.follow(poll_s=0.05):
        kinds.append(event.kind)
        if event.kind == "text" and kinds.count("text") == 2:
            live.cancel()
        if event.kind == "end":
            finished = event.value
    assert live.join(30)
    assert finished.cancelled and finished.failure == "cancelled by the user"
    step = finished.trace.steps[-1]
    assert step.decision == "error" and step.reason == "cancelled"
    assert 1 <= step.output_tokens < 60, step.output_tokens  # stopped long before the 200 allowed
    assert kinds[0] == "start" and "end" == kinds[-1]
