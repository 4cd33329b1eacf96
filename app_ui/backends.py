"""Loaded backends for the app (the models' weights, one copy per process): `st.cache_resource` (shared by every session.

Two browser sessions routing at once share one backend object; the backend serialises its own
inference (HFBackend holds a lock around tokenising and the forward pass), so no lock is needed
here. The cache key is what makes a backend (model, device, dtype, quantisation, ...), not the
stage name, so two stages of the same model share one copy.
"""

from __future__ import annotations

import json
import os
import threading

import streamlit as st

from cascade_core.cascade import RuntimeStage
from cascade_core.policy import StagePolicy
from cascade_core.presets import StageConfig

_BACKEND_FIELDS = ("backend", "model", "device", "dtype", "quantization", "chat_template", "batch_size",
                   "api_base", "api_key_env", "api_mode", "timeout_s", "max_retries", "concurrency",
                   "price_in", "price_out")
_loaded: dict[str, object] = {}
_loaded_lock = threading.Lock()


def backend_key(config: StageConfig) -> str:
    return json.dumps({f: getattr(config, f) for f in _BACKEND_FIELDS}, sort_keys=True)


@st.cache_resource(show_spinner=False, max_entries=12)
def _load_backend(key: str):
    from cascade_core.compose.live import build_backend

    fields = json.loads(key)
    backend = build_backend(StageConfig(name="cached", **fields))
    with _loaded_lock:
        _loaded[key] = backend
    return backend


def get_backend(config: StageConfig):
    """The stage's backend, loading it on first use (raises the backend's own error if it cannot)."""
    return _load_backend(backend_key(config))


def is_loaded(config: StageConfig) -> bool:
    with _loaded_lock:
        return backend_key(config) in _loaded


def unload_all() -> None:
    """Drop every cached model (the memory comes back once no session holds one)."""
    _load_backend.clear()
    with _loaded_lock:
        _loaded.clear()
    import gc

    gc.collect()


def fetched_status(config: StageConfig) -> tuple[bool, str]:
    """(ready to load without waiting?, a short description) for the Settings and Route pages."""
    if config.backend == "packaged":
        from cascade_core.compose.live import is_fetched, packaged_models

        if config.model not in packaged_models():
            return False, f"unknown packaged model {config.model!r}"
        ready = is_fetched(config.model)
        return ready, "fetched" if ready else "not fetched yet"
    if config.backend == "hf":
        return True, "from the Hugging Face Hub (or a local folder) on first use"
    if config.backend == "openai":
        if config.api_key_env and not os.environ.get(config.api_key_env):
            return False, f"environment variable {config.api_key_env} is not set"
        return True, "remote endpoint" + (f", key from ${config.api_key_env}" if config.api_key_env else "")
    return True, "recorded outcomes (built in)"


def model_memory_bytes(config: StageConfig) -> int | None:
    """Bytes of the loaded model's weights, or None when it is not loaded or has none here."""
    with _loaded_lock:
        backend = _loaded.get(backend_key(config))
    model = getattr(backend, "model", None)
    if model is None:
        return None
    return int(sum(p.numel() * p.element_size() for p in model.parameters()))


def process_memory_bytes() -> int | None:
    """Resident memory of this server process (Linux), or None where it cannot be read."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def runtime_stage(config: StageConfig, policy: StagePolicy) -> RuntimeStage:
    """A stage ready to run with the given routing policy (the explorer's thresholds)."""
    from cascade_core.compose.live import runtime_stage as build_runtime_stage

    stage = build_runtime_stage(config, backend=get_backend(config))
    stage.policy = policy
    return stage


def preset_policy(config: StageConfig) -> StagePolicy:
    """The routing policy the preset gives a stage (its combiner file read for rule `learned`)."""
    from cascade_core.compose.live import stage_policy

    return stage_policy(config)


def packaged_models() -> dict:
    """Packaged offline models by key (for the Settings page's picker and the Home table)."""
    from cascade_core.compose.live import packaged_models as catalog

    return catalog()


def recorded_total_params(model: str) -> int:
    """Parameters of a recorded model (0 where they were never published, as for GPT-4)."""
    from cascade_core.compose.live import recorded_total_params as params

    return params(model)


def fetch_model(key: str):
    """Fetch one packaged model (minutes the first time); returns its folder."""
    from cascade_core.compose.live import fetch_model as fetch

    return fetch(key, progress=False)


def run_benchmark(config: StageConfig, per_subject: int, subjects, progress):
    """A small benchmark of one stage from the Benchmarks page, into the app's results folder
    (the same job, files and folders as `python -m cascade_core bench`)."""
    from app_ui.data import where
    from cascade_core.compose.jobs import bench_questions, bench_stage

    questions = bench_questions(per_subject=int(per_subject), subjects=subjects or None)
    return bench_stage(config, questions, where(), backend=get_backend(config), progress=progress)
