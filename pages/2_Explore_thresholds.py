"""Explore thresholds: drag τ_T / τ_IK per stage and watch accuracy against cost, replayed on the
benchmark records (no model runs). Every number is computed by cascade_core; the URL carries the
thresholds so a view can be shared."""

from __future__ import annotations

from dataclasses import replace

import streamlit as st

from app_ui import charts, data, datasets, state, view_model
from cascade_core import formatting
from cascade_core.cost import COST_UNITS
from cascade_core.choose.replay import replay
from app_ui.view_model import (SCORE_RANGE, UNIT_LABELS, StageSetting, choice_param, default_unit, operating_point,
                                  policy_from_settings, settings_from_params,
                                  settings_from_policy, settings_to_params, unknown_params)


PAGE = "explore"
RULE_LABELS = {"both": "both: P(T) ≥ τ_T and P(IK) ≥ τ_IK (the paper's)", "pt_only": "P(T) only",
               "pik_only": "P(IK) only", "loss_aware": "loss-aware score (fitted on calibration)",
               "learned": "learned score (fitted on calibration)"}
NO_RECORDED = "(none)"
KNOWN_PARAMS = ("preset", "split", "unit", "end", "rule", datasets.PARAM)  # the dataset: app_ui.datasets


def pct(x: float, digits: int = 2) -> str:
    return formatting.pct(x, digits)


def widget_key(preset: str, stage: str, what: str) -> str:
    return f"x::{preset}::{stage}::{what}"


# ---- URL -> session, once per session -----------------------------------------------------------
params = st.query_params.to_dict()
first_visit = not st.session_state.get("_explore_seen")
problems: list[str] = []
if first_visit:
    problems += unknown_params(params, KNOWN_PARAMS)
    chosen_preset, bad = choice_param(params, "preset", state.list_presets())
    problems += bad
    if chosen_preset:
        st.session_state[state.PRESET_KEY] = chosen_preset
    for name, choices in (("split", data.SPLIT_CHOICES), ("unit", COST_UNITS)):
        value, bad = choice_param(params, name, choices)
        problems += bad
        if value:
            st.session_state[f"_explore_{name}"] = value

st.title("Explore thresholds")
st.caption("Every point is a replay of the cached benchmark records: the same answers and costs the live "
           "cascade would give with these thresholds, without running a model.")

preset = state.preset_picker(PAGE)
dataset = datasets.dataset_picker(PAGE)  # the sidebar's dataset: its records and its policy below
if preset is None:
    st.stop()


def sidebar_select(label: str, options, name: str, default, **kwargs):
    key = f"{name}@{PAGE}"
    if st.session_state.get(key) not in options:
        stored = st.session_state.get(f"_explore_{name}", default)
        st.session_state[key] = stored if stored in options else default
    value = st.sidebar.selectbox(label, options, key=key, **kwargs)
    st.session_state[f"_explore_{name}"] = value
    return value


split = sidebar_select("Split", list(data.SPLIT_CHOICES), "split", "test",
                       help="Report on the test split; thresholds are chosen on the calibration split.")
recorded_options = data.recorded_choices(preset) if dataset == "mmlu" else {}  # recorded outcomes are MMLU's
own_recorded = [s.name for s in preset.stages if s.backend == "recorded"]
# A preset that ends with a recorded stage opens in API calls: GPT-4's FLOPs are unknown (it would cost 0).
if st.session_state.get("_explore_unit_for") != preset.name and not (first_visit and "unit" in params):
    last = next((s for s in preset.stages if s.name == own_recorded[-1]), None) if own_recorded else None
    st.session_state["_explore_unit"] = default_unit(last is not None, bool(last and (last.price_in or last.price_out)))
    st.session_state.pop("unit@explore", None)
st.session_state["_explore_unit_for"] = preset.name
unit = sidebar_select("Cost unit", list(COST_UNITS), "unit", "flops", format_func=UNIT_LABELS.get)
if first_visit:
    value, bad = choice_param(params, "end", [NO_RECORDED, *recorded_options])
    problems += bad
    if value:
        st.session_state[f"_explore_end::{preset.name}"] = value
end_key = f"end::{preset.name}"
end_options = [NO_RECORDED, *recorded_options]
if st.session_state.get(f"{end_key}@{PAGE}") not in end_options:
    stored_end = st.session_state.get(f"_explore_{end_key}", own_recorded[0] if own_recorded else NO_RECORDED)
    st.session_state[f"{end_key}@{PAGE}"] = stored_end if stored_end in end_options else NO_RECORDED
