"""Home page of the Streamlit app: what the tool does and the active preset's stages."""

from __future__ import annotations

import streamlit as st

from cascade_core.presets import PresetError, list_presets, load_preset

st.set_page_config(page_title="Confidence-driven cascade", page_icon="🪜", layout="wide")

st.title("Confidence-driven model cascade")
st.markdown(
    "Every question goes to the **smallest model first**. It keeps its answer when it is confident "
    "enough (its probability for the answer, **P(T)**, and a probe on its hidden state, **P(IK)**, "
    "both pass the stage's thresholds) and escalates to the next larger model otherwise. "
    "You pay for the big model only on the questions the small ones cannot handle."
)

names = list_presets()
default_index = names.index("default") if "default" in names else 0
preset_name = st.selectbox("Preset", names, index=default_index, key="preset")
try:
    preset = load_preset(preset_name)
except PresetError as err:
    st.error(str(err))
    st.stop()

st.caption(preset.description)
if preset.needs_network:
    st.warning("This preset needs network access (the Hugging Face Hub or an API) and, for 4-bit stages, a GPU.")

rows = [
    {
        "stage": s.display_name,
        "backend": s.backend + (" (recorded outcomes)" if s.backend == "recorded" else ""),
        "model": s.model,
        "quantisation": s.quantization,
        "device": s.device,
        "rule": s.rule,
        "τ_T": s.tau_t,
        "τ_IK": s.tau_ik,
        "enabled": s.enabled,
    }
    for s in preset.stages
]
st.subheader("Stages, smallest first")
st.dataframe(rows, hide_index=True, width="stretch")
st.caption("The last enabled stage always answers.")
