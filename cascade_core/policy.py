"""The routing policy: at each stage, keep the answer or escalate it to the next stage.

`keep_mask` is THE decision rule. The live cascade calls it with length-1 arrays, the replay
with a whole record table, so a policy decides the same way live and replayed.

Rules (``StagePolicy.rule``):

- ``both``     keep iff P(T) >= tau_t AND P(IK) >= tau_ik (the paper's rule);
- ``pt_only``  keep iff P(T) >= tau_t;
- ``pik_only`` keep iff P(IK) >= tau_ik;
- ``learned``  keep iff a logistic combination of [P(T), P(IK), margin, entropy] (and, when fit
  with subjects, the question's subject prior) >= tau_learned;
- ``loss_aware`` keep iff P(this stage right) - P(the last stage right), both logistic in the same
  signals and fit on calibration (`LossAwareScore`), >= tau_learned: the expected accuracy gained
  by keeping rather than escalating, so a stage keeps where the big model would fail too.

Missing signals: a question whose P(IK) is NaN (a stage without hidden states, such as an API,
or without a probe) routes on P(T) >= tau_t alone, whatever the rule, ``pik_only`` included, as
the paper does for GPT-4o. ``learned`` and ``loss_aware`` do the same where any feature their model uses is NaN.

The subject: a fitted model may use the question's subject through its *subject prior*, the
smoothed calibration log-odds that this stage (``subject_right``) and the reference
(``subject_reference``) answer a question of that subject right, stored per subject as plain
floats in the model (JSON-safe), with a default (the overall log-odds) for a subject calibration
never saw or a question without one. `keep_mask` takes the subject: the live cascade passes the
question's, the replay the table's, so both read the same number.
A NaN P(T) never passes a threshold: that question escalates.

Thresholds: NaN is rejected; any other float is accepted (a threshold above 1 means "never
keep", 0 means "always keep" for a probability). Range checks for user input belong to the
preset loader.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Sequence

import numpy as np

RULES: tuple[str, ...] = ("both", "pt_only", "pik_only", "learned", "loss_aware")
SCORED_RULES: tuple[str, ...] = ("learned", "loss_aware")  # rules whose threshold is tau_learned
FEATURES: tuple[str, ...] = ("p_t", "p_ik", "margin", "entropy")
SUBJECT_FEATURES: tuple[str, ...] = ("subject_right", "subject_reference")  # from the subject prior
SUBJECT_SMOOTHING = 20.0  # pseudo-questions at the overall rate added to every subject's count


def _as_array(values, name: str) -> np.ndarray:
    array = np.atleast_1d(np.asarray(values, dtype=np.float64))
    if array.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array, got shape {array.shape}")
    return array


@dataclass(frozen=True)
class LearnedCombiner:
    """A fitted logistic combination of the signals, stored as plain floats (JSON-safe).

    score = sigmoid(bias + sum_j weight_j * (x_j - mean_j) / scale_j) over `features`, a subset
    of ("p_t", "p_ik", "margin", "entropy") and, with a subject prior, of SUBJECT_FEATURES; think
    scikit-learn's StandardScaler followed by LogisticRegression, without either object.
    `subject_values`: (subject, (one value per subject feature, in `features` order)) pairs,
    sorted; `subject_default`: the values for any other subject (module docstring).
    """

    features: tuple[str, ...]
    weights: tuple[float, ...]
    bias: float
    means: tuple[float, ...]
    scales: tuple[float, ...]
    subject_values: tuple = ()
    subject_default: tuple = ()

    def __post_init__(self) -> None:
        unknown = [f for f in self.features if f not in FEATURES + SUBJECT_FEATURES]
        if unknown or not self.features:
            raise ValueError(f"combiner features must be a non-empty subset of {FEATURES + SUBJECT_FEATURES}, "
                             f"got {self.features}")
        n_subject = sum(f in SUBJECT_FEATURES for f in self.features)
        pairs = tuple((str(k), tuple(float(v) for v in values)) for k, values in self.subject_values)
        default = tuple(float(v) for v in self.subject_default)
        object.__setattr__(self, "subject_values", pairs)
        object.__setattr__(self, "subject_default", default)
        if len(default) != n_subject or any(len(v) != n_subject for _, v in pairs):
            raise ValueError(f"the subject prior needs {n_subject} value(s) per subject and as default")
        if not all(math.isfinite(v) for v in (*default, *(x for _, v in pairs for x in v))):
            raise ValueError("subject prior values must be finite numbers")
        n = len(self.features)
        if not (len(self.weights) == len(self.means) == len(self.scales) == n):
            raise ValueError("combiner weights, means and scales must have one value per feature")
        values = [*self.weights, self.bias, *self.means, *self.scales]
        if not all(math.isfinite(v) for v in values):
            raise ValueError("combiner parameters must be finite numbers")
        if any(s <= 0 for s in self.scales):
            raise ValueError("combiner scales must be > 0")

    @property
    def uses_p_ik(self) -> bool:
        return "p_ik" in self.features

    @property
    def uses_subject(self) -> bool:
        return bool(self.subject_default)

    def subject_columns(self, subject, n: int) -> dict[str, np.ndarray]:
        """The subject features of `n` questions: `subject` is one name, an array of n, or None."""
        names = [f for f in self.features if f in SUBJECT_FEATURES]
        if not names:
            return {}
        if subject is None or isinstance(subject, str):
            subject = [subject or ""] * n
        subject = np.asarray(subject).astype(str)
        if subject.shape != (n,):
            raise ValueError(f"subject must be one name or {n} names, got shape {subject.shape}")
        table = dict(self.subject_values)
        unique, back = np.unique(subject, return_inverse=True)
        values = np.array([table.get(u, self.subject_default) for u in unique],
                          dtype=np.float64).reshape(len(unique), -1)
        return {name: values[back.ravel(), j] for j, name in enumerate(names)}

    def score(self, p_t, p_ik, margin, entropy, subject=None) -> np.ndarray:
        """P(correct) by the combiner; NaN where a feature it uses is NaN. `subject`: the
        question's subject (one name or one per question; None = the default prior)."""
        columns = {"p_t": p_t, "p_ik": p_ik, "margin": margin, "entropy": entropy}
        if self.uses_subject:
            columns.update(self.subject_columns(subject, len(_as_array(p_t, "p_t"))))
        arrays = [_as_array(columns[f], f) for f in self.features]
        z = np.full(arrays[0].shape, float(self.bias))
        for x, w, m, s in zip(arrays, self.weights, self.means, self.scales):
            z = z + w * (x - m) / s
        with np.errstate(over="ignore"):
            return 1.0 / (1.0 + np.exp(-z))

    def to_dict(self) -> dict:
        out = {"kind": "learned", "features": list(self.features), "weights": [float(w) for w in self.weights],
               "bias": float(self.bias), "means": [float(m) for m in self.means],
               "scales": [float(s) for s in self.scales]}
        if self.uses_subject:
            out["subject_prior"] = {"default": list(self.subject_default),
                                    "subjects": {k: list(v) for k, v in self.subject_values}}
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "LearnedCombiner":
        try:
            prior = data.get("subject_prior") or {}
            return cls(features=tuple(str(f) for f in data["features"]),
                       weights=tuple(float(w) for w in data["weights"]), bias=float(data["bias"]),
                       means=tuple(float(m) for m in data["means"]),
                       scales=tuple(float(s) for s in data["scales"]),
                       subject_values=tuple(sorted((str(k), tuple(v)) for k, v in prior.get("subjects", {}).items())),
                       subject_default=tuple(prior.get("default", ())))
        except KeyError as err:
            raise ValueError(f"combiner dict lacks key {err}") from None


