"""The benchmark runner survives being killed: rerun it and the records are whole, none lost or doubled.

A real SmolLM2-135M run over 24 MMLU questions in a subprocess is SIGKILLed as soon as its
records file shows some rows (a pause after each batch keeps the window open; the forward
passes and writes are the real ones). A rerun in this process must finish the job with the same
questions and the same answers as a clean, uninterrupted run, and a rerun of the finished
benchmark must not touch a file.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cascade_core.records.runner import BenchPaths, backfill_features, load_features, load_records, run_stage
from cascade_core.records.mmlu import load_mmlu

pytestmark = pytest.mark.model

STAGE = "smollm2-135m"
BATCH = 4
SUBJECTS = ["abstract_algebra", "anatomy", "astronomy", "global_facts", "marketing", "virology"]
REPO = Path(__file__).resolve().parent.parent

CHILD = textwrap.dedent("""
    import sys, time
    import torch
    torch.set_num_threads(1)
    from cascade_core.records.runner import BenchPaths, run_stage
    from cascade_core.records.mmlu import load_mmlu
    from models.hf import HFBackend

    model_path, records, features, batch = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    backend = HFBackend(model_path, device="cpu", dtype="float32", quantization="none", model_id="smollm2-135m")
    questions = load_mmlu(per_subject=4, subjects=sys.argv[5].split(","))
    print("loaded", flush=True)
    # The pause keeps the kill window open after each atomic write; everything else is the real run.
    run_stage(backend, "smollm2-135m", questions, BenchPaths(__import__("pathlib").Path(records),
              __import__("pathlib").Path(features)), batch_size=batch, progress=lambda done, total: time.sleep(0.7))
