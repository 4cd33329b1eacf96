"""Route a question: run the cascade live, stage by stage, and show why each stage kept or escalated."""

from __future__ import annotations

import math
import time

import streamlit as st

from app_ui import backends, charts, data, datasets, state
from cascade_core.cascade import CascadeError, for_free_form, run_cascade
from cascade_core.policy import StagePolicy
from cascade_core.prompts import validate_question
from cascade_core.types import OPTION_LETTERS, Question, StageStep
from cascade_core.compose.policies import FREE_FORM_DATASET, apply_free_form, stage_summary
from cascade_core.ui_data import decision_reason, display_answer, thresholds_applied


PAGE = "route"
LAST_KEY = "_route_last"
MAX_OPTION_CHARS = 1000  # an option is one line of the prompt

st.title("Route a question")
preset = state.preset_picker(PAGE)
dataset = datasets.dataset_picker(PAGE)
if preset is None:
    st.stop()
found_policy, policy_problem = data.applied(preset)
policies, source, off_reasons = state.stage_thresholds(preset, found_policy)
configs = {s.name: s for s in preset.stages}
if policy_problem:
    st.warning(policy_problem.capitalize() + "; routing uses the preset's thresholds.")

# ---- which stages -------------------------------------------------------------------------------------
names = list(configs)
stages_key = f"stages::{preset.name}@{PAGE}"
if stages_key not in st.session_state or not set(st.session_state[stages_key]) <= set(names):
    st.session_state[stages_key] = [n for n in names if policies[n].enabled]
chosen = st.sidebar.multiselect("Stages to run", names, key=stages_key, format_func=lambda n: state.label_of(configs[n]),
                                help="Kept in cascade order, smallest first; the last one always answers.")
chosen = [n for n in names if n in chosen]
st.sidebar.page_link("pages/4_Settings.py", label="Add a stage or fetch models", icon=":material/settings:")

# ---- the question -------------------------------------------------------------------------------------
picked = ["picked"] if dataset not in ("mmlu", "arith") else []  # a registered file picked in the sidebar
mode = st.radio("Where the question comes from", ["type", "mmlu", "arith", *picked], horizontal=True,
                key="route_mode", format_func={"type": "Type a question", "mmlu": "Pick an MMLU question (test split)",
                                               "arith": "Pick an arithmetic question (arith, free-form)",
                                               "picked": f"Pick a question of {dataset}"}.get)