end = st.sidebar.selectbox(
    "End the cascade with a recorded stage", end_options, key=f"{end_key}@{PAGE}",
    format_func=lambda n: n if n == NO_RECORDED else view_model.label_of(recorded_options[n]),
    help="Recorded stages replay real per-question outcomes of GPT-4 / Mixtral on MMLU (RouteLLM). "
         "They have no probabilities, so they can only be last.")
st.session_state[f"_explore_{end_key}"] = end
recorded = None if end == NO_RECORDED else recorded_options[end]

loaded = data.load_table(preset, split, recorded, dataset=dataset)
if loaded.error:
    st.error(f"The benchmark records cannot be read: {loaded.error}")
    st.stop()
if loaded.table is None:
    st.info(f"No benchmark records yet for the stages of preset **{preset.name}** in "
            f"`{data.results_dir() / dataset}`. Run `make bench` (or the Benchmarks page) first; "
            "this page replays those records.")
    st.page_link("pages/3_Benchmarks.py", label="Benchmarks", icon=":material/bar_chart:",
                 query_params={datasets.PARAM: dataset})
    st.stop()
table = loaded.table
if loaded.missing:
    st.warning(f"No records yet for {', '.join(loaded.missing)}: the explorer uses the stages that have them "
               f"({', '.join(table.names)}).")
if table.n_stages == 1:
    st.info("Only one stage has records, so there is nothing to cascade yet: the page shows that model alone. "
            "Benchmark another stage (or end with a recorded stage in the sidebar) to explore thresholds.")
if table.n_questions < 50:
    st.warning(f"Only {table.n_questions} questions have records from every stage: the numbers are noisy.")

# ---- thresholds: defaults, URL, widgets -------------------------------------------------------------
configs = {s.name: s for s in preset.stages + tuple(recorded_options.values())}


def preset_setting(name: str, position: int) -> StageSetting:
    """The preset's thresholds; a stage the preset runs last (no thresholds there) that now passes
    questions on to a later stage starts at 0.5 / 0.5 instead of "keep everything"."""
    config = configs.get(name)
    if config is None:
        return StageSetting(0.5, 0.5)
    last_in_preset = name == [s.name for s in preset.stages if s.enabled][-1]
    if last_in_preset and position < table.n_stages - 1 and config.tau_t == 0.0 and config.tau_ik == 0.0:
        return StageSetting(0.5, 0.5, config.enabled)
    return StageSetting(config.tau_t, config.tau_ik, config.enabled)


defaults = {n: preset_setting(n, i) for i, n in enumerate(table.names)}
rule_default = "both"
scores_key = f"_explore_scores::{preset.name}::{'|'.join(table.names)}"  # fitted keep scores for this layout
found_policy, policy_problem = data.applied(preset, dataset)
calibrated_names = [s.name for s in preset.stages if s.enabled]
opens_calibrated = found_policy.source == "calibrated" and list(table.names) == calibrated_names
calibrated_off: set[str] = set()
if opens_calibrated:
    defaults, rule_default, combiners = settings_from_policy(table.names, found_policy.policy)
    # A stage calibration switched off keeps the preset's thresholds for when it is switched on by
    # hand (its stored ones, 0 / 0, would keep every answer).
    calibrated_off = {n for n, s in defaults.items() if not s.enabled}
    defaults = {n: replace(s, tau_t=preset_setting(n, i).tau_t,
                           tau_ik=preset_setting(n, i).tau_ik) if n in calibrated_off
                else s for i, (n, s) in enumerate(defaults.items())}
    if combiners and scores_key not in st.session_state:
        st.session_state[scores_key] = {"rule": rule_default, "combiners": combiners}
stored = state.explorer_thresholds(preset.name)
if stored:
    defaults.update({n: s for n, s in stored[0].items() if n in defaults})
    rule_default = stored[1]
scorer = st.session_state.get(scores_key)
rule_options = [r for r in RULE_LABELS if r not in SCORE_RANGE or (scorer and scorer["rule"] == r)]
if first_visit:
    defaults, url_rule, more = settings_from_params(params, defaults, tuple(rule_options))
    problems += more
    rule_default = url_rule or rule_default
st.session_state["_explore_seen"] = True
for message in problems:
    st.warning(f"Ignored from the link: {message}")
if opens_calibrated and any(b is not None for b in getattr(found_policy, "biases", ())):
    st.warning("The calibrated policy also debiases some stages' letters (a letter bias fit on calibration); this page "
               "replays the raw records, so its numbers for that policy are not the policy file's.")
