"""Route a question: run the cascade live, stage by stage, and show why each stage kept or escalated."""

from __future__ import annotations

import math

import streamlit as st

from app_ui import backends, charts, data, datasets, state, view_model
from app_ui.route_run import PAGE_LEFT, USER_CANCELLED, LiveRun
from cascade_core.cascade import trace_to_dict
from cascade_core.monitor.app_traces import record_route
from cascade_core.policy import StagePolicy
from cascade_core.prompts import validate_question
from cascade_core.types import OPTION_LETTERS, Question, StageStep, Trace
from cascade_core.compose.policies import apply_question_policy, calibration_stages, stage_summary
from cascade_core.policy import CascadePolicy
from app_ui.view_model import decision_reason, display_answer, json_text, thresholds_applied


PAGE = "route"
LAST_KEY = "_route_last"
CANCEL_KEY = "_route_cancel_clicked"
MAX_OPTION_CHARS = 1000  # an option is one line of the prompt

st.title("Route a question")
preset = state.preset_picker(PAGE)
dataset = datasets.dataset_picker(PAGE)
if preset is None:
    st.stop()
found_policy, policy_problem = data.applied(preset)
configs = {s.name: s for s in preset.stages}
if policy_problem:
    st.warning(policy_problem.capitalize() + "; routing uses the preset's thresholds.")

# ---- the promise: the accuracy target, recalibrated here with the same Learn-then-Test -------------------
# The shipped MMLU policy promises <= 1 pt, and at that target calibration switches the small stages
# off: nothing routes. A looser target is chosen here by `calibrate`'s own function on the records'
# calibration split (cached), and the page opens on the tightest target at which a stage before the
# last is in use, so a newcomer sees a keep and an escalation (issue 22).
shipped = data.shipped_target(preset)
offered = data.route_targets(preset)
applied_now, target_note = found_policy, ""
if shipped is not None and offered is not None:
    shipped_pt, delta = shipped
    targets, opening = offered
    target_key = f"route_target::{preset.name}"
    if st.session_state.get(target_key) not in targets:
        st.session_state[target_key] = opening
    last_label = view_model.label_of(configs[calibration_stages(preset)[-1]])
    target = st.radio(f"Accuracy promise: at most this many points lost against {last_label} alone", targets,
                      key=target_key, horizontal=True,
                      format_func=lambda t: f"≤ {t:g} pt" + (" (the shipped policy)" if t == shipped_pt else ""),
                      help="Each target's policy is chosen by Learn-then-Test on the calibration split, as "
                           "`python -m cascade_core calibrate --target X` does.")
    found_target, chosen_target, target_problem = data.policy_at_target(preset, target)
    if found_target is None:
        st.warning(f"No policy could be certified for ≤ {target:g} pt: {target_problem}. Routing uses the shipped "
                   f"policy.")
    else:
        applied_now = found_target
        where = ("the shipped policy file" if chosen_target is None else
                 f"recalibrated here (the shipped file promises ≤ {shipped_pt:g} pt), rule {chosen_target.rule}")
        target_note = (f"**The promise**: with probability at least {1 - delta:.0%} over the draw of the calibration "
                       f"questions, the cascade loses at most **{target:g} accuracy "
                       f"point{'s' if target != 1 else ''}** "
                       f"against {last_label} alone on new MMLU questions ({where}).")
# The explorer's thresholds win only where the user moved them off the shipped policy: opening the
# explorer (it opens on that policy) must not undo the target chosen here.
policies, source, off_reasons = state.stage_thresholds(preset, found_policy)
if source != state.EXPLORER_SOURCE:
    policies, source, off_reasons = state.stage_thresholds(preset, applied_now, explorer=False)
if target_note and source == applied_now.description:
    st.caption(target_note)
elif target_note:
    st.caption("The threshold explorer's thresholds apply (they carry no promise); the target above applies "
               "once the explorer is back on a calibrated policy.")

