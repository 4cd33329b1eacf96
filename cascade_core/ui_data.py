"""Data shaping for the dashboard: the numbers its pages draw, from the library's own functions.

The pages only arrange and draw; every number they show is computed here from `replay`,
`frontier`, `stats` and `calibration`, so it is the number those modules give (and the tests can
check the page against them). Nothing here imports Streamlit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from cascade_core.calibration import auroc, expected_calibration_error, reliability_curve
from cascade_core.frontier import accuracy_difference, random_routing
from cascade_core.policy import CascadePolicy, StagePolicy, keep_mask
from cascade_core.record_schema import TABLE_FLOATS
from cascade_core.records import RecordTable
from cascade_core.replay import ReplayResult
from cascade_core.stats import accuracy_ci, mcnemar_exact

UNIT_LABELS = {"flops": "FLOPs", "tokens": "tokens", "dollars": "dollars", "seconds": "seconds", "calls": "API calls"}


# -- thresholds <-> URL query parameters ----------------------------------------------------------
@dataclass(frozen=True)
class StageSetting:
    """What the explorer's widgets hold for one stage (the rule is shared by all stages)."""

    tau_t: float
    tau_ik: float
    enabled: bool = True
    tau_score: float = 0.0  # the threshold of a scored rule (`learned`, `loss_aware`): keep when score >= it


def _unit_float(text: str, what: str, low: float = 0.0, high: float = 1.0) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number in [{low:g}, {high:g}], got {text!r}") from None
    if math.isnan(value) or not low <= value <= high:
        raise ValueError(f"{what} must be a number in [{low:g}, {high:g}], got {text!r}")
    return value


SCORE_RANGE = {"learned": (0.0, 1.0), "loss_aware": (-1.0, 1.0)}  # what each scored rule's keep score spans


def settings_to_params(settings: Mapping[str, StageSetting], rule: str) -> dict[str, str]:
    """Explorer state -> query parameters: `rule`, and per stage `t.<stage>`, `ik.<stage>`, `on.<stage>`
    (and `s.<stage>`, the score threshold, under a scored rule).

    Every stage's on/off is written, on as well as off: a fresh page opens on the calibrated policy,
    which may switch a stage off, so a link that only named the stages switched off would bring
    that stage back off (issue 22). Thresholds are written exactly (`repr`), so the link replays to
    the last digit."""
    params = {"rule": rule}
    for name, s in settings.items():
        params[f"t.{name}"] = _exact(s.tau_t)
        params[f"ik.{name}"] = _exact(s.tau_ik)
        if rule in SCORE_RANGE:
            params[f"s.{name}"] = _exact(s.tau_score)
        params[f"on.{name}"] = "1" if s.enabled else "0"
    return params


def _exact(value: float) -> str:
    """A threshold as the shortest text that reads back to the same float (0.5 -> "0.5", 1.0 -> "1")."""
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text


def settings_from_params(params: Mapping[str, str], defaults: Mapping[str, StageSetting],
                         rules: Sequence[str]) -> tuple[dict[str, StageSetting], str | None, list[str]]:
    """Query parameters -> (settings for the stages in `defaults`, rule or None, problems).

    A parameter that cannot be read is skipped with a problem message (a shared link with a typo
    must still open the page); a per-stage parameter of a stage not in `defaults` is a problem too
    (see `unknown_params` for the page's other keys).
    """
    problems: list[str] = []
    out = dict(defaults)
    rule = params.get("rule")
    if rule is not None and rule not in rules:
        problems.append(f"URL parameter rule={rule!r} is not one of {', '.join(rules)}")
        rule = None
    low, high = SCORE_RANGE.get(rule or "", (-1.0, 1.0))
    for name, default in defaults.items():
        values = {"tau_t": default.tau_t, "tau_ik": default.tau_ik, "tau_score": default.tau_score}
        enabled = default.enabled
        for key, attr in ((f"t.{name}", "tau_t"), (f"ik.{name}", "tau_ik"), (f"s.{name}", "tau_score")):
            if key in params:
                try:
                    values[attr] = (_unit_float(params[key], f"URL parameter {key}", low, high) if attr == "tau_score"
                                    else _unit_float(params[key], f"URL parameter {key}"))
                except ValueError as err:
                    problems.append(str(err))
        if f"on.{name}" in params:
            flag = str(params[f"on.{name}"]).strip().lower()
            if flag in ("0", "false", "off", "no"):
                enabled = False
            elif flag in ("1", "true", "on", "yes"):
                enabled = True
            else:
                problems.append(f"URL parameter on.{name}={params[f'on.{name}']!r} is not 0 or 1")
        out[name] = StageSetting(values["tau_t"], values["tau_ik"], enabled, values["tau_score"])
    for key in params:
        prefix, _, stage = key.partition(".")
        if prefix in ("t", "ik", "s", "on") and stage and stage not in defaults:
            problems.append(f"URL parameter {key}: no stage {stage!r} in this cascade ({', '.join(defaults)})")
    return out, rule, problems


