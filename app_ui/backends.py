"""Loaded backends for the app (the models' weights, one copy per process): `st.cache_resource`
(shared by every session.

Two browser sessions routing at once share one backend object; the backend serialises its own
inference (HFBackend holds a lock around tokenising and the forward pass), so no lock is needed
here. The cache key is what makes a backend (model, device, dtype, quantisation, ...), not the
stage name, so two stages of the same model share one copy.
"""

from __future__ import annotations

import json
import os
import threading
import time

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


_build_lock = threading.Lock()  # one model build (or the code warm-up) at a time in this process


@st.cache_resource(show_spinner=False, max_entries=12)
def _load_backend(key: str):
    from cascade_core.compose.live import build_backend

    fields = json.loads(key)
    # Serialised: a first build imports transformers' model code, and two threads importing it at
    # once (the start-up warm-up and a question's load) once left the question's stage failing
    # (bench/first_answer.py, cold-kept routed right after opening, 2026-12-01). On 2 cores two
    # loads at once are no faster than one after the other.
    with _build_lock:
        backend = build_backend(StageConfig(name="cached", **fields))
    with _loaded_lock:
        _loaded[key] = backend
    return backend


_key_locks: dict[str, threading.Lock] = {}
_load_seconds: dict[str, float] = {}
_preloads: dict[str, dict] = {}  # backend key -> {"state": "waiting|loading|loaded|failed", "error": str}
PRELOAD_ENV = "CASCADE_APP_PRELOAD"  # "0": never preload at start-up, "1": always; unset: the packaged CPU presets


def _key_lock(key: str) -> threading.Lock:
    with _loaded_lock:
        return _key_locks.setdefault(key, threading.Lock())


def get_backend(config: StageConfig):
    """The stage's backend, loading it on first use (raises the backend's own error if it cannot).

    One lock per backend: a page that needs a model the background preloader is loading waits for
    that load instead of loading a second copy."""
    key = backend_key(config)
    with _key_lock(key):
        with _loaded_lock:
            known = key in _loaded
        started = time.perf_counter()
        backend = _load_backend(key)
        took = time.perf_counter() - started
        if not known and took >= 0.05:  # a model found in memory was not "loaded in 0.0 s" (issue 22)
            with _loaded_lock:
                _load_seconds.setdefault(key, took)
        return backend


def load_seconds(config: StageConfig) -> float | None:
    """How long the stage's model took to load in this process (None: not loaded yet)."""
    with _loaded_lock:
        return _load_seconds.get(backend_key(config))


def lazy_stage(config: StageConfig, policy: StagePolicy) -> RuntimeStage:
    """A stage whose model loads when the cascade first reaches it (compose.live.LazyBackend),
    through this process's shared cache."""
    from cascade_core.compose.live import lazy_runtime_stage

    stage = lazy_runtime_stage(config, load=lambda: get_backend(config))
    stage.policy = policy
    return stage


def preload_default(stages) -> bool:
    """Whether start-up preloading is on by default: $CASCADE_APP_PRELOAD, else for a preset of
    packaged models on the CPU (the first question then finds them loaded)."""
    flag = os.environ.get(PRELOAD_ENV, "").strip().lower()
    if flag in ("0", "false", "no", "off"):
        return False
    if flag in ("1", "true", "yes", "on"):
        return True
    local = [c for c in stages if c.enabled and c.backend != "recorded"]
    if not local or any(c.backend != "packaged" for c in local):
        return False
    from cascade_core.compose.live import resolved_runtime

    try:
        return all(resolved_runtime(c)[0] == "cpu" for c in local)
    except Exception:  # noqa: BLE001 - no preloading where the device cannot be resolved
        return False


def start_preload(stages) -> None:
    """Load the stages' models in a background thread, smallest first, without blocking the page;
    a stage already loaded, loading or failed is left alone. Runs once per model per process."""
    todo = []
    with _loaded_lock:
        for config in stages:
            if not config.enabled or config.backend not in ("packaged", "hf"):
                continue
            key = backend_key(config)
            if key in _preloads or key in _loaded:
                continue
            if not fetched_status(config)[0]:
                continue
            _preloads[key] = {"state": "waiting", "error": "", "label": config.display_name}
            todo.append((key, config))
    if not todo:
        return

    def work():
        for key, config in todo:
            with _loaded_lock:
                _preloads[key]["state"] = "loading"
            try:
                get_backend(config)
            except Exception as err:  # noqa: BLE001 - kept for the Settings page; the Route page retries
                with _loaded_lock:
                    _preloads[key].update(state="failed", error=f"{type(err).__name__}: {err}")
                continue
            with _loaded_lock:
                _preloads[key]["state"] = "loaded"

    threading.Thread(target=work, name="cascade-preload", daemon=True).start()