# ---- the question -------------------------------------------------------------------------------------
# Two MMLU test questions whose route under the followed policy is clear in the records (one kept by
# the first stage in use, one escalated), chosen by cascade_core (`ui_data.route_examples`).
policy_stages = calibration_stages(preset)
examples = {}
if sum(bool(policies[n].enabled) for n in policy_stages if n in policies) > 1:
    try:
        examples = data.route_examples(preset, CascadePolicy(tuple(policies[n] for n in policy_stages)))
    except (OSError, ValueError, KeyError) as err:
        st.caption(f"No examples from the records: {err}")
MODES = {"example": "An example: kept or escalated", "type": "Type a question",
         "mmlu": "Pick an MMLU question (test split)", "arith": "Pick an arithmetic question (arith, free-form)"}
modes = [m for m in MODES if m != "example" or examples]
if dataset not in ("mmlu", "arith"):  # a registered file picked in the sidebar: its questions too
    MODES = {**MODES, "picked": f"Pick a question of {dataset}"}
    modes.append("picked")
if st.session_state.get("route_mode") not in modes:
    st.session_state["route_mode"] = modes[0]
# A dataset picked in the sidebar (or opened from a link's ?dataset=) offers its questions first.
if st.session_state.get("_route_mode_for") != dataset:
    st.session_state["_route_mode_for"] = dataset
    if dataset != "mmlu":
        st.session_state["route_mode"] = "arith" if dataset == "arith" else "picked"
mode = st.radio("Where the question comes from", modes, horizontal=True, key="route_mode", format_func=MODES.get)
question: Question | None = None
input_problem: str | None = None
if mode == "example":
    def example_label(kind: str) -> str:
        ex = examples[kind]
        first, by = view_model.label_of(configs[ex.first_stage]), view_model.label_of(configs[ex.answered_by])
        return f"kept by {first}" if kind == "keep" else f"escalated by {first} to {by}"

    kinds = list(examples)
    if st.session_state.get("route_example") not in kinds:
        st.session_state["route_example"] = kinds[0]
    kind = st.radio("Example", kinds, key="route_example", horizontal=True, format_func=example_label)
    ex = examples[kind]
    pool = data.mmlu_questions("test")
    row = pool[pool["qid"] == ex.qid].iloc[0]
    question = Question(text=row["question"], options=tuple(row["options"]), subject=row["subject"],
                        answer=int(row["answer"]), qid=row["qid"])
    with st.container(border=True):
        st.markdown(f"**{question.text}**")
        st.markdown("  \n".join(f"{OPTION_LETTERS[i]}. {o}" for i, o in enumerate(question.options)))
        pik = "" if math.isnan(ex.p_ik) else f", P(IK) {ex.p_ik:.2f}"
        st.caption(f"MMLU `{ex.qid}` (test split). In the benchmark records "
                   f"{view_model.label_of(configs[ex.first_stage])} "
                   f"has P(T) {ex.p_t:.2f}{pik} on it, so this policy "
                   f"{'keeps its answer' if kind == 'keep' else 'escalates it'}, even with both signals 0.05 "
                   f"{'lower' if kind == 'keep' else 'higher'}; live, the model runs again here and its numbers can "
                   "differ a little from the records'.")
elif mode == "type":
    # No max_chars: the browser would drop an over-long paste silently; it is refused below instead.
    text = st.text_area("Question", key="route_text", height=100,
                        placeholder="e.g. Which planet is known as the Red Planet?")
    options_text = st.text_area("Answer options, one per line (leave empty for a free-form answer)",
                                key="route_options",
                                height=120, placeholder="Venus\nMars\nJupiter\nSaturn")
    subject = st.text_input("Subject (optional, goes into the prompt header)", key="route_subject", max_chars=100)
    options = tuple(line.strip() for line in options_text.splitlines() if line.strip())
    limit = data.prompt_limit()
    length = len(text) + sum(len(o) for o in options) + len(subject)
    long_options = [(i, len(o)) for i, o in enumerate(options) if len(o) > MAX_OPTION_CHARS]
    if length > limit:
        input_problem = (f"The question is too long: it holds {length:,} characters (question, options and subject), "
                         f"over the limit of {limit:,} (the servers' prompt limit). Shorten it and route again.")
    elif long_options:
        i, n = long_options[0]
        input_problem = (f"Option {OPTION_LETTERS[i] if i < len(OPTION_LETTERS) else i + 1} is too long: {n:,} "
                         f"characters, over the limit of {MAX_OPTION_CHARS:,} per option.")
    question = Question(text=text, options=options, subject=subject.strip())
