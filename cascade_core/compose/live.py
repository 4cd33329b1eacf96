"""Build a runnable cascade from a preset: one backend per stage, its policy and its probe.

This is the only place that maps a preset's `backend = ...` to a class in `models/`, so the
CLI, the servers and the app all get the same stages from the same file. A stage's probe file
must exist unless the stage says `probe_optional = true` (`presets.check_stage_files`, called
before any model is loaded).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Iterable, Sequence

from cascade_core.cascade import RuntimeStage
from cascade_core.policy import LearnedCombiner, StagePolicy
from cascade_core.presets import Preset, StageConfig, check_stage_files
from cascade_core.types import Backend

log = logging.getLogger(__name__)


def build_backend(config: StageConfig) -> Backend:
    """The backend a stage's `backend` key names, loaded and ready."""
    if config.backend == "packaged":
        from models.hf import HFBackend

        return HFBackend.from_packaged(
            config.model, device=config.device, dtype=config.dtype,
            quantization=config.quantization, chat_template=config.chat_template,
            batch_size=config.batch_size,
        )
    if config.backend == "hf":
        from models.hf import HFBackend

        return HFBackend(
            config.model, device=config.device, dtype=config.dtype,
            quantization=config.quantization, chat_template=config.chat_template,
            batch_size=config.batch_size,
        )
    if config.backend == "openai":
        from models.openai_stage import OpenAIStage

        return OpenAIStage.from_config(config)
    if config.backend == "recorded":
        return recorded_backend(config.model, price_in=config.price_in, price_out=config.price_out)
    raise ValueError(f"stage {config.name!r}: unknown backend {config.backend!r}")


def recorded_backend(model: str, price_in: float = 0.0, price_out: float = 0.0):
    """A RecordedBackend on the shipped recording (RouteLLM's MMLU outcomes) and MMLU's prompts."""
    from cascade_core.records.mmlu import RECORDED_PATH, load_mmlu, load_recorded_outcomes, to_questions
    from cascade_core.prompts import format_prompt
    from models.recorded import RecordedBackend

    def prompts():
        return ((format_prompt(q), q.qid, int(q.answer)) for q in to_questions(load_mmlu()))

    return RecordedBackend(model, load_recorded_outcomes(RECORDED_PATH), prompts,
                           price_in=price_in, price_out=price_out)


def stage_policy(config: StageConfig) -> StagePolicy:
    """The stage's routing policy; a `learned` rule reads its combiner from the JSON file named."""
    combiner = None
    path = config.combiner_path()
    if path is not None:
        try:
            combiner = LearnedCombiner.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            raise ValueError(f"stage {config.name!r}: combiner file not found: {path}") from None
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"stage {config.name!r}: invalid combiner file {path}: {err}") from None
    return StagePolicy(
        tau_t=config.tau_t, tau_ik=config.tau_ik, rule=config.rule,
        enabled=config.enabled, tau_learned=config.tau_learned, combiner=combiner,
    )


def load_probe(config: StageConfig, backend: Backend):
    """The stage's P(IK) probe, or None when it has no hidden states, names none and none was
    trained for it, or its file is missing and the stage says `probe_optional = true` (a missing
    file is refused otherwise). A stage without a `probe` key reads `<probes>/<stage>.npz`, where
    `probes train` writes it ($CASCADE_PROBES_DIR or data/probes), when that file exists."""
    if not backend.has_hidden_states:
        return None
    path = config.probe_path()
    if path is None:
        from cascade_core.locations import locations

        path = locations().probe_path(config)
        if not path.exists():
            return None
    if not path.exists():
        check_stage_files(config)  # raises unless probe_optional
        log.info("stage %s: no probe yet at %s (routes on P(T) alone)", config.name, path)
        return None
    from cascade_core.probe import PIKProbe

    return PIKProbe.load(path, expected_model_id=backend.model_id, expected_layer=config.probe_layer)