_warmed = threading.Event()


def start_warm_up(stages) -> None:
    """Once per process, in a background thread: import the model code the stages need, loading no
    model (compose.live.warm_model_code), so that with preloading off a question that reaches an
    unloaded model waits for its weights only."""
    with _loaded_lock:
        if _warmed.is_set():
            return
        _warmed.set()

    def work():
        from cascade_core.compose.live import warm_model_code

        try:
            with _build_lock:
                warm_model_code(stages)
        except Exception:  # noqa: BLE001 - only a head start: the first load imports whatever is missing
            pass

    threading.Thread(target=work, name="cascade-warm-up", daemon=True).start()


def preload_state(config: StageConfig) -> dict | None:
    """The background preload of a stage's model: {"state", "error"} or None when none was started."""
    with _loaded_lock:
        found = _preloads.get(backend_key(config))
        return dict(found) if found else None


def is_loaded(config: StageConfig) -> bool:
    with _loaded_lock:
        return backend_key(config) in _loaded


def unload_all() -> None:
    """Drop every cached model (the memory comes back once no session holds one)."""
    _load_backend.clear()
    with _loaded_lock:
        _loaded.clear()
        _load_seconds.clear()
        for key, found in list(_preloads.items()):
            if found["state"] in ("loaded", "failed"):
                del _preloads[key]
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
    # Buffers too: prepacked linear layers (models.hf.prepack_linear_layers) hold their weights as buffers.
    return int(sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers())))


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


def runs_as(config: StageConfig) -> str:
    """How a stage really runs, for Home and Settings: the loaded backend's device, dtype and
    quantisation ("cpu, float32, from GGUF Q4_K_M"), else what it will resolve to once loaded."""
    if config.backend in ("recorded",):
        return "recorded outcomes (no model)"
    if config.backend == "openai":
        return f"remote endpoint ({config.api_base or 'default base URL'})"
    with _loaded_lock:
        backend = _loaded.get(backend_key(config))
    source = ""
    if config.backend == "packaged":
        spec = packaged_models().get(config.model)
        if spec is not None:
            kind = spec.gguf_name.rsplit(".", 2)[-2] if spec.gguf_name.count(".") >= 2 else spec.gguf_name
            source = f", from GGUF {kind.split('-')[-1].upper()} (dequantised)"
    if backend is None:
        from cascade_core.compose.live import resolved_runtime

        try:
            device, dtype, quant = resolved_runtime(config)
        except Exception as err:  # noqa: BLE001 - shown, not raised: the page must render
            return f"cannot run here: {err}"
        return f"not loaded: will run on {device}, {dtype}" + (f", {quant}" if quant != "none" else "") + source
    dtype = str(getattr(backend, "dtype", "")).replace("torch.", "")
    quant = str(getattr(backend, "quantization", "none"))
    return f"{getattr(backend, 'device', '?')}, {dtype}" + (f", {quant}" if quant != "none" else "") + source


def number_formats(configs, applied=None) -> dict:
    """Stage name -> its `compose.formats.StageFormat` (the live number format, from the loaded model
    where there is one, beside the format the policy was calibrated on); `applied`: the preset's
    AppliedPolicy (its policy file is the reference when it has one)."""
    from app_ui.data import where
    from cascade_core.compose.formats import stage_formats

    with _loaded_lock:
        loaded = {c.name: _loaded[backend_key(c)] for c in configs if backend_key(c) in _loaded}
    policy_file = applied.file if applied is not None and applied.policy is not None else None
    return stage_formats(configs, policy_file, where(), loaded=loaded)


def format_caption(configs, applied=None) -> tuple[str, bool]:
    """One line for a page: each local stage's number format, stages that say the same grouped
    ("**Number format**: SmolLM2-135M-Instruct, Qwen2.5-Coder-1.5B-Instruct: float32 here;
    calibrated on bfloat16 records: about 5% of answers may differ."), and whether any stage runs in
    another format than its records; ("", False) when no stage has a format of ours."""
    from app_ui.view_model import label_of

    labels = {c.name: label_of(c) for c in configs}
    groups: dict[str, list[str]] = {}
    differs = False
    for name, found in number_formats(configs, applied).items():
        if found.live:
            groups.setdefault(found.note, []).append(labels[name])
            differs = differs or found.differs
    if not groups:
        return "", False
    return "**Number format**: " + " ".join(f"{', '.join(names)}: {note}." for note, names in groups.items()), differs