if policy_problem:
    st.warning(policy_problem.capitalize() + "; the page opens on the preset's thresholds.")
elif found_policy.source == "calibrated" and not opens_calibrated:
    st.info(f"The calibrated policy covers {', '.join(calibrated_names)}; these records cover "
            f"{', '.join(table.names)}, so the page opens on the preset's thresholds.")

layout_key = f"_explore_layout::{preset.name}"
previous = st.session_state.get(layout_key)
if previous and previous[-1] in table.names and previous[-1] != table.names[-1]:
    # A stage that was last (no thresholds) now passes questions on, e.g. to a recorded GPT-4.
    fresh = preset_setting(previous[-1], table.names.index(previous[-1]))
    st.session_state[widget_key(preset.name, previous[-1], "tau_t")] = fresh.tau_t
    st.session_state[widget_key(preset.name, previous[-1], "tau_ik")] = fresh.tau_ik
st.session_state[layout_key] = table.names

rule_key = widget_key(preset.name, "*", "rule")
if st.session_state.get(rule_key) not in rule_options:
    st.session_state[rule_key] = rule_default if rule_default in rule_options else "both"
for name, s in defaults.items():
    for what, value in (("tau_t", s.tau_t), ("tau_ik", s.tau_ik), ("on", s.enabled), ("tau_score", s.tau_score)):
        if widget_key(preset.name, name, what) not in st.session_state:
            st.session_state[widget_key(preset.name, name, what)] = value

rule = st.sidebar.radio("Rule", rule_options, key=rule_key, format_func=RULE_LABELS.get)


def apply_policy(policy, names: tuple[str, ...], preset_name: str, scores_key: str) -> None:
    """Put a policy's thresholds, rule and fitted scores into the widgets (in a callback: before they render)."""
    settings, rule, combiners = settings_from_policy(names, policy)
    if combiners:
        st.session_state[scores_key] = {"rule": rule, "combiners": combiners}
    st.session_state[widget_key(preset_name, "*", "rule")] = rule
    for name, s in settings.items():
        for what, value in (("tau_t", s.tau_t), ("tau_ik", s.tau_ik), ("on", s.enabled), ("tau_score", s.tau_score)):
            if s.enabled or what == "on":  # a stage switched off keeps its sliders for when it is switched on
                st.session_state[widget_key(preset_name, name, what)] = value


def budget_key(unit: str, factor: float) -> str:
    """The budget box's key: per unit and per axis scale (a value typed in billions stays in billions)."""
    return f"cal_budget::{unit}::{factor:g}"


def recalibrate(preset, recorded, names: tuple[str, ...], unit: str, split: str, scores_key: str,
                factor: float = 1.0) -> None:
    """Callback of the calibrate button: Learn-then-Test on the calibration split, sliders moved to the
    result. `factor`: what the budget box's unit is worth (1e9 when the chart shows billions of FLOPs)."""
    from cascade_core.choose.calibrated_policy import calibrate_policy

    mode = st.session_state.get("cal_mode", "accuracy loss")
    calib = data.load_table(preset, "calibration", recorded, dataset=dataset)
    if calib.table is None or tuple(calib.table.names) != tuple(names):
        st.session_state["_calibrated"] = {"error": "Calibrating needs records of the same stages in the calibration "
                                                    "split."}
        return
    try:
        if mode == "accuracy loss":
            chosen = calibrate_policy(calib.table, target_max_loss=float(st.session_state["cal_target"]) / 100.0,
                                      delta=float(st.session_state["cal_delta"]), unit=unit)
        else:
            chosen = calibrate_policy(calib.table, target_max_loss=None,
                                      cost_budget=float(st.session_state[budget_key(unit, factor)]) * factor,
                                      delta=float(st.session_state["cal_delta"]), unit=unit)
    except ValueError as err:
        st.session_state["_calibrated"] = {"error": f"No policy could be certified: {err}"}
        return
    apply_policy(chosen.policy, names, preset.name, scores_key)
    st.session_state["_calibrated"] = {"preset": preset.name, "names": names, "description": chosen.describe(),
                                       "rule": chosen.rule, "calibration": dict(chosen.calibration), "unit": unit,
                                       "split": split}


def _seed(key: str, value) -> None:
    """Set a widget's value from code only when it differs: every assignment is sent to the browser
    as "show this value", and one that arrives while the user holds an arrow key undoes the presses
    the browser had already applied."""
    if st.session_state.get(key) != value:
        st.session_state[key] = value


