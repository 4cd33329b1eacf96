"""Each stage's live number format beside the format its thresholds were calibrated on.

The live format is what dtype "auto" resolves to here (`live.resolved_runtime`, or the loaded
backend's own dtype); the reference is the format of the records the policy was calibrated on:
the policy file's `provenance.records_dtype` (written by `calibrate`), else the `dtype` column of
the stage's records. The sentence is `cascade_core.number_format.format_note`'s; `route`, the app
and `serve` all come here for it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from cascade_core.locations import Locations, locations
from cascade_core.number_format import differs, format_note
from cascade_core.records.schema import records_dtype

LOCAL_BACKENDS = ("packaged", "hf")


@dataclass(frozen=True)
class StageFormat:
    """One stage's live format, the records' format it is compared with, and how they relate."""

    stage: str
    live: str | None  # None: a remote or recorded stage (no format of ours)
    reference: str | None  # the records' format; None: unknown (no records, no policy file)
    basis: str = "calibrated on"  # "calibrated on" (a policy file) | "records made in" (the preset's thresholds)
    emulated: bool = False  # bfloat16 on a CPU without native bfloat16

    @property
    def differs(self) -> bool:
        return differs(self.live, self.reference)

    @property
    def note(self) -> str:
        return format_note(self.live, self.reference, self.emulated, self.basis)


def policy_records_dtypes(policy_file: Path | str) -> tuple[dict[str, str], str]:
    """(stage -> the records' format, dataset) from a policy file's provenance; stages it does not
    name are looked up in their records (`reference_dtype`)."""
    try:
        provenance = json.loads(Path(policy_file).read_text(encoding="utf-8")).get("provenance") or {}
    except (OSError, ValueError, AttributeError):
        return {}, "mmlu"
    found = provenance.get("records_dtype")
    dataset = str(provenance.get("dataset") or "mmlu")
    return ({str(k): str(v) for k, v in found.items()} if isinstance(found, dict) else {}), dataset


def live_dtype(config) -> tuple[str | None, bool]:
    """(the format a local stage will run in here, whether it is emulated bfloat16); (None, False)
    for a remote or recorded stage, or where the device cannot be resolved."""
    if config.backend not in LOCAL_BACKENDS:
        return None, False
    from cascade_core.compose.live import resolved_runtime

    try:
        device, dtype, _ = resolved_runtime(config)
    except Exception:  # noqa: BLE001 - e.g. a CUDA stage on a machine without one: no format to say
        return None, False
    return dtype, is_emulated(device, dtype)


def is_emulated(device: str, dtype: str) -> bool:
    """bfloat16 on a CPU that only emulates it (`models.hf.cpu_has_native_bf16` false)."""
    if dtype != "bfloat16" or not str(device).startswith("cpu"):
        return False
    from models.hf import cpu_has_native_bf16

    return not cpu_has_native_bf16()


def emulated_stages(configs: Sequence) -> list[str]:
    """The local stages among `configs` that would compute in emulated bfloat16 here."""
    return [c.name for c in configs if live_dtype(c)[1]]


def stage_formats(configs: Sequence, policy_file: Path | str | None = None, where: Locations | None = None,
                  dataset: str = "mmlu", loaded: dict | None = None) -> dict[str, StageFormat]:
    """Each stage's StageFormat. `policy_file`: the calibrated policy file that applies (None: the
    preset's own thresholds; then the reference is the format the stage's records were made in).
    `loaded`: stage name -> a loaded backend, whose own dtype is the live format."""
    where = where or locations()
    from_file: dict[str, str] = {}
    if policy_file is not None:
        from_file, dataset = policy_records_dtypes(policy_file)
    basis = "calibrated on" if policy_file is not None else "records made in"
    out = {}
    for config in configs:
        backend = (loaded or {}).get(config.name)
        if backend is not None and config.backend in LOCAL_BACKENDS and hasattr(backend, "dtype"):
            live = str(backend.dtype).replace("torch.", "")
            emulated = is_emulated(str(getattr(backend, "device", "cpu")), live)
        else:
            live, emulated = live_dtype(config)
        reference = from_file.get(config.name) or records_dtype(where.record_path(config.name, dataset))
        out[config.name] = StageFormat(config.name, live, reference if live else None, basis, emulated)
    return out


def format_notes(configs: Sequence, policy_file: Path | str | None = None, where: Locations | None = None,
                 dataset: str = "mmlu") -> dict[str, str]:
    """stage -> `format_note` for the stages with a format of ours (local stages)."""
    return {n: f.note for n, f in stage_formats(configs, policy_file, where, dataset).items() if f.live}


def served_format_notes(cascade: str, stages: Sequence, where: Locations | None = None) -> dict[str, str]:
    """For `/v1/models`: stage -> its format note, from the running stages (RuntimeStage) of the
    model `cascade` ("cascade-<preset>" or a stage's name). The policy file is the preset's when
    the stages run its calibrated thresholds (their `policy_source` says so)."""
    where = where or locations()
    preset = cascade.removeprefix("cascade-")
    calibrated = any(s.policy_source and not s.policy_source.startswith("thresholds: from the preset") for s in stages)
    path = where.policies / f"{preset}.json"
    policy_file = path if calibrated and cascade.startswith("cascade-") and path.exists() else None
    out = {}
    for stage in stages:
        backend = stage.backend
        if not getattr(backend, "has_hidden_states", False) or getattr(backend, "recorded", False):
            continue  # a remote (API) or recorded stage: no format of ours
        config = getattr(backend, "_config", None)  # a LazyBackend not loaded yet: its config resolves it
        if getattr(backend, "loaded", True) is False and config is not None:
            found = stage_formats([config], policy_file, where)[config.name]
        else:
            dtype = str(getattr(backend, "dtype", "")).replace("torch.", "") or None
            reference = None
            if policy_file is not None:
                reference = policy_records_dtypes(policy_file)[0].get(stage.name)
            reference = reference or records_dtype(where.record_path(stage.name))
            found = StageFormat(stage.name, dtype, reference, "calibrated on" if policy_file else "records made in",
                                is_emulated(str(getattr(backend, "device", "cpu")), dtype or ""))
        if found.live:
            out[stage.name] = found.note
    return out


def backend_format_notes(name: str, backend, where: Locations | None = None) -> dict[str, str]:
    """For `serve --single-stage`'s /v1/models: {name: its format note} for one loaded local
    backend (compared with the records of a stage of that name); {} for a remote one."""
    from types import SimpleNamespace

    return served_format_notes(name, [SimpleNamespace(name=name, backend=backend, policy_source="")], where)
