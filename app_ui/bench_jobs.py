"""The Benchmarks page's sections for a dataset other than MMLU: its background benchmark (start,
progress with ETA, Stop) and its calibration (target, delta, label-free or labelled).

The job itself is `cascade_core.compose.background` (a child process and a status file beside
the records), so its progress is read from that file on every run: a rerun, a reload or another
browser shows the same job. While it runs, the progress panel is a fragment that reruns itself
every `REFRESH_S` seconds; when the job ends it reruns the whole page, whose tables then include
the new records. The calibration is `compose.policies.calibrate`, the same as the CLI's.
"""

from __future__ import annotations

import time

import streamlit as st

from app_ui import backends, view_model
from app_ui.data import where
from cascade_core.presets import Preset

REFRESH_S = 2.0
STATE_WORDS = {"starting": "starting", "loading": "loading a model", "running": "running",
               "probes": "training the P(IK) probes", "done": "done", "failed": "failed", "stopped": "stopped",
               "died": "ended unexpectedly"}
DEFAULT_MAX_NEW_TOKENS = 16


def report_path(dataset: str):
    """The report `python -m cascade_core report --dataset NAME` wrote for a dataset other than
    MMLU, when there is one: docs/RESULTS-<name>.md for a shipped set (on the repository's own
    records), else REPORT.md beside the records."""
    from cascade_core.locations import RESULTS_DOC
    from cascade_core.records.registry import BUILTIN

    if dataset in BUILTIN:
        path = RESULTS_DOC.with_name(f"RESULTS-{dataset}.md") if where().is_default_results else None
    else:
        path = where().results / dataset / "REPORT.md"
    return path if path is not None and path.is_file() else None


def duration(seconds: float | None) -> str:
    """'45 s', '3 min 20 s', '2 h 05 min'; '–' when unknown."""
    if seconds is None:
        return "–"
    s = int(round(max(seconds, 0)))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def _read(dataset: str):
    from cascade_core.compose import background

    try:
        return background.read_status(where(), dataset), None
    except ValueError as err:
        return None, str(err)


def show_job(status) -> None:
    """The job's state, an overall progress bar with the current stage and its ETA, one row per
    stage, the error and the log's last lines."""
    current = status.current
    words = STATE_WORDS.get(status.state, status.state)
    if current is not None and current.state == "running" and current.total:
        text = (f"{current.name}: {current.done:,} / {current.total:,} questions"
                + (f", {current.rate:.2f} questions/s, about {duration(current.eta_s)} left for this stage"
                   if current.rate else ", measuring the rate…"))
    elif current is not None:
        text = f"{current.name}: loading the model…"
    else:
        text = f"{words}: {status.done:,} / {status.total:,} questions"
    st.progress(min(status.fraction, 1.0), text=text)
    updated = (f", updated {duration(time.time() - status.updated_at)} ago"
               if status.active and status.updated_at else "")
    st.caption(f"Job on **{status.dataset}**: {words}, {duration(status.elapsed_s)} "
               f"{'so far' if status.active else 'in all'}{updated}. Stages: "
               f"{', '.join(status.request.get('stages', [])) or '–'}; records go to "
               f"`{where().results / status.dataset}`.")
    st.dataframe([{"stage": s.name, "state": s.state, "questions": f"{s.done:,} / {s.total:,}",
                   "questions / s (this run)": f"{s.rate:.2f}" if s.rate else "–",
                   "ETA": duration(s.eta_s) if s.state == "running" else "–", "result": s.message}
                  for s in status.stages], hide_index=True)
    if status.state == "done":
        st.success(f"The benchmark of {status.dataset} is done: {', '.join(s.message for s in status.stages)}.")
    elif status.state == "stopped":
        st.warning("Stopped. The records so far are kept; starting again resumes from them.")
    elif status.error:
        st.error(f"The job {words}: {status.error}")
    for line in status.probes:
        st.caption(f"Probes: {line}")
    if status.log_tail:
        with st.expander("The job's log (last lines)", expanded=status.state in ("failed", "died")):
            st.code(status.log_tail, language=None)


def running_elsewhere(dataset: str) -> None:
    """Say which datasets other than the picked one have a job running, with a button to watch it
    (after a reload the session starts on MMLU again; the job did not stop)."""
    from cascade_core.compose import background
    from app_ui import datasets

    for job in background.running_jobs(where()):
        if job.dataset == dataset:
            continue
        left, right = st.columns([4, 1], vertical_alignment="center")
        left.info(f"A benchmark job runs on **{job.dataset}** ({STATE_WORDS.get(job.state, job.state)}, "
                  f"{job.done:,} / {job.total:,} questions).")
        if right.button(f"Watch {job.dataset}", key=f"watch_job::{job.dataset}"):
            datasets.choose(job.dataset)
            st.rerun()


