"""Explore thresholds: drag τ_T / τ_IK per stage and watch accuracy against cost, replayed on the
benchmark records (no model runs). Every number is computed by cascade_core; the URL carries the
thresholds so a view can be shared."""

from __future__ import annotations

import streamlit as st

from app_ui import charts, data, state
from cascade_core import formatting
from cascade_core.cost import COST_UNITS
from cascade_core.frontier import oracle, single_models
from cascade_core.replay import replay
from cascade_core.selection import evaluate_on, select_policy
from cascade_core.ui_data import (UNIT_LABELS, StageSetting, operating_point, policy_from_settings,
                                  random_routing_curve, settings_from_params, settings_to_params)


PAGE = "explore"
RULE_LABELS = {"both": "both: P(T) ≥ τ_T and P(IK) ≥ τ_IK (the paper's)", "pt_only": "P(T) only",
               "pik_only": "P(IK) only"}
NO_RECORDED = "(none)"


def pct(x: float, digits: int = 2) -> str:
    return formatting.pct(x, digits)


def widget_key(preset: str, stage: str, what: str) -> str:
    return f"x::{preset}::{stage}::{what}"


# ---- URL -> session, once per session -----------------------------------------------------------
params = st.query_params.to_dict()
first_visit = not st.session_state.get("_explore_seen")
if first_visit and params.get("preset"):
    st.session_state[state.PRESET_KEY] = params["preset"]
for name, choices in (("split", data.SPLIT_CHOICES), ("unit", COST_UNITS)):
    if first_visit and params.get(name) in choices:
        st.session_state[f"_explore_{name}"] = params[name]

st.title("Explore thresholds")
st.caption("Every point is a replay of the cached benchmark records: the same answers and costs the live "
           "cascade would give with these thresholds, without running a model.")

preset = state.preset_picker(PAGE)
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
unit = sidebar_select("Cost unit", list(COST_UNITS), "unit", "flops", format_func=UNIT_LABELS.get)
recorded_options = data.recorded_choices(preset)
own_recorded = [s.name for s in preset.stages if s.backend == "recorded"]
if first_visit and params.get("end") in list(recorded_options) + [NO_RECORDED]:
    st.session_state[f"_explore_end::{preset.name}"] = params["end"]
end_key = f"end::{preset.name}"
end_options = [NO_RECORDED, *recorded_options]
if st.session_state.get(f"{end_key}@{PAGE}") not in end_options:
    stored_end = st.session_state.get(f"_explore_{end_key}", own_recorded[0] if own_recorded else NO_RECORDED)
    st.session_state[f"{end_key}@{PAGE}"] = stored_end if stored_end in end_options else NO_RECORDED
end = st.sidebar.selectbox(
    "End the cascade with a recorded stage", end_options, key=f"{end_key}@{PAGE}",
    format_func=lambda n: n if n == NO_RECORDED else state.label_of(recorded_options[n]),
    help="Recorded stages replay real per-question outcomes of GPT-4 / Mixtral on MMLU (RouteLLM). "
         "They have no probabilities, so they can only be last.")
st.session_state[f"_explore_{end_key}"] = end
recorded = None if end == NO_RECORDED else recorded_options[end]

loaded = data.load_table(preset, split, recorded)
if loaded.error:
    st.error(f"The benchmark records cannot be read: {loaded.error}")
    st.stop()
if loaded.table is None:
    st.info(f"No benchmark records yet for the stages of preset **{preset.name}** in "
            f"`{data.results_dir() / data.DATASET}`. Run `make bench` (or the Benchmarks page) first; "
            "this page replays those records.")
    st.page_link("pages/3_Benchmarks.py", label="Benchmarks", icon=":material/bar_chart:")
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
stored = state.explorer_thresholds(preset.name)
rule_default = "both"
if stored:
    defaults.update({n: s for n, s in stored[0].items() if n in defaults})
    rule_default = stored[1]
problems: list[str] = []
if first_visit:
    defaults, url_rule, problems = settings_from_params(params, defaults, tuple(RULE_LABELS))
    rule_default = url_rule or rule_default
st.session_state["_explore_seen"] = True
for message in problems:
    st.warning(f"Ignored from the link: {message}")

layout_key = f"_explore_layout::{preset.name}"
previous = st.session_state.get(layout_key)
if previous and previous[-1] in table.names and previous[-1] != table.names[-1]:
    # A stage that was last (no thresholds) now passes questions on, e.g. to a recorded GPT-4.
    fresh = preset_setting(previous[-1], table.names.index(previous[-1]))
    st.session_state[widget_key(preset.name, previous[-1], "tau_t")] = fresh.tau_t
    st.session_state[widget_key(preset.name, previous[-1], "tau_ik")] = fresh.tau_ik