elif mode == "arith":
    try:
        pool = data.dataset_questions("arith", "test")
    except (OSError, ValueError) as err:
        st.error(f"The arith questions cannot be read: {err}")
        st.stop()
    tasks = list(dict.fromkeys(pool["subject"]))
    left, right = st.columns([3, 1])
    task = left.selectbox("Task (GPT-3's arithmetic tasks: digits and operation)", tasks, key="route_arith_task")
    in_task = pool[pool["subject"] == task].reset_index(drop=True)
    number = right.number_input(f"Question (1–{len(in_task)})", 1, len(in_task), 1, key=f"route_arith_n::{task}")
    row = in_task.iloc[int(number) - 1]
    question = Question(text=row["question"], qid=row["qid"])
    with st.container(border=True):
        st.markdown(f"**{question.text}**")
        st.caption(f"arith `{question.qid}` (synthetic, seeded); the right answer is {row['references'][0]}.")
elif mode == "picked":  # a question of the dataset picked in the sidebar (app_ui.datasets)
    question = datasets.question_picker(dataset, "route_picked")
    if question is None:
        st.stop()
else:
    try:
        pool = data.mmlu_questions("test")
    except (OSError, ValueError) as err:
        st.error(f"The MMLU questions cannot be read: {err}")
        st.stop()
    subjects = sorted(pool["subject"].unique())
    left, right = st.columns([3, 1])
    subject = left.selectbox("Subject", subjects, key="route_mmlu_subject", format_func=lambda s: s.replace("_", " "))
    in_subject = pool[pool["subject"] == subject].reset_index(drop=True)
    number = right.number_input(f"Question (1–{len(in_subject)})", 1, len(in_subject), 1,
                                key=f"route_mmlu_n::{subject}")
    row = in_subject.iloc[int(number) - 1]
    question = Question(text=row["question"], options=tuple(row["options"]), subject=row["subject"],
                        answer=int(row["answer"]), qid=row["qid"])
    with st.container(border=True):
        st.markdown(f"**{question.text}**")
        # one option a line: a markdown line break ("  \n"); a bare "\n" would run them into one paragraph
        st.markdown("  \n".join(f"{OPTION_LETTERS[i]}. {o}" for i, o in enumerate(question.options)))
        st.caption(f"MMLU `{question.qid}`; the right answer is shown after routing.")

# ---- the policy this question runs with ----------------------------------------------------------------
# Its own dataset's calibrated policy file when there is one, else its kind's (MMLU's for multiple choice,
# the shipped free-form set's for free-form): cascade_core decides (`policy_for_question`), as for `route`.
QUESTION_DATASET = {"example": "mmlu", "mmlu": "mmlu", "arith": "arith", "picked": dataset}
# A question not typed yet has no kind: it shows the page's MMLU policy (the promise above) until it is typed.
multiple_choice = question.is_multiple_choice or not (question.text.strip() or question.options)
resolved, resolved_problem = data.question_policy(preset, multiple_choice, QUESTION_DATASET.get(mode))
page_policy = multiple_choice and resolved.dataset == "mmlu"  # the promise and explorer above apply
if resolved_problem:
    st.warning(resolved_problem.capitalize() + "; routing uses the preset's thresholds.")
page_followed = [n for n in configs if policies[n].enabled]  # the stages the MMLU promise (or explorer) uses
if not page_policy:  # another dataset's policy: its thresholds (or the explorer's, chosen on its records)
    policies, source, off_reasons = state.stage_thresholds(preset, resolved.applied, dataset=resolved.dataset)