def subject_prior(subjects, targets: dict, smoothing: float = SUBJECT_SMOOTHING) -> tuple[tuple, tuple]:
    """(subject_values, subject_default) of a `LearnedCombiner`: per subject, the log-odds of each
    target (name -> bool per question) with `smoothing` pseudo-questions at its overall rate (a
    subject of 20 calibration questions moves half way from the overall rate to its own)."""
    subjects = np.asarray(subjects).astype(str)
    unique, code = np.unique(subjects, return_inverse=True)
    counts = np.bincount(code, minlength=len(unique))
    logit = lambda r: np.log(r / (1.0 - r))  # noqa: E731
    per, default = [], []
    for y in targets.values():
        y = np.asarray(y).astype(float)
        overall = float(np.clip(y.mean(), 1e-3, 1 - 1e-3))
        rates = (np.bincount(code, weights=y, minlength=len(unique)) + smoothing * overall) / (counts + smoothing)
        per.append(logit(np.clip(rates, 1e-3, 1 - 1e-3)))
        default.append(float(logit(overall)))
    values = tuple((str(u), tuple(float(p[i]) for p in per)) for i, u in enumerate(unique))
    return values, tuple(default)


def fit_combiner(p_t, p_ik, margin, entropy, correct, C: float = 1.0, subjects=None,
                 subject_targets: dict | None = None) -> LearnedCombiner:
    """Fit the learned rule on the calibration split: logistic regression on standardised signals.

    A feature that is NaN everywhere (P(IK) of a stage without a probe) is left out; rows with a
    NaN in a used feature are not trained on. Needs both right and wrong answers. `subjects`
    (one per question) adds the subject prior of `subject_targets` (feature name in
    SUBJECT_FEATURES -> bool per question; default {"subject_right": correct}), fit on the same rows.
    """
    columns = {"p_t": p_t, "p_ik": p_ik, "margin": margin, "entropy": entropy}
    arrays = {k: _as_array(v, k) for k, v in columns.items()}
    prior: tuple = ((), ())
    if subjects is not None:
        targets = subject_targets if subject_targets is not None else {"subject_right": correct}
        prior = subject_prior(subjects, targets)
        names = tuple(targets)
        probe = LearnedCombiner(features=names, weights=(0.0,) * len(names), bias=0.0, means=(0.0,) * len(names),
                                scales=(1.0,) * len(names), subject_values=prior[0], subject_default=prior[1])
        arrays.update(probe.subject_columns(subjects, len(arrays["p_t"])))
    y = np.atleast_1d(np.asarray(correct)).astype(bool)
    n = len(y)
    for name, array in arrays.items():
        if len(array) != n:
            raise ValueError(f"{name} has {len(array)} values, correct has {n}")
    used = tuple(f for f in (*FEATURES, *SUBJECT_FEATURES) if f in arrays and not np.all(np.isnan(arrays[f])))
    if "p_t" not in used:
        raise ValueError("P(T) is NaN everywhere: nothing to fit a combiner on")
    X = np.column_stack([arrays[f] for f in used])
    rows = ~np.isnan(X).any(axis=1)
    X, y = X[rows], y[rows]
    if y.all() or not y.any():
        raise ValueError("the combiner needs both right and wrong answers to fit")
    means = X.mean(axis=0)
    scales = X.std(axis=0)
    scales = np.where(scales > 0, scales, 1.0)
    weights, bias = logistic_fit((X - means) / scales, y, C=C)
    return LearnedCombiner(features=used, weights=tuple(float(w) for w in weights),
                           bias=float(bias), means=tuple(float(m) for m in means),
                           scales=tuple(float(s) for s in scales), subject_values=prior[0], subject_default=prior[1])