def _switch_on(on_key: str) -> None:
    """A threshold of a switched-off stage was moved: switch the stage on (a callback, so the stage's
    checkbox shows it in this run). The sliders of a stage calibration switched off are usable from
    the start; moving one is how a newcomer leaves the calibrated policy."""
    st.session_state[on_key] = True


def threshold_input(label: str, low: float, high: float, key: str, disabled: bool, on_key: str | None = None) -> None:
    """A slider in steps of 0.01 (arrow keys move it visibly) and an exact number box for one value,
    held by the slider's key.

    Which of the two the user changed is read from what the last run left them at, with no
    on_change callback: during a burst of arrow presses, each rerun request carries the box's value
    from before the previous rerun reached the browser; a callback took that stale value for an
    edit and set the slider back (a 20-press burst ended 4-12 presses short). The slider wins when
    both differ, because only a slider moves many times in a row."""
    box, seen = f"{key}#n", f"{key}#seen"
    slider_now = float(st.session_state[key])
    box_now = st.session_state.get(box)
    last = st.session_state.get(seen)
    typed = last is not None and box_now is not None and slider_now == last[0] and float(box_now) != last[1]
    value = float(min(max(float(box_now) if typed else slider_now, low), high))
    _seed(key, value)
    left, right = st.columns([3, 1.25], vertical_alignment="bottom")
    switch = {"on_change": _switch_on, "args": (on_key,)} if on_key else {}
    left.slider(label, low, high, step=0.01, format="%.2f", key=key, disabled=disabled, **switch)
    _seed(box, value)
    right.number_input("exact", low, high, step=0.001, format="%.4f", key=box, disabled=disabled,
                       label_visibility="collapsed", help="The exact value (the slider moves in steps of 0.01)",
                       **switch)
    st.session_state[seen] = (value, value)