with st.container(border=True, key="route_policy"):
    st.markdown(f"**Policy for this question**: {view_model.question_policy_title(resolved)}")
    st.caption(view_model.question_policy_text(resolved, source))
    if target_note and not page_policy:
        st.caption("The accuracy promise above is MMLU's, for multiple-choice questions: it does not apply to "
                   "this one.")

# ---- which stages -------------------------------------------------------------------------------------
names = list(configs)
stages_key = f"stages::{preset.name}@{PAGE}"
followed_key = f"_route_followed::{preset.name}"
custom_key = f"_route_stages_custom::{preset.name}"  # the user chose the stages by hand
page_key = f"_route_page_followed::{preset.name}"
followed = [n for n in names if policies[n].enabled]
# The stages follow the policy the question runs with: a new target or explorer policy resets them (as it
# always did); another question's policy (typing options makes a free-form question multiple choice)
# resets them only where the user has not chosen them by hand.
if st.session_state.get(page_key, page_followed) != page_followed:
    st.session_state.pop(custom_key, None)
st.session_state[page_key] = page_followed
if (stages_key not in st.session_state or not set(st.session_state[stages_key]) <= set(names)
        or (st.session_state.get(followed_key, followed) != followed and not st.session_state.get(custom_key))):
    st.session_state[stages_key] = followed
st.session_state[followed_key] = followed


def _chosen_by_hand() -> None:
    st.session_state[custom_key] = True


chosen = st.sidebar.multiselect("Stages to run", names, key=stages_key, on_change=_chosen_by_hand,
                                format_func=lambda n: view_model.label_of(configs[n]),
                                help="Kept in cascade order, smallest first; the last one always answers.")
chosen = [n for n in names if n in chosen]
st.sidebar.page_link("pages/4_Settings.py", label="Add a stage or fetch models", icon=":material/settings:")

# ---- thresholds ---------------------------------------------------------------------------------------


# A stage the followed policy switches off but the user chose in the sidebar runs with the preset's own
# thresholds (never the 0 / 0 a switched-off stage carries), and the table below says so.
run_policies = {n: policies[n] if policies[n].enabled or n not in chosen else state.switched_on_by_hand(configs[n])
                for n in names}


def stage_policy(name: str) -> StagePolicy:
    """The policy the stage runs with (`run_policies`)."""
    return run_policies[name]


def routing_text(name: str) -> str:
    """A stage's routing in the thresholds table: what it runs with when it is routed."""
    last = name == (chosen or names)[-1]
    if policies[name].enabled or name not in chosen:
        return stage_summary(policies[name], last, off_reasons.get(name, ""))
    return f"switched on here: {stage_summary(run_policies[name], last)} (the preset's thresholds)"


enabled_names = [n for n in names if configs[n].enabled]
st.caption(f"{source.capitalize()}.")
number_format, format_differs = backends.format_caption([configs[n] for n in chosen],
                                                        found_policy if page_policy else resolved.applied)
if number_format:
    (st.info if format_differs else st.caption)(number_format)
for name, why in off_reasons.items():
    if name not in configs:
        continue
    if name in chosen:
        st.caption(f"**{view_model.label_of(configs[name])}: switched on here** although {why[0].lower()}{why[1:]}; "
                   f"it runs with the preset's thresholds: {routing_text(name).removeprefix('switched on here: ')}.")
    else:
        st.caption(f"**{view_model.label_of(configs[name])}: off**. {why[0].upper()}{why[1:]}.")
with st.expander("Thresholds", expanded=False):
    st.dataframe([{"stage": view_model.label_of(configs[n]), "routing": routing_text(n)} for n in names],
                 hide_index=True, width="stretch")
    # on the records of the dataset whose policy this is: thresholds chosen there route its questions
    st.page_link("pages/2_Explore_thresholds.py", label=f"Change them in the threshold explorer ({resolved.dataset})",
                 icon=":material/tune:", query_params={datasets.PARAM: resolved.dataset})


