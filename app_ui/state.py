"""State the pages share in one browser session: the preset, stages added on the Settings page,
and the explorer's thresholds (which the Route page follows).

Streamlit forgets a widget's value when a page without that widget runs, so shared values live
under keys of their own (leading underscore) and each page's widget is seeded from them.
"""

from __future__ import annotations

from typing import Mapping

import streamlit as st

from cascade_core.policy import StagePolicy
from cascade_core.presets import Preset, PresetError, StageConfig, list_presets, load_preset, parse_preset
from app_ui.view_model import StageSetting

PRESET_KEY = "_preset_name"
ADDED_KEY = "_added_stages"  # {preset name: [StageConfig dicts]}
POLICY_KEY = "_explorer_policy"  # {preset name: {"rule": str, "stages": {stage: StageSetting}, "dataset": str}}


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


def store_explorer_thresholds(name: str, settings: Mapping[str, StageSetting], rule: str,
                              combiners: Mapping[str, object] | None = None, dataset: str = "mmlu") -> None:
    """Keep the explorer's thresholds for the Route page, with the dataset whose records they were
    chosen on: they route that dataset's kind of question only (`stage_thresholds`)."""
    store = dict(st.session_state.get(POLICY_KEY, {}))
    store[name] = {"stages": dict(settings), "rule": rule, "combiners": dict(combiners or {}), "dataset": dataset}
    st.session_state[POLICY_KEY] = store


EXPLORER_SOURCE = "thresholds: from the threshold explorer"


def stage_thresholds(preset: Preset, applied=None, explorer: bool = True,
                     dataset: str = "mmlu") -> tuple[dict[str, StagePolicy], str, dict[str, str]]:
    """Each stage's policy for live routing, where it came from, and why a stage is off.

    The explorer's thresholds where it set them (with its rule and fitted scores; `explorer=False`
    ignores them, and so do thresholds chosen on another dataset's records than `dataset`, the one
    whose policy `applied` is), else the calibrated policy (`applied`, an AppliedPolicy), else the
    preset's own. The explorer left on the calibrated policy still says "calibrated".
    """
    from cascade_core.compose.live import stage_policy
    from app_ui.view_model import policy_from_settings

    own = {s.name: stage_policy(s) for s in preset.stages}
    source, off = "thresholds: from the preset file", {}
    calibrated: dict[str, StagePolicy] = {}
    if applied is not None and applied.policy is not None:
        calibrated = dict(zip([s.name for s in preset.stages if s.enabled], applied.policy.stages))
        own.update(calibrated)
        source = applied.description
        off = {n: applied.off_reasons.get(n, "switched off by calibration")
               for n, p in calibrated.items() if not p.enabled}
    elif applied is not None:
        source = applied.description
    stored = st.session_state.get(POLICY_KEY, {}).get(preset.name) if explorer else None
    if not stored or stored.get("dataset", "mmlu") != dataset:
        return own, source, off
    names = [n for n in stored["stages"] if n in own]
    if not names or not any(stored["stages"][n].enabled for n in names):
        return own, source, off
    chosen = policy_from_settings(names, stored["stages"], stored["rule"], stored.get("combiners"))
    followed = dict(own)
    followed.update(zip(names, chosen.stages))
    if calibrated and all(_same(followed[n], calibrated.get(n)) for n in names):
        return followed, source, off
    off = {n: "switched off in the threshold explorer" for n in names if not followed[n].enabled}
    return followed, EXPLORER_SOURCE, off


def switched_on_by_hand(config: StageConfig) -> StagePolicy:
    """The policy of a stage the followed policy switches off but the user routes through anyway:
    the preset's own thresholds, on (a switched-off stage's stored thresholds, often 0 / 0, would
    keep every answer)."""
    from dataclasses import replace

    from cascade_core.compose.live import stage_policy

    return replace(stage_policy(config), enabled=True)


def same_policy(a, b) -> bool:
    """Whether two CascadePolicies route alike, stage by stage (`_same`)."""
    return b is not None and len(a.stages) == len(b.stages) and all(_same(x, y) for x, y in zip(a.stages, b.stages))


def _same(a: StagePolicy, b: StagePolicy | None) -> bool:
    """The same routing (a switched-off stage's thresholds do not matter; thresholds to 1e-9)."""
    if b is None or a.enabled != b.enabled:
        return False
    if not a.enabled:
        return True
    close = all(abs(x - y) < 1e-9 for x, y in ((a.tau_t, min(max(b.tau_t, 0), 1)), (a.tau_ik, min(max(b.tau_ik, 0), 1)),
                                                (a.tau_learned, b.tau_learned)))
    return close and a.rule == b.rule and (a.combiner == b.combiner or a.rule not in ("learned", "loss_aware"))


PRELOAD_KEY = "_preload_models"


def preload_enabled(preset: Preset) -> bool:
    """The Settings page's "preload at start-up" switch; its default from `backends.preload_default`."""
    from app_ui.backends import preload_default

    if PRELOAD_KEY not in st.session_state:
        st.session_state[PRELOAD_KEY] = preload_default(preset.stages)
    return bool(st.session_state[PRELOAD_KEY])