def unknown_params(params: Mapping[str, str], known: Sequence[str]) -> list[str]:
    """Problems for query parameters the page does not read at all (neither in `known` nor per stage)."""
    out = []
    for key, value in params.items():
        prefix, dot, _ = key.partition(".")
        if key in known or (dot and prefix in ("t", "ik", "s", "on")):
            continue
        out.append(f"URL parameter {key}={value!r} is not one this page reads")
    return out


def choice_param(params: Mapping[str, str], key: str, choices: Sequence[str]) -> tuple[str | None, list[str]]:
    """A query parameter that must be one of `choices`: (the value or None, problems)."""
    if key not in params:
        return None, []
    value = params[key]
    if value in choices:
        return value, []
    return None, [f"URL parameter {key}={value!r} is not one of {', '.join(map(str, choices))}"]


def policy_from_settings(names: Sequence[str], settings: Mapping[str, StageSetting], rule: str,
                         combiners: Mapping[str, object] | None = None) -> CascadePolicy:
    """One StagePolicy per table stage, in table order (ValueError when every stage is off).

    A scored rule (`learned`, `loss_aware`) needs each routed stage's fitted score in `combiners`
    (stage -> LearnedCombiner / LossAwareScore, e.g. from the calibrated policy)."""
    combiners = combiners or {}
    return CascadePolicy(tuple(StagePolicy(tau_t=settings[n].tau_t, tau_ik=settings[n].tau_ik, rule=rule,
                                           enabled=settings[n].enabled, tau_learned=settings[n].tau_score,
                                           combiner=combiners.get(n) if rule in SCORE_RANGE else None)
                               for n in names))


def settings_from_policy(names: Sequence[str], policy: CascadePolicy) -> tuple[dict[str, StageSetting], str, dict]:
    """A policy (e.g. a calibrated one) as the explorer's widgets: (stage -> setting, the rule, stage ->
    fitted score). The rule is the one its routed stages share (the first routed stage's)."""
    if len(names) != len(policy):
        raise ValueError(f"the policy has {len(policy)} stages, the records {len(names)} ({', '.join(names)})")
    routed = [s for s in policy.stages[:policy.last_enabled] if s.enabled]
    rule = routed[0].rule if routed else next((s.rule for s in policy.stages if s.enabled), "both")
    settings = {n: StageSetting(float(min(max(s.tau_t, 0.0), 1.0)), float(min(max(s.tau_ik, 0.0), 1.0)),
                                bool(s.enabled), float(s.tau_learned)) for n, s in zip(names, policy.stages)}
    combiners = {n: s.combiner for n, s in zip(names, policy.stages) if s.combiner is not None}
    return settings, rule, combiners


# -- which threshold decides (the Route page's gauges) --------------------------------------------
def thresholds_applied(policy: StagePolicy, p_t: float, p_ik: float, margin: float = float("nan"),
                       entropy: float = float("nan")) -> dict[str, bool]:
    """Whether τ_T and τ_IK take part in this stage's decision on this question, asked of
    `policy.keep_mask` itself (so every rule, `learned` and any new one, is answered alike).

    A threshold takes part when moving its signal from just below it to on it can change the
    decision, the other signal set to pass its own threshold (and P(IK) kept missing where it is
    missing: a missing P(IK) routes on P(T) alone). τ_IK never applies without a P(IK).
    """
    def decides(signal: str) -> bool:
        tau = policy.tau_t if signal == "p_t" else policy.tau_ik
        values = {"p_t": max(1.0, policy.tau_t), "p_ik": p_ik if math.isnan(p_ik) else max(1.0, policy.tau_ik),
                  "margin": margin, "entropy": entropy}
        both = []
        for x in (np.nextafter(tau, -np.inf), tau):
            values[signal] = x
            both.append(bool(keep_mask(policy, [values["p_t"]], [values["p_ik"]], [values["margin"]],
                                       [values["entropy"]])[0]))
        return both[0] != both[1]

    return {"tau_t": decides("p_t"), "tau_ik": not math.isnan(p_ik) and decides("p_ik")}