# ---- one stage's card ---------------------------------------------------------------------------------
def draw_card(step: StageStep, policy: StagePolicy, label: str, recorded: bool, options: tuple[str, ...],
              load_s: float | None = None, subject: str | None = None) -> None:
    if step.decision == "error":
        st.error(f"**{label} failed**: {step.error}")
        st.caption("A failing stage passes the question on to the next one.")
        return
    final = step.decision == "final"
    left, middle, right = st.columns([1, 1, 1.4])
    if recorded:
        left.info("Recorded outcome: no probabilities (it only knows right or wrong).")
    else:
        applies = thresholds_applied(policy, step.p_t, step.p_ik, step.margin, step.entropy, subject)
        left.plotly_chart(charts.gauge(step.p_t, None if final else policy.tau_t, "P(T)", applies["tau_t"]),
                          key=f"gauge_pt_{step.stage}", config={"displayModeBar": False})
        if math.isnan(step.p_ik):
            middle.caption("No P(IK) (see the note below the cards).")
        else:
            middle.plotly_chart(charts.gauge(step.p_ik, None if final else policy.tau_ik, "P(IK)", applies["tau_ik"]),
                                key=f"gauge_pik_{step.stage}", config={"displayModeBar": False})
    with right:
        if step.answer_index is not None and options:
            st.markdown(f"Answer: **{step.answer}. {options[step.answer_index]}**")
        elif recorded:
            st.markdown(f"Answer: **{step.answer}**")
        else:
            st.markdown("Answer (free-form):")
            skipped = getattr(step, "generation_skipped", False)  # the P(IK) gate escalated before any answer
            st.text("(not generated: P(IK) was below "
                    "τ_IK)" if skipped else display_answer(step.answer) or "(an empty answer)")
        reason = step.reason
        if (step.decision in ("keep", "escalate") and step.reason != "empty answer" and not recorded
                and not getattr(step, "generation_skipped", False)):  # a P(IK) gate's reason says what it saved
            reason = decision_reason(policy, step.p_t, step.p_ik, step.margin, step.entropy, subject)
        if step.decision == "keep":
            st.success(f"**Keep**: {reason.removeprefix('keep: ')}")
        elif step.decision == "escalate":
            st.warning(f"**Escalate**: {reason.removeprefix('escalate: ')}")
        else:
            st.info("**Answers**: the last stage always answers.")
        dollars = f" · ${step.dollars:.3g}" if step.dollars else ""
        loaded = f" · model loaded in {load_s:.1f} s" if load_s else ""
        st.caption(f"{charts.fmt_number(step.prompt_tokens + step.output_tokens)} tokens · "
                   f"{charts.fmt_number(step.flops)} FLOPs"
                   f"{dollars} · {step.seconds:.2f} s{loaded}")


def status_label(step: StageStep, label: str) -> str:
    verdict = {"keep": "kept its answer", "escalate": "escalated", "final": "answered (last stage)",
               "error": "failed"}.get(step.decision, step.decision)
    return f"{label}: {verdict}"


# ---- run ----------------------------------------------------------------------------------------------
LIVE_KEY = "_route_live"  # the LiveRun of the last Route press


def _cancel_clicked() -> None:
    """The Cancel button's callback: it runs at the start of the script run the click starts (while
    the stopped run may still be unwinding in its own thread) and stops the model at once."""
    st.session_state[CANCEL_KEY] = True
    live = st.session_state.get(LIVE_KEY)
    if live is not None:
        live.cancel(USER_CANCELLED)


left, right = st.columns([1, 5], vertical_alignment="center")
run = left.button("Route", type="primary", key="route_button", disabled=not chosen)
if not chosen:
    st.info("Choose at least one stage in the sidebar.")
# Everything a run shows goes into one of two slots, and a new run uses the slot the last one did not.
# Streamlit sends a container drawn where the previous run drew one as an update of that container:
# the old cards stay on screen, faded, until the new run ends, and the new cards replace them one by
# one (measured in Chromium: the previous answer and path stayed for the whole 8 s run). The slot
# left empty this run replaces the previous result at once instead.
SLOT_KEY = "_route_slot"
slots = (st.empty(), st.empty())
# Brings the running card into view (at 1400 x 900 it was below the fold): a script run in the page
# scrolls to the marker drawn above the cards.
SCROLL_JS = """<script>
const doc = document;
const go = () => {
  const el = doc.getElementById("route-running");
  if (el) { el.scrollIntoView({behavior: "smooth", block: "start"}); } else { setTimeout(go, 100); }
};
go();
</script>"""


