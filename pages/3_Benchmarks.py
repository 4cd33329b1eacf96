"""Benchmarks: how each model did on the chosen dataset's records (per model, per group), how well
its P(T) and P(IK) predict a right answer; your own question file (upload, check, register), its
benchmark in the background and its calibration; and a way to run or extend an MMLU benchmark."""

from __future__ import annotations

import time

import streamlit as st

from app_ui import backends, bench_jobs, charts, data, datasets, state, view_model
from cascade_core import formatting
from cascade_core.locations import REPO_ROOT
from app_ui.view_model import per_subject_accuracy, reliability, stage_summary


PAGE = "bench"
NO_RECORDED = "(none)"
RECENT_WRITE_S = 120


def pct(x: float, digits: int = 1) -> str:
    return formatting.pct(x, digits)


def num(x: float, digits: int = 3) -> str:
    return formatting.num(x, f".{digits}f")


st.title("Benchmarks")
preset = state.preset_picker(PAGE)
if preset is None:
    st.stop()
dataset = datasets.dataset_picker(PAGE)
bench_jobs.running_elsewhere(dataset)
configs = {s.name: s for s in preset.stages + preset.extra_stages}
meta: dict = {}
if dataset != "mmlu":
    from cascade_core.records.registry import read_metadata

    try:
        meta = read_metadata(dataset, data.where().results)
    except ValueError as err:  # a built-in set not registered in this results folder yet
        meta = {"problem": str(err)}

split = st.sidebar.selectbox("Split", list(data.SPLIT_CHOICES), key=f"split@{PAGE}")
recorded_options = data.recorded_choices(preset) if dataset == "mmlu" else {}  # recorded outcomes are MMLU's
configs.update(recorded_options)
recorded = None
if recorded_options:
    end = st.sidebar.selectbox("Compare with a recorded model", [NO_RECORDED, *recorded_options],
                               key=f"end::{preset.name}@{PAGE}",
                               format_func=lambda n: n if n == NO_RECORDED
                               else view_model.label_of(recorded_options[n]))
    recorded = None if end == NO_RECORDED else recorded_options[end]


def label(name: str) -> str:
    return view_model.label_of(configs[name]) if name in configs else name


loaded = data.load_table(preset, split, recorded, dataset=dataset)
if loaded.error:
    st.error(f"The benchmark records cannot be read: {loaded.error}")
elif loaded.table is None:
    st.info(f"No benchmark records yet for the stages of preset **{preset.name}** in "
            f"`{data.results_dir() / dataset}`. "
            + ("Run `make bench`, or run a small one below." if dataset == "mmlu" else "Benchmark it below."))
else:
    table = loaded.table
    if loaded.missing:
        st.warning(f"No records yet for {', '.join(map(label, loaded.missing))}.")
    st.caption(f"{table.n_questions:,} {'MMLU' if dataset == 'mmlu' else dataset} questions ({split} split) that "
               "every stage shown has answered.")
    st.page_link("pages/2_Explore_thresholds.py", label=f"Explore the thresholds on {dataset}", icon=":material/tune:",
                 query_params={datasets.PARAM: dataset})

    st.subheader("Per model")
    summary = stage_summary(table)
    # Two narrower tables rather than one of 13 columns, which was cut off on the right.
    st.dataframe([{
        "stage": label(r.stage), "questions": r.questions,
        "accuracy": pct(r.accuracy), "95% CI": f"{pct(r.ci_low)} – {pct(r.ci_high)}",
        "AUROC P(T)": num(r.auroc_p_t), "AUROC P(IK)": num(r.auroc_p_ik),
        "ECE P(T)": num(r.ece_p_t), "ECE P(IK)": num(r.ece_p_ik),
    } for r in summary.itertuples()], hide_index=True, width="stretch")
    st.dataframe([{
        "stage": label(r.stage), "model": r.model,
        "tokens / question": charts.fmt_number(r.mean_tokens), "FLOPs / question": charts.fmt_number(r.mean_flops),
        "$ / question": f"${r.mean_dollars:.3g}" if r.mean_dollars else "–",
        "seconds / question": f"{r.mean_seconds:.3f}",
    } for r in summary.itertuples()], hide_index=True, width="stretch")
    st.caption("AUROC: how well the signal ranks right answers above wrong ones (0.5 = no signal). ECE: how far "
               "its values are from the accuracy they predict. P(IK) appears once a probe is trained "
               "(`python -m cascade_core probes train`); recorded models have no probabilities.")

    st.subheader("Reliability of the confidence signals")
    tabs = st.tabs(["P(T)", "P(IK)"])
    for tab, (signal, signal_label) in zip(tabs, (("p_t", "P(T)"), ("p_ik", "P(IK)"))):
        with tab:
            curves = reliability(table, signal)
            if curves:
                st.plotly_chart(charts.reliability_figure(curves, signal_label), key=f"reliability_{signal}")
            else:
                st.info(f"No stage has {signal_label} on these records yet.")

    st.subheader("Per subject" if dataset == "mmlu" else "Per group")
    subjects = per_subject_accuracy(table)
    st.plotly_chart(charts.subject_heatmap(subjects, list(table.names)), key="subject_heatmap")
    with st.expander("Per-subject table" if dataset == "mmlu" else "Per-group table"):
        st.dataframe(subjects.style.format({n: "{:.1%}" for n in table.names}), width="stretch")