st.session_state[layout_key] = table.names

rule_key = widget_key(preset.name, "*", "rule")
if rule_key not in st.session_state:
    st.session_state[rule_key] = rule_default if rule_default in RULE_LABELS else "both"
for name, s in defaults.items():
    for what, value in (("tau_t", s.tau_t), ("tau_ik", s.tau_ik), ("on", s.enabled)):
        if widget_key(preset.name, name, what) not in st.session_state:
            st.session_state[widget_key(preset.name, name, what)] = value

rule = st.sidebar.radio("Rule", list(RULE_LABELS), key=rule_key, format_func=RULE_LABELS.get)


def apply_found(policy, names: tuple[str, ...], preset_name: str) -> None:
    """Callback: put a chosen policy's thresholds into the sliders (runs before the page)."""
    for name, stage in zip(names, policy.stages):
        st.session_state[widget_key(preset_name, name, "tau_t")] = float(min(max(stage.tau_t, 0.0), 1.0))
        st.session_state[widget_key(preset_name, name, "tau_ik")] = float(min(max(stage.tau_ik, 0.0), 1.0))
        st.session_state[widget_key(preset_name, name, "on")] = bool(stage.enabled)


metrics_area = st.container()
controls, main = st.columns([1, 2.4], gap="large")
with controls:
    st.subheader("Stages, smallest first")
    enabled_now = [bool(st.session_state[widget_key(preset.name, n, "on")]) for n in table.names]
    last_enabled = max((i for i, on in enumerate(enabled_now) if on), default=-1)
    for i, name in enumerate(table.names):
        label = state.label_of(configs[name]) if name in configs else name
        with st.container(border=True):
            st.checkbox(f"**{label}**", key=widget_key(preset.name, name, "on"),
                        help="Switch the stage off to replay the cascade without it.")
            if table.recorded[i]:
                st.caption("Recorded outcomes: no probabilities, so it can only be last: it answers all it receives.")
                continue
            if i == last_enabled:
                st.caption("Last stage in use: it always answers, so it has no thresholds.")
                continue
            off = not enabled_now[i]
            has_pik = bool(table.has_hidden[i])
            st.slider("τ_T (keep when P(T) ≥ τ_T)", 0.0, 1.0, step=0.001, format="%.3f",
                      key=widget_key(preset.name, name, "tau_t"), disabled=off or (rule == "pik_only" and has_pik))
            st.slider("τ_IK (keep when P(IK) ≥ τ_IK)", 0.0, 1.0, step=0.001, format="%.3f",
                      key=widget_key(preset.name, name, "tau_ik"), disabled=off or not has_pik or rule == "pt_only")
            if not has_pik:
                st.caption("No P(IK) in the records yet (no probe trained): this stage routes on P(T) alone.")

settings = {n: StageSetting(float(st.session_state[widget_key(preset.name, n, "tau_t")]),
                            float(st.session_state[widget_key(preset.name, n, "tau_ik")]),
                            bool(st.session_state[widget_key(preset.name, n, "on")])) for n in table.names}
state.store_explorer_thresholds(preset.name, settings, rule)
wanted_params = {"preset": preset.name, "split": split, "unit": unit, "end": end,
                 **settings_to_params(settings, rule)}
if st.query_params.to_dict() != wanted_params:
    st.query_params.from_dict(wanted_params)