def no_probe_note(trace, recorded: dict[str, bool], labels: dict[str, str]) -> None:
    missing = [labels[s.stage] for s in trace.steps
               if s.decision != "error" and not recorded.get(s.stage) and math.isnan(s.p_ik)]
    if not missing:
        return
    one = len(missing) == 1
    if trace.question.is_multiple_choice:
        why = f"no probe trained for {'this model' if one else 'these models'} yet"
    else:  # a multiple-choice probe reads another prompt's hidden state: it does not apply here
        why = (f"no free-form probe for {'this model' if one else 'these models'} (a free-form P(IK) needs one trained "
               "on free-form records: `probes train --dataset arith`)")
    st.info(f"No P(IK) for {', '.join(missing)}: {why}, so {'it routes' if one else 'they route'} on P(T) alone.")


def run_question(cancel_box) -> None:
    problem = input_problem
    if problem is None:
        try:
            validate_question(question)
        except ValueError as err:
            problem = f"This question cannot be asked: {err}."
    recorded_chosen = [n for n in chosen if configs[n].backend == "recorded"]
    if problem is None and recorded_chosen and not question.qid:
        problem = (f"{view_model.label_of(configs[recorded_chosen[0]])} replays recorded MMLU outcomes only: pick an "
                   "MMLU question, or leave that stage out.")
    if problem is None:
        for name in chosen:
            ready, why = backends.fetched_status(configs[name])
            if not ready:
                problem = (f"{view_model.label_of(configs[name])} cannot run: {why}. Fetch it on the Settings page "
                           "(or `make fetch`), or leave the stage out.")
                break
    if problem:
        st.error(problem)
        return
    stages = []
    for name in chosen:  # no model loads here: each loads when the cascade first reaches its stage
        try:
            stages.append(backends.lazy_stage(configs[name], stage_policy(name)))
        except Exception as err:  # noqa: BLE001 - any build failure becomes a message
            st.error(f"{view_model.label_of(configs[name])} is not usable: {err}")
            return
    try:  # its own dataset's policy reads P(IK) with that dataset's probes (`apply_question_policy`)
        stages = apply_question_policy(stages, resolved, question.is_multiple_choice, data.where())
    except (ValueError, OSError) as err:
        st.error(f"The policy for this question cannot run here: {err}")
        return
    labels = {n: view_model.label_of(configs[n]) for n in chosen}
    policy_record = view_model.question_policy_record(resolved, source)
    boxes: dict[str, object] = {}
    loads: dict[str, float] = {}
    steps: list[StageStep] = []
    # the free-form answer of the stage running, as it is generated
    streaming = {"slot": None, "text": "", "since": None}
    live = LiveRun(stages, question)
    st.session_state[LIVE_KEY] = live
    live.start()
    finished = None
    clock = st.empty()
    try:
        for event in live.follow():
            name = event.stage.name if event.stage is not None else None
            if event.kind == "tick":  # a Streamlit call now and then: where a click on Cancel stops this script
                clock.caption(f"Running for {live.elapsed:.0f} s.")
                running = next((n for n in reversed(list(boxes)) if n not in {s.stage for s in steps}), None)
                if running is not None:
                    # expanded=True every time: an update without it collapses the box (and hides the streamed text)
                    boxes[running].update(label=f"{labels[running]}: {boxes_state[running]} {live.elapsed:.0f} s…",
                                          expanded=True)
                continue
            if event.kind == "start":
                lazy = bool(event.value)
                boxes_state[name] = (f"loading {configs[name].model} (once per server)… running for" if lazy
                                     else "running for")
                boxes[name] = st.status(f"{labels[name]}: {boxes_state[name]} {live.elapsed:.0f} s…", expanded=True)
                if not question.is_multiple_choice:
                    streaming["slot"], streaming["text"] = boxes[name].empty(), ""
                continue
            if event.kind == "loaded":
                if event.value >= 0.05:  # under that it was already in memory (another session or the preload)
                    loads[name] = event.value
                    boxes_state[name] = f"loaded {configs[name].model} in {event.value:.1f} s; running for"
                else:
                    boxes_state[name] = "running for"
                continue
            if event.kind == "text":
                streaming["text"] += event.value
                if streaming["slot"] is not None:  # st.text: user-visible model output, never markup
                    streaming["slot"].text(f"generating: {streaming['text']}")
                continue
            if event.kind in ("done", "error"):
                if streaming["slot"] is not None:
                    streaming["slot"].empty()  # the card below shows the whole answer
                    streaming["slot"], streaming["text"] = None, ""
                steps.append(event.value)
                box = boxes.get(name) or st.status(labels[name], expanded=True)
                with box:
                    draw_card(event.value, event.stage.policy, labels[name], event.stage.recorded, question.options,
                              loads.get(name), question.subject or None)
                box.update(label=status_label(event.value, labels[name]),
                           state="error" if event.kind == "error" else "complete", expanded=True)
                continue
            finished = event.value
    finally:
        if finished is None:  # Streamlit stopped this script (Cancel, or any click): stop the model too
            live.cancel(PAGE_LEFT)
            live.partial = {
                "trace": Trace(question=question, steps=list(steps), thresholds=source), "failure": PAGE_LEFT,
                "cancelled": True, "preset": preset.name, "loads": loads, "stages": list(labels.items()),
                "policies": {s.name: s.policy for s in stages}, "recorded": {s.name: s.recorded for s in stages},
                "seconds": live.elapsed, "policy": policy_record,
                "running": next((labels[n] for n in boxes if n not in {x.stage for x in steps}), None),
            }
        live.page_done.set()  # finished or stopped: the next run need not wait for this one
    clock.empty()
    cancel_box.empty()
    if finished.trace is None:
        st.error(f"The cascade cannot run this question: {finished.failure}")
        return
    st.session_state[LAST_KEY] = {
        "trace": finished.trace, "failure": finished.failure, "cancelled": finished.cancelled, "preset": preset.name,
        "loads": loads, "stages": list(labels.items()),
        "policies": {s.name: s.policy for s in stages},
        "recorded": {s.name: s.recorded for s in stages}, "policy": policy_record,
    }
    draw_summary(st.session_state[LAST_KEY], drawn=True)
    if not finished.cancelled:  # into the trace store the Monitor page reads, when $CASCADE_TRACES_DB is set
        ran = applied_now if page_policy else resolved.applied
        record_route(preset.name, stages, question, finished.trace, description=source, failure=finished.failure,
                     policy_file=ran.file if source == ran.description else None)


