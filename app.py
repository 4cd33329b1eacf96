"""The Streamlit app: `streamlit run app.py`. This file is the Home page and the navigation; the
other pages are files under pages/ (each a short script over cascade_core and app_ui).

`st.navigation` below owns the pages, so a deep link (a shared explorer URL) runs this file
first; that holds with Streamlit's default file watcher (see .streamlit/config.toml).

Streamlit uses this file twice. `streamlit run app.py` finds `app` (an `st.App`) and imports the file
once at start-up, outside any session, to serve it; that import only switches off the legacy `pages/`
navigation (see SERVING). Each browser session then runs the file as a script.
"""

from __future__ import annotations

import streamlit as st
from streamlit.runtime.scriptrunner import get_script_run_ctx

SERVING = get_script_run_ctx(suppress_warning=True) is None  # imported to be served, not run as a session's script
if SERVING:
    # With a pages/ folder next to the main script, Streamlit (1.67) runs the first script run of the
    # process through its legacy pages/ navigation (runtime/scriptrunner/script_runner.py, _mpa_v1, while
    # PagesManager.uses_pages_directory is true; only st.navigation clears it, and only once it runs).
    # That navigation names the pages after their files ("Explore_thresholds"), so a deep link such as
    # /explore?... as the first request matched none of them: it sent PageNotFound
    # (commands/navigation.py, _navigation) and the browser showed "Page not found" over the page that
    # this file's st.navigation then rendered. Clearing the flag before any session starts does what
    # st.navigation would do: the pages are PAGES below, never the folder's file list.
    from streamlit.runtime.pages_manager import PagesManager

    PagesManager.uses_pages_directory = False
    app = st.App(__file__)  # the same Starlette server `streamlit run` starts for a plain script
else:
    import threading

    import pandas as pd

    from app_ui import backends, charts, data, datasets, state, view_model
    from cascade_core import formatting
    from app_ui.view_model import headline_sentence

PAGES_DIR = "pages"


def size_of(config) -> str:
    """Parameters of a stage's model as far as they are known without loading it."""
    if config.backend == "packaged":
        spec = backends.packaged_models().get(config.model)
        return f"{spec.total_params / 1e6:,.0f} M" if spec else "?"
    if config.backend == "recorded":
        total = backends.recorded_total_params(config.model)
        return f"{total / 1e9:,.1f} B" if total else "not published"
    return "–"


def policy_text(config, policy, is_last: bool, off_reason: str) -> str:
    """A stage's routing in words: the calibrated policy's where there is one, else the preset's."""
    from cascade_core.compose.policies import stage_summary

    return stage_summary(policy if policy is not None else backends.preset_policy(config), is_last, off_reason)


def home() -> None:
    """What the tool does, the active preset's stages, the headline result, links to the pages."""
    st.title("Confidence-driven model cascade")
    st.markdown(
        "Every question goes to the **smallest model first**. It keeps its answer when it is confident "
        "enough (its probability for the answer, **P(T)**, and a probe on its hidden state, **P(IK)**, "
        "both pass the stage's thresholds) and escalates to the next larger model otherwise. "
        "You pay for the big model only on the questions the small ones cannot handle."
    )
    preset = state.preset_picker("home")
    datasets.dataset_picker("home")
    if preset is None:
        st.stop()
    st.caption(f"Preset **{preset.name}**: {preset.description}")
    if preset.needs_network:
        st.warning("This preset needs network access (the Hugging Face Hub or an API) and, for 4-bit stages, a GPU.")

    st.subheader("Stages, smallest first")
    found, _ = data.applied(preset)
    enabled = [s for s in preset.stages if s.enabled]
    policies = dict(zip([s.name for s in enabled], found.policy.stages)) if found.policy is not None else {}
    # st.table, not st.dataframe: it wraps long cells ("routing" and "status" were cut at 1400 px)
    st.table(pd.DataFrame([{
        "stage": view_model.label_of(s), "backend": s.backend, "model": s.model, "size": size_of(s),
        "runs as": backends.runs_as(s), "routing": policy_text(s, policies.get(s.name), i == len(enabled) - 1,
                                                               found.off_reasons.get(s.name, "")),
        "status": backends.fetched_status(s)[1],
    } for i, s in enumerate(enabled)]).set_index("stage"))
    st.caption(f"{found.description.capitalize()}. The last stage always answers. Recorded stages replay real "
               "per-question outcomes (MMLU only).")
    number_format, differs = backends.format_caption(enabled, found)
    if number_format:
        (st.info if differs else st.caption)(number_format)

    st.subheader("Headline from the cached benchmark")
    guaranteed = data.guarantee_headline()
    if guaranteed is not None:
        st.success(headline_sentence(guaranteed), icon=":material/verified:")
        st.caption("From the report (docs/RESULTS.md, `python -m cascade_core report`): the Benchmarks page and the "
                   "README quote the same row. The figures below are this preset's own policy on the test split.")
    headline = data.headline(preset)
    if headline is None:
        st.info(f"No benchmark records for this preset's stages yet (looked in `{data.results_dir() / data.DATASET}`). "
                "Run `make bench`, or a small benchmark on the Benchmarks page.")
    elif "error" in headline:
        st.warning(f"No headline yet: {headline['error']}")
    else:
        if headline.get("problem"):
            st.warning(headline["problem"].capitalize())
        cols = st.columns(4)
        cols[0].metric("Test questions", f"{headline['questions']:,}")
        flat = abs(headline["pd"]) < 0.0005  # "+0.0%" with a green arrow read as a gain
        cols[1].metric("Cascade accuracy", f"{headline['accuracy']:.1%}",
                       f"{0.0 if flat else headline['pd']:+.1%} vs {headline['reference']}",
                       delta_color="off" if flat else "normal")
        reduction = headline["reduction"]
        unit = headline.get("unit", "flops")
        if unit == "flops":
            cols[2].metric("Compute reduction (FLOPs)", formatting.pct(reduction))
        elif unit == "calls":
            cols[2].metric(f"{headline['last_stage']} calls saved", formatting.pct(headline["unit_reduction"]),
                           help="The share of questions the last stage never sees, as the report counts it")
        else:
            cols[2].metric(f"Saved ({unit})", formatting.pct(headline["unit_reduction"]))
        cols[3].metric("Mean FLOPs / question", charts.fmt_number(headline["mean_flops"]))
        missing = f" No records yet for {', '.join(headline['missing'])}." if headline["missing"] else ""
        if headline["source"] == "calibrated":
            st.caption(f"The preset's calibrated policy ({headline['description'].removeprefix('thresholds: ')}), "
                       f"reported on the test split. Cascade used: **{headline['stages']}**.{missing}")
        else:
            st.caption(f"No calibrated policy file for this preset: thresholds chosen here on the calibration split "
                       f"for at most 1 accuracy point below {headline['reference']} alone, reported on the test "
                       f"split. Cascade used: {headline['stages']}.{missing}")
        if headline["off"]:
            names = ", ".join(headline["off"])
            why = " ".join(f"{r[0].upper()}{r[1:]}." for r in dict.fromkeys(headline["off"].values()))
            what = ("FLOPs" if unit == "flops" else f"{headline['last_stage']} calls" if unit == "calls" else unit)
            st.info(f"Calibration switched off {names}, so the cascade is **{headline['stages']}** and saves "
                    f"{formatting.pct(headline['unit_reduction'] if unit != 'flops' else reduction)} of the "
                    f"{what}. {why}")
            if unit == "flops" and len(headline["stages"].split(" → ")) == 1:
                st.page_link("pages/1_Route_a_question.py", icon=":material/alt_route:",
                             label="See a keep and an escalation: the Route page opens on a looser promise")

    st.subheader("Pages")
    cols = st.columns(4)
    for col, (page, text) in zip(cols, PAGE_TEXT.items()):
        col.page_link(page, query_params=datasets.link_params())  # the dataset picked travels with the link
        col.caption(text)