# ---- the report -------------------------------------------------------------------------------------
st.subheader("The report")
report_path = data.report_path() if dataset == "mmlu" else bench_jobs.report_path(dataset)
if report_path is None and dataset != "mmlu":
    st.info(f"No report for {dataset} yet: `python -m cascade_core report --dataset {dataset}` writes one (accuracy, "
            "P(T) and P(IK) per model, the guarantees and what they save).")
elif report_path is None:
    st.info("No report for these records yet: `python -m cascade_core report` writes docs/RESULTS.md (the paper's "
            "experiment: cascades, the API scenario, ablations, baselines; it takes minutes, so it is not run here).")
else:
    text = report_path.read_text(encoding="utf-8")
    sections = {part.split("\n", 1)[0].strip(): part for part in text.split("\n## ")[1:]}
    shown_path = report_path.relative_to(REPO_ROOT) if report_path.is_relative_to(REPO_ROOT) else report_path
    st.caption(f"From `{shown_path}`, written "
               f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(report_path.stat().st_mtime))} by "
               f"`python -m cascade_core report{'' if dataset == 'mmlu' else ' --dataset ' + dataset}`.")
    # The guaranteed headline first, the same sentence as Home and the README (ui_data.guarantee_headline).
    from app_ui.view_model import guarantee_headline, headline_sentence

    guaranteed = guarantee_headline(text)
    if guaranteed is not None:
        st.success(headline_sentence(guaranteed), icon=":material/verified:")
    for title in ("The guarantee: savings that hold on fresh questions", "Summary", "1. Each model alone"):
        if title in sections:
            st.markdown("#### " + sections[title])
    with st.expander("The whole report"):
        st.markdown(text)

# ---- your own questions: upload, check, register ------------------------------------------------------
st.subheader("Your own questions")
upload = st.file_uploader("A question file: .jsonl, .csv or .parquet (columns: question; options, or A, B, …; "
                          "answer, optional; group and id, optional)", type=["jsonl", "csv", "parquet"],
                          key="bench_upload")
if upload is not None:
    from cascade_core.records.registry import resolve_dataset, store_upload

    try:
        stored, checked = store_upload(upload.name, upload.getvalue(), data.where().results)
    except ValueError as err:
        st.error(f"Not taken: {err}")
    else:
        kind = "multiple choice" if checked.kind == "mc" else "free-form"
        st.success(f"{len(checked.table):,} {kind} questions in {checked.table['subject'].nunique()} group(s), "
                   f"{'with' if checked.has_answers else 'without'} answers; kept as `{stored}`.")
        st.dataframe(checked.table.head(20)[["qid", "subject", "question", "options", "references"]],
                     hide_index=True)
        found = datasets.registered_as(stored)
        if found is None and st.button("Register it as a dataset (its seeded calibration / test split)",
                                       key="bench_register"):
            try:
                name = resolve_dataset(str(stored), data.where().results).name
            except ValueError as err:
                st.error(f"Not registered: {err}")
            else:
                datasets.choose(name)  # the sidebar's dataset from the next run on
                st.rerun()
        if found is not None:
            free_form = "" if found["kind"] == "mc" else " --max-new-tokens 16"
            rule = "" if found["kind"] == "mc" else " --rule pt_only"  # live free-form answers route on P(T)
            label_free = "" if found["has_answers"] else " --label-free"
            picked = ("It is the dataset picked in the sidebar: benchmark and calibrate it below, or from a shell"
                      if dataset == found["name"] else f"Pick `{found['name']}` in the sidebar to benchmark it here, "
                                                       "or from a shell")
            st.success(f"Registered as `{found['name']}`: {found['questions']:,} questions, graded "
                       f"`{found['grader']['name']}`. {picked}:")
            st.code(f"python -m cascade_core bench --dataset {found['name']}{free_form}\n"
                    f"python -m cascade_core probes train --dataset {found['name']}\n"
                    f"python -m cascade_core calibrate --dataset {found['name']}{label_free}{rule}\n"
                    f"python -m cascade_core report --dataset {found['name']}", language="bash")

