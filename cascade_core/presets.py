"""Cascade presets: ordered stages in a TOML file, validated at load.

A preset is the one place a user describes a cascade (which models, where they run, what they
cost, their thresholds). Validation happens here, once, so that every error names the file and the
key instead of surfacing later as a model-loading traceback. Numbers and booleans are strict:
`tau_t = "0.5"` or `enabled = "yes"` is a type error, not a silent conversion. Files a stage
names (probe, combiner) are checked by `Preset.check_files` / `check_stage_files`, which the
live cascade runs before loading any model (`load_preset(..., check_files=True)` runs it at load).
"""

from __future__ import annotations

import math
import tomllib
from pathlib import Path
from typing import Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from cascade_core.locations import REPO_ROOT

PRESET_DIR = Path(__file__).parent / "presets"

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
    chat_template: bool = Field(default=False, strict=True)
    batch_size: int = Field(default=8, ge=1, le=1024, strict=True)
    # Dollars per million tokens; local stages usually leave them at 0 and are costed in FLOPs.
    price_in: float = Field(default=0.0, ge=0.0, strict=True)
    price_out: float = Field(default=0.0, ge=0.0, strict=True)
    # OpenAI-compatible stages.
    api_base: str | None = None
    api_key_env: str | None = None
    api_mode: Literal["chat", "completions"] = "chat"
    timeout_s: float = Field(default=30.0, gt=0.0, strict=True)
    max_retries: int = Field(default=2, ge=0, le=10, strict=True)
    concurrency: int = Field(default=4, ge=1, le=256, strict=True)
    on_error: Literal["escalate", "fail"] = "escalate"
    # An OpenAI-compatible stage's hidden states: a vLLM pooling server of the same model whose
    # /v1/embeddings returns the prompt's last hidden state (`python -m cascade_core vllm up`).
    hidden_api_base: str | None = None
    # vLLM only: exact letter log-probabilities (`logprob_token_ids`, ids from its /tokenize), not top-k.
    letter_token_ids: bool = Field(default=False, strict=True)
    # Routing.
    tau_t: float = Field(default=0.0, strict=True)
    tau_ik: float = Field(default=0.0, strict=True)
    tau_learned: float = Field(default=0.5, strict=True)
    rule: Rule = "both"
    probe: str | None = None
    probe_optional: bool = Field(default=False, strict=True)  # a missing probe file routes on P(T) alone
    probe_layer: int | None = Field(default=None, strict=True)
    combiner: str | None = None  # JSON of a LearnedCombiner (policy.LearnedCombiner.to_dict), rule "learned"
    enabled: bool = Field(default=True, strict=True)

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


def check_stage_files(config: StageConfig, source: str = "", key: str = "") -> None:
    """Refuse a stage whose probe file is missing (unless `probe_optional`), damaged or made for
    another model or layer, or whose combiner file is missing; the message names the preset file,
    the key and the file."""
    where = f"preset {source}: " if source else ""
    key = key or f"stage {config.name!r}"
    probe = config.probe_path()
    if probe is not None and not config.probe_optional and not probe.is_file():
        raise PresetError(f"{where}{key}.probe: probe file not found: {probe} (train it with `python -m "
                          f"cascade_core probes train`, or set probe_optional = true to route on P(T) alone)")
    if probe is not None and probe.is_file() and config.backend in ("packaged", "hf"):
        # Read it now (a few kilobytes), before any weights load: a damaged probe, or one trained
        # for another model or layer, is refused in a second instead of after a 20 s model load.
        from cascade_core.probe import PIKProbe

        try:
            PIKProbe.load(probe, expected_model_id=config.model, expected_layer=config.probe_layer)
        except ValueError as err:  # CorruptFileError, ProbeMismatchError
            raise PresetError(f"{where}{key}.probe: {err}") from None
    combiner = config.combiner_path()
    if combiner is not None and not combiner.is_file():
        raise PresetError(f"{where}{key}.combiner: combiner file not found: {combiner}")


class Preset(BaseModel):
    """An ordered cascade of stages; the last enabled stage always answers."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    description: str = ""
    stages: tuple[StageConfig, ...] = Field(min_length=1)
    extra_stages: tuple[StageConfig, ...] = ()
    needs_network: bool = Field(default=False, strict=True)
    _source: str = PrivateAttr(default="")

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

    @property
    def source(self) -> str:
        """The file the preset was loaded from ("" for a preset built from a dict)."""
        return self._source

    def check_files(self, only: Sequence[str] | None = None) -> None:
        """`check_stage_files` for every stage (or the ones named in `only`), naming the key."""
        for group in ("stages", "extra_stages"):
            for i, config in enumerate(getattr(self, group)):
                if (only and config.name in only) or (not only and group == "stages"):
                    check_stage_files(config, self.source or self.name, f"{group}.{i}")

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
        preset = Preset.model_validate(data)
    except ValidationError as err:
        raise PresetError(_format_validation_error(err, source)) from None
    preset._source = source
    return preset


def preset_path(name_or_path: str | Path) -> Path:
    """A preset name (`default`) or a path to a TOML file -> the file."""
    candidate = Path(name_or_path)
    if candidate.suffix == ".toml" or candidate.exists():
        if not candidate.is_file():
            raise PresetError(f"preset file not found: {candidate}")
        return candidate
    path = PRESET_DIR / f"{name_or_path}.toml"
    if not path.is_file():  # a preset a command wrote (`vllm up` writes vllm-local) beside the model cache
        path = generated_preset_dir() / f"{name_or_path}.toml"
    if not path.is_file():
        raise PresetError(
            f"unknown preset {str(name_or_path)!r}; available: {', '.join(list_presets())}"
        )
    return path


def generated_preset_dir() -> Path:
    """Where commands write presets (`$CASCADE_CACHE_DIR/presets`, else the user cache's)."""
    import os

    value = os.environ.get("CASCADE_CACHE_DIR", "").strip()
    if value:
        return Path(value).expanduser() / "presets"
    import platformdirs

    return Path(platformdirs.user_cache_dir("cascade-core", appauthor=False)) / "presets"


def load_preset(name_or_path: str | Path, check_files: bool = False) -> Preset:
    """Load and validate a preset by name or path; `check_files` also refuses missing probe and
    combiner files of its stages (what a live cascade needs)."""
    path = preset_path(name_or_path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise PresetError(f"invalid preset {path}: not valid TOML ({err})") from None
    except RecursionError:  # tomllib recurses per nested array or table: 5,000 levels exhaust it
        raise PresetError(f"invalid preset {path}: nested too deeply to parse (a preset needs two levels)") from None
    preset = parse_preset(data, str(path))
    if check_files:
        preset.check_files()
    return preset


def list_presets() -> list[str]:
    """Names of the presets shipped with the project."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))