with main:
    if not any(s.enabled for s in settings.values()):
        st.error("Every stage is switched off: switch at least one on.")
        st.stop()
    policy = policy_from_settings(table.names, settings, rule)
    result = replay(table, policy)
    point = operating_point(table, result, unit)
    unit_label = UNIT_LABELS[unit]

    m = metrics_area.columns(5)
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
    metrics_area.caption(f"Accuracy {pct(point.accuracy)} (95% CI {pct(point.accuracy_low)} – {pct(point.accuracy_high)}); "
               f"random routing at the same escalation rates: {pct(point.random_accuracy)} at "
               f"{charts.fmt_number(point.random_cost)} {unit_label}.")

    zero_cost = [table.names[s] for s in range(table.n_stages) if not table.cost(unit)[s].any()]
    if zero_cost:
        st.info(f"{', '.join(zero_cost)} cost{'s' if len(zero_cost) == 1 else ''} nothing in {unit_label} "
                "(a local model has no price; GPT-4's size, hence its FLOPs, is unknown): pick another cost unit "
                "to compare them.")

    swept = data.load_frontier(preset, split, recorded, rule, unit)
    singles_frame = single_models(table)
    singles = [{"label": state.label_of(configs[r.stage]) if r.stage in configs else r.stage,
                "cost": getattr(r, f"cost_{unit}"), "accuracy": r.accuracy, "recorded": bool(table.recorded[i])}
               for i, r in enumerate(singles_frame.itertuples())]
    best = oracle(table, unit)
    curve = random_routing_curve(table, [s.enabled for s in policy.stages], unit)
    figure = charts.frontier_figure(
        cloud=swept["cloud"], frontier=swept["frontier"],
        cloud_label="swept policies" + (" (a sample)" if swept["sampled"] else ""),
        singles=singles, oracle=(best.mean_cost[unit], best.accuracy),
        random_curve=(curve["cost"].to_numpy(), curve["accuracy"].to_numpy()),
        random_point=(point.random_cost, point.random_accuracy), current=(point.mean_cost, point.accuracy),
        unit_label=unit_label, current_label="these thresholds")
    st.plotly_chart(figure, key="frontier_chart", config={"displaylogo": False})
    st.caption(f"{swept['policies']:,} swept polic{'y' if swept['policies'] == 1 else 'ies'} (every sub-cascade, quantile thresholds); the oracle answers each "
               "question with the cheapest model that gets it right, the limit no router can beat.")

    st.subheader("Where the questions go")
    rates = [{"stage": state.label_of(configs[n]) if n in configs else n,
              "in use": bool(policy.stages[i].enabled),
              "reaches": pct(float(result.reach_rate[i]), 1),
              "escalation rate": pct(point.escalation_rate[n], 1),
              "answers": pct(point.answer_rate[n], 1)} for i, n in enumerate(table.names)]
    st.dataframe(rates, hide_index=True, width="stretch")

    with st.expander("Find thresholds for a target (chosen on calibration, shown on test)", expanded=False):
        mode = st.radio("Criterion", ["accuracy loss", "cost budget"], horizontal=True, key="find_mode",
                        format_func=lambda m: {"accuracy loss": "at most this accuracy loss against the largest model",
                                               "cost budget": f"at most this mean cost ({unit_label} / question)"}[m])
        if mode == "accuracy loss":
            target = st.number_input("Accuracy loss allowed (percentage points)", 0.0, 100.0, 1.0, 0.5, key="find_loss")
        else:
            largest = float(table.cost(unit)[-1].mean())
            target = st.number_input(f"Budget ({unit_label} per question)", 0.0, value=float(f"{largest / 2:.3g}"),
                                     key=f"find_budget::{unit}", format="%.4g")
        if st.button("Find thresholds", key="find_button", type="primary"):
            calib = data.load_table(preset, "calibration", recorded)
            test = data.load_table(preset, "test", recorded)
            if calib.table is None or test.table is None or calib.table.names != table.names:
                st.error("Finding thresholds needs records of the same stages in both the calibration and the test split.")
            else:
                try:
                    kwargs = {"target_max_loss": target / 100} if mode == "accuracy loss" else {"cost_budget": target}
                    chosen = select_policy(calib.table, unit=unit, rule=rule, **kwargs)
                except ValueError as err:
                    st.error(f"No thresholds meet that: {err}")
                else:
                    on_test = evaluate_on(test.table, chosen.policy)
                    st.session_state["_found"] = {
                        "policy": chosen.policy, "names": table.names, "preset": preset.name,
                        "rows": [
                            {"split": "calibration (chosen here)", "accuracy": pct(chosen.calibration.accuracy),
                             f"mean {unit_label}": charts.fmt_number(chosen.calibration.mean_cost[unit]),
                             "compute reduction": pct(chosen.calibration.compute_reduction[unit])},
                            {"split": "test (report this)", "accuracy": pct(on_test.accuracy),
                             f"mean {unit_label}": charts.fmt_number(on_test.mean_cost[unit]),
                             "compute reduction": pct(on_test.compute_reduction[unit])}],
                        "stages": " → ".join(n for n, s in zip(table.names, chosen.policy.stages) if s.enabled),
                    }
        found = st.session_state.get("_found")
        if found and found["preset"] == preset.name and tuple(found["names"]) == table.names:
            st.markdown(f"Chosen cascade: **{found['stages']}**")
            st.dataframe(found["rows"], hide_index=True, width="stretch")
            st.button("Use these thresholds", key="apply_found", on_click=apply_found,
                      args=(found["policy"], table.names, preset.name))

    st.caption("Share this view: the page's address carries the thresholds, the rule, the split and the cost unit.")
