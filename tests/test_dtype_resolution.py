"""What dtype "auto" resolves to on a CPU, forced each way, and the comparisons that must hold in either.

The suite pins "auto" to float32 (tests/conftest.py) so that its numbers are the same on an
AVX2-only CPU and on one with native bfloat16. These tests undo or change that pin to check the
resolution itself and to run the cross-process comparison (a server beside a local backend, both
"auto") with "auto" resolved each way, whatever this machine's CPU is.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from _loopback import SubprocessServer
from cascade_core.presets import StageConfig

PIN = "CASCADE_AUTO_DTYPE"
CPU = torch.device("cpu")


@pytest.mark.parametrize("native, expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_unpinned_auto_follows_the_cpu_flags(monkeypatch, native, expected):
    import models.hf as hf

    monkeypatch.delenv(PIN, raising=False)
    monkeypatch.setattr(hf, "cpu_has_native_bf16", lambda cpuinfo=None: native)
    assert hf.resolve_dtype("auto", CPU) == expected
    assert hf.resolve_dtype("float32", CPU) == torch.float32  # an explicit format is never resolved
    assert hf.resolve_dtype("bfloat16", CPU) == torch.bfloat16


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("pin, expected", [("float32", torch.float32), ("bfloat16", torch.bfloat16)])
def test_the_pin_wins_over_the_cpu_flags(monkeypatch, native, pin, expected):
    import models.hf as hf

    monkeypatch.setenv(PIN, pin)
    monkeypatch.setattr(hf, "cpu_has_native_bf16", lambda cpuinfo=None: native)
    assert hf.resolve_dtype("auto", CPU) == expected


def test_a_bad_pin_names_the_variable_and_the_choices(monkeypatch):
    from models.hf import resolve_dtype

    monkeypatch.setenv(PIN, "float64")
    with pytest.raises(ValueError, match=f"{PIN}='float64'.*float32, bfloat16"):
        resolve_dtype("auto", CPU)


@pytest.mark.parametrize("pin", ["float32", "bfloat16"])
def test_the_stage_tables_say_the_format_auto_resolves_to(monkeypatch, pin):
    """Home and Settings show what a not-yet-loaded stage will run as (`resolved_runtime`)."""
    from cascade_core.compose.live import resolved_runtime

    monkeypatch.setenv(PIN, pin)
    config = StageConfig(name="smollm2-135m", backend="packaged", model="smollm2-135m", dtype="auto", device="cpu")
    assert resolved_runtime(config) == ("cpu", pin, "none")


@pytest.mark.model
@pytest.mark.parametrize("pin", ["float32", "bfloat16"])
def test_a_server_and_a_local_backend_both_on_auto_agree_in_either_format(monkeypatch, tmp_path, smollm2_path, pin):
    """`serve --single-stage` (another process) and a local HFBackend, both "auto", both pinned the
    same way: the same letters and P(T). Each prompt is scored alone on both sides, so no padding
    separates them, and both run torch on one thread, so no split of the sums does: even bfloat16
    gives the same numbers."""
    import torch

    from cascade_core.prompts import format_prompt
    from cascade_core.types import Question
    from models.hf import DTYPES, HFBackend
    from models.openai_stage import OpenAIStage

    monkeypatch.setenv(PIN, pin)
    questions = [
        Question(text="What is the capital of France?", options=("Berlin", "Madrid", "Paris", "Rome"),
                 subject="geography"),
        Question(text="What is 7 times 8?", options=("54", "56", "58", "64"), subject="elementary mathematics"),
    ]
    prompts = [format_prompt(q) for q in questions]
    server = SubprocessServer("cascade_core", ["serve", "--single-stage", "smollm2-135m", "--device", "cpu",
                                               "--threads", "1"],
                              env={PIN: pin}, log_path=tmp_path / "server.log").start()
    torch.set_num_threads(1)  # as the server (conftest restores it after the test)
    try:
        local = HFBackend(smollm2_path, device="cpu", dtype="auto", quantization="none", model_id="smollm2-135m")
    except BaseException:
        server.__exit__()
        raise
    assert local.dtype == DTYPES[pin]
    with server:
        remote_stage = OpenAIStage("smollm2-135m", f"{server.url}/v1", mode="completions")
        remote = [remote_stage.score_options([p], [4])[0] for p in prompts]
    mine = [local.score_options([p], [4])[0] for p in prompts]
    for r, m in zip(remote, mine):
        # The server returns the letters in its top 20 logprobs; over those, both sides' softmax agree.
        shown = np.isfinite(r.letter_logits)
        assert shown.sum() >= 2, r.letter_logits
        np.testing.assert_allclose(_softmax(r.letter_logits[shown]), _softmax(m.letter_logits[shown]), atol=1e-4)


def _softmax(logits) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    p = np.exp(x - x.max())
    return p / p.sum()
