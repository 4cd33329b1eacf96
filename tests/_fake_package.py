"""A small fake packaged model for tests of fetch and the GGUF cache (test_packaged, test_hardening).

Its parts are real wheels built here and laid in the wheel cache, so pip is never asked and no real
model is needed; the spec is registered under `FAKE` in `PACKAGED_MODELS` for the test's duration.
"""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

from models.packaged import PACKAGED_MODELS, PackagedModel, Part

FAKE = "fake-model"


def fake_packaged_model(tmp_path: Path, monkeypatch, chunks: list[bytes], sha256: str | None = None) -> PackagedModel:
    """A two-or-more-part 'model' whose wheels already sit in the cache (tmp_path/cache)."""
    root = tmp_path / "cache"
    wheels = root / "wheels" / FAKE
    wheels.mkdir(parents=True)
    parts = []
    for i, chunk in enumerate(chunks, 1):
        part = Part(f"fake-model-part{i}", "1.0.0", f"fake_model_part{i}/data/part{i:02d}.bin")
        with zipfile.ZipFile(wheels / f"fake_model_part{i}-1.0.0-py3-none-any.whl", "w") as archive:
            archive.writestr(f"fake_model_part{i}/__init__.py", "")
            archive.writestr(part.member, chunk)
        parts.append(part)
    whole = b"".join(chunks)
    spec = PackagedModel(
        key=FAKE, label="fake", arch="llama", n_layers=1, hidden_size=8, total_params=1000, license="none",
        gguf_name="fake.gguf", gguf_size=len(whole), sha256=sha256 or hashlib.sha256(whole).hexdigest(),
        parts=tuple(parts),
    )
    monkeypatch.setitem(PACKAGED_MODELS, FAKE, spec)
    return spec
