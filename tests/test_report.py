"""The report: its numbers equal a recomputation from the records, and no test question chooses anything.

Built on a seeded synthetic table (3 local stages + a recorded GPT-4-like last stage) with small
hidden-state features whose direction carries each stage's correctness, so every section
(probes, OOD, label-free, the text router) runs for real in a few seconds. The loader test uses
real MMLU ids and the real RouteLLM recording.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest

from cascade_core.choose import pregen_router as pg
from cascade_core.signal_quality import auroc, expected_calibration_error
from cascade_core.choose.baselines import oracle
from cascade_core.choose.sweep import sweep
from cascade_core.records.table import RecordTable, synthetic_table
from cascade_core.choose.replay import replay
from cascade_core.report import (ReportSettings, build_report, oracle_curve, policy_from_dict, retrain_p_ik,
                                 with_groups)
from cascade_core.report.markdown import render
from cascade_core.choose.selection import evaluate_on
from cascade_core.choose.paired_stats import mcnemar_exact

CATEGORIES = np.array(["STEM", "humanities", "social sciences", "other"])
SETTINGS = ReportSettings(n_resamples=100, cv_folds=2, rules=("both", "learned"),
                          api_groupings=("global", "category"), api_calibration_targets=(0.01, 0.0), probe_folds=2,
                          resplits=6, resplits_others=3)


def _table(n: int = 360, seed: int = 5) -> RecordTable:
    base = synthetic_table(n, 4, seed=seed, accuracies=[0.3, 0.4, 0.5, 0.8])
    p_ik = base.p_ik.copy()
    p_ik[-1] = np.nan  # a recording has no hidden states
    prediction = base.prediction.copy()
    prediction[-1] = -1
    return dataclasses.replace(base, names=("small", "medium", "large", "gpt4"), recorded=np.array([0, 0, 0, 1], bool),
                               has_hidden=np.array([1, 1, 1, 0], bool), p_ik=p_ik, prediction=prediction, _costs={})


def _features(table: RecordTable, seed: int = 0) -> dict:
    """Features for the two small stages (the largest local stage has none: it routes on P(T))."""
    rng = np.random.default_rng(seed)
    out = {}
    for s in range(2):
        layers = {}
        for layer in (1, 2):
            direction = rng.normal(size=8)
            signal = (0.6 + 0.4 * layer) * np.where(table.correct[s], 1.0, -1.0)[:, None] * direction
            layers[layer] = (rng.normal(size=(table.n_questions, 8)) + signal).astype(np.float32)
        out[table.names[s]] = (table.qids.copy(), layers)
    return out


def _questions(table: RecordTable) -> pd.DataFrame:
    words = np.array(["atom", "court", "market", "cell", "poem", "law", "graph"])
    return pd.DataFrame({
        "qid": table.qids, "subject": table.subjects,
        "question": [f"what about the {words[i % 7]} {words[(i * 3) % 7]} number "
                     f"{i % 11}" for i in range(table.n_questions)],
        "options": [["one", "two", "three", "four"]] * table.n_questions,
    })


def _categories(table: RecordTable) -> np.ndarray:
    return CATEGORIES[np.arange(table.n_questions) % 4]


def _build(table: RecordTable, features=None, questions=None) -> dict:
    return build_report(table, questions=_questions(table) if questions is None else questions,
                        features=_features(table) if features is None else features,
                        categories=_categories(table), settings=SETTINGS)


@pytest.fixture(scope="module")
def table() -> RecordTable:
    return _table()


@pytest.fixture(scope="module")
def report(table) -> dict:
    return _build(table)


# -- the numbers equal a recomputation --------------------------------------------------------------
def test_report_is_json_and_renders(report):
    text = json.dumps(report, allow_nan=False)
    assert json.loads(text) == report
    page = render(report)
    for heading in ("## 1. Each model alone", "## 2. Local cascades", "## 3. API scenario", "## 4. Ablations",
                    "## 5. Baselines", "## 6. Out of distribution", "## 7. Label-free probes",
                    "## 8. Free-form sets"):
        assert heading in page
    from cascade_core.locations import REPO_ROOT

    for name in ("arith", "mmlu-open"):  # each shipped free-form set's own report is linked, and exists
        assert f"(RESULTS-{name}.md)" in page and (REPO_ROOT / "docs" / f"RESULTS-{name}.md").exists()
    chosen = report["api"][-1]["chosen_test"]["calls_saved"]
    assert f"{chosen * 100:.1f}% of GPT-4 calls" in page


def test_single_models_recomputed(report, table):
    test = table.subset("test")
    for s, row in enumerate(report["models"]):
        assert row["stage"] == table.names[s]
        assert row["accuracy"]["value"] == pytest.approx(test.correct[s].mean(), abs=0)
        assert row["mean_cost"]["flops"] == pytest.approx(test.flops[s].mean(), rel=1e-12)
        assert row["mean_cost"]["dollars"] == pytest.approx(test.dollars[s].mean(), rel=1e-12)
        if s < 3:
            assert row["p_t"]["auroc"] == pytest.approx(auroc(test.p_t[s], test.correct[s]))
            assert row["p_ik"]["ece"] == pytest.approx(expected_calibration_error(test.p_ik[s], test.correct[s]))
        else:
            assert row["p_t"] is None and row["p_ik"] is None  # a recording has no probabilities


def test_cascade_policies_replay_to_the_reported_numbers(report, table):
    assert [c["stages"] for c in report["cascades"]] == [
        ["small", "medium"], ["small", "large"], ["medium", "large"], ["small", "medium", "large"]]
    for entry in report["cascades"]:
        test = table.stage_subset(entry["stages"]).subset("test")
        result = replay(test, policy_from_dict(entry["policy"]))
        t = entry["test"]
        assert t["accuracy"]["value"] == pytest.approx(result.accuracy, abs=0)
        assert t["compute_reduction"]["value"] == pytest.approx(1 - result.total_cost["flops"] / test.flops[-1].sum())
        assert t["pd"]["value"] == pytest.approx(result.accuracy - test.correct[-1].mean())
        assert t["mcnemar"]["p_value"] == pytest.approx(mcnemar_exact(result.correct, test.correct[-1])[0])
        for name, rate in zip(test.names, result.escalation_rate):
            assert t["escalation_rate"][name] == (None if np.isnan(rate) else pytest.approx(rate))
        assert t["compute_reduction"]["low"] <= t["compute_reduction"]["value"] <= t["compute_reduction"]["high"]


def test_api_variants_replay_to_the_reported_savings(report, table):
    categories = _categories(table)
    for entry in report["api"]:
        sub = table.stage_subset(entry["stages"])
        assert entry["gpt4_accuracy"] == pytest.approx(sub.subset("test").correct[-1].mean())
        for v in entry["variants"]:
            grouped = sub if v["grouping"] == "global" else with_groups(sub, categories)
            test = grouped.subset("test")
            result = evaluate_on(test, policy_from_dict(v["policy"]))
            reached = result.final_stage == test.n_stages - 1
            assert v["test"]["calls_saved"] == pytest.approx(1 - reached.mean())
            assert v["test"]["tokens_saved"] == pytest.approx(
                1 - test.cost("tokens")[-1][reached].sum() / test.cost("tokens")[-1].sum())
            assert v["test"]["accuracy_loss"] == pytest.approx(test.correct[-1].mean() - result.accuracy)
        chosen = [v for v in entry["variants"] if v["name"] == entry["chosen"]]
        assert len(chosen) == 1 and entry["chosen_test"] == chosen[0]["test"]


def test_the_chosen_api_variant_is_picked_on_calibration_numbers_only(report):
    for entry in report["api"]:
        ok = [v for v in entry["variants"] if v["cv"]["accuracy_loss"] <= SETTINGS.target_max_loss + 1e-12]
        if ok:
            best = max(v["cv"]["cost_saved"] for v in ok)
            chosen = next(v for v in entry["variants"] if v["name"] == entry["chosen"])
            assert chosen["cv"]["cost_saved"] == best


def test_baselines_oracle_and_random(report, table):
    full = report["baselines"][0]
    assert full["stages"] == ["small", "medium", "large"]
    test = table.stage_subset(full["stages"]).subset("test")
    o = oracle(test, "flops")
    assert full["methods"]["oracle"]["operating_point"]["accuracy"] == pytest.approx(o.accuracy)
    for name in ("cascade", "random", "oracle", "pregen_router"):
        m = full["methods"][name]
        assert 0 < m["aiq"] <= 1
    others = max(full["methods"][n]["aiq"] for n in ("cascade", "random", "pregen_router"))
    assert full["methods"]["oracle"]["aiq"] >= others


def test_oracle_curve_bounds_every_policy(table):
    test = table.stage_subset([0, 1, 2]).subset("test")
    cost, acc = oracle_curve(test, "flops", points=None)
    assert np.all(np.diff(cost) >= 0) and np.all(np.diff(acc) > 0)
    assert acc[-1] == pytest.approx(oracle(test, "flops").accuracy)
    swept = sweep(test, rule="pt_only", n_quantiles=12)
    for c, a in zip(swept.cost("flops"), swept.accuracy):
        reachable = acc[cost <= c * (1 + 1e-9)]
        assert reachable.size and reachable.max() >= a - 1e-12


# -- no leakage: test questions choose nothing ---------------------------------------------------------
def _choices(report: dict) -> dict:
    """Everything the report CHOSE (policies, variants, thresholds, probe layers), not what it measured."""
    return {
        "cascades": [c["policy"] for c in report["cascades"]],
        "api": [(e["chosen"], [(v["name"], v["policy"], v["cv"]) for v in e["variants"]]) for e in report["api"]],
        "ablations": [[r["policy"] for r in b["rules"]] for b in report["ablations"]],
        "pregen_tau": [b["methods"]["pregen_router"]["tau"] for b in report["baselines"]],
        "ood": [[c["ood"]["thresholds"] for c in e["cascades"]] for e in report["ood"]["categories"]],
        "label_free": {k: c["thresholds"] for k, c in report["label_free"]["cascades"].items()},
        "label_free_layers": {k: v["layer"] for k, v in report["label_free"]["probes"].items()},
    }


def _perturb(table: RecordTable, features: dict, rows: np.ndarray, seed: int = 99):
    """Flip labels, scramble signals and features on `rows` only."""
    rng = np.random.default_rng(seed)
    correct = table.correct.copy()
    correct[:, rows] = rng.random((table.n_stages, rows.sum())) < 0.5
    p_t, p_ik = table.p_t.copy(), table.p_ik.copy()
    p_t[:3, rows] = rng.random((3, rows.sum()))
    p_ik[:3, rows] = rng.random((3, rows.sum()))
    prediction = table.prediction.copy()
    prediction[:3, rows] = rng.integers(0, 4, size=(3, rows.sum()))
    changed = dataclasses.replace(table, correct=correct, p_t=p_t, p_ik=p_ik, prediction=prediction, _costs={})
    new_features = {}
    for name, (qids, layers) in features.items():
        new_features[name] = (qids, {k: np.where(rows[:, None], rng.normal(size=a.shape), a).astype(np.float32)
                                     for k, a in layers.items()})
    return changed, new_features


def test_perturbing_test_questions_changes_no_choice(report, table):
    features = _features(table)
    changed, new_features = _perturb(table, features, table.splits == "test")
    again = _build(changed, features=new_features)
    assert _choices(again) == _choices(report)
    # ... while the measured numbers do move (the perturbation reached the report).
    assert again["models"][0]["accuracy"] != report["models"][0]["accuracy"]


def test_perturbing_calibration_questions_changes_choices(report, table):
    from cascade_core.report.cascades import cascade_section

    changed, _ = _perturb(table, _features(table), table.splits == "calibration")
    again = cascade_section(changed, SETTINGS, lambda message: None)
    assert [c.policy for c in again] != _choices(report)["cascades"]


def test_ood_probe_never_trains_on_the_held_out_category_or_test(table):
    features = _features(table)
    categories = _categories(table)
    train = (table.splits == "calibration") & (categories != "STEM")
    p_ik, info = retrain_p_ik(table, features, train, SETTINGS, stages=[0, 1, 2])
    changed, new_features = _perturb(table, features, ~train)
    p_ik2, info2 = retrain_p_ik(changed, new_features, train, SETTINGS, stages=[0, 1, 2])
    assert set(info) == {"small", "medium"}
    layers = {k: (v["layer"], v["n_train"]) for k, v in info.items()}
    assert layers == {k: (v["layer"], v["n_train"]) for k, v in info2.items()}
    np.testing.assert_array_equal(p_ik[:2, train], p_ik2[:2, train])
    assert np.isnan(p_ik[2:]).all()  # no features for the large stage, no probe for a recording
    with pytest.raises(ValueError, match="test-split"):
        retrain_p_ik(table, features, np.ones(table.n_questions, bool), SETTINGS, stages=[0])


def test_ood_section_holds_out_each_category(report, table):
    rows = report["ood"]["categories"]
    assert sorted(r["held_out"] for r in rows) == sorted(CATEGORIES)
    categories = _categories(table)
    for r in rows:
        assert r["n_test"] == int(((table.splits == "test") & (categories == r["held_out"])).sum())
        assert r["n_train"] == int(((table.splits == "calibration") & (categories != r["held_out"])).sum())


def test_label_free_probe_is_trained_on_agreement(report, table):
    lf = report["label_free"]
    assert lf["largest"] == "large"
    assert [s["stage"] for s in lf["stages"]] == ["small", "medium"]
    cal = table.splits == "calibration"
    agree = table.prediction[0] == table.prediction[2]
    assert lf["stages"][0]["agreement_rate_calibration"] == pytest.approx(agree[cal].mean())
    assert set(lf["cascades"]) == {"gold_probe", "label_free_probe", "fully_label_free"}


# -- the pre-generation router --------------------------------------------------------------------------
def test_router_out_of_fold_predictions_ignore_the_question_own_label(table):
    texts = pg.question_texts(table.qids[:120], _questions(table))
    correct = table.correct[:, :120]
    first = pg.out_of_fold_proba(texts, correct, folds=3, seed=1)
    flipped = correct.copy()
    flipped[:, 7] = ~flipped[:, 7]
    second = pg.out_of_fold_proba(texts, flipped, folds=3, seed=1)
    np.testing.assert_array_equal(first[:, 7], second[:, 7])
    assert not np.array_equal(first, second)


def test_router_counts_pretokenised_terms_as_it_counts_texts(table):
    """`question_terms` (texts tokenised once for every fold's fit) give exactly the predictions
    the texts give."""
    texts = pg.question_texts(table.qids[:120], _questions(table))
    terms = pg.question_terms(texts)
    correct = table.correct[:, :120]
    np.testing.assert_array_equal(pg.out_of_fold_proba(terms, correct, folds=3, seed=1),
                                  pg.out_of_fold_proba(texts, correct, folds=3, seed=1))
    by_texts = pg.PregenRouter().fit(texts, correct)
    by_terms = pg.PregenRouter().fit(terms, correct)
    assert by_terms.vectorizer_.vocabulary_ == by_texts.vectorizer_.vocabulary_
    np.testing.assert_array_equal(by_terms.predict_proba(texts), by_texts.predict_proba(terms))


def test_router_routes_to_the_cheapest_stage_predicted_right():
    proba = np.array([[0.9, 0.2, 0.2], [0.1, 0.8, 0.3], [0.5, 0.5, 0.5]])
    np.testing.assert_array_equal(pg.route(proba, 0.7), [0, 1, 2])
    np.testing.assert_array_equal(pg.route(proba, 2.0), [2, 2, 2])
    t = synthetic_table(30, 3, seed=2)
    result = pg.evaluate(t, pg.route(np.ones((3, 30)) * 0.5, 0.4))
    assert result.accuracy == pytest.approx(t.correct[0].mean())
    assert result.mean_cost["flops"] == pytest.approx(t.flops[0].mean())  # pays one model only


def test_router_threshold_is_always_feasible(table):
    sub = table.stage_subset([0, 1, 2])
    calib = sub.subset("calibration")
    noise = np.random.default_rng(0).random((3, calib.n_questions))
    tau = pg.select_threshold(calib, noise, 0.0, "flops")
    assert pg.evaluate(calib, pg.route(noise, tau)).accuracy >= calib.correct[-1].mean() - 1e-12
    with pytest.raises(ValueError, match="no text"):
        pg.question_texts(["nope"], _questions(table))


# -- the preset loader with the recorded GPT-4 -------------------------------------------------------------
def test_load_preset_table_joins_local_records_and_the_recording(tmp_path):
    from cascade_core.records.mmlu import load_mmlu, load_recorded_outcomes
    from cascade_core.compose.tables import MissingRecordsError, load_preset_table

    questions = load_mmlu(per_subject=2, subjects=["anatomy", "virology", "astronomy"])
    rng = np.random.default_rng(0)
    (tmp_path / "mmlu").mkdir()
    for name in ("smollm2-135m", "qwen2.5-coder-0.5b"):
        frame = questions[["qid", "subject", "category", "split", "answer"]].assign(
            stage=name, model_id=name, prediction=rng.integers(0, 4, len(questions)), p_t=rng.random(len(questions)),
            prompt_tokens=100, output_tokens=0, flops=1e9, seconds=0.1)
        frame["correct"] = frame["prediction"] == frame["answer"]
        frame.to_parquet(tmp_path / "mmlu" / f"{name}.parquet")
    with pytest.raises(MissingRecordsError, match="qwen2.5-coder-1.5b"):
        load_preset_table("default", results_dir=tmp_path)
    table = load_preset_table("default", results_dir=tmp_path, include_recorded="gpt-4", skip_missing=True)
    assert table.names == ("smollm2-135m", "qwen2.5-coder-0.5b", "gpt-4-recorded")
    assert table.recorded.tolist() == [False, False, True] and np.isnan(table.p_t[-1]).all()
    recorded = load_recorded_outcomes().set_index("qid").loc[table.qids]
    np.testing.assert_array_equal(table.correct[-1], recorded["gpt4_correct"].to_numpy())
    np.testing.assert_allclose(table.dollars[-1], recorded["gpt4_prompt_tokens"].to_numpy() * 10 / 1e6 + 30 / 1e6)
    np.testing.assert_array_equal(table.splits, questions.set_index("qid").loc[table.qids, "split"].to_numpy())
    assert (table.dollars[:-1] == 0).all()
    only_local = load_preset_table("default", results_dir=tmp_path, include_recorded=False, skip_missing=True,
                                   split="test")
    assert only_local.names == ("smollm2-135m", "qwen2.5-coder-0.5b") and set(only_local.splits) == {"test"}


def test_guarantee_headline_has_the_promised_keys_and_replays(report, table):
    g = report["guarantee"]
    assert set(g) == {"cascade", "variant", "delta", "target_pt", "resplits", "held_share", "saving_mean",
                      "saving_p05", "unit", "bound", "rules"}
    assert g["bound"] == SETTINGS.guarantee_bound and set(g["rules"]) == set(SETTINGS.guarantee_rules)
    assert g["cascade"] == "large -> gpt4" and g["delta"] == 0.1 and g["target_pt"] == 1.0
    assert g["resplits"] == SETTINGS.resplits and g["unit"] == "calls"
    assert 0 <= g["held_share"] <= 1 and g["saving_p05"] <= g["saving_mean"]
    study = report["guarantee_study"]
    head = next(c for c in study["cascades"] if c["headline"])
    assert head["study"]["chosen"]["held_share"] == g["held_share"]
    # The committed-split figure is the chosen rule's policy replayed on the test split.
    from cascade_core.choose.resplit import choose, loss_and_saving

    sub = table.stage_subset([2, 3])
    chosen, policies, _ = choose(sub.subset("calibration"), tuple(SETTINGS.guarantee_rules), 0.01, 0.1, "dollars",
                                 SETTINGS.guarantee_folds, SETTINGS.seed, "calls", SETTINGS.guarantee_bound)
    assert chosen == head["committed"]["rule"]
    loss, saving = loss_and_saving(policies[chosen], sub.subset("test"), "calls")
    assert saving == pytest.approx(head["committed"]["saving"])
    assert loss == pytest.approx(head["committed"]["accuracy_loss"])


def test_one_process_and_two_give_the_same_report(table, report):
    """Two workers share the report's independent jobs (re-splits, API cascades, router, one probe
    per category and stage) in whatever order they finish; one does them all in queue order: the
    numbers must not depend on it."""
    features = _features(table)
    one = build_report(table, questions=_questions(table), features=features, categories=_categories(table),
                       settings=SETTINGS, workers=1)
    assert json.dumps(one, sort_keys=True) == json.dumps(report, sort_keys=True)


def _square(x):
    return x * x


def _fail(message):
    raise ValueError(message)


def test_report_jobs_give_the_same_results_in_any_number_of_processes_and_name_a_failure():
    from cascade_core.report.jobs import Job, run_jobs

    jobs = [Job(f"square {i}", float(i % 3), _square, (i,)) for i in range(7)]
    assert run_jobs(jobs, workers=1) == run_jobs(jobs, workers=2) == {f"square {i}": i * i for i in range(7)}
    with pytest.raises(RuntimeError, match="'broken'.*ValueError: no luck"):
        run_jobs(jobs + [Job("broken", 9.0, _fail, ("no luck",))], workers=2)
    with pytest.raises(ValueError, match="unique"):
        run_jobs([jobs[0], jobs[0]], workers=1)


def test_retrained_probes_search_as_the_settings_say(table, monkeypatch):
    """The OOD and label-free probes search C with `probe_path_stop` (None: the whole grid, as
    `probes train` does), and solve on float32 rows with warm starts unless the settings say not."""
    import cascade_core.records.probe_training as training
    from cascade_core.report.probes import retrain_stage

    seen = []
    real = training.probe_grid

    def spy(*args, **kwargs):
        seen.append((kwargs.get("stop_after_worse"), kwargs.get("float32"), kwargs.get("warm_start")))
        return real(*args, **kwargs)

    monkeypatch.setattr(training, "probe_grid", spy)
    features, cal = _features(table), table.splits == "calibration"
    fast = retrain_stage(table, features, 0, cal, SETTINGS)
    plain = retrain_stage(table, features, 0, cal, dataclasses.replace(SETTINGS, probe_path_stop=None,
                                                                       probe_float32=False, probe_warm_start=False))
    assert seen == [(2, True, True), (None, False, False)] and SETTINGS.probe_path_stop == 2
    assert np.abs(fast[0] - plain[0]).max() < 0.02  # the same probe, up to the solver's tolerance
