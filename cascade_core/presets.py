"""Cascade presets: ordered stages in a TOML file, validated at load.

A preset is the one place a user describes a cascade (which models, where they run, what they
cost, their thresholds). Validation happens here, once, so that every error names the file and the
key instead of surfacing later as a model-loading traceback.
"""

from __future__ import annotations

import math
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

PRESET_DIR = Path(__file__).parent / "presets"
REPO_ROOT = Path(__file__).resolve().parent.parent

BackendKind = Literal["packaged", "hf", "openai", "recorded"]
Rule = Literal["both", "pt_only", "pik_only", "learned"]


class PresetError(ValueError):
    """A preset that cannot be used; the message names the file and the key."""


def _repo_path(value: str | None) -> Path | None:
    if not value:
        return None
    path = Path(value)
    return path if path.is_absolute() else REPO_ROOT / path


class StageConfig(BaseModel):
    """One stage of a cascade as written in a preset."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    backend: BackendKind
    model: str = Field(min_length=1)
    label: str = ""
    quantization: Literal["auto", "none", "nf4", "int8"] = "auto"
    device: str = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    chat_template: bool = False
    batch_size: int = Field(default=8, ge=1, le=1024)
    # Dollars per million tokens; local stages usually leave them at 0 and are costed in FLOPs.
    price_in: float = Field(default=0.0, ge=0.0)
    price_out: float = Field(default=0.0, ge=0.0)
    # OpenAI-compatible stages.
    api_base: str | None = None
    api_key_env: str | None = None
    api_mode: Literal["chat", "completions"] = "chat"
    timeout_s: float = Field(default=30.0, gt=0.0)
    max_retries: int = Field(default=2, ge=0, le=10)
    concurrency: int = Field(default=4, ge=1, le=256)
    on_error: Literal["escalate", "fail"] = "escalate"
    # Routing.
    tau_t: float = 0.0
    tau_ik: float = 0.0
    tau_learned: float = 0.5
    rule: Rule = "both"
    probe: str | None = None
    probe_layer: int | None = None
    combiner: str | None = None  # JSON of a LearnedCombiner (policy.LearnedCombiner.to_dict), rule "learned"
    enabled: bool = True

    @field_validator("tau_t", "tau_ik", "tau_learned")
    @classmethod
    def _threshold_in_unit_interval(cls, value: float) -> float:
        if math.isnan(value) or not 0.0 <= value <= 1.0:
            raise ValueError(f"must be a number in [0, 1], got {value!r}")
        return value

    @model_validator(mode="after")
    def _backend_needs(self) -> "StageConfig":
        if self.backend == "openai" and not self.api_base:
            raise ValueError("an 'openai' stage needs api_base (e.g. http://127.0.0.1:8000/v1)")
        if self.rule == "learned" and not self.combiner:
            raise ValueError("rule 'learned' needs combiner = path to its JSON (fit on the calibration split)")
        if self.api_key_env is not None and not self.api_key_env.replace("_", "").isalnum():
            raise ValueError("api_key_env must be the NAME of an environment variable, not a key")
        return self

    @property
    def display_name(self) -> str:
        return self.label or self.name

    def probe_path(self) -> Path | None:
        """The probe file, relative paths taken from the repository root."""
        return _repo_path(self.probe)

    def combiner_path(self) -> Path | None:
        return _repo_path(self.combiner)


class Preset(BaseModel):
    """An ordered cascade of stages; the last enabled stage always answers."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    description: str = ""
    needs_network: bool = False
    stages: tuple[StageConfig, ...] = Field(min_length=1)
    extra_stages: tuple[StageConfig, ...] = ()

    @model_validator(mode="after")
    def _stages_consistent(self) -> "Preset":
        names = [s.name for s in self.stages + self.extra_stages]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"stage names must be unique, repeated: {duplicates}")
        if not any(s.enabled for s in self.stages):
            raise ValueError("at least one stage must be enabled")
        for stage in self.stages[:-1]:
            if stage.backend == "recorded":
                raise ValueError(
                    f"stage {stage.name!r} is recorded (no probabilities): it can only be the last stage"
                )
        return self

    def stage(self, name: str) -> StageConfig:
        for s in self.stages + self.extra_stages:
            if s.name == name:
                return s
        raise KeyError(f"preset {self.name!r} has no stage {name!r}")


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid preset {source}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def parse_preset(data: dict, source: str = "<dict>") -> Preset:
    """Validate a preset given as a dict (parsed TOML); errors name `source` and the key."""
    try:
        return Preset.model_validate(data)
    except ValidationError as err:
        raise PresetError(_format_validation_error(err, source)) from None


def preset_path(name_or_path: str | Path) -> Path:
    """A preset name (`default`) or a path to a TOML file -> the file."""
    candidate = Path(name_or_path)
    if candidate.suffix == ".toml" or candidate.exists():
        if not candidate.is_file():
            raise PresetError(f"preset file not found: {candidate}")
        return candidate
    path = PRESET_DIR / f"{name_or_path}.toml"
    if not path.is_file():
        raise PresetError(
            f"unknown preset {str(name_or_path)!r}; available: {', '.join(list_presets())}"
        )
    return path


def load_preset(name_or_path: str | Path) -> Preset:
    """Load and validate a preset by name or path."""
    path = preset_path(name_or_path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise PresetError(f"invalid preset {path}: not valid TOML ({err})") from None
    return parse_preset(data, str(path))


def list_presets() -> list[str]:
    """Names of the presets shipped with the project."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))