def job_section(preset: Preset, dataset: str, meta: dict) -> None:
    """Start the benchmark of the preset's local stages on `dataset` in the background, or watch it."""
    from cascade_core.compose import background

    st.subheader(f"Benchmark {dataset} in the background")
    status, problem = _read(dataset)
    if problem:
        st.error(problem)
    was_active = status is not None and status.active

    def panel() -> None:
        now, trouble = _read(dataset)
        if trouble:
            st.error(trouble)
            return
        if now is None:
            return
        show_job(now)
        if now.active:
            if st.button("Stop the job", key="job_stop"):
                with st.spinner("Stopping (the batch in flight ends first)…"):
                    background.stop(where(), dataset)
                st.rerun()
        elif was_active:
            st.rerun()  # the job just ended: redraw the page, whose tables now include its records

    st.fragment(run_every=REFRESH_S if was_active else None)(panel)()
    if was_active:
        st.caption("The job runs on in the background: reload the page or close it, and come back to it here.")
        return

    runnable = [c for c in preset.stages + preset.extra_stages if c.backend != "recorded"]
    if not runnable:
        st.info("This preset has no stage that can be benchmarked here (recorded stages are built in).")
        return
    free = meta.get("kind") == "free"
    with st.form("job_form"):
        stages = st.multiselect("Stages", [c.name for c in runnable], key="job_stages",
                                default=[c.name for c in preset.stages if c.enabled and c.backend != "recorded"],
                                format_func=lambda n: view_model.label_of(next(c for c in runnable if c.name == n)))
        cols = st.columns(2)
        per_group = cols[0].number_input("Questions per group (0 = all)", 0, 1_000_000, 0, key="job_per_group",
                                         help="The first of each group in the split's seeded order, half "
                                              "calibration and half test; a larger number later extends the run.")
        max_new = cols[1].number_input("Longest answer (new tokens)", 1, 512, DEFAULT_MAX_NEW_TOKENS,
                                       key="job_max_new_tokens", disabled=not free,
                                       help="Free-form questions only: generation stops there.")
        probes = st.checkbox("Then train the P(IK) probes (needs answers)", value=bool(meta.get("has_answers")),
                             key="job_probes", disabled=not meta.get("has_answers"))
        go = st.form_submit_button("Start the benchmark in the background", type="primary")
    if not go:
        return
    configs = {c.name: c for c in runnable}
    missing = [(n, why) for n in stages for ready, why in [backends.fetched_status(configs[n])] if not ready]
    if not stages:
        st.error("Choose at least one stage.")
    elif missing:
        st.error("Not started: " + "; ".join(f"{n}: {why}" for n, why in missing)
                 + ". Fetch the models on the Settings page (or `make fetch`).")
    else:
        try:
            background.start(where(), dataset, preset, stages=stages, per_subject=int(per_group) or None,
                             max_new_tokens=int(max_new) if free else None, probes=probes)
        except (background.JobRefused, ValueError, OSError) as err:
            st.error(f"Not started: {err}")
        else:
            st.rerun()


def calibrate_section(preset: Preset, dataset: str, meta: dict, job_active: bool) -> None:
    """Choose the dataset's policy with a guarantee (`calibrate`) and say what it is."""
    from cascade_core.compose.policies import calibrate, calibration_stages, stage_summary
    from cascade_core.choose.ltt import GUARANTEE_RULES

    st.subheader(f"Calibrate {dataset}")
    has_answers = bool(meta.get("has_answers"))
    free = meta.get("kind") == "free"
    st.caption("Chooses every stage's on/off and thresholds on the calibration split with a Learn-then-Test "
               "guarantee: with probability at least 1 − delta, at most the target lost against the last stage "
               f"({calibration_stages(preset)[-1]}). Label-free bounds the disagreement with the last stage's "
               "answers, so it holds for any labels." + ("" if has_answers else
                                                        " This dataset has no answers: label-free only."))
    rules = ["auto", *GUARANTEE_RULES]
    with st.form("calibrate_form"):
        cols = st.columns(3)
        target = cols[0].number_input("Target (accuracy points lost, at most)", 0.0, 100.0, 1.0, step=0.5,
                                      key="cal_target")
        delta = cols[1].number_input("Risk delta", 0.01, 0.5, 0.1, step=0.01, key="cal_delta")
        rule = cols[2].selectbox("Keep rule", rules, index=rules.index("pt_only" if free else "auto"), key="cal_rule",
                                 help="auto: chosen by cross-validation inside calibration. Free-form answers "
                                      "route live on P(T) unless the stage has a free-form probe.")
        label_free = st.checkbox("Label-free (against the last stage's answers)", value=not has_answers,
                                 disabled=not has_answers, key="cal_label_free")
        go = st.form_submit_button("Calibrate", disabled=job_active)
    if job_active:
        st.caption("Calibration waits for the benchmark job to end.")
    if not go:
        return
    try:
        with st.spinner("Calibrating (Learn-then-Test on the calibration split)…"):
            path, found = calibrate(preset, where(), dataset, target_pt=float(target), delta=float(delta), rule=rule,
                                    label_free=bool(label_free) or not has_answers)
    except (ValueError, OSError, KeyError) as err:
        st.error(f"Not calibrated: {err}")
        return
    figures = found.calibration
    policy = found.cascade_policy()
    lines = [f"- **{name}**: {stage_summary(stage, i == policy.last_enabled, found.off_reasons.get(name, ''))}"
             for i, (name, stage) in enumerate(zip(found.stages, policy.stages))]
    agreement = (f"agreement with the last stage {figures['agreement']:.1%}, "
                 if figures.get("agreement") is not None else "")
    accuracy = (f"accuracy {figures['accuracy']:.1%} (last stage alone {figures['reference_accuracy']:.1%}), "
                if figures.get("accuracy") is not None else "")
    st.success(f"{found.description} → `{path}`\n\n" + "\n".join(lines) + f"\n\nOn calibration: {agreement}{accuracy}"
               f"{figures['unit']} saved {figures['cost_reduction']:.1%}.")
    from app_ui.datasets import PARAM

    st.page_link("pages/2_Explore_thresholds.py", label=f"Explore {dataset} from this policy",
                 icon=":material/tune:", query_params={PARAM: dataset})