def runtime_stage(config: StageConfig, backend: Backend | None = None) -> RuntimeStage:
    backend = backend or build_backend(config)
    return RuntimeStage(
        name=config.name, backend=backend, policy=stage_policy(config),
        probe=load_probe(config, backend), price_in=config.price_in, price_out=config.price_out,
        on_error=config.on_error, label=config.display_name, free_form_probe=free_form_probe(config, backend),
    )


def build_cascade(preset: Preset, only: Sequence[str] | None = None, progress: bool = True,
                  thresholds: str = "auto", where=None, policies: dict | None = None) -> list[RuntimeStage]:
    """Every stage of `preset` (or the ones named in `only`, in preset order), ready to run, with
    each kind's policy: `policies` (True: multiple choice, False: free-form; `compose.policies.
    served_policies`, which `route`/`serve --dataset/--policy` resolve before any model loads), else
    each kind's own (the calibrated policy file if any). The multiple-choice policy is the stages'
    `policy` (`apply_to_stages`), the free-form one their free-form policy (`apply_free_form`);
    a dataset's own policy reads P(IK) with that dataset's probes (`dataset_probes`)."""
    from cascade_core.compose.policies import apply_free_form, apply_question_policy, apply_to_stages, dataset_probes

    configs = list(preset.stages)
    if only:
        unknown = sorted(set(only) - {c.name for c in preset.stages + preset.extra_stages})
        if unknown:
            raise ValueError(f"preset {preset.name!r} has no stage(s) {unknown}")
        configs = [c for c in preset.stages + preset.extra_stages if c.name in set(only)]
    preset.check_files([c.name for c in configs])  # a missing probe or combiner file, before any model loads
    # each kind's policy (`policy_for_question`); a bad policy file is refused before any model loads
    policies = policies or cascade_policies(preset, only, thresholds, where)
    mc, free = policies[True], policies[False]
    stages = apply_to_stages([runtime_stage(c) for c in configs], mc.applied, preset)
    stages = apply_question_policy(stages, mc, True, where)
    return apply_free_form(dataset_probes(stages, free, False, where), free.applied, preset)


def cascade_policies(preset: Preset, only: Sequence[str] | None = None, thresholds: str = "auto", where=None,
                     dataset: str | None = None, policy_file=None) -> dict:
    """Each kind's policy (`compose.policies.served_policies`) for `build_cascade`: `only` some
    stages runs the preset's thresholds unless asked otherwise (a calibrated policy is a guarantee
    for the whole cascade only). No model loads."""
    from cascade_core.compose.policies import served_policies

    if only and thresholds == "auto" and policy_file is None:
        thresholds = "preset"
    return served_policies(preset, dataset, where, thresholds, policy_file)


def free_form_probe(config: StageConfig, backend: Backend):
    """The stage's P(IK) probe for free-form questions (trained by `probes train --dataset arith`,
    `<probes>/arith/<stage>.npz`), or None when there is none or the stage has no hidden states."""
    from cascade_core.locations import locations
    from cascade_core.compose.policies import FREE_FORM_DATASET

    if not backend.has_hidden_states or config.backend not in ("packaged", "hf"):
        return None
    path = locations().probe_path(config, FREE_FORM_DATASET)
    if not path.exists():
        return None
    from cascade_core.probe import PIKProbe

    return PIKProbe.load(path, expected_model_id=backend.model_id)


def fetch_preset_models(preset: Preset, include_extra: bool = False) -> Iterable[tuple[str, Path | str]]:
    """Fetch what the preset's local stages need; remote and recorded stages need nothing."""
    from models.packaged import fetch

    stages = preset.stages + (preset.extra_stages if include_extra else ())
    for config in stages:
        if config.backend == "packaged":
            yield config.name, fetch(config.model)
        elif config.backend == "hf":
            yield config.name, f"{config.model} (loaded from the Hub or a local folder on first use)"
        else:
            yield config.name, f"{config.backend} stage: nothing to fetch"


def single_stage_backend(model: str, device: str = "auto", progress: bool = False) -> Backend:
    """One packaged model as a backend, for `serve --single-stage`."""
    from models.hf import HFBackend

    return HFBackend.from_packaged(model, progress=progress, device=device)