def _agreeing(value: float, tau: float) -> tuple[str, str]:
    """`value` and `tau` printed with the fewest decimals (2 to 10) that show the comparison the
    decision made: 0.4996 < 0.5 prints "0.4996 < 0.5000", never "0.50 < 0.50"."""
    ok = value >= tau
    for d in range(2, 11):
        a, b = f"{value:.{d}f}", f"{tau:.{d}f}"
        if (float(a) >= float(b)) == ok and (ok or a != b):
            return a, b
    return repr(value), repr(tau)


def decision_reason(policy: StagePolicy, p_t: float, p_ik: float, margin: float = float("nan"),
                    entropy: float = float("nan")) -> str:
    """`policy.explain`'s reason for one question, its numbers printed so that each printed
    comparison agrees with the decision (see `_agreeing`)."""
    from cascade_core.policy import explain

    text = explain(policy, [p_t], [p_ik], [margin], [entropy])
    pairs = [("P(T)", p_t, "τ_T", policy.tau_t), ("P(IK)", p_ik, "τ_IK", policy.tau_ik)]
    if policy.rule in SCORE_RANGE and policy.combiner is not None:
        score = float(policy.combiner.score(np.array([p_t]), np.array([p_ik]), np.array([margin]),
                                            np.array([entropy]))[0])
        label = "expected gain of keeping" if policy.rule == "loss_aware" else "combined score"
        pairs.append((label, score, "τ", policy.tau_learned))
    for label, value, tau_label, tau in pairs:
        if math.isnan(value):
            continue
        op = "≥" if value >= tau else "<"
        short = f"{label} {value:.2f} {op} {tau_label} {tau:.2f}"
        a, b = _agreeing(value, tau)
        text = text.replace(short, f"{label} {a} {op} {tau_label} {b}")
    return text


def display_answer(text: str | None) -> str:
    """A free-form answer as shown: cut at the first end-of-turn marker a chat template writes
    (should the model have gone on past it), surrounding whitespace trimmed."""
    out = text or ""
    for marker in END_OF_TURN_MARKERS:
        cut = out.find(marker)
        if cut >= 0:
            out = out[:cut]
    return out.strip()


END_OF_TURN_MARKERS = ("<|im_end|>", "<|im_start|>", "<|endoftext|>", "<|eot_id|>", "<end_of_turn>", "</s>")


# -- the operating point ----------------------------------------------------------------------------
@dataclass(frozen=True)
class OperatingPoint:
    """A replayed policy's numbers as the explorer shows them (all from cascade_core)."""

    accuracy: float
    accuracy_low: float
    accuracy_high: float
    mean_cost: float
    compute_reduction: float
    reference_name: str
    reference_accuracy: float
    pd: float
    mcnemar_p: float
    discordant: tuple[int, int]
    escalation_rate: dict[str, float]
    answer_rate: dict[str, float]
    random_accuracy: float
    random_cost: float


def operating_point(table: RecordTable, result: ReplayResult, unit: str) -> OperatingPoint:
    """Accuracy with its Wilson CI, compute reduction against the last (largest) stage alone, PD
    and exact McNemar p against that stage, escalation rates, and random routing at the same rates."""
    acc = accuracy_ci(result.correct)
    reference = table.correct[-1]
    p_value, b, c = mcnemar_exact(result.correct, reference)
    rand = random_routing(table, result)
    return OperatingPoint(
        accuracy=acc.value, accuracy_low=acc.low, accuracy_high=acc.high,
        mean_cost=result.mean_cost[unit], compute_reduction=result.compute_reduction[unit],
        reference_name=table.names[-1], reference_accuracy=float(reference.mean()),
        pd=float(accuracy_difference(result.accuracy, reference.mean())), mcnemar_p=p_value, discordant=(b, c),
        escalation_rate={n: float(r) for n, r in zip(table.names, result.escalation_rate)},
        answer_rate={n: float(r) for n, r in zip(table.names, result.answer_rate)},
        random_accuracy=rand.accuracy, random_cost=rand.mean_cost[unit],
    )


