"""The `vllm-local` preset: a preset's local stages as `openai` stages on running vLLM servers.

`vllm up` (`vllm_launch`) writes it once its servers answer, and `vllm preset` rewrites it for the
running servers (e.g. once a last-layer probe exists). Its other stages are copied as they are.

P(IK) needs the prompt's hidden state, which vLLM's generation endpoints never return. vLLM's
pooling runner does: a second server per stage (`--runner pooling --convert embed`, pooler
`LAST`, no activation) answers `/v1/embeddings` with the prompt's last-token hidden state after
the model's final norm, which is exactly what transformers calls hidden state `n_layers`.
Intermediate layers cannot be had that way (the pooler sees only the model's output) nor from any
0.32 endpoint (the `extract_hidden_states` speculative method writes them to the server's disk,
a debug connector, not over HTTP); so a vLLM stage's probe must be trained on its last layer
(`hidden_api_base`, `probe_layer = n_layers` in the preset), and a stage without such a probe
routes on P(T) alone, which the preset's description and the trace's threshold line say.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from cascade_core.io import atomic_write_text

if TYPE_CHECKING:
    from cascade_core.server.vllm_launch import Started

LOCAL_PRESET = "vllm-local"


def generated_preset_path(name: str = LOCAL_PRESET) -> Path:
    """Where the written preset goes: the generated presets' folder, where `--preset NAME` looks."""
    from cascade_core.presets import generated_preset_dir

    return generated_preset_dir() / f"{name}.toml"


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def local_preset_text(source, servers: Sequence[Started], n_layers: dict[str, int], concurrency: int = 8) -> str:
    """A preset whose local stages are `openai` stages on the started servers, in the source
    preset's order; its other stages are copied as they are. A stage with a pooling server reads
    P(IK) from it when a probe for its last layer exists (`<probes>/<name>.npz`), else P(T) alone."""
    from cascade_core.locations import locations

    by_stage: dict[str, dict[str, Started]] = {}
    for started in servers:
        by_stage.setdefault(started.spec.stage, {})[started.spec.runner] = started
    lines = [f"# Written by `python -m cascade_core vllm up --preset {source.name}`: every local stage of",
             f"# {source.name!r} on its own vLLM server (this machine, 127.0.0.1). `vllm down` stops them.",
             f"name = {_toml_value(LOCAL_PRESET)}"]
    notes = []
    stage_lines: list[str] = []
    for config in source.stages:
        started = by_stage.get(config.name)
        if started is None or "generate" not in started:
            stage_lines += ["", "[[stages]]"] + _copied_stage(config)
            continue
        gen = started["generate"]
        name = f"vllm-{config.name}"
        entry = {"name": name, "label": f"{config.display_name} (vLLM)", "backend": "openai",
                 "model": gen.spec.served_name, "api_base": gen.spec.api_base, "api_mode": "completions",
                 "letter_token_ids": True, "timeout_s": 120.0, "max_retries": 2, "concurrency": concurrency,
                 "batch_size": 32,
                 "enabled": config.enabled}
        if config is not source.stages[-1]:
            entry["tau_t"] = config.tau_t
        pooling = started.get("pooling")
        layer = n_layers.get(config.name)
        probe = locations().probes / f"{name}.npz"
        if pooling is not None and layer is not None:
            entry["hidden_api_base"] = pooling.spec.api_base
            entry["probe_layer"] = layer
        if pooling is not None and layer is not None and probe.exists():
            entry["rule"] = config.rule if config.rule != "pt_only" else "both"
            entry["tau_ik"] = config.tau_ik
        else:
            entry["rule"] = "pt_only"
            why = ("no probe for its last layer yet (`bench` then `probes train` this preset)" if pooling is not None
                   else "no hidden-state server (vLLM's generation endpoints return no hidden states)")
            notes.append(f"{name}: P(T) only, {why}")
            entry["label"] = f"{config.display_name} (vLLM; P(T) only: {why.split(' (')[0]})"
        stage_lines += ["", "[[stages]]"] + [f"{k} = {_toml_value(v)}" for k, v in entry.items()]
    description = f"{source.name} on local vLLM servers" + (f"; {'; '.join(notes)}" if notes else "")
    lines.append(f"description = {_toml_value(description)}")
    return "\n".join(lines + stage_lines) + "\n"


def write_local_preset(source, servers: Sequence[Started], n_layers: dict[str, int | None]) -> Path:
    """Write `local_preset_text` where `--preset vllm-local` finds it (atomically: a route that
    loads it meanwhile never reads half a preset); its path."""
    path = generated_preset_path()
    atomic_write_text(path, local_preset_text(source, servers, n_layers))
    return path


def _copied_stage(config) -> list[str]:
    data = config.model_dump(exclude_defaults=True)
    return [f"{k} = {_toml_value(v)}" for k, v in data.items()]


def n_layers_of(source, stage: str) -> int | None:
    """The stage's layer count (the index of the last hidden state), from the packaged model table
    or the HF folder's config.json; None when unknown (the stage then routes on P(T) alone)."""
    from cascade_core.compose.live import packaged_models

    config = source.stage(stage)
    if config.backend == "packaged":
        return int(packaged_models()[config.model].n_layers)
    path = Path(config.model) / "config.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        value = data.get("num_hidden_layers") or (data.get("text_config") or {}).get("num_hidden_layers")
        return int(value) if value else None
    except (OSError, ValueError, TypeError, AttributeError) as err:
        raise ValueError(f"stage {stage!r}: cannot read num_hidden_layers from {path} ({err})") from None