@st.fragment
def explorer(rule: str) -> None:
    """Thresholds, metrics, chart and routing table: a change to any threshold reruns only this part
    (no preset, records or sidebar work), and rapid changes coalesce into the latest one."""
    if st.session_state.get(rule_key) != rule:  # "Calibrate" chose another rule: the sidebar must show it
        st.rerun(scope="app")
    scorer = st.session_state.get(scores_key)  # fitted scores, replaced by "Calibrate" within this fragment
    no_probe: list[str] = []
    metrics_area = st.container()
    controls, main = st.columns([1, 2.4], gap="large")
    with controls:
        st.subheader("Stages, smallest first")
        enabled_now = [bool(st.session_state[widget_key(preset.name, n, "on")]) for n in table.names]
        last_enabled = max((i for i, on in enumerate(enabled_now) if on), default=-1)
        for i, name in enumerate(table.names):
            label = view_model.label_of(configs[name]) if name in configs else name
            with st.container(border=True):
                st.checkbox(f"**{label}**", key=widget_key(preset.name, name, "on"),
                            help="Switch the stage off to replay the cascade without it.")
                if table.recorded[i]:
                    st.caption("Recorded outcomes: no probabilities, so it can only be last: it answers all it "
                               "receives.")
                    continue
                if i == last_enabled:
                    st.caption("Last stage in use: it always answers, so it has no thresholds.")
                    continue
                if name in calibrated_off and enabled_now[i]:
                    st.caption("Calibration switched this stage off; switched on here, it starts at the preset's "
                               "thresholds.")
                on_key = None if enabled_now[i] else widget_key(preset.name, name, "on")  # moving it switches it on
                if on_key and i < last_enabled:
                    st.caption("Off: move a threshold (or tick the box) to put it back in the cascade.")
                has_pik = bool(table.has_hidden[i])
                if rule in SCORE_RANGE:
                    low, high = SCORE_RANGE[rule]
                    threshold_input(f"τ (keep when its {rule} score ≥ τ)", low, high,
                                    widget_key(preset.name, name, "tau_score"), False, on_key)
                    continue
                threshold_input("τ_T (keep when P(T) ≥ τ_T)", 0.0, 1.0, widget_key(preset.name, name, "tau_t"),
                                rule == "pik_only" and has_pik, on_key)
                threshold_input("τ_IK (keep when P(IK) ≥ τ_IK)", 0.0, 1.0, widget_key(preset.name, name, "tau_ik"),
                                not has_pik or rule == "pt_only", on_key)
                if not has_pik:
                    no_probe.append(label)
        if no_probe:
            st.caption(f"No P(IK) in the records of {', '.join(no_probe)} yet (no probe trained): "
                       f"{'it routes' if len(no_probe) == 1 else 'they route'} on P(T) alone.")

    settings = {n: StageSetting(float(st.session_state[widget_key(preset.name, n, "tau_t")]),
                                float(st.session_state[widget_key(preset.name, n, "tau_ik")]),
                                bool(st.session_state[widget_key(preset.name, n, "on")]),
                                float(st.session_state[widget_key(preset.name, n, "tau_score")])) for n in table.names}
    state.store_explorer_thresholds(preset.name, settings, rule,
                                    (scorer or {}).get("combiners", {}) if rule in SCORE_RANGE else {}, dataset)
    wanted_params = {"preset": preset.name, "split": split, "unit": unit, "end": end,
                     **settings_to_params(settings, rule), **datasets.link_params(dataset)}
    if st.query_params.to_dict() != wanted_params:
        st.query_params.from_dict(wanted_params)

    with main:
        if not any(s.enabled for s in settings.values()):
            st.error("Every stage is switched off: switch at least one on.")
            return
        combiners = (scorer or {}).get("combiners", {}) if rule in SCORE_RANGE else {}
        policy = policy_from_settings(table.names, settings, rule, combiners)
        if opens_calibrated:
            described = found_policy.description.removeprefix("thresholds: ")
            if state.same_policy(policy, found_policy.policy):
                metrics_area.caption(f"On the preset's calibrated policy ({described}): its promise holds for these "
                                     "thresholds.")
            else:
                with metrics_area.container(border=True):
                    st.markdown(f":material/info: **You left the calibrated policy** ({described}): these thresholds "
                                "carry no guarantee, and the Route page now follows them.")
                    st.button("Back to the calibrated policy", key="back_to_calibrated", on_click=apply_policy,
                              args=(found_policy.policy, table.names, preset.name, scores_key))
        result = replay(table, policy)
        point = operating_point(table, result, unit)
        unit_label = UNIT_LABELS[unit]
        draw_metrics(metrics_area, point, unit_label)

        zero_cost = [table.names[s] for s in range(table.n_stages) if not table.cost(unit)[s].any()]
        if zero_cost:
            st.info(f"{', '.join(zero_cost)} cost{'s' if len(zero_cost) == 1 else ''} nothing in {unit_label} "
                    "(a local model has no price; GPT-4's size, hence its FLOPs, is unknown): pick another cost unit "
                    "to compare them.")
        scale = draw_chart(point, [s.enabled for s in policy.stages], unit_label)
    # Below the two columns, full width: on a narrow screen (400 px) the columns stack, and the chart
    # then sits right under the sliders instead of after this table and the calibration form.
    st.subheader("Where the questions go")
    rates = [{"stage": view_model.label_of(configs[n]) if n in configs else n,
              "in use": bool(policy.stages[i].enabled),
              "reaches": pct(float(result.reach_rate[i]), 1),
              "escalation rate": pct(point.escalation_rate[n], 1),
              "answers": pct(point.answer_rate[n], 1)} for i, n in enumerate(table.names)]
    st.dataframe(rates, hide_index=True, width="stretch")
    calibrate_form(unit_label, scale)
    st.caption("Share this view: the page's address carries the thresholds, the rule, the split and the cost unit.")


def draw_metrics(area, point, unit_label: str) -> None:
    m = area.columns(5)
    m[0].metric("Accuracy", pct(point.accuracy), help=f"95% Wilson interval {pct(point.accuracy_low)} – "
                f"{pct(point.accuracy_high)} over {table.n_questions:,} questions ({split})")
    m[1].metric(f"Compute saved ({unit_label})", pct(point.compute_reduction),
                help=f"1 − cost of the cascade / cost of {point.reference_name} alone, on the same questions")
    m[2].metric(f"{unit_label} / question", charts.fmt_number(point.mean_cost))
    m[3].metric(f"PD vs {point.reference_name}", f"{point.pd:+.2%}",
                help=f"Accuracy difference to {point.reference_name} alone ({pct(point.reference_accuracy)})")
    m[4].metric("McNemar p", "< 0.0001" if point.mcnemar_p < 1e-4 else f"{point.mcnemar_p:.3g}",
                help=f"Exact paired test against {point.reference_name}: the cascade alone right on "
                     f"{point.discordant[0]} questions, {point.reference_name} alone right on {point.discordant[1]}")
    area.caption(f"Accuracy {pct(point.accuracy)} (95% CI {pct(point.accuracy_low)} – {pct(point.accuracy_high)}); "
                 f"random routing at the same escalation rates: {pct(point.random_accuracy)} at "
                 f"{charts.fmt_number(point.random_cost)} {unit_label}.")