""")


def _questions() -> pd.DataFrame:
    questions = load_mmlu(per_subject=4, subjects=SUBJECTS)
    assert len(questions) == 24
    return questions


def _paths(root: Path) -> BenchPaths:
    return BenchPaths.for_stage(root / "results", root / "features", "mmlu", STAGE)


def _rows(path: Path) -> int:
    try:
        return len(pd.read_parquet(path))
    except Exception:  # noqa: BLE001 - not there yet (or, which the test would catch later, unreadable)
        return 0


def _snapshot(paths: BenchPaths) -> dict:
    files = [paths.records, *sorted(paths.features_dir.iterdir())]
    return {str(f): (f.stat().st_mtime_ns, f.stat().st_size, f.read_bytes()) for f in files}


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory, smollm2_backend):
    paths = _paths(tmp_path_factory.mktemp("clean"))
    records = run_stage(smollm2_backend, STAGE, _questions(), paths, batch_size=BATCH)
    return paths, records


def test_killed_run_resumes_to_the_clean_records(tmp_path, smollm2_path, smollm2_backend, clean_run):
    paths = _paths(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(smollm2_path), str(paths.records), str(paths.features_dir), str(BATCH),
         ",".join(SUBJECTS)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and child.poll() is None and _rows(paths.records) == 0:
            time.sleep(0.02)
        assert child.poll() is None, f"the run ended before it could be killed: {child.stderr.read()[-2000:]}"
        assert _rows(paths.records) > 0, "no records were written in time"
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL

    # What the killed run left is a whole file of whole batches, a strict part of the job.
    partial = load_records(paths.records)
    assert 0 < len(partial) < 24 and len(partial) % BATCH == 0
    assert not partial["qid"].duplicated().any()

    records = run_stage(smollm2_backend, STAGE, _questions(), paths, batch_size=BATCH)
    _, clean = clean_run
    assert len(records) == 24 and not records["qid"].duplicated().any()
    assert sorted(records["qid"]) == sorted(_questions()["qid"])
    on_disk = load_records(paths.records).set_index("qid").sort_index()
    expected = clean.set_index("qid").sort_index()
    assert list(on_disk.index) == list(expected.index)
    np.testing.assert_array_equal(on_disk["prediction"], expected["prediction"])
    np.testing.assert_array_equal(on_disk["correct"], expected["correct"])
    np.testing.assert_allclose(on_disk["p_t"], expected["p_t"], rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(on_disk["prompt_tokens"], expected["prompt_tokens"])
    # The rows the killed run wrote are kept as they were, not redone.
    kept = on_disk.loc[partial["qid"]]
    np.testing.assert_array_equal(kept["created_at"], partial.set_index("qid")["created_at"])

    # Features: every question once (a batch redone after a kill between its feature chunk and its
    # records write would appear twice in the chunks; load_features keeps the last).
    qids, layers = load_features(paths.features_dir)
    clean_qids, clean_layers = load_features(clean_run[0].features_dir)
    assert sorted(qids) == sorted(clean_qids) and len(qids) == 24
    order, clean_order = np.argsort(qids), np.argsort(clean_qids)
    assert layers.keys() == clean_layers.keys()
    for layer in layers:
        np.testing.assert_allclose(layers[layer][order], clean_layers[layer][clean_order], rtol=2e-2, atol=2e-2)


def test_rerunning_a_finished_benchmark_is_a_no_op(clean_run, smollm2_backend):
    paths, records = clean_run
    before = _snapshot(paths)
    again = run_stage(smollm2_backend, STAGE, _questions(), paths, batch_size=BATCH)
    assert _snapshot(paths) == before
    pd.testing.assert_frame_equal(again, records)


def test_backfill_adds_features_to_records_made_without_them(tmp_path, smollm2_backend, clean_run):
    """Records whose feature files are gone get features from a new pass; the records stay untouched."""
    paths = _paths(tmp_path)
    clean_paths, clean = clean_run
    paths.records.parent.mkdir(parents=True)
    paths.records.write_bytes(clean_paths.records.read_bytes())
    before = paths.records.read_bytes()

    first = backfill_features(smollm2_backend, _questions(), paths, batch_size=BATCH, max_batches=2)
    assert first == {"questions": 24, "backfilled": 2 * BATCH, "agree": first["agree"]}
    rest = backfill_features(smollm2_backend, _questions(), paths, batch_size=BATCH)
    assert rest["backfilled"] == 24 - 2 * BATCH  # resumed: the first two batches are not redone
    assert first["agree"] + rest["agree"] == 24  # float32, same prompts: the same answers
    assert paths.records.read_bytes() == before

    qids, layers = load_features(paths.features_dir)
    assert sorted(qids) == sorted(clean["qid"])
    assert backfill_features(smollm2_backend, _questions(), paths, batch_size=BATCH)["backfilled"] == 0


def test_backfill_skips_what_a_committed_checkpoint_already_has(tmp_path, smollm2_backend, clean_run):
    """A run resumed on another machine: questions whose features came with the clone are not redone."""
    paths = _paths(tmp_path)
    paths.records.parent.mkdir(parents=True)
    paths.records.write_bytes(clean_run[0].records.read_bytes())
    elsewhere = set(_questions()["qid"].astype(str).iloc[:20])
    done = backfill_features(smollm2_backend, _questions(), paths, batch_size=BATCH, have_elsewhere=elsewhere)
    assert done["backfilled"] == 24 - 20
    qids, _ = load_features(paths.features_dir)
    assert not set(qids) & elsewhere


def test_two_shards_of_one_backfill_cover_every_question_once(tmp_path, smollm2_backend, clean_run):
    """`bench --backfill-features --shard K/N`: two workers share one stage's backfill (each only adds
    chunk files); between them every recorded question gets features, none twice."""
    from cascade_core.compose.jobs import shard_of

    paths = _paths(tmp_path)
    paths.records.parent.mkdir(parents=True)
    paths.records.write_bytes(clean_run[0].records.read_bytes())
    shards = [shard_of(_questions(), k, 2) for k in (0, 1)]
    assert not set(shards[0]["qid"]) & set(shards[1]["qid"])
    done = [backfill_features(smollm2_backend, shard, paths, batch_size=BATCH) for shard in shards]
    assert [d["backfilled"] for d in done] == [12, 12]
    qids, _ = load_features(paths.features_dir)
    assert sorted(qids) == sorted(_questions()["qid"])
    assert backfill_features(smollm2_backend, _questions(), paths, batch_size=BATCH)["backfilled"] == 0


def test_records_are_never_extended_in_another_dtype(tmp_path, smollm2_backend, clean_run):
    """The clean run's records say float32; a run that would compute in bfloat16 is refused."""
    paths = _paths(tmp_path)
    paths.records.parent.mkdir(parents=True)
    paths.records.write_bytes(clean_run[0].records.read_bytes())
    records = load_records(paths.records)
    records["dtype"] = "float32"
    records.iloc[:12].to_parquet(paths.records)
    with pytest.raises(ValueError, match=r"made in float32, this run computes in bfloat16"):
        run_stage(smollm2_backend, STAGE, _questions(), paths, batch_size=BATCH, dtype="bfloat16")
    with pytest.raises(ValueError, match=r"made in float32, this run computes in bfloat16"):
        backfill_features(smollm2_backend, _questions(), paths, batch_size=BATCH, dtype="bfloat16")


def test_a_batch_holds_prompts_of_similar_length(tmp_path, smollm2_backend):
    """The runner batches the shortest prompts of a window together (a padded batch costs its
    longest prompt's length in every row), and a resumed run still covers every question once."""
    from cascade_core.prompts import format_prompt
    from cascade_core.types import Question

    questions = _questions()
    by_length = sorted(questions.itertuples(index=False), key=lambda r: len(format_prompt(
        Question(text=r.question, options=tuple(r.options), subject=r.subject, answer=int(r.answer), qid=r.qid))))
    paths = _paths(tmp_path)
    first = run_stage(smollm2_backend, STAGE, questions, paths, batch_size=BATCH, max_batches=1)
    assert set(first["qid"]) == {r.qid for r in by_length[:BATCH]}
    records = run_stage(smollm2_backend, STAGE, questions, paths, batch_size=BATCH)
    assert sorted(records["qid"]) == sorted(questions["qid"]) and records["qid"].is_unique