def describe_backend(config: StageConfig, backend: Backend) -> dict[str, str]:
    """What made a record: model file hash (packaged GGUF SHA-256), dtype, quantisation."""
    model_hash = ""
    if config.backend == "packaged":
        from models.packaged import PACKAGED_MODELS

        model_hash = PACKAGED_MODELS[config.model].sha256
    return {
        "model_hash": model_hash,
        "dtype": str(getattr(backend, "dtype", config.dtype)).replace("torch.", ""),
        "quantization": str(getattr(backend, "quantization", config.quantization)),
    }


def recorded_total_params(model: str) -> int:
    """A recorded model's parameter count from the one recorded-model table (0: never published)."""
    from models.recorded import RECORDED_MODELS, canonical_name

    return int(RECORDED_MODELS[canonical_name(model)][2])


def packaged_models() -> dict:
    """The packaged offline models by key (label, sizes, pinned packages): for pickers and tables."""
    from models.packaged import PACKAGED_MODELS

    return dict(PACKAGED_MODELS)


def is_fetched(key: str) -> bool:
    """Whether a packaged model is fetched and converted (loads without waiting)."""
    from models.packaged import is_ready

    return is_ready(key)


def warm_model_code(configs) -> None:
    """Import the model code the fetched packaged stages among `configs` will need (models.hf.
    warm_imports), loading no weights: a first load then costs only the weights."""
    from models.hf import warm_imports
    from models.packaged import hf_folder, is_ready

    warm_imports([hf_folder(c.model) for c in configs
                  if c.enabled and c.backend == "packaged" and is_ready(c.model)])


def fetch_model(key: str, progress: bool = False) -> Path:
    """Fetch and convert one packaged model (skips what is done); returns its folder."""
    from models.packaged import fetch

    return fetch(key, progress=progress)


def resolved_runtime(config: StageConfig) -> tuple[str, str, str]:
    """(device, dtype, quantisation) a local stage will really run with here, "auto" resolved
    (for the app's stage tables, before the model is loaded)."""
    from models.hf import resolve_device, resolve_dtype, resolve_quantization

    device = resolve_device(config.device)
    dtype = str(resolve_dtype(config.dtype, device)).replace("torch.", "")
    return str(device), dtype, str(resolve_quantization(config.quantization, device))


class LazyBackend:
    """A local stage's backend that loads its model when the cascade first uses it.

    `model_id`, `has_hidden_states` and `recorded` are known from the stage's config, so a
    RuntimeStage (and its probe) can be built around it without loading anything; any other
    attribute loads the model (through `load`, e.g. the app's shared cache) and is then the
    real backend's. A question kept by stage 1 therefore loads stage 1 only.
    """

    recorded = False
    has_hidden_states = True

    def __init__(self, config: StageConfig, load=None):
        if config.backend not in ("packaged", "hf"):
            raise ValueError(f"stage {config.name!r}: only local (packaged, hf) stages load lazily, not "
                             f"{config.backend!r}")
        self._config = config
        self._load = load or (lambda: build_backend(config))
        self._backend = None
        self._error: Exception | None = None
        self.model_id = config.model

    @property
    def loaded(self) -> bool:
        return self._backend is not None

    def get(self) -> Backend:
        """The real backend, loading it now if it is not loaded yet (a failed load is not retried:
        its error is raised again)."""
        if self._error is not None:
            raise self._error
        if self._backend is None:
            try:
                self._backend = self._load()
            except Exception as err:
                self._error = err
                raise
        return self._backend

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.get(), name)


def lazy_runtime_stage(config: StageConfig, load=None) -> RuntimeStage:
    """`runtime_stage` around a LazyBackend for local stages (the model loads on first use);
    other backends (recorded, remote) are built at once, which costs no model load."""
    if config.backend in ("packaged", "hf"):
        return runtime_stage(config, backend=LazyBackend(config, load))
    return runtime_stage(config, backend=load() if load else None)