def draw_chart(point, enabled: list[bool], unit_label: str) -> tuple[float, str]:
    """The accuracy-cost chart: the sweep, the references and the operating point (with where it was);
    returns the factor and words its cost axis is drawn in (`charts.option_scale`)."""
    swept = data.load_frontier(preset, split, recorded, rule, unit, dataset=dataset)
    refs = data.load_references(preset, split, recorded, enabled, unit, dataset=dataset)
    singles = [{"label": view_model.label_of(configs[stage]) if stage in configs else stage, "cost": cost,
                "accuracy": accuracy, "recorded": bool(table.recorded[i])}
               for i, (stage, cost, accuracy) in enumerate(refs["singles"])]
    point_key = f"_explore_point::{preset.name}::{'|'.join(table.names)}::{split}::{unit}"
    now = (float(point.mean_cost), float(point.accuracy))
    moved = st.session_state.get(point_key, {"current": now, "previous": None})
    if moved["current"] != now:
        moved = {"current": now, "previous": moved["current"]}
    st.session_state[point_key] = moved
    option = charts.frontier_option(
        previous=moved["previous"], cloud=swept["cloud"], frontier=swept["frontier"],
        cloud_label="swept policies" + (" (a sample)" if swept["sampled"] else ""), singles=singles,
        oracle=refs["oracle"], random_curve=refs["random_curve"],
        random_point=(point.random_cost, point.random_accuracy),
        current=now, unit_label=unit_label, current_label="these thresholds")
    st.echarts_chart(option, key="frontier_chart", height=520)
    st.caption(f"{swept['policies']:,} swept polic{'y' if swept['policies'] == 1 else 'ies'} (every sub-cascade, "
               "quantile thresholds); the oracle answers each question with the cheapest model that gets it right, "
               "the limit no router can beat.")
    return charts.option_scale(option)


def calibrate_form(unit_label: str, scale: tuple[float, str] = (1.0, "")) -> None:
    with st.expander("Calibrate for a promise (computed on the calibration split, shown on the chosen split)",
                     expanded=False):
        st.caption("Learn-then-Test on the calibration split: with probability at least 1 − δ over the draw of the "
                   "calibration questions, the chosen policy keeps its promise on new questions. The sliders move to "
                   f"the chosen policy; the metrics above show it on the **{split}** split.")
        factor, words = scale  # the budget is typed in the unit the chart's cost axis shows
        shown_unit = f"{words} {unit_label}" if words else unit_label
        mode = st.radio("Promise", ["accuracy loss", "cost budget"], horizontal=True, key="cal_mode",
                        format_func=lambda m: {"accuracy loss": "at most this accuracy loss against the largest stage",
                                               "cost budget": f"at most this mean cost ({shown_unit} / question)"}[m])
        left, right = st.columns(2)
        if mode == "accuracy loss":
            left.number_input("Accuracy loss allowed (points)", 0.0, 100.0, 1.0, 0.5, key="cal_target")
        else:
            largest = float(table.cost(unit)[-1].mean()) / factor
            left.number_input(f"Budget ({shown_unit} per question, as on the chart)",
                              0.0, value=float(f"{largest / 2:.3g}"), key=budget_key(unit, factor), format="%.4g")
        right.number_input("Risk δ", 0.001, 0.5, 0.1, 0.01, key="cal_delta", format="%.3f",
                           help="The chance that the promise fails on new questions of the same kind")
        st.button("Calibrate and move the sliders", key="cal_button", type="primary", on_click=recalibrate,
                  args=(preset, recorded, table.names, unit, split, scores_key, factor))
        done = st.session_state.get("_calibrated")
        if done and "error" in done:
            st.error(done["error"])
        elif done and done["preset"] == preset.name and tuple(done["names"]) == table.names:
            cal = done["calibration"]
            st.success(f"{done['description'].removeprefix('thresholds: ').capitalize()}, rule {done['rule']}. On "
                       f"calibration: accuracy {pct(cal['accuracy'])} against {pct(cal['reference_accuracy'])} for "
                       f"{table.names[-1]} alone, {pct(cal['saving'])} of the {UNIT_LABELS[done['unit']]} saved. "
                       f"The metrics above are on the {split} split.")


explorer(rule)