boxes_state: dict[str, str] = {}


def draw_summary(last: dict, drawn: bool) -> None:
    trace = last["trace"]
    labels = dict(last["stages"])
    if not drawn:  # a later rerun: draw the stored trace again
        for step in trace.steps:
            with st.status(status_label(step, labels[step.stage]),
                           state="error" if step.decision == "error" else "complete",
                           expanded=True):
                draw_card(step, last["policies"][step.stage], labels[step.stage], last["recorded"][step.stage],
                          trace.question.options, last.get("loads", {}).get(step.stage), trace.question.subject or None)
    no_probe_note(trace, last["recorded"], labels)
    if last.get("policy"):
        st.caption(view_model.routed_with(last["policy"]))
    if last.get("cancelled"):
        who = "You cancelled the run" if st.session_state.get(CANCEL_KEY) else "The run stopped: " + PAGE_LEFT
        running = f" while {last['running']} was running" if last.get("running") else ""
        took = f" after {last['seconds']:.1f} s" if last.get("seconds") is not None else ""
        done = (f"; the {len(trace.steps)} stage{'s' if len(trace.steps) != 1 else ''} done before it are shown"
                if trace.steps else "")
        st.warning(f"{who}{took}{running}: its model stopped{done}. Press Route to run the question again.")
    elif last["failure"]:
        st.error(f"The cascade could not answer: {last['failure']}")
    st.subheader("Routing path")
    st.graphviz_chart(charts.routing_path_dot(last["stages"], trace.steps))
    final = trace.answered_by
    q = trace.question
    if final is not None and not q.options:
        st.info(f"The cascade's free-form answer, by {labels[final.stage]}:")
        st.text(display_answer(final.answer) or "(an empty answer)")
    elif final is not None:
        answer = final.answer or ""
        if final.answer_index is not None:
            answer = f"{final.answer}. {q.options[final.answer_index]}"
        message = f"The cascade answers **{answer}** (by {labels[final.stage]})."
        if q.answer is not None:
            right = f"{OPTION_LETTERS[q.answer]}. {q.options[q.answer]}"
            if final.answer_index is not None:
                (st.success if final.answer_index == q.answer else st.error)(f"{message} The right answer is "
                                                                             f"**{right}**.")
            else:
                st.info(f"{message} The right answer is **{right}**.")
        else:
            st.info(message)
    st.subheader("Cost")
    cols = st.columns(5)
    cols[0].metric("Stages visited", len(trace.steps))
    cols[1].metric("FLOPs", charts.fmt_number(trace.total("flops")))
    cols[2].metric("Tokens", charts.fmt_number(trace.total("prompt_tokens") + trace.total("output_tokens")))
    dollars = trace.total("dollars")
    cols[3].metric("Dollars", f"${dollars:.3g}" if dollars else "$0 (local)")
    cols[4].metric("Seconds", f"{trace.total('seconds'):.2f}")
    record = {**trace_to_dict(trace), "preset": last["preset"], "cancelled": bool(last.get("cancelled")),
              "policy": last.get("policy"),
              "stages": [{"stage": n, "label": label, "policy": last["policies"][n].to_dict()}
                         for n, label in last["stages"] if n in last["policies"]]}
    st.download_button("Download the trace (JSON)", json_text(record),
                       file_name=f"trace-{(trace.question.qid or 'question').replace('/', '-')}.json",
                       mime="application/json", key="route_download", on_click="ignore", icon=":material/download:")
    st.dataframe([{"stage": labels[s.stage], "decision": s.decision,
                   "tokens": charts.fmt_number(s.prompt_tokens + s.output_tokens),
                   "FLOPs": charts.fmt_number(s.flops), "dollars": f"${s.dollars:.3g}" if s.dollars else "–",
                   "seconds": f"{s.seconds:.2f}"} for s in trace.steps],
                 hide_index=True, width="stretch")



