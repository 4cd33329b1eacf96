"""Home page of the Streamlit app: what the tool does, the active preset's stages, the headline
result from the cached benchmark, and links to the other pages."""

from __future__ import annotations

import math

import streamlit as st

from app_ui import charts, data, models, state

st.set_page_config(page_title="Confidence-driven cascade", page_icon="🪜", layout="wide")

st.title("Confidence-driven model cascade")
st.markdown(
    "Every question goes to the **smallest model first**. It keeps its answer when it is confident "
    "enough (its probability for the answer, **P(T)**, and a probe on its hidden state, **P(IK)**, "
    "both pass the stage's thresholds) and escalates to the next larger model otherwise. "
    "You pay for the big model only on the questions the small ones cannot handle."
)

preset = state.preset_picker("home", container=st)
if preset is None:
    st.stop()
st.caption(preset.description)
if preset.needs_network:
    st.warning("This preset needs network access (the Hugging Face Hub or an API) and, for 4-bit stages, a GPU.")


def size_of(config) -> str:
    if config.backend == "packaged":
        from models.packaged import PACKAGED_MODELS

        spec = PACKAGED_MODELS.get(config.model)
        return f"{spec.total_params / 1e6:,.0f} M" if spec else "?"
    if config.backend == "recorded":
        return "46.7 B (8×7B MoE)" if "mixtral" in config.model.lower() else "not published"
    return "–"


rows = [{
    "stage": state.label_of(s), "backend": s.backend + (" (recorded outcomes)" if s.backend == "recorded" else ""),
    "model": s.model, "size": size_of(s), "quantisation": s.quantization, "device": s.device, "rule": s.rule,
    "τ_T": s.tau_t, "τ_IK": s.tau_ik, "status": models.fetched_status(s)[1],
} for s in preset.stages if s.enabled]
st.subheader("Stages, smallest first")
st.dataframe(rows, hide_index=True, width="stretch")
st.caption("The last stage always answers.")

st.subheader("Headline from the cached benchmark")
headline = data.headline(preset)
if headline is None:
    st.info(f"No benchmark records for this preset's stages yet (looked in `{data.results_dir() / data.DATASET}`). "
            "Run `make bench` or a small benchmark on the Benchmarks page.")
elif "error" in headline:
    st.warning(f"No headline: {headline['error']}")
else:
    cols = st.columns(4)
    cols[0].metric("Test questions", f"{headline['questions']:,}")
    cols[1].metric("Cascade accuracy", f"{headline['accuracy']:.1%}",
                   f"{headline['pd']:+.1%} vs {headline['reference']}")
    reduction = headline["reduction"]
    cols[2].metric("Compute reduction (FLOPs)", "–" if math.isnan(reduction) else f"{reduction:.1%}")
    cols[3].metric("Mean FLOPs / question", charts.fmt_number(headline["mean_flops"]))
    st.caption(f"Thresholds chosen on the calibration split for at most 1 accuracy point below "
               f"{headline['reference']} alone, reported on the test split; cascade used: {headline['stages']}. "
               + (f"No records yet for {', '.join(headline['missing'])}." if headline["missing"] else ""))

st.subheader("Pages")
cols = st.columns(4)
cols[0].page_link("pages/1_Route_a_question.py", label="Route a question", icon="🔀")
cols[0].caption("Run the cascade live and see each stage's P(T), P(IK) and decision.")
cols[1].page_link("pages/2_Explore_thresholds.py", label="Explore thresholds", icon="🎚️")
cols[1].caption("Drag thresholds; accuracy against cost on the Pareto frontier.")
cols[2].page_link("pages/3_Benchmarks.py", label="Benchmarks", icon="📊")
cols[2].caption("Per model and subject accuracy, calibration of the signals, run a benchmark.")
cols[3].page_link("pages/4_Settings.py", label="Settings and models", icon="⚙️")
cols[3].caption("Stage status, fetch models, add a stage.")
