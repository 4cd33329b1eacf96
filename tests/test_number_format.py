"""The number format said where it matters (issue 18, item 2): one sentence (`number_format`), the
formats resolved per stage (`compose.formats`), `route`, `serve`'s /v1/models, and `bench`'s
refusal to run in emulated bfloat16.

The suite pins dtype "auto" to float32 (tests/conftest.py); these tests force the resolution
each way with the pin or by monkeypatching `models.hf.cpu_has_native_bf16`.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pandas as pd
import pytest

from cascade_core.number_format import ANSWERS_DIFFER, format_note
from cascade_core.presets import StageConfig, load_preset

PIN = "CASCADE_AUTO_DTYPE"
DIFFERS = "float32 here; calibrated on bfloat16 records: about 5% of answers may differ"


def local(name: str = "smollm2-135m", dtype: str = "auto") -> StageConfig:
    return StageConfig(name=name, backend="packaged", model="smollm2-135m", dtype=dtype, device="cpu")


def write_records(root, stage: str, dtype: str, dataset: str = "mmlu") -> None:
    (root / dataset).mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"qid": ["q1", "q2"], "dtype": [dtype, dtype]}).to_parquet(root / dataset / f"{stage}.parquet")


def write_policy(folder, preset: str, records_dtype: dict | None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    provenance = {"dataset": "mmlu", "split": "calibration", "questions": 2}
    if records_dtype is not None:
        provenance["records_dtype"] = records_dtype
    (folder / f"{preset}.json").write_text(json.dumps({"provenance": provenance}))


@pytest.fixture
def where(tmp_path, monkeypatch):
    from cascade_core.locations import locations

    monkeypatch.setenv("CASCADE_RESULTS_DIR", str(tmp_path / "results"))
    monkeypatch.setenv("CASCADE_POLICIES_DIR", str(tmp_path / "policies"))
    return locations()


# ---- the sentence ---------------------------------------------------------------------------------------
def test_the_sentence_says_the_format_and_whether_it_differs_from_the_calibration():
    assert ANSWERS_DIFFER == pytest.approx(1 - 0.947)
    assert format_note("bfloat16", "bfloat16") == "bfloat16"
    assert format_note("float32", None) == "float32"  # no records to compare with
    assert format_note("float32", "bfloat16") == DIFFERS
    assert format_note("float32", "bfloat16", basis="records made in") == (
        "float32 here; the records were made in bfloat16: about 5% of answers may differ")
    assert "emulated on this CPU" in format_note("bfloat16", "bfloat16", emulated=True)
    assert format_note(None, "bfloat16") == ""  # a remote or recorded stage has no format of ours


# ---- resolved per stage ---------------------------------------------------------------------------------
@pytest.mark.parametrize("native, pin, live, emulated", [
    (False, None, "float32", False),     # AVX2: auto is float32
    (True, None, "bfloat16", False),     # native bfloat16: auto is bfloat16
    (False, "bfloat16", "bfloat16", True),  # pinned to bfloat16 on AVX2: emulated
    (True, "float32", "float32", False),
])
def test_each_stage_says_its_live_format_and_compares_it_with_the_calibration(monkeypatch, where, native, pin, live,
                                                                                emulated):
    import models.hf as hf
    from cascade_core.compose.formats import stage_formats

    if pin is None:
        monkeypatch.delenv(PIN, raising=False)
    else:
        monkeypatch.setenv(PIN, pin)
    monkeypatch.setattr(hf, "cpu_has_native_bf16", lambda cpuinfo=None: native)
    write_records(where.results, "smollm2-135m", "bfloat16")
    write_policy(where.policies, "default", {"smollm2-135m": "bfloat16"})
    remote = StageConfig(name="gpt", backend="openai", model="gpt-4o", api_base="http://127.0.0.1:1/v1")
    found = stage_formats([local(), remote], where.policies / "default.json", where)
    stage = found["smollm2-135m"]
    assert (stage.live, stage.reference, stage.emulated) == (live, "bfloat16", emulated)
    assert stage.differs == (live != "bfloat16")
    assert (stage.note.startswith(DIFFERS)) == (live == "float32")
    assert found["gpt"].live is None and found["gpt"].note == ""


def test_the_reference_is_the_policy_file_s_then_the_records(monkeypatch, where):
    from cascade_core.compose.formats import stage_formats

    monkeypatch.setenv(PIN, "float32")
    write_records(where.results, "smollm2-135m", "float32")
    write_policy(where.policies, "default", {"smollm2-135m": "bfloat16"})
    assert stage_formats([local()], where.policies / "default.json", where)["smollm2-135m"].note == DIFFERS
    # an older policy file without records_dtype: the records' own column
    write_policy(where.policies, "default", None)
    assert stage_formats([local()], where.policies / "default.json", where)["smollm2-135m"].note == "float32"
    # no policy file (the preset's thresholds): compared with the records, and said so
    write_records(where.results, "smollm2-135m", "bfloat16")
    assert stage_formats([local()], None, where)["smollm2-135m"].note.startswith(
        "float32 here; the records were made in bfloat16")
    assert stage_formats([local("nothing-recorded")], None, where)["nothing-recorded"].note == "float32"


def test_the_shipped_policy_files_record_the_records_format():
    from cascade_core.compose.formats import policy_records_dtypes
    from cascade_core.locations import DATA_DIR

    for preset in ("default", "api-recorded"):
        dtypes, dataset = policy_records_dtypes(DATA_DIR / "policies" / f"{preset}.json")
        local_stages = [c.name for c in load_preset(preset).stages if c.backend == "packaged"]
        assert dataset == "mmlu" and dtypes == {n: "bfloat16" for n in local_stages}


def test_calibrate_writes_the_records_format_into_the_provenance(tmp_path):
    from _records import write_synthetic_records
    from cascade_core.locations import locations
    from cascade_core.compose.policies import calibrate

    write_synthetic_records(tmp_path / "results")
    frames = {p.stem: pd.read_parquet(p) for p in (tmp_path / "results" / "mmlu").glob("*.parquet")}
    for name, frame in frames.items():  # as `bench` writes them: the format in a column
        frame.assign(dtype="bfloat16").to_parquet(tmp_path / "results" / "mmlu" / f"{name}.parquet")
    _, found = calibrate("default", where=locations(results_dir=tmp_path / "results", policies_dir=tmp_path / "p"),
                         target_pt=3.0, rule="both")
    assert found.provenance["records_dtype"] == {n: "bfloat16" for n in found.stages}


# ---- route --------------------------------------------------------------------------------------------------
def test_route_prints_each_stage_s_format():
    from cascade_core.cli import trace_table
    from cascade_core.types import Question, Trace

    trace = Trace(question=Question(text="Q?", options=("a", "b")), steps=[], thresholds="thresholds: calibrated")
    table = trace_table(trace, {}, {"smollm2-135m": DIFFERS})
    assert f"smollm2-135m           number format: {DIFFERS}" in table.splitlines()[1]


@pytest.mark.model
def test_route_on_smollm2_says_its_format(smollm2_path, capsys):
    from cascade_core.cli import main

    assert main(["route", "What is the capital of France?", "--options", "Berlin", "Paris", "--stages",
                 "smollm2-135m", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    # the suite pins float32; the committed records are bfloat16; --stages runs the preset's thresholds
    assert out["number_format"] == {"smollm2-135m": "float32 here; the records were made in bfloat16: about 5% of "
                                                    "answers may differ"}


# ---- serve's /v1/models ---------------------------------------------------------------------------------
def test_the_model_cards_say_each_local_stage_s_format(monkeypatch, where):
    from fastapi.testclient import TestClient

    from cascade_core.cascade import RuntimeStage
    from cascade_core.server.cascade_app import create_cascade_app

    monkeypatch.setenv(PIN, "float32")
    write_records(where.results, "small", "bfloat16")
    write_policy(where.policies, "demo", {"small": "bfloat16"})
    small = SimpleNamespace(model_id="small", has_hidden_states=True, recorded=False, dtype="torch.float32",
                            device="cpu")
    api = SimpleNamespace(model_id="gpt", has_hidden_states=False, recorded=False)
    source = "thresholds: calibrated for <= 1 pt at delta 0.1 on 2 calibration questions"
    app = create_cascade_app({"demo": [RuntimeStage("small", small, policy_source=source),
                                       RuntimeStage("gpt", api, policy_source=source)]})
    cards = {c["id"]: c for c in TestClient(app).get("/v1/models").json()["data"]}
    assert cards["cascade-demo"]["number_format"] == {"small": DIFFERS}
    # the stage served alone runs no calibrated policy: compared with the records it was measured on
    assert cards["small"]["number_format"] == {"small": "float32 here; the records were made in bfloat16: about 5% "
                                                        "of answers may differ"}
    assert cards["gpt"]["number_format"] == {}  # an API stage: no format of ours


# ---- bench refuses emulated bfloat16 --------------------------------------------------------------------
@pytest.mark.parametrize("native, pin, refused", [(False, "bfloat16", True), (True, "bfloat16", False),
                                                  (False, None, False)])
def test_bench_refuses_emulated_bfloat16_with_the_measured_slowdown(monkeypatch, tmp_path, capsys, native, pin,
                                                                    refused):
    import models.hf as hf
    from cascade_core.cli import main

    if pin is None:
        monkeypatch.delenv(PIN, raising=False)
    else:
        monkeypatch.setenv(PIN, pin)
    monkeypatch.delenv("CASCADE_ALLOW_EMULATED_BF16", raising=False)
    monkeypatch.setattr(hf, "cpu_has_native_bf16", lambda cpuinfo=None: native)
    args = ["bench", "--stages", "smollm2-135m", "--results-dir", str(tmp_path), "--format-check"]
    assert main(args) == (2 if refused else 0)
    err = capsys.readouterr().err
    if refused:
        assert "smollm2-135m would run in EMULATED bfloat16" in err
        assert "SmolLM2-135M 4.9 s vs 0.72 s" in err and "Qwen2.5-Coder-1.5B 51 s vs 9.9 s" in err
        assert "--allow-emulated-bf16" in err
        assert main(args + ["--allow-emulated-bf16"]) == 0  # forced
        monkeypatch.setenv("CASCADE_ALLOW_EMULATED_BF16", "1")
        assert main(args) == 0  # forced for make bench / bench-full
        assert "emulated bfloat16 (forced)" in capsys.readouterr().err
    else:
        assert "EMULATED" not in err


@pytest.mark.model
def test_the_single_stage_server_s_card_says_its_format(where, smollm2_backend):
    from fastapi.testclient import TestClient

    from cascade_core.server.single_stage import create_single_stage_app

    write_records(where.results, "smollm2-135m", "bfloat16")
    card = TestClient(create_single_stage_app(smollm2_backend, "smollm2-135m")).get("/v1/models").json()["data"][0]
    assert card["number_format"] == {"smollm2-135m": "float32 here; the records were made in bfloat16: about 5% of "
                                                     "answers may differ"}  # the fixture loads float32
