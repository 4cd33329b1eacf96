"""The pre-generation router baseline: pick the stage from the question text alone, before any model runs.

RouteLLM-style (Ong et al. 2024): a text classifier predicts, per stage, whether that stage will
answer the question correctly; the question goes to the cheapest stage predicted correct with
probability >= tau, else to the largest. Unlike a cascade it pays ONE model per question, but
it cannot see the model's own confidence: the comparison says what the cascade's signals
(P(T), P(IK)) add over routing on the question's wording.

Features: TF-IDF (words and word pairs, sublinear tf) of "subject + question + options"; one
L2-regularised logistic regression per stage. Trained on the calibration split; tau chosen on
out-of-fold calibration predictions (so no question picks a threshold with a prediction made by
a model trained on it), reported on the test split.
"""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np
import pandas as pd

from cascade_core.cost import check_unit
from cascade_core.prompts import subject_phrase
from cascade_core.records.table import RecordTable
from cascade_core.choose.replay import ReplayResult, summarise


def question_texts(qids: Sequence[str], questions: pd.DataFrame) -> list[str]:
    """The text the router reads for each qid: subject, question and options (in `qids` order)."""
    missing = [c for c in ("qid", "question", "options") if c not in questions.columns]
    if missing:
        raise ValueError(f"the question table lacks column(s) {missing}")
    by_qid = questions.assign(qid=questions["qid"].astype(str)).set_index("qid")
    wanted = pd.Index(np.asarray(qids).astype(str))
    absent = wanted[~wanted.isin(by_qid.index)]
    if len(absent):
        raise ValueError(f"{len(absent)} question ids have no text, e.g. {absent[0]!r}")
    rows = by_qid.loc[wanted]
    subjects = rows["subject"].astype(str) if "subject" in rows.columns else pd.Series("", index=rows.index)
    return [f"{subject_phrase(s)}\n{q}\n" + "\n".join(map(str, o))
            for s, q, o in zip(subjects, rows["question"].astype(str), rows["options"])]


@functools.cache
def _word_terms():
    """The router's word analyzer (words and word pairs), built once on first use."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    return TfidfVectorizer(ngram_range=(1, 2)).build_analyzer()


def question_terms(texts: Sequence[str]) -> list[list[str]]:
    """Each text's terms as the router's TF-IDF counts them (lower-cased words of 2+ characters and
    word pairs). Tokenising is most of a TF-IDF fit's time: `out_of_fold_proba` fits the router once
    per fold on the same texts, so it tokenises them once and every fit counts these lists."""
    analyze = _word_terms()
    return [analyze(text) for text in texts]


def _terms(document) -> list[str]:
    """The router vectorizer's analyzer: a text is tokenised, a `question_terms` list is used as it is."""
    return document if isinstance(document, list) else _word_terms()(document)


class PregenRouter:
    """TF-IDF + one logistic regression per stage: P(stage s answers correctly | question text)."""

    def __init__(self, C: float = 1.0, max_features: int = 20_000, min_df: int = 2):
        if C <= 0:
            raise ValueError(f"C must be > 0, got {C}")
        self.C, self.max_features, self.min_df = float(C), int(max_features), int(min_df)

    def fit(self, texts: Sequence, correct) -> "PregenRouter":
        """texts: N question texts (or their `question_terms`); correct: (S, N) booleans, stage s got
        question n right."""
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression

        y = np.atleast_2d(np.asarray(correct, dtype=bool))
        if y.shape[1] != len(texts):
            raise ValueError(f"correct has {y.shape[1]} questions but {len(texts)} texts were given")
        if len(texts) < 2:
            raise ValueError("a router needs at least 2 training questions")
        self.vectorizer_ = TfidfVectorizer(analyzer=_terms, sublinear_tf=True, max_features=self.max_features,
                                           min_df=min(self.min_df, len(texts)))
        X = self.vectorizer_.fit_transform(texts)
        self.models_: list = []
        for row in y:
            if row.all() or not row.any():  # one class: predict its rate (a recording may be all-right)
                self.models_.append(float(row.mean()))
            else:
                self.models_.append(LogisticRegression(C=self.C, max_iter=2000).fit(X, row))
        return self

    def predict_proba(self, texts: Sequence) -> np.ndarray:
        """(S, N): predicted probability that each stage answers each question correctly (texts or
        their `question_terms`)."""
        if not hasattr(self, "models_"):
            raise ValueError("the router is not fitted: call fit() first")
        X = self.vectorizer_.transform(texts)
        return np.stack([np.full(X.shape[0], m) if isinstance(m, float) else m.predict_proba(X)[:, 1]
                         for m in self.models_])


