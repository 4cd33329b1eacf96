"""Hardening: bad input, faults, load and secrets, against the real `python -m cascade_core serve`.

Already covered elsewhere (not repeated here): empty / whitespace / 1 and 27 / duplicate options
and control characters in `validate_question` (test_prompts.py); thresholds NaN, -1, 2 in a preset
(test_presets.py) and in a StagePolicy (test_policy.py); a probe of the wrong feature size or
model (test_probe.py); a model file whose hash does not match and a truncated wheel
(test_packaged.py); remote-stage faults inside `run_cascade` (test_openai_stage.py). This file
drives the same inputs through the server and the CLI, where users meet them.

Processes: A = `serve --single-stage smollm2-135m` (its API key planted), B = `serve --preset
<tmp preset>` (bearer token planted): local SmolLM2 -> an endpoint that echoes the Authorization
header in a 400 -> A. Both on free loopback ports, their output captured for the secret grep.
"""

from __future__ import annotations

import asyncio
import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from _loopback import REPO_ROOT, SubprocessServer, ThreadServer, free_port
from cascade_core import cli
from cascade_core.cascade import RuntimeStage
from cascade_core.server.cascade_app import create_cascade_app
from cascade_core.server.common import check_bind_host, is_loopback
from models.openai_stage import OpenAIStage

KEY_ENV = "CASCADE_TEST_HARDEN_REMOTE_KEY"
REMOTE_KEY = "sk-harden-planted-7e6d5c4b3a29"
TOKEN_ENV = "CASCADE_TEST_HARDEN_TOKEN"
TOKEN = "tok-harden-planted-1a2b3c4d5e"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MC = "What is 7 times 8?\nA. 54\nB. 56\nC. 58\nD. 64"
SEEN: list[str] = []  # every response body, for the secret grep at the end


# ---- the fault endpoint ----------------------------------------------------------------------


def _answer(top):
    logprobs = None if top is None else {"content": [{"token": top[0][0], "logprob": top[0][1],
                                                      "top_logprobs": [{"token": t, "logprob": lp} for t, lp in top]}]}
    return {"choices": [{"index": 0, "message": {"role": "assistant", "content": "A"}, "logprobs": logprobs}],
            "usage": {"prompt_tokens": 9, "completion_tokens": 1}}


@pytest.fixture(scope="module")
def faults():
    """/{kind}/v1/chat/completions: e500, hang (3 s), nologprobs, echo (400 with the auth header)."""
    app = FastAPI()

    @app.post("/{kind}/v1/chat/completions")
    async def chat(kind: str, request: Request):
        if kind == "e500":
            return JSONResponse({"error": {"message": "boom"}}, status_code=500)
        if kind == "hang":
            await asyncio.sleep(3)
            return _answer([("A", -0.1)])
        if kind == "nologprobs":
            return _answer(None)
        if kind == "echo":
            return JSONResponse({"error": {"message": f"bad header {request.headers.get('authorization')}"}},
                                status_code=400)
        return JSONResponse({"error": "unknown"}, status_code=404)

    with ThreadServer(app) as running:
        yield running


# ---- the two server processes ----------------------------------------------------------------


@pytest.fixture(scope="module")
def remote(tmp_path_factory):
    from models.packaged import fetch

    fetch("smollm2-135m", progress=False)
    log = tmp_path_factory.mktemp("a") / "a.log"
    args = ["serve", "--single-stage", "smollm2-135m", "--token-env", KEY_ENV, "--threads", "1", "--device", "cpu",
            "--log-level", "info"]
    with SubprocessServer("cascade_core", args, env={KEY_ENV: REMOTE_KEY}, log_path=log) as server:
        yield server