def random_routing_curve(table: RecordTable, enabled: Sequence[bool], unit: str, points: int = 21) -> pd.DataFrame:
    """Random routing over the enabled stages, every routed stage escalating the same share r,
    for r from 0 to 1: the line a router must beat (its expectation, `frontier.random_routing`)."""
    rows = []
    for r in np.linspace(0.0, 1.0, points):
        base = random_routing(table, np.full(table.n_stages, r), enabled=enabled)
        rows.append({"rate": float(r), "accuracy": base.accuracy, "cost": base.mean_cost[unit]})
    return pd.DataFrame(rows)


# -- per model ----------------------------------------------------------------------------------------
def stage_summary(table: RecordTable) -> pd.DataFrame:
    """Per stage: questions, accuracy with Wilson CI, AUROC and ECE of P(T) and P(IK), mean costs."""
    rows = []
    for s, name in enumerate(table.names):
        correct = table.correct[s]
        ci = accuracy_ci(correct)
        row = {"stage": name, "model": table.model_ids[s], "recorded": bool(table.recorded[s]),
               "questions": int(table.n_questions), "accuracy": ci.value, "ci_low": ci.low, "ci_high": ci.high}
        for signal in ("p_t", "p_ik"):
            values = getattr(table, signal)[s]
            complete = np.isfinite(values).all()
            row[f"auroc_{signal}"] = auroc(values, correct) if complete else float("nan")
            row[f"ece_{signal}"] = expected_calibration_error(values, correct) if complete else float("nan")
        for unit in ("tokens", "flops", "dollars", "seconds"):
            row[f"mean_{unit}"] = float(table.cost(unit)[s].mean())
        rows.append(row)
    return pd.DataFrame(rows)


def per_subject_accuracy(table: RecordTable) -> pd.DataFrame:
    """Subjects x stages accuracy (and a `questions` column), subjects sorted by name."""
    subjects, inverse = np.unique(table.subjects, return_inverse=True)
    counts = np.bincount(inverse, minlength=len(subjects))
    data = {"questions": counts}
    for s, name in enumerate(table.names):
        hits = np.bincount(inverse, weights=table.correct[s].astype(np.float64), minlength=len(subjects))
        data[name] = hits / np.maximum(counts, 1)
    frame = pd.DataFrame(data, index=pd.Index(subjects, name="subject"))
    return frame


def reliability(table: RecordTable, signal: str, bins: int = 10) -> dict[str, dict]:
    """Per stage with a complete signal: its reliability curve, ECE and AUROC (stages without it
    are left out: P(IK) before a probe is trained, P(T) of a recorded stage)."""
    out = {}
    for s, name in enumerate(table.names):
        values = getattr(table, signal)[s]
        if not np.isfinite(values).all():
            continue
        correct = table.correct[s]
        out[name] = {"curve": reliability_curve(values, correct, bins),
                     "ece": expected_calibration_error(values, correct, bins),
                     "auroc": auroc(values, correct)}
    return out


def record_frames(table: RecordTable, qids: Sequence[str] | None = None, splits: Sequence[str] | None = None) -> list[pd.DataFrame]:
    """One frame per stage in the benchmark runner's column layout, from a table (the inverse of
    `RecordTable.from_frames`); `qids`/`splits` relabel the questions, e.g. to put synthetic
    records on real MMLU ids. Lets the app and its benchmark run on synthetic records."""
    qids = table.qids if qids is None else np.asarray(qids, dtype=str)
    splits = table.splits if splits is None else np.asarray(splits, dtype=str)
    if len(qids) != table.n_questions or len(splits) != table.n_questions:
        raise ValueError(f"need {table.n_questions} qids and splits, got {len(qids)} and {len(splits)}")
    frames = []
    for s, name in enumerate(table.names):
        frame = pd.DataFrame({
            "qid": qids, "subject": table.subjects, "split": splits, "stage": name, "model_id": table.model_ids[s],
            "prediction": table.prediction[s], "correct": table.correct[s],
            **{k: getattr(table, k)[s] for k in TABLE_FLOATS},
        })
        if not table.has_hidden[s]:
            frame = frame.drop(columns="p_ik")
        frames.append(frame)
    return frames


__all__ = [
    "END_OF_TURN_MARKERS", "decision_reason", "display_answer", "SCORE_RANGE", "UNIT_LABELS", "OperatingPoint", "StageSetting", "choice_param", "settings_from_policy",
    "unknown_params", "operating_point", "per_subject_accuracy", "policy_from_settings",
    "random_routing_curve", "record_frames", "reliability", "settings_from_params", "settings_to_params", "stage_summary",
    "thresholds_applied",
]