def out_of_fold_proba(texts: Sequence, correct, folds: int = 5, seed: int = 0, C: float = 1.0) -> np.ndarray:
    """(S, N) router predictions for every question from a router trained on the other folds
    (texts or their `question_terms`: texts are tokenised once for all the folds)."""
    y = np.atleast_2d(np.asarray(correct, dtype=bool))
    n = len(texts)
    if folds < 2 or n < folds:
        raise ValueError(f"need folds >= 2 and at least `folds` questions, got folds={folds}, n={n}")
    order = np.random.default_rng(seed).permutation(n)
    out = np.empty(y.shape, dtype=np.float64)
    terms = [_terms(t) for t in texts]
    for part in np.array_split(order, folds):
        train = np.setdiff1d(order, part)
        router = PregenRouter(C=C).fit([terms[i] for i in train], y[:, train])
        out[:, part] = router.predict_proba([terms[i] for i in part])
    return out


def route(proba: np.ndarray, tau: float) -> np.ndarray:
    """Stage per question: the cheapest (first) stage with predicted P(correct) >= tau, else the last."""
    proba = np.atleast_2d(np.asarray(proba, dtype=np.float64))
    ok = proba >= tau
    ok[-1] = True
    return np.argmax(ok, axis=0)


def evaluate(table: RecordTable, stage: np.ndarray, label: str = "pregen router") -> ReplayResult:
    """Outcome of answering question n by stage[n] alone: it pays that one model, nothing else."""
    stage = np.asarray(stage, dtype=np.int64)
    if stage.shape != (table.n_questions,):
        raise ValueError(f"stage must have one entry per question ({table.n_questions}), got {stage.shape}")
    visited = np.zeros((table.n_stages, table.n_questions), dtype=bool)
    visited[stage, np.arange(table.n_questions)] = True
    return summarise(table, label, stage, visited)


def candidate_thresholds(proba: np.ndarray, n: int = 101) -> np.ndarray:
    """Thresholds to sweep: quantiles of the routed stages' predictions, plus 'never' (above 1)."""
    routed = np.asarray(proba, dtype=np.float64)[:-1].ravel()
    levels = np.quantile(routed, np.linspace(0, 1, n), method="lower") if routed.size else np.array([])
    return np.unique(np.concatenate([[0.0], levels, [1.0 + 1e-9]]))


def curve(table: RecordTable, proba: np.ndarray, thresholds: Sequence[float]) -> pd.DataFrame:
    """Accuracy and mean cost (every unit) of the router at each threshold on `table`."""
    from cascade_core.cost import COST_UNITS

    rows = []
    for tau in thresholds:
        result = evaluate(table, route(proba, float(tau)))
        row = {"tau": float(tau), "accuracy": result.accuracy}
        row.update({f"cost_{u}": result.mean_cost[u] for u in COST_UNITS})
        row.update({f"answer_rate:{n}": float(r) for n, r in zip(table.names, result.answer_rate)})
        rows.append(row)
    return pd.DataFrame(rows)


def select_threshold(calib_table: RecordTable, oof_proba: np.ndarray, target_max_loss: float = 0.01,
                     unit: str = "flops", thresholds: Sequence[float] | None = None) -> float:
    """The threshold whose router is cheapest (in `unit`) on calibration while losing at most
    `target_max_loss` accuracy against the largest stage alone; always feasible (tau > 1 = largest)."""
    check_unit(unit)
    taus = candidate_thresholds(oof_proba) if thresholds is None else np.asarray(thresholds, dtype=np.float64)
    points = curve(calib_table, oof_proba, taus)
    reference = float(calib_table.correct[-1].mean())
    ok = points[points["accuracy"] >= reference - target_max_loss - 1e-12]
    if ok.empty:
        return float(taus.max())
    best = ok.sort_values([f"cost_{unit}", "accuracy"], ascending=[True, False], kind="stable").iloc[0]
    return float(best["tau"])