def preload() -> None:
    """Start loading the session's preset's models in the background (the Settings page's switch;
    on by default for the packaged CPU preset), so the first question finds them loaded; with it
    off, import their code only, so a first load costs just the weights."""
    from cascade_core.presets import PresetError, load_preset

    try:
        preset = state.with_added_stages(load_preset(state.preset_name()))
    except PresetError:
        return
    if state.preload_enabled(preset):
        # The stages the session's thresholds use: a stage calibration switched off loads only if
        # the user routes through it (with the shipped default policy that is 1.5B alone: one load
        # of ~20-30 s here instead of three).
        policies, _, _ = state.stage_thresholds(preset, data.applied(preset)[0])
        used = {s.name for s in preset.stages if s.name not in policies or policies[s.name].enabled}
        if st.session_state.get("_preload_started") == preset.name:
            return
        st.session_state["_preload_started"] = preset.name

        def with_the_route_opening() -> None:
            """The Route page opens on a looser promise than the shipped one (`data.route_targets`), whose
            first stage (SmolLM2 for the default preset) must be loaded too; finding it may calibrate
            (a second or two, cached), so it runs here, off the page's thread."""
            try:
                offered = data.route_targets(preset)
                found = data.policy_at_target(preset, offered[1])[0] if offered else None
                if found is not None:
                    enabled = [s.name for s in preset.stages if s.enabled]
                    used.update(n for n, p in zip(enabled, found.policy.stages) if p.enabled)
            except Exception:  # noqa: BLE001 - only a head start: the shipped policy's stages still load
                pass
            backends.start_preload([s for s in preset.stages if s.name in used])

        threading.Thread(target=with_the_route_opening, name="cascade-preload-plan", daemon=True).start()
    else:
        backends.start_warm_up(preset.stages)


if not SERVING:
    PAGES = [
        st.Page(home, title="Home", icon=":material/home:", default=True),
        st.Page(f"{PAGES_DIR}/1_Route_a_question.py", title="Route a question", icon=":material/alt_route:",
                url_path="route"),
        st.Page(f"{PAGES_DIR}/2_Explore_thresholds.py", title="Explore thresholds", icon=":material/tune:",
                url_path="explore"),
        st.Page(f"{PAGES_DIR}/3_Benchmarks.py", title="Benchmarks", icon=":material/bar_chart:", url_path="benchmarks"),
        st.Page(f"{PAGES_DIR}/4_Settings.py", title="Settings and models", icon=":material/settings:",
                url_path="settings"),
        st.Page(f"{PAGES_DIR}/5_Monitor.py", title="Monitor", icon=":material/monitor_heart:", url_path="monitor"),
    ]
    PAGE_TEXT = {
        PAGES[1]: "Run the cascade live; see each stage's P(T), P(IK) and decision.",
        PAGES[2]: "Drag thresholds; accuracy against cost on the Pareto frontier.",
        PAGES[3]: "Accuracy per model and subject, calibration of the signals, run a benchmark.",
        PAGES[4]: "Stage status, fetch models, add a stage.",
    }
    st.set_page_config(page_title="Confidence-driven cascade", page_icon="🪜", layout="wide")
    preload()
    st.navigation(PAGES).run()