if run:
    st.session_state[LIVE_KEY] = None
    st.session_state.pop(LAST_KEY, None)
    st.session_state.pop(CANCEL_KEY, None)
    st.session_state[SLOT_KEY] = 1 - st.session_state.get(SLOT_KEY, 0)
    with slots[st.session_state[SLOT_KEY]].container():
        st.html('<div id="route-running"></div>')
        cancel_box = st.empty()
        cancel_box.button("Cancel", key="route_cancel", icon=":material/stop_circle:", on_click=_cancel_clicked,
                          help="Stop the cascade: the model stops within one generated token (a multiple-choice "
                               "pass, a second or two, runs to its end).")
        st.html(SCROLL_JS, unsafe_allow_javascript=True)
        run_question(cancel_box)
else:
    stopped = st.session_state.get(LIVE_KEY)
    if LAST_KEY not in st.session_state and stopped is not None:  # a run this click (or another) stopped
        stopped.page_done.wait(5)  # its thread reaches a Streamlit call within a tick (0.2 s)
        if stopped.partial is not None:
            st.session_state[LAST_KEY] = stopped.partial
        st.session_state[LIVE_KEY] = None
    last = st.session_state.get(LAST_KEY)
    if last and last["preset"] == preset.name:
        with slots[st.session_state.get(SLOT_KEY, 0)].container():
            draw_summary(last, drawn=False)
