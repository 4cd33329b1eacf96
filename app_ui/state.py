"""State the pages share in one browser session: the preset, stages added on the Settings page,
and the explorer's thresholds (which the Route page follows).

Streamlit forgets a widget's value when a page without that widget runs, so shared values live
under keys of their own (leading underscore) and each page's widget is seeded from them.
"""

from __future__ import annotations

from typing import Mapping

import streamlit as st

from cascade_core.presets import Preset, PresetError, StageConfig, list_presets, load_preset, parse_preset
from cascade_core.ui_data import StageSetting

PRESET_KEY = "_preset_name"
ADDED_KEY = "_added_stages"  # {preset name: [StageConfig dicts]}
POLICY_KEY = "_explorer_policy"  # {preset name: {"rule": str, "stages": {stage: StageSetting}}}


def preset_name() -> str:
    names = list_presets()
    current = st.session_state.get(PRESET_KEY)
    if current in names:
        return current
    return "default" if "default" in names else names[0]


def _remember_preset(widget_key: str) -> None:
    st.session_state[PRESET_KEY] = st.session_state[widget_key]


def preset_picker(page: str, container=None) -> Preset | None:
    """A preset selectbox (in the sidebar by default) shared by every page; None after showing
    the error when the preset cannot be loaded."""
    container = container or st.sidebar
    names = list_presets()
    key = f"preset@{page}"
    current = preset_name()
    if st.session_state.get(key) != current:
        st.session_state[key] = current
    container.selectbox("Preset", names, key=key, on_change=_remember_preset, args=(key,),
                        help="A cascade described in cascade_core/presets/*.toml")
    st.session_state[PRESET_KEY] = st.session_state[key]
    try:
        return with_added_stages(load_preset(st.session_state[key]))
    except PresetError as err:
        st.error(f"This preset cannot be used: {err}")
        return None


def added_stages(name: str) -> list[dict]:
    return list(st.session_state.get(ADDED_KEY, {}).get(name, []))


def set_added_stages(name: str, stages: list[dict]) -> None:
    store = dict(st.session_state.get(ADDED_KEY, {}))
    store[name] = list(stages)
    st.session_state[ADDED_KEY] = store


def with_added_stages(preset: Preset, extra: list[dict] | None = None) -> Preset:
    """The shipped preset with this session's added stages (or `extra`), before a recorded last
    stage (which must stay last). Raises PresetError when the combination is invalid (e.g. a
    repeated name)."""
    extra = added_stages(preset.name) if extra is None else extra
    if not extra:
        return preset
    data = preset.model_dump()
    stages = list(data["stages"])
    tail = [stages.pop()] if stages and stages[-1]["backend"] == "recorded" else []
    data["stages"] = stages + extra + tail
    return parse_preset(data, f"preset {preset.name!r} with the stages added on the Settings page")


def explorer_thresholds(name: str) -> tuple[dict[str, StageSetting], str] | None:
    """The explorer's last thresholds for preset `name` (stage -> setting, rule), if any."""
    stored = st.session_state.get(POLICY_KEY, {}).get(name)
    if not stored:
        return None
    return dict(stored["stages"]), stored["rule"]


def store_explorer_thresholds(name: str, settings: Mapping[str, StageSetting], rule: str) -> None:
    store = dict(st.session_state.get(POLICY_KEY, {}))
    store[name] = {"stages": dict(settings), "rule": rule}
    st.session_state[POLICY_KEY] = store


def stage_thresholds(preset: Preset) -> tuple[dict[str, StageSetting], str | None, str]:
    """Thresholds for live routing: the explorer's where it set them, else the preset's.

    Returns (stage -> setting, rule or None for "each stage's own rule", where they came from).
    """
    base = {s.name: StageSetting(s.tau_t, s.tau_ik, s.enabled) for s in preset.stages}
    stored = explorer_thresholds(preset.name)
    if stored is None:
        return base, None, "the preset"
    settings, rule = stored
    followed = {n: settings.get(n, s) for n, s in base.items()}
    return followed, rule, "the threshold explorer"


def label_of(config: StageConfig) -> str:
    return config.display_name + (" (recorded)" if config.backend == "recorded" and "recorded" not in config.display_name.lower() else "")