# ---- a dataset of files: its benchmark in the background, its calibration --------------------------------
if dataset != "mmlu":
    if "problem" in meta:
        st.info(f"{dataset} is not registered in `{data.where().results}` yet: {meta['problem']}")
        st.stop()
    from cascade_core.compose import background

    try:
        job = background.read_status(data.where(), dataset)
    except ValueError:
        job = None
    bench_jobs.job_section(preset, dataset, meta)
    bench_jobs.calibrate_section(preset, dataset, meta, job_active=job is not None and job.active)
    st.stop()

# ---- run or extend an MMLU benchmark ------------------------------------------------------------------
st.subheader("Run or extend a benchmark")
runnable = [c for c in preset.stages + preset.extra_stages if c.backend != "recorded"]
if not runnable:
    st.info("This preset has no stage that can be benchmarked here (recorded stages are built in).")
    st.stop()
with st.form("bench_form"):
    cols = st.columns([2, 1, 1])
    stage_name = cols[0].selectbox("Stage", [c.name for c in runnable], key="bench_stage", format_func=label)
    per_subject = cols[1].number_input("Questions per subject", 0, 400, 0, step=2, key="bench_per_subject",
                                       help="Half calibration, half test; 0 runs nothing. Questions already in the "
                                            "records are skipped, so a larger number extends a run.")
    from cascade_core.records.mmlu import MMLU_SUBJECTS

    subjects_chosen = st.multiselect("Subjects (none = all 57)", list(MMLU_SUBJECTS), key="bench_subjects")
    anyway = st.checkbox("Run even if another run is writing this stage's records", key="bench_anyway")
    go = st.form_submit_button("Run benchmark", type="primary")

config = configs[stage_name]
path = data.where().record_path(stage_name)
recent = path.exists() and time.time() - path.stat().st_mtime < RECENT_WRITE_S
if recent:
    st.warning(f"`{path}` was written in the last {RECENT_WRITE_S} s: another benchmark may be running on "
               f"{label(stage_name)}. Two runs writing one file lose records; wait for it or tick the box.")
if go:
    ready, why = backends.fetched_status(config)
    if per_subject <= 0:
        st.info("Choose how many questions per subject to run (0 runs nothing).")
    elif recent and not anyway:
        st.error("Not started: another run seems to be writing these records.")
    elif not ready:
        st.error(f"{label(stage_name)} cannot run: {why}. Fetch it on the Settings page (or `make fetch`).")
    else:
        try:
            with st.spinner(f"Loading {label(stage_name)}…"):
                backends.get_backend(config)
            bar = st.progress(0.0, text="starting…")
            started = time.perf_counter()

            def progress(done: int, total: int) -> None:
                bar.progress(done / max(total, 1), text=f"{label(stage_name)}: {done:,} / {total:,} questions")

            records = backends.run_benchmark(config, int(per_subject), subjects_chosen, progress)
        except Exception as err:  # noqa: BLE001 - a failed run is a message, never a traceback
            st.error(f"The benchmark stopped: {type(err).__name__}: {err}")
        else:
            st.success(f"{label(stage_name)}: {len(records):,} records (accuracy {records['correct'].mean():.1%}) in "
                       f"{time.perf_counter() - started:.1f} s → `{path}`. The tables above include them on the next "
                       f"rerun.")
            st.button("Refresh the tables", key="bench_refresh")