question: Question | None = None
input_problem: str | None = None
if mode == "type":
    # No max_chars: the browser would drop an over-long paste silently; it is refused below instead.
    text = st.text_area("Question", key="route_text", height=100,
                        placeholder="e.g. Which planet is known as the Red Planet?")
    options_text = st.text_area("Answer options, one per line (leave empty for a free-form answer)", key="route_options",
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
        st.caption(f"arith `{question.qid}` (synthetic, seeded); the right answer is {row['references'][0]}. Free-form "
                   "questions run with the free-form policy when one was calibrated.")
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
    number = right.number_input(f"Question (1–{len(in_subject)})", 1, len(in_subject), 1, key=f"route_mmlu_n::{subject}")
    row = in_subject.iloc[int(number) - 1]
    question = Question(text=row["question"], options=tuple(row["options"]), subject=row["subject"],
                        answer=int(row["answer"]), qid=row["qid"])
    with st.container(border=True):
        st.markdown(f"**{question.text}**")
        # one option a line: a markdown line break ("  \n"); a bare "\n" would run them into one paragraph
        st.markdown("  \n".join(f"{OPTION_LETTERS[i]}. {o}" for i, o in enumerate(question.options)))
        st.caption(f"MMLU `{question.qid}`; the right answer is shown after routing.")

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
number_format, format_differs = backends.format_caption([configs[n] for n in chosen], found_policy)
if number_format:
    (st.info if format_differs else st.caption)(number_format)
for name, why in off_reasons.items():
    if name not in configs:
        continue
    if name in chosen:
        st.caption(f"**{state.label_of(configs[name])}: switched on here** although {why[0].lower()}{why[1:]}; "
                   f"it runs with the preset's thresholds: {routing_text(name).removeprefix('switched on here: ')}.")
    else:
        st.caption(f"**{state.label_of(configs[name])}: off**. {why[0].upper()}{why[1:]}.")
with st.expander("Thresholds", expanded=False):
    st.dataframe([{"stage": state.label_of(configs[n]), "routing": routing_text(n)} for n in names],
                 hide_index=True, width="stretch")
    st.page_link("pages/2_Explore_thresholds.py", label="Change them in the threshold explorer", icon=":material/tune:")


# ---- one stage's card ---------------------------------------------------------------------------------
def draw_card(step: StageStep, policy: StagePolicy, label: str, recorded: bool, options: tuple[str, ...],
              load_s: float | None = None) -> None:
    if step.decision == "error":
        st.error(f"**{label} failed**: {step.error}")
        st.caption("A failing stage passes the question on to the next one.")
        return
    final = step.decision == "final"
    left, middle, right = st.columns([1, 1, 1.4])
    if recorded:
        left.info("Recorded outcome: no probabilities (it only knows right or wrong).")
    else:
        applies = thresholds_applied(policy, step.p_t, step.p_ik, step.margin, step.entropy)
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
            st.text(display_answer(step.answer) or "(an empty answer)")
        reason = step.reason
        if step.decision in ("keep", "escalate") and step.reason != "empty answer" and not recorded:
            reason = decision_reason(policy, step.p_t, step.p_ik, step.margin, step.entropy)
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
run = st.button("Route", type="primary", key="route_button", disabled=not chosen)
if not chosen:
    st.info("Choose at least one stage in the sidebar.")
# Everything a run shows goes into one of two slots, and a new run uses the slot the last one did not.
# Streamlit sends a container drawn where the previous run drew one as an update of that container:
# the old cards stay on screen, faded, until the new run ends, and the new cards replace them one by
# one (measured in Chromium: the previous answer and path stayed for the whole 8 s run). The slot
# left empty this run replaces the previous result at once instead.
SLOT_KEY = "_route_slot"
slots = (st.empty(), st.empty())


def no_probe_note(trace, recorded: dict[str, bool], labels: dict[str, str]) -> None:
    missing = [labels[s.stage] for s in trace.steps
               if s.decision != "error" and not recorded.get(s.stage) and math.isnan(s.p_ik)]
    if missing:
        st.info(f"No P(IK) for {', '.join(missing)}: no probe trained for "
                f"{'this model' if len(missing) == 1 else 'these models'} yet, so "
                f"{'it routes' if len(missing) == 1 else 'they route'} on P(T) alone.")


def run_question() -> None:
    problem = input_problem
    if problem is None:
        try:
            validate_question(question)
        except ValueError as err:
            problem = f"This question cannot be asked: {err}."
    recorded_chosen = [n for n in chosen if configs[n].backend == "recorded"]
    if problem is None and recorded_chosen and not question.qid:
        problem = (f"{state.label_of(configs[recorded_chosen[0]])} replays recorded MMLU outcomes only: pick an MMLU "
                   "question, or leave that stage out.")
    if problem is None:
        for name in chosen:
            ready, why = backends.fetched_status(configs[name])
            if not ready:
                problem = (f"{state.label_of(configs[name])} cannot run: {why}. Fetch it on the Settings page "
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
            st.error(f"{state.label_of(configs[name])} is not usable: {err}")
            return
    if not question.is_multiple_choice:  # free-form: the calibrated free-form policy, when there is one
        free_form, free_problem = data.applied(preset, FREE_FORM_DATASET)
        try:
            stages = apply_free_form(stages, free_form, preset)
        except ValueError as err:
            free_problem = str(err)
        if free_problem:
            st.warning(f"Free-form policy not used: {free_problem}")
        elif free_form.policy is not None:
            st.caption(f"Free-form question: {free_form.description} ({FREE_FORM_DATASET} records).")
    stages = [for_free_form(s) if not question.is_multiple_choice else s for s in stages]
    boxes: dict[str, object] = {}
    loads: dict[str, float] = {}
    streaming = {"slot": None, "text": ""}  # the free-form answer of the stage running, as it is generated

    def on_text(delta: str) -> None:
        streaming["text"] += delta
        if streaming["slot"] is not None:
            streaming["slot"].text(f"generating: {streaming['text']}")  # st.text: user-visible model output, never markup

    def on_event(event, stage, step):
        label = state.label_of(configs[stage.name])
        if event != "start" and streaming["slot"] is not None:
            streaming["slot"].empty()  # the card below shows the whole answer
            streaming["slot"], streaming["text"] = None, ""
        if event == "start":
            lazy = getattr(stage.backend, "loaded", True) is False
            if lazy:
                boxes[stage.name] = st.status(f"{label}: loading {configs[stage.name].model} (once per server)…",
                                              expanded=True)
                started = time.perf_counter()
                try:
                    stage.backend.get()
                except Exception:  # noqa: BLE001 - raised again inside the stage: its error row, as any failure
                    return
                took = time.perf_counter() - started
                if took < 0.05:  # already in memory (another session or the preload loaded it): nothing to say
                    boxes[stage.name].update(label=f"{label}: running…", expanded=True)
                else:
                    loads[stage.name] = took
                    boxes[stage.name].update(label=f"{label}: loaded {configs[stage.name].model} in {took:.1f} s; "
                                                   "running…", expanded=True)
            else:
                boxes[stage.name] = st.status(f"{label}: running…", expanded=True)
            if not question.is_multiple_choice:
                streaming["slot"], streaming["text"] = boxes[stage.name].empty(), ""
            return
        box = boxes[stage.name]
        with box:
            draw_card(step, stage.policy, label, stage.recorded, question.options, loads.get(stage.name))
        box.update(label=status_label(step, label), state="error" if event == "error" else "complete",
                   expanded=True)

    failure = None
    try:
        trace = run_cascade(stages, question, on_event=on_event, on_text=on_text)
    except CascadeError as err:
        trace, failure = err.trace, str(err)
    except ValueError as err:
        trace, failure = None, str(err)
    if trace is None:
        st.error(f"The cascade cannot run this question: {failure}")
        return
    st.session_state[LAST_KEY] = {
        "trace": trace, "failure": failure, "preset": preset.name, "loads": loads,
        "stages": [(n, state.label_of(configs[n])) for n in chosen],
        "policies": {s.name: s.policy for s in stages},
        "recorded": {s.name: s.recorded for s in stages},
    }
    draw_summary(st.session_state[LAST_KEY], drawn=True)


def draw_summary(last: dict, drawn: bool) -> None:
    trace = last["trace"]
    labels = dict(last["stages"])
    if not drawn:  # a later rerun: draw the stored trace again
        for step in trace.steps:
            with st.status(status_label(step, labels[step.stage]), state="error" if step.decision == "error" else "complete",
                           expanded=True):
                draw_card(step, last["policies"][step.stage], labels[step.stage], last["recorded"][step.stage],
                          trace.question.options, last.get("loads", {}).get(step.stage))
    no_probe_note(trace, last["recorded"], labels)
    if last["failure"]:
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
                (st.success if final.answer_index == q.answer else st.error)(f"{message} The right answer is **{right}**.")
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
    st.dataframe([{"stage": labels[s.stage], "decision": s.decision,
                   "tokens": charts.fmt_number(s.prompt_tokens + s.output_tokens),
                   "FLOPs": charts.fmt_number(s.flops), "dollars": f"${s.dollars:.3g}" if s.dollars else "–",
                   "seconds": f"{s.seconds:.2f}"} for s in trace.steps],
                 hide_index=True, width="stretch")


if run:
    st.session_state.pop(LAST_KEY, None)
    st.session_state[SLOT_KEY] = 1 - st.session_state.get(SLOT_KEY, 0)
    with slots[st.session_state[SLOT_KEY]].container():
        run_question()
else:
    last = st.session_state.get(LAST_KEY)
    if last and last["preset"] == preset.name:
        with slots[st.session_state.get(SLOT_KEY, 0)].container():
            draw_summary(last, drawn=False)
