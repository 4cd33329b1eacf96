"""The loss-aware keep score: fit on calibration, plain floats, the same decision live and replayed."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cascade_core.choose.sweep import sweep
from cascade_core.policy import (CascadePolicy, LossAwareScore, StagePolicy, explain, fit_combiner, fit_loss_aware,
                                 keep_mask, logistic_fit)
from cascade_core.records.table import synthetic_table
from cascade_core.choose.replay import replay


def test_newton_fit_matches_scikit_learn():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    X = rng.normal(size=(800, 3))
    y = X @ [1.0, -2.0, 0.3] + rng.logistic(size=800) > 0
    ref = LogisticRegression(C=0.5, tol=1e-10, max_iter=1000).fit(X, y)
    w, b = logistic_fit(X, y, C=0.5)
    assert np.allclose(w, ref.coef_[0], atol=1e-6) and b == pytest.approx(ref.intercept_[0], abs=1e-6)


def test_loss_aware_score_prefers_questions_the_reference_gets_wrong_too():
    rng = np.random.default_rng(1)
    n = 3000
    p_t = rng.random(n)
    margin = rng.random(n)  # the reference fails where margin is low
    ours = rng.random(n) < p_t
    reference = rng.random(n) < np.where(margin < 0.3, 0.2, 0.95)
    model = fit_loss_aware(p_t, np.full(n, np.nan), margin, np.zeros(n), ours, reference)
    assert model.features == ("p_t", "margin", "entropy")
    gain = model.score(p_t, np.full(n, np.nan), margin, np.zeros(n))
    assert gain.min() >= -1 and gain.max() <= 1
    # Same P(T): keeping is worth more where the reference is weak.
    low, high = model.score([0.6, 0.6], [np.nan] * 2, [0.1, 0.9], [0.0, 0.0])
    assert low > high
    again = LossAwareScore.from_dict(json.loads(json.dumps(model.to_dict())))
    assert again == model


def test_loss_aware_policy_round_trips_and_replays_like_keep_mask():
    table = synthetic_table(600, 3, seed=2)
    result = sweep(table, rule="loss_aware", n_quantiles=10)
    index = int(np.argmax(result.accuracy - result.cost("flops") / result.cost("flops").max()))
    policy = result.policy(index)
    again = CascadePolicy.from_dict(json.loads(json.dumps(policy.to_dict())))
    assert again == policy
    r = replay(table, again)
    assert r.accuracy == pytest.approx(result.accuracy[index])
    assert r.mean_cost["flops"] == pytest.approx(result.cost("flops")[index])
    stage = again[0]
    keep = keep_mask(stage, table.p_t[0], table.p_ik[0], table.margin[0], table.entropy[0])
    one = [bool(keep_mask(stage, [table.p_t[0, i]], [table.p_ik[0, i]], [table.margin[0, i]], [table.entropy[0, i]])[0])
           for i in range(20)]
    assert one == list(keep[:20])
    assert "expected gain of keeping" in explain(stage, [0.5], [0.5], [0.2], [1.0])


def test_loss_aware_rule_refuses_a_plain_combiner():
    c = fit_combiner(np.random.default_rng(0).random(50), np.full(50, np.nan), np.zeros(50), np.zeros(50),
                     np.arange(50) % 2 == 0)
    with pytest.raises(ValueError, match="LossAwareScore"):
        StagePolicy(rule="loss_aware", combiner=c)