def write_preset(folder: Path, remote_url: str, faults_url: str) -> Path:
    path = folder / "hardening.toml"
    path.write_text(f"""
name = "hardening"
[[stages]]
name = "local"
backend = "packaged"
model = "smollm2-135m"
device = "cpu"
dtype = "float32"
rule = "pt_only"
tau_t = 0.6

[[stages]]
name = "echo-fault"
backend = "openai"
model = "fault"
api_base = "{faults_url}/echo/v1"
api_key_env = "{KEY_ENV}"
max_retries = 0

[[stages]]
name = "remote"
backend = "openai"
model = "smollm2-135m"
api_base = "{remote_url}/v1"
api_key_env = "{KEY_ENV}"
api_mode = "completions"
timeout_s = 60
concurrency = 4
""", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def cascade(remote, faults, tmp_path_factory):
    folder = tmp_path_factory.mktemp("b")
    preset = write_preset(folder, remote.url, faults.url)
    args = ["serve", "--preset", str(preset), "--token-env", TOKEN_ENV, "--threads", "1", "--max-in-flight", "2",
            "--max-queue", "16", "--log-level", "info"]
    server = SubprocessServer("cascade_core", args, env={KEY_ENV: REMOTE_KEY, TOKEN_ENV: TOKEN},
                              log_path=folder / "b.log")
    with server:
        server.client = httpx.Client(base_url=server.url, timeout=120, headers=AUTH)
        yield server
        server.client.close()


def post(server, body=None, content: bytes | None = None, headers=None) -> httpx.Response:
    if content is not None:
        response = server.client.post("/v1/chat/completions", content=content,
                                      headers={"content-type": "application/json", **(headers or {})})
    else:
        response = server.client.post("/v1/chat/completions", json=body, headers=headers)
    SEEN.append(response.text + json.dumps(dict(response.headers)))
    return response


def user(content: str, **extra) -> dict:
    return {"messages": [{"role": "user", "content": content}], **extra}


# ---- bad input over HTTP ---------------------------------------------------------------------

BAD_BODIES = [
    ("empty question", user(""), 400, "the question is empty"),
    ("whitespace question", user(" \n\t  "), 400, "the question is empty"),
    ("only options", user("A. x\nB. y"), 400, "the question is empty"),
    ("control character", user("What\x00 is this?\nA. x\nB. y"), 400, "control characters (U+0000)"),
    ("escape in an option", user("Q?", options=["a", "b\x1b[31m"]), 400, "option B contains control characters"),
    ("1 option", user("Q?", options=["only"]), 400, "needs 2 to 26 options, got 1"),
    ("27 options", user("Q?", options=[f"o{i}" for i in range(27)]), 400, "needs 2 to 26 options, got 27"),
    ("duplicate options", user("Q?\nA. same\nB. other\nC.  same"), 400, "options A and C are the same"),
    ("1 MB question", user("x" * 1_000_000), 413, "over the limit of 1000000 bytes"),
    ("100k-character question", user("x" * 100_000), 400, "over the prompt limit of 32000"),
    ("messages not a list", {"messages": "hi"}, 400, "messages"),
    ("no messages", {"messages": []}, 400, "messages"),
]


@pytest.mark.model
@pytest.mark.parametrize("what, body, status, needle", BAD_BODIES, ids=[b[0] for b in BAD_BODIES])
def test_bad_input_is_a_clear_4xx(cascade, what, body, status, needle):
    response = post(cascade, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert needle in error["message"] and error["type"] == "invalid_request_error"
    assert "Traceback" not in response.text


@pytest.mark.model
@pytest.mark.parametrize("raw, needle", [
    (b'{"messages": [{"role": "user", "content": "caf\xe9 \xff"}]}', "not UTF-8 (UnicodeDecodeError"),
    (b'{"messages": [', "not valid JSON"),
    (b'{"messages": [{"role": "user", "content": "Q\\ud800?"}]}', "lone surrogate (U+D800)"),
    (b"", "empty request body"),
    (b"[1, 2]", "must be a JSON object"),
])
def test_invalid_bytes_and_broken_json_are_400(cascade, raw, needle):
    response = post(cascade, content=raw)
    assert response.status_code == 400 and needle in response.json()["error"]["message"]


@pytest.mark.model
def test_the_cascade_answers_through_a_failing_stage_with_the_fault_in_the_trace(cascade):
    body = post(cascade, user(MC, options=None)).json()
    steps = body["cascade"]["steps"]
    assert steps[0]["stage"] == "local" and steps[-1]["decision"] in ("keep", "final")
    if steps[0]["decision"] == "escalate":
        echo = steps[1]
        assert echo["decision"] == "error" and "HTTP 400" in echo["error"] and "Bearer ***" in echo["error"]
        assert steps[2]["stage"] == "remote" and steps[2]["decision"] == "final"
    # the echo stage alone is the last stage: its failure is a 502 carrying the trace
    failed = post(cascade, user(MC, model="echo-fault"))
    assert failed.status_code == 502 and "could not answer" in failed.json()["error"]["message"]
    assert failed.json()["cascade"]["steps"][0]["decision"] == "error"
    assert failed.headers["X-Cascade-Path"] == "echo-fault:error"


# ---- faults over HTTP (in-process server: a fault stage in front of the remote process) -------

FAULTS = {"down": "ConnectError", "e500": "HTTP 500", "hang": "ReadTimeout", "nologprobs": "no logprobs"}


def fault_stage(faults, kind: str) -> OpenAIStage:
    url = f"http://127.0.0.1:{free_port()}/v1" if kind == "down" else f"{faults.url}/{kind}/v1"
    return OpenAIStage("fault", url, timeout_s=0.5, max_retries=1, backoff_s=0.01)


@pytest.fixture(scope="module")
def remote_stage(remote):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(KEY_ENV, REMOTE_KEY)
        stage = OpenAIStage("smollm2-135m", f"{remote.url}/v1", api_key_env=KEY_ENV, mode="completions", timeout_s=60)
    yield stage
    stage.close()


@pytest.fixture(scope="module")
def fault_server(faults, remote_stage):
    cascades = {}
    for kind in FAULTS:
        for policy in ("escalate", "fail"):
            cascades[f"{kind}-{policy}"] = [RuntimeStage(f"{kind}-{policy}-stage", fault_stage(faults, kind),
                                                         on_error=policy),
                                            RuntimeStage(f"remote-after-{kind}-{policy}", remote_stage)]
    with ThreadServer(create_cascade_app(cascades, serve_stages=False)) as running:
        yield running


@pytest.mark.model
@pytest.mark.parametrize("kind", sorted(FAULTS))
def test_a_faulty_stage_escalates_or_fails_per_its_policy(fault_server, kind):
    url = f"{fault_server.url}/v1/chat/completions"
    escalated = httpx.post(url, json=user(MC, model=f"cascade-{kind}-escalate"), timeout=60)
    assert escalated.status_code == 200, escalated.text
    fault, answered = escalated.json()["cascade"]["steps"]
    assert fault["decision"] == "error" and FAULTS[kind] in fault["error"]
    assert answered["decision"] == "final" and answered["answer"] in "ABCD"
    assert escalated.headers["X-Cascade-Escalations"] == "1"
    failed = httpx.post(url, json=user(MC, model=f"cascade-{kind}-fail"), timeout=60)
    assert failed.status_code == 502 and FAULTS[kind] in failed.json()["error"]["message"]
    assert [s["decision"] for s in failed.json()["cascade"]["steps"]] == ["error"]
    for response in (escalated, failed):
        SEEN.append(response.text)


# ---- load ------------------------------------------------------------------------------------


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.mark.model
def test_64_concurrent_requests_are_answered_or_cleanly_rejected(cascade):
    before = rss_bytes(cascade.proc.pid)
    questions = [user(f"What is {a} plus {a + 1}?\nA. {2 * a + 1}\nB. {2 * a}\nC. {2 * a + 3}\nD. {a}")
                 for a in range(1, 65)]
    with ThreadPoolExecutor(max_workers=64) as pool:
        responses = list(pool.map(lambda body: post(cascade, body), questions))
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 429, 503}, statuses
    assert statuses.count(200) >= 1 and statuses.count(429) >= 1  # 2 running + 16 waiting < 64
    for r in responses:
        if r.status_code == 200:
            assert r.json()["choices"][0]["message"]["content"][0] in "ABCD"
        else:
            assert r.json()["error"]["message"]
    health = cascade.client.get("/health").json()
    assert all(q["in_flight"] == 0 and q["waiting"] == 0 for q in health["queues"].values())
    after = rss_bytes(cascade.proc.pid)
    assert after < before + 1024**3, (before, after)  # a sanity bound, not a measurement
    metrics = cascade.client.get("/metrics").json()
    assert metrics["requests"]["by_status"]["429"] == statuses.count(429)


# ---- the CLI ---------------------------------------------------------------------------------


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out + captured.err


GOOD_STAGE = '[[stages]]\nname = "a"\nbackend = "packaged"\nmodel = "smollm2-135m"\n'


@pytest.mark.parametrize("argv, needle", [
    (["", "--options", "a", "b"], "the question is empty"),
    (["  \t ", "--options", "a", "b"], "the question is empty"),
    (["Q\x07?", "--options", "a", "b"], "control characters (U+0007)"),
    (["Q\udcff?"], "control characters (U+DCFF)"),  # an undecodable byte in argv (surrogateescape)
    (["Q?", "--options", "only"], "at least 2 options"),
    (["Q?", "--options", *[f"o{i}" for i in range(27)]], "at most 26"),
    (["Q?", "--options", "same", "other", "same"], "options A and C are the same"),
])
def test_bad_questions_on_the_route_cli_are_one_line_messages(capsys, argv, needle):
    code, text = run_cli(capsys, "route", *argv)
    assert code == 2 and text.startswith("error: ") and needle in text and "Traceback" not in text


def test_serve_single_stage_with_an_unknown_model_is_a_cli_message(capsys):
    code, text = run_cli(capsys, "serve", "--single-stage", "no-such-model")
    assert code == 2 and "no-such-model" in text and "Traceback" not in text


@pytest.mark.parametrize("line", ["tau_t = nan", "tau_t = -1", "tau_ik = 2", "tau_learned = nan"])
@pytest.mark.parametrize("command", [["route", "Q?", "--options", "a", "b"], ["serve"]])
def test_bad_thresholds_in_a_preset_are_a_cli_message(tmp_path, capsys, line, command):
    preset = tmp_path / "p.toml"
    preset.write_text('name = "p"\n' + GOOD_STAGE + line + "\n")
    code, text = run_cli(capsys, *command, "--preset", str(preset))
    assert code == 2 and "must be a number in [0, 1]" in text and str(preset) in text
    assert "Traceback" not in text


@pytest.mark.parametrize("content, needle", [
    ('name = "p"\n[[stages]\n', "not valid TOML"),
    ('name = "p"\n' + GOOD_STAGE + 'colour = "red"\n', "unknown key"),
    ("\xff\xfe", "not valid TOML"),
])
def test_a_malformed_preset_is_a_cli_message(tmp_path, capsys, content, needle):
    preset = tmp_path / "bad.toml"
    preset.write_bytes(content.encode("latin-1"))
    code, text = run_cli(capsys, "serve", "--preset", str(preset))
    assert code == 2 and needle in text and "Traceback" not in text


def test_serve_refuses_a_non_loopback_host(capsys):
    code, text = run_cli(capsys, "serve", "--host", "0.0.0.0")
    assert code == 2 and "not a loopback address" in text and "--allow-remote" in text
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and is_loopback("127.5.0.1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2") and not is_loopback("example.org")
    check_bind_host("0.0.0.0", allow_remote=True)  # said explicitly: allowed


def test_serve_refuses_a_recorded_stage_before_loading_models(capsys):
    code, text = run_cli(capsys, "serve", "--preset", "api-recorded")
    assert code == 2 and "gpt-4-recorded" in text and "cannot answer live questions" in text


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_corrupted_results_parquet_is_a_cli_message(tmp_path, capsys, damage):
    import pandas as pd

    records = tmp_path / "results" / "mmlu" / "smollm2-135m.parquet"
    records.parent.mkdir(parents=True)
    pd.DataFrame({"qid": ["q1", "q2"], "correct": [True, False], "prediction": [0, 1],
                  "p_t": [0.9, 0.4]}).to_parquet(records)
    data = records.read_bytes()
    records.write_bytes(b"this is not parquet" * 10 if damage == "garbage" else data[: len(data) // 2])
    code, text = run_cli(capsys, "probes", "train", "--stages", "smollm2-135m", "--results-dir",
                         str(tmp_path / "results"),
                         "--features-dir", str(tmp_path / "features"), "--probes-dir", str(tmp_path / "probes"))
    assert code == 2 and "not a valid parquet file" in text and str(records) in text and "Traceback" not in text


def test_a_truncated_gguf_in_the_cache_is_detected_and_rebuilt(tmp_path, monkeypatch, caplog):
    from _fake_package import fake_packaged_model
    from models import packaged

    whole = b"GGUF" + bytes(range(256)) * 8
    spec = fake_packaged_model(tmp_path, monkeypatch, [whole[:1000], whole[1000:]])
    dest = tmp_path / "cache" / "gguf" / spec.gguf_name
    dest.parent.mkdir(parents=True)
    dest.write_bytes(whole[:700])  # an interrupted copy
    assert packaged.ensure_gguf(spec, tmp_path / "cache", progress=False).read_bytes() == whole
    assert "expected" in caplog.text and spec.sha256 in caplog.text


# ---- security --------------------------------------------------------------------------------


@pytest.mark.model
def test_auth_on_the_cli_server(cascade):
    url = cascade.url
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": f"Basic {TOKEN}"}):
        response = httpx.post(f"{url}/v1/chat/completions", json=user(MC), headers=headers, timeout=30)
        SEEN.append(response.text)
        assert response.status_code == 401 and "API key" in response.json()["error"]["message"]


@pytest.mark.model
def test_no_secret_in_logs_bodies_or_traces(cascade, remote, fault_server):
    """Every path a secret could leak by, exercised here (so the test stands alone, in any order):
    a remote stage called with its key, free-form, a faulty stage, wrong and missing tokens,
    metrics and health. Whatever other tests of the module saw (SEEN) is searched too."""
    post(cascade, user(MC))
    post(cascade, user("Name a colour.", max_tokens=4))
    post(cascade, user(MC, model="echo-fault"))
    post(cascade, user(MC), headers={"Authorization": f"Bearer {REMOTE_KEY}"})  # the wrong secret as token
    post(cascade, user(MC), headers={"Authorization": "Bearer nope"})
    post(cascade, user(MC), headers={"Authorization": f"Basic {REMOTE_KEY}"})
    SEEN.append(cascade.client.get("/metrics").text + cascade.client.get("/health").text)
    logs = cascade.log_tail() + Path(cascade.log_path).read_text(errors="replace") + \
        Path(remote.log_path).read_text(errors="replace")
    assert "POST /v1/chat/completions" in logs  # the access log is on: there is something to search
    for secret in (REMOTE_KEY, TOKEN):
        assert secret not in logs
        for text in SEEN:
            assert secret not in text
    written = [p for p in Path(cascade.log_path).parent.rglob("*") if p.is_file()]
    for path in written:
        content = path.read_text(errors="replace")
        assert REMOTE_KEY not in content and TOKEN not in content, path


def test_no_pickle_or_joblib_loading_in_the_code():
    """Nothing a user loads goes through pickle: npz (allow_pickle=False), JSON, parquet, safetensors."""
    patterns = [r"\bpickle\.loads?\(", r"\bimport pickle\b", r"\bjoblib\b", r"\bcloudpickle\b", r"\bdill\b",
                r"allow_pickle\s*=\s*True", r"torch\.load\((?![^)]*weights_only\s*=\s*True)"]
    offenders = []
    roots = ["cascade_core", "models", "app_ui", "pages", "bench", "tests"]
    files = [REPO_ROOT / "app.py"] + [p for r in roots for p in (REPO_ROOT / r).rglob("*.py")]
    for path in files:
        if path.name == Path(__file__).name:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        for pattern in patterns:
            for match in re.finditer(pattern, text):
                offenders.append(f"{path.relative_to(REPO_ROOT)}: {match.group(0)}")
    assert not offenders, offenders


# ---- free-form answers: never an empty one ---------------------------------------------------


class _Says:
    """A backend whose free-form answer is fixed (the shape any backend returns)."""

    has_hidden_states = False
    total_params = non_embedding_params = 0

    def __init__(self, name: str, text: str):
        self.model_id, self.text = name, text

    def generate(self, prompt, max_new_tokens=64, *, cancel=None, on_text=None, layers=None, gate=None):
        import numpy as np

        from cascade_core.types import Generation

        return Generation(text=self.text, token_logprobs=np.array([-0.01]), prompt_tokens=5, output_tokens=1,
                          tokens=("<|im_end|>",) if not self.text else ("x",))


@pytest.mark.parametrize("empty", ["", "  \n\t", "\n"])
def test_an_empty_free_form_answer_is_never_kept(empty):
    from cascade_core.cascade import CascadeError, run_cascade
    from cascade_core.policy import StagePolicy
    from cascade_core.types import Question

    keep_anything = StagePolicy(tau_t=0.0, rule="pt_only")
    stages = [RuntimeStage("first", _Says("first", empty), policy=keep_anything),
              RuntimeStage("last", _Says("last", "Seven."))]
    trace = run_cascade(stages, Question("Name a prime number."))
    first, last = trace.steps
    assert (first.decision, first.reason, first.p_t) == ("escalate", "empty answer", 0.0)
    assert trace.answer == "Seven." and last.decision == "final"
    with pytest.raises(CascadeError, match="empty answer") as failed:
        run_cascade([RuntimeStage("only", _Says("only", empty))], Question("Name a prime number."))
    (only,) = failed.value.trace.steps
    assert (only.decision, only.reason) == ("error", "empty answer")


@pytest.mark.model
def test_route_name_a_prime_number_on_the_default_preset_is_never_empty(capsys):
    """A real SmolLM2 run (the default preset's first stage): it used to answer "" (its raw
    prompt made it end its turn at once); through the chat template it answers."""
    code = cli.main(["route", "Name a prime number.", "--preset", "default", "--stages", "smollm2-135m", "--json",
                     "--max-new-tokens", "24"])
    out = capsys.readouterr().out
    assert code == 0, out
    trace = json.loads(out.strip().splitlines()[-1])
    assert trace["answer"] and trace["answer"].strip()
    assert trace["steps"][-1]["output_tokens"] <= 24


# ---- issue 23 item 7: the app is as closed as the server --------------------------------------


def test_the_app_binds_to_loopback_unless_exposed_on_the_make_command_line():
    import os
    import subprocess
    import tomllib

    config = tomllib.loads((REPO_ROOT / ".streamlit" / "config.toml").read_text(encoding="utf-8"))
    assert config["server"]["address"] == "127.0.0.1"

    def dry_run(*args, env=None) -> str:
        out = subprocess.run(["make", "-n", "run", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                             env={**os.environ, **(env or {})}, check=True).stdout
        return " ".join(out.split())

    assert "--server.address 127.0.0.1" in dry_run()
    assert "--server.address 127.0.0.1" in dry_run(env={"HOST": "my-laptop"})  # a shell's HOST does not expose it
    assert "--server.address 0.0.0.0" in dry_run("HOST=0.0.0.0")


@pytest.mark.parametrize("api_base, env, allowed", [
    ("http://127.0.0.1:8001/v1", {}, True),
    ("http://localhost:8000/v1", {}, True),
    ("http://[::1]:8000/v1", {}, True),
    ("https://api.openai.com/v1", {}, False),
    ("http://169.254.169.254/latest/meta-data", {}, False),
    ("http://10.0.0.5:8000/v1", {}, False),
    ("http://127.0.0.1@evil.example/v1", {}, False),  # the host is evil.example, not the user part
    ("https://api.openai.com/v1", {"CASCADE_ALLOWED_API_HOSTS": "api.openai.com, 10.0.0.5"}, True),
    ("http://10.0.0.5:8000/v1", {"CASCADE_ALLOWED_API_HOSTS": "api.openai.com,10.0.0.5"}, True),
    ("http://10.0.0.6:8000/v1", {"CASCADE_ALLOWED_API_HOSTS": "api.openai.com,10.0.0.5"}, False),
    ("http://anything.example/v1", {"CASCADE_ALLOWED_API_HOSTS": "*"}, True),
    ("file:///etc/passwd", {"CASCADE_ALLOWED_API_HOSTS": "*"}, False),
])
def test_add_stage_calls_only_allowed_endpoint_hosts(api_base, env, allowed):
    from cascade_core.endpoint_hosts import api_base_problem

    problem = api_base_problem(api_base, env=env)
    assert (problem is None) == allowed, problem
    if problem and "evil" in api_base:
        assert "'evil.example' is not allowed" in problem and "CASCADE_ALLOWED_API_HOSTS" in problem


def test_the_add_stage_form_refuses_a_host_outside_the_allow_list(tmp_path, monkeypatch):
    """The app's form, driven by Streamlit's AppTest: a cloud metadata address is refused with the
    switch named; after the operator's opt-in the same stage is added."""
    from streamlit.testing.v1 import AppTest

    from _records import write_synthetic_records
    from app_ui import state

    write_synthetic_records(tmp_path / "results")
    for name, value in {"CASCADE_RESULTS_DIR": str(tmp_path / "results"), "CASCADE_APP_PRELOAD": "0",
                        "CASCADE_POLICIES_DIR": str(tmp_path / "policies")}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("CASCADE_ALLOWED_API_HOSTS", raising=False)
    at = AppTest.from_file(str(REPO_ROOT / "app.py"), default_timeout=120)
    at.run()
    at.switch_page("pages/4_Settings.py").run()
    at.radio(key="add_kind").set_value("openai").run()
    at.text_input(key="add_api_model").set_value("m")
    at.text_input(key="add_api_base").set_value("http://169.254.169.254/v1")
    at.text_input(key="add_name").set_value("metadata")
    at.button(key="FormSubmitter:add_stage-Add stage").click().run()
    shown = "\n".join(str(e.value) for e in at.error)
    assert "host '169.254.169.254' is not allowed" in shown and "CASCADE_ALLOWED_API_HOSTS" in shown
    added = at.session_state[state.ADDED_KEY] if state.ADDED_KEY in at.session_state else {}
    assert not added.get("default")
    monkeypatch.setenv("CASCADE_ALLOWED_API_HOSTS", "169.254.169.254")
    at.button(key="FormSubmitter:add_stage-Add stage").click().run()
    assert [s["name"] for s in at.session_state[state.ADDED_KEY]["default"]] == ["metadata"]