def logistic_fit(X: np.ndarray, y: np.ndarray, C: float = 1.0, iterations: int = 50) -> tuple[np.ndarray, float]:
    """L2-penalised logistic regression by Newton's method: the optimum of scikit-learn's
    `LogisticRegression(C=C)` objective (0.5 |w|^2 + C * log-loss, intercept not penalised),
    in a millisecond for a few features (the report fits thousands: lbfgs costs ~50x more)."""
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n, d = X.shape
    A = np.column_stack([X, np.ones(n)])
    penalty = np.full(d + 1, 1.0 / C)
    penalty[-1] = 0.0
    theta = np.zeros(d + 1)
    for _ in range(iterations):
        z = A @ theta
        p = 1.0 / (1.0 + np.exp(-np.clip(z, -500, 500)))
        grad = A.T @ (p - y) + penalty * theta
        hess = (A * (p * (1 - p))[:, None]).T @ A + np.diag(penalty + 1e-12)
        step = np.linalg.solve(hess, grad)
        theta -= step
        if np.max(np.abs(step)) < 1e-10:
            break
    return theta[:-1], float(theta[-1])


@dataclass(frozen=True)
class LossAwareScore:
    """The `loss_aware` keep score: P(this stage right) - P(the reference right), each a fitted
    `LearnedCombiner` on this stage's signals; in [-1, 1], the expected accuracy kept by not
    escalating. Plain floats only (JSON-safe), like `LearnedCombiner`."""

    right: LearnedCombiner
    reference: LearnedCombiner

    def __post_init__(self) -> None:
        if not isinstance(self.right, LearnedCombiner) or not isinstance(self.reference, LearnedCombiner):
            raise ValueError("a LossAwareScore holds two LearnedCombiners (right, reference)")

    @property
    def features(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.right.features + self.reference.features))

    @property
    def uses_p_ik(self) -> bool:
        return self.right.uses_p_ik or self.reference.uses_p_ik

    @property
    def uses_subject(self) -> bool:
        return self.right.uses_subject or self.reference.uses_subject

    def score(self, p_t, p_ik, margin, entropy, subject=None) -> np.ndarray:
        return (self.right.score(p_t, p_ik, margin, entropy, subject)
                - self.reference.score(p_t, p_ik, margin, entropy, subject))

    def to_dict(self) -> dict:
        return {"kind": "loss_aware", "right": self.right.to_dict(), "reference": self.reference.to_dict()}

    @classmethod
    def from_dict(cls, data: dict) -> "LossAwareScore":
        try:
            return cls(right=LearnedCombiner.from_dict(data["right"]),
                       reference=LearnedCombiner.from_dict(data["reference"]))
        except KeyError as err:
            raise ValueError(f"loss-aware score dict lacks key {err}") from None


def combiner_from_dict(data: dict) -> "LearnedCombiner | LossAwareScore":
    """A stage's fitted keep-score model from its dict (kind "learned" or "loss_aware")."""
    kind = data.get("kind", "learned")
    if kind == "loss_aware":
        return LossAwareScore.from_dict(data)
    if kind != "learned":
        raise ValueError(f"unknown combiner kind {kind!r}; kinds: learned, loss_aware")
    return LearnedCombiner.from_dict(data)


def fit_loss_aware(p_t, p_ik, margin, entropy, correct, reference_correct, C: float = 1.0,
                   subjects=None) -> LossAwareScore:
    """Fit the loss-aware score on calibration: one combiner for "this stage is right", one for
    "the reference (last stage) is right", both on this stage's signals and, with `subjects`, on
    both subject priors (this stage's and the reference's rate in the question's subject)."""
    targets = None if subjects is None else {"subject_right": correct, "subject_reference": reference_correct}
    fit = lambda y: fit_combiner(p_t, p_ik, margin, entropy, y, C=C, subjects=subjects,  # noqa: E731
                                 subject_targets=targets)
    return LossAwareScore(right=fit(correct), reference=fit(reference_correct))


@dataclass(frozen=True)
class StagePolicy:
    """One stage's routing: its rule, thresholds, and whether the stage is in the cascade at all."""

    tau_t: float = 0.0
    tau_ik: float = 0.0
    rule: str = "both"
    enabled: bool = True
    tau_learned: float = 0.5
    combiner: LearnedCombiner | LossAwareScore | None = field(default=None, compare=True)

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"unknown rule {self.rule!r}; rules: {', '.join(RULES)}")
        for name in ("tau_t", "tau_ik", "tau_learned"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
                raise ValueError(f"{name} must be a number, got {value!r}")
            if math.isnan(float(value)):
                raise ValueError(f"{name} is NaN: a threshold must be a number")
            object.__setattr__(self, name, float(value))
        object.__setattr__(self, "enabled", bool(self.enabled))
        if self.combiner is not None and not isinstance(self.combiner, (LearnedCombiner, LossAwareScore)):
            raise ValueError("combiner must be a LearnedCombiner or LossAwareScore (use combiner_from_dict)")
        if self.rule == "loss_aware" and self.combiner is not None and not isinstance(self.combiner, LossAwareScore):
            raise ValueError("rule 'loss_aware' needs a LossAwareScore (policy.fit_loss_aware), not a LearnedCombiner")

    def to_dict(self) -> dict:
        return {"tau_t": self.tau_t, "tau_ik": self.tau_ik, "rule": self.rule, "enabled": self.enabled,
                "tau_learned": self.tau_learned,
                "combiner": None if self.combiner is None else self.combiner.to_dict()}

    @classmethod
    def from_dict(cls, data: dict) -> "StagePolicy":
        combiner = data.get("combiner")
        return cls(tau_t=data.get("tau_t", 0.0), tau_ik=data.get("tau_ik", 0.0), rule=data.get("rule", "both"),
                   enabled=data.get("enabled", True), tau_learned=data.get("tau_learned", 0.5),
                   combiner=None if combiner is None else combiner_from_dict(combiner))


def keep_mask(policy: StagePolicy, p_t, p_ik, margin=None, entropy=None, subject=None) -> np.ndarray:
    """Which questions a stage keeps (True) rather than escalates, by `policy`'s rule.

    Arrays of one value per question; `margin` and `entropy` are only read by the learned rule
    (None = NaN), `subject` (one name or one per question; None = unknown) only by a fitted
    model with a subject prior. This function ignores `policy.enabled`: skipping a switched-off
    stage is the cascade's job (live runner and replay alike).
    """
    p_t = _as_array(p_t, "p_t")
    p_ik = _as_array(p_ik, "p_ik")
    if p_ik.shape != p_t.shape:
        raise ValueError(f"p_t and p_ik must have the same length, got {p_t.shape} and {p_ik.shape}")
    by_pt = p_t >= policy.tau_t  # NaN P(T) -> False -> escalate
    no_pik = np.isnan(p_ik)
    if policy.rule == "pt_only":
        return by_pt
    if policy.rule == "both":
        return by_pt & ((p_ik >= policy.tau_ik) | no_pik)
    if policy.rule == "pik_only":
        return np.where(no_pik, by_pt, p_ik >= policy.tau_ik)
    # learned, loss_aware
    if policy.combiner is None:
        fit = "fit_combiner" if policy.rule == "learned" else "fit_loss_aware"
        raise ValueError(f"rule {policy.rule!r} needs a fitted model (policy.{fit} on the calibration split)")
    nan = np.full(p_t.shape, np.nan)
    margin = nan if margin is None else _as_array(margin, "margin")
    entropy = nan if entropy is None else _as_array(entropy, "entropy")
    score = policy.combiner.score(p_t, p_ik, margin, entropy, subject)
    return np.where(np.isnan(score), by_pt, score >= policy.tau_learned)


def _fmt(x: float) -> str:
    return "NaN" if math.isnan(x) else f"{x:.2f}"


def _compare(label: str, value: float, tau_label: str, tau: float) -> tuple[bool, str]:
    ok = bool(value >= tau)
    return ok, f"{label} {_fmt(value)} {'≥' if ok else '<'} {tau_label} {_fmt(tau)}"


def explain(policy: StagePolicy, p_t, p_ik, margin=None, entropy=None, subject=None) -> str:
    """A short human reason for the decision on ONE question, e.g. "escalate: P(T) 0.62 < τ_T 0.70"."""
    values = [_as_array(v, n) for v, n in ((p_t, "p_t"), (p_ik, "p_ik"))]
    if any(len(v) != 1 for v in values):
        raise ValueError("explain takes the signals of one question")
    keep = bool(keep_mask(policy, p_t, p_ik, margin, entropy, subject)[0])
    verdict = "keep" if keep else "escalate"
    t, ik = float(values[0][0]), float(values[1][0])
    pt_ok, pt_text = _compare("P(T)", t, "τ_T", policy.tau_t)
    if math.isnan(t):
        pt_text = "P(T) missing"
    if policy.rule == "pt_only":
        return f"{verdict}: {pt_text}"
    if math.isnan(ik) and policy.rule != "learned":
        return f"{verdict}: {pt_text} (no P(IK): routes on P(T) alone)"
    if policy.rule == "pik_only":
        return f"{verdict}: {_compare('P(IK)', ik, 'τ_IK', policy.tau_ik)[1]}"
    if policy.rule == "both":
        ik_ok, ik_text = _compare("P(IK)", ik, "τ_IK", policy.tau_ik)
        if keep:
            return f"{verdict}: {pt_text} and {ik_text}"
        failing = [text for ok, text in ((pt_ok, pt_text), (ik_ok, ik_text)) if not ok]
        return f"{verdict}: " + " and ".join(failing)
    nan = np.full(1, np.nan)
    score = policy.combiner.score(p_t, p_ik, nan if margin is None else margin, nan if entropy is None else entropy,
                                  subject)
    if math.isnan(float(score[0])):
        return f"{verdict}: {pt_text} (a combiner feature is missing: routes on P(T) alone)"
    label = "expected gain of keeping" if policy.rule == "loss_aware" else "combined score"
    return f"{verdict}: {_compare(label, float(score[0]), 'τ', policy.tau_learned)[1]}"


@dataclass(frozen=True)
class CascadePolicy:
    """One StagePolicy per stage, in cascade order. The last enabled stage always answers."""

    stages: tuple[StagePolicy, ...]

    def __post_init__(self) -> None:
        stages = tuple(self.stages)
        if not stages:
            raise ValueError("a cascade policy needs at least one stage")
        if not all(isinstance(s, StagePolicy) for s in stages):
            raise ValueError("every stage of a CascadePolicy must be a StagePolicy")
        if not any(s.enabled for s in stages):
            raise ValueError("every stage is switched off: enable at least one")
        object.__setattr__(self, "stages", stages)

    def __len__(self) -> int:
        return len(self.stages)

    def __getitem__(self, index: int) -> StagePolicy:
        return self.stages[index]

    @property
    def enabled_indices(self) -> tuple[int, ...]:
        return tuple(i for i, s in enumerate(self.stages) if s.enabled)

    @property
    def last_enabled(self) -> int:
        return self.enabled_indices[-1]

    @classmethod
    def from_lists(cls, tau_t: Sequence[float], tau_ik: Sequence[float] | None = None,
                   rule: str | Sequence[str] = "both", enabled: Sequence[bool] | None = None,
                   tau_learned: Sequence[float] | None = None,
                   combiners: Sequence[LearnedCombiner | None] | None = None) -> "CascadePolicy":
        """Build from per-stage lists (one value per stage; `rule` may be one rule for all)."""
        n = len(tau_t)
        rules = [rule] * n if isinstance(rule, str) else list(rule)
        tau_ik = [0.0] * n if tau_ik is None else list(tau_ik)
        enabled = [True] * n if enabled is None else list(enabled)
        tau_learned = [0.5] * n if tau_learned is None else list(tau_learned)
        combiners = [None] * n if combiners is None else list(combiners)
        for name, values in (("tau_ik", tau_ik), ("rule", rules), ("enabled", enabled),
                             ("tau_learned", tau_learned), ("combiners", combiners)):
            if len(values) != n:
                raise ValueError(f"{name} has {len(values)} values for {n} stages")
        return cls(tuple(StagePolicy(tau_t=tau_t[i], tau_ik=tau_ik[i], rule=rules[i], enabled=enabled[i],
                                     tau_learned=tau_learned[i], combiner=combiners[i]) for i in range(n)))

    @classmethod
    def single(cls, n_stages: int, stage: int) -> "CascadePolicy":
        """Only `stage` enabled: that model alone."""
        if not 0 <= stage < n_stages:
            raise ValueError(f"stage {stage} out of range for {n_stages} stages")
        return cls(tuple(StagePolicy(enabled=i == stage) for i in range(n_stages)))

    def with_stage(self, index: int, **changes) -> "CascadePolicy":
        """A copy with stage `index`'s policy changed (e.g. ``tau_t=0.7`` or ``enabled=False``)."""
        stages = list(self.stages)
        stages[index] = replace(stages[index], **changes)
        return CascadePolicy(tuple(stages))

    def to_dict(self) -> dict:
        return {"stages": [s.to_dict() for s in self.stages]}

    @classmethod
    def from_dict(cls, data: dict) -> "CascadePolicy":
        if "stages" not in data:
            raise ValueError("cascade policy dict lacks 'stages'")
        return cls(tuple(StagePolicy.from_dict(s) for s in data["stages"]))
