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

from cascade_core.signal_quality import auroc, expected_calibration_error, reliability_curve
from cascade_core.choose.baselines import random_routing
from cascade_core.choose.router_metrics import accuracy_difference
from cascade_core.presets import StageConfig
from cascade_core.policy import CascadePolicy, StagePolicy, keep_mask
from cascade_core.records.schema import TABLE_FLOATS
from cascade_core.records.table import RecordTable
from cascade_core.choose.replay import ReplayResult, replay
from cascade_core.choose.paired_stats import accuracy_ci, mcnemar_exact

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
                       entropy: float = float("nan"), subject: str | None = None) -> dict[str, bool]:
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
                                       [values["entropy"]], subject=subject)[0]))
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
                    entropy: float = float("nan"), subject: str | None = None) -> str:
    """`policy.explain`'s reason for one question, its numbers printed so that each printed
    comparison agrees with the decision (see `_agreeing`). `subject`: the question's, as the live
    decision read it (a fitted score with a subject prior depends on it)."""
    from cascade_core.policy import explain

    text = explain(policy, [p_t], [p_ik], [margin], [entropy], subject=subject)
    pairs = [("P(T)", p_t, "τ_T", policy.tau_t), ("P(IK)", p_ik, "τ_IK", policy.tau_ik)]
    if policy.rule in SCORE_RANGE and policy.combiner is not None:
        score = float(policy.combiner.score(np.array([p_t]), np.array([p_ik]), np.array([margin]),
                                            np.array([entropy]), subject)[0])
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


def json_text(obj) -> str:
    """`obj` as strict JSON text (indented): NaN and infinities, which JSON has no words for, become
    null at any depth (a trace's missing P(IK), a token's log-probability of -inf)."""
    import json

    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {str(k): clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        if isinstance(x, np.generic):
            return clean(x.item())
        return x

    return json.dumps(clean(obj), indent=2, allow_nan=False, default=str)


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
    for r from 0 to 1: the line a router must beat (its expectation, `baselines.random_routing`)."""
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


def record_frames(table: RecordTable, qids: Sequence[str] | None = None,
                  splits: Sequence[str] | None = None) -> list[pd.DataFrame]:
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



# -- the accuracy target on the Route page -------------------------------------------------------
# the accuracy targets the Route page offers (points lost against the last stage)
ROUTE_TARGETS_PT = (1.0, 3.0, 5.0, 10.0)


@dataclass(frozen=True)
class TargetPolicy:
    """A policy chosen for one accuracy target with the same Learn-then-Test as `calibrate`
    (`calibrated.calibrate_policy`, its defaults), in the words the pages show."""

    target_pt: float
    delta: float
    policy: CascadePolicy
    rule: str
    description: str  # "thresholds: calibrated for <= 3 pt at delta 0.1 on 2,850 questions"
    off_reasons: dict  # stage -> why calibration switched it off
    calibration: dict  # the figures on calibration (`CalibratedPolicy.calibration`)

    @property
    def routes(self) -> bool:
        """Whether a stage before the last one is in use (something can be kept early)."""
        return sum(bool(s.enabled) for s in self.policy.stages) > 1


def policy_for_target(calib: RecordTable, target_pt: float, delta: float = 0.1, unit: str = "flops") -> TargetPolicy:
    """The policy `calibrate --target target_pt --delta delta` would choose on `calib` (the calibration
    split of the preset's records): the same function and defaults, so the Route page's target
    selector promises what the CLI would write to a policy file."""
    from cascade_core.choose.calibrated_policy import calibrate_policy
    from cascade_core.choose.policy_file import policy_file_from_calibrated

    chosen = calibrate_policy(calib, target_max_loss=target_pt / 100.0, delta=delta, unit=unit)
    found = policy_file_from_calibrated(chosen, "route", {}, target_pt=target_pt)
    return TargetPolicy(target_pt=float(target_pt), delta=float(delta), policy=chosen.policy, rule=chosen.rule,
                        description=chosen.describe(), off_reasons=dict(found.off_reasons),
                        calibration=dict(chosen.calibration))


@dataclass(frozen=True)
class RouteExample:
    """A test question whose route under a policy is clear in the records: kept by the first stage in
    use, or escalated by it (and then answered right by a later stage)."""

    qid: str
    kind: str  # "keep" | "escalate"
    first_stage: str  # the first stage in use: it keeps or escalates the question
    answered_by: str  # the stage whose answer the cascade gives, in the records
    correct: bool  # whether that answer is right
    p_t: float  # the first stage's recorded P(T) and P(IK) (NaN without a probe)
    p_ik: float


def route_examples(table: RecordTable, policy: CascadePolicy, lengths: Mapping[str, int] | None = None,
                   slack: float = 0.05) -> dict[str, RouteExample]:
    """One question the policy's first stage keeps and one it escalates, chosen on `table` (test
    records), as far as the records have them: {"keep": ..., "escalate": ...} (a kind left out
    when no question fits).

    Live answers may differ a little from the records (another number format), so a candidate's
    decision must survive its P(T) and P(IK) moved by `slack` against it. Among those, a kept
    question the first stage answers right, and an escalated one the first stage gets wrong and
    the cascade then gets right, are preferred; then the shortest (`lengths`: qid -> characters),
    then the first by qid, so the choice is deterministic."""
    result = replay(table, policy)
    enabled = [i for i, s in enumerate(policy.stages) if s.enabled]
    out: dict[str, RouteExample] = {}
    if len(enabled) < 2:
        return out
    first = enabled[0]
    stage = policy.stages[first]
    columns = np.arange(table.n_questions)
    p_t, p_ik = table.p_t[first], table.p_ik[first]
    margin, entropy = table.margin[first], table.entropy[first]

    def keeps(dp: float) -> np.ndarray:
        return keep_mask(stage, np.clip(p_t + dp, 0, 1), np.where(np.isnan(p_ik), np.nan, np.clip(p_ik + dp, 0, 1)),
                         margin, entropy, subject=table.subjects)

    answered_right = table.correct[result.final_stage, columns]
    lengths = lengths or {}
    size = np.array([lengths.get(str(q), 0) for q in table.qids])
    wanted = {
        "keep": (result.final_stage == first) & keeps(-slack) & keeps(0.0),
        "escalate": (result.final_stage != first) & ~keeps(+slack) & ~keeps(0.0),
    }
    preferred = {"keep": table.correct[first], "escalate": ~table.correct[first] & answered_right}
    for kind, mask in wanted.items():
        idx = np.flatnonzero(mask)
        if not idx.size:
            continue
        order = np.lexsort((table.qids[idx], size[idx], ~preferred[kind][idx]))
        i = int(idx[order[0]])
        out[kind] = RouteExample(qid=str(table.qids[i]), kind=kind, first_stage=table.names[first],
                                 answered_by=table.names[int(result.final_stage[i])], correct=bool(answered_right[i]),
                                 p_t=float(p_t[i]), p_ik=float(p_ik[i]))
    return out


# -- the headline: the guaranteed figure and its held share ------------------------------------------
GUARANTEE_SECTION = "## The guarantee"


def guarantee_headline(report_markdown: str) -> dict | None:
    """The report's guaranteed headline (docs/RESULTS.md, written by `report`): the headline row of
    its guarantee table, as strings exactly as printed there: cascade, rule, saving and accuracy
    difference on the test half, re-splits, held share, mean and 5th-percentile saving, and what
    the saving counts. None when the report has no such row. Home, the Benchmarks page and the
    README quote this one row (`headline_sentence`), so they cannot disagree."""
    start = report_markdown.find(GUARANTEE_SECTION)
    if start < 0:
        return None
    end = report_markdown.find("\n## ", start + len(GUARANTEE_SECTION))
    section = report_markdown[start:end if end > 0 else None]
    header = None
    for line in section.splitlines():
        if not line.startswith("|"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if header is None:
            header = cells
            continue
        if "(headline)" in cells[0] and len(cells) == len(header):
            row = dict(zip(header, cells))
            try:
                import re

                delta = re.search(r"at delta = ([0-9.]+)", section)
                target = re.search(r"is at most ([0-9.]+) pt", section)
                return {"target": f"≤ {target.group(1)} pt" if target else "the target",
                        "delta": delta.group(1) if delta else "?",
                        "cascade": cells[0].replace("(headline)", "").strip(),
                        "rule": row["rule (committed split)"].strip("`"),
                        "saving": row["saving (test)"], "delta_acc": row["Δacc (test)"],
                        "target_on_test": row["target on test"], "resplits": row["re-splits"],
                        "held_share": row["held share"], "mean_saving": row["mean saving"],
                        "p05_saving": row["5th pct saving"], "counts": row["saving counts"]}
            except KeyError:
                return None
    return None


def headline_sentence(headline: Mapping[str, str]) -> str:
    """The guaranteed headline in one sentence (Markdown), the same on every page and in the README."""
    counts = headline["counts"].removesuffix(" saved")
    return (f"**{headline['cascade']}** saves **{headline['saving']} of {counts} at {headline['delta_acc']}** on the "
            f"test half, with a Learn-then-Test guarantee ({headline['target']} lost at δ {headline['delta']}); over "
            f"{headline['resplits']} "
            f"re-splits the promise **held on {headline['held_share']}** of them (mean saving "
            f"{headline['mean_saving']}, "
            f"5th percentile {headline['p05_saving']}).")


def default_unit(last_is_recorded: bool, priced: bool = True) -> str:
    """The cost unit a page opens in. FLOPs, unless the cascade ends with a recorded stage, whose FLOPs
    are unknown (GPT-4 would cost 0): then dollars when it has prices (local stages cost none, so the
    saving is the recorded stage's bill), else API calls."""
    if not last_is_recorded:
        return "flops"
    return "dollars" if priced else "calls"


def last_stage_calls_saved(table: RecordTable, policy: CascadePolicy) -> float:
    """The share of questions the last stage never sees (e.g. GPT-4 calls saved), as the report counts it."""
    from cascade_core.choose.resplit import loss_and_saving

    return loss_and_saving(policy, table, "calls")[1]

__all__ = [
    "END_OF_TURN_MARKERS", "decision_reason", "display_answer", "SCORE_RANGE", "UNIT_LABELS", "OperatingPoint",
    "StageSetting", "choice_param", "settings_from_policy",
    "unknown_params", "operating_point", "per_subject_accuracy", "policy_from_settings",
    "random_routing_curve", "record_frames", "reliability", "settings_from_params", "settings_to_params",
    "stage_summary", "thresholds_applied", "json_text", "ROUTE_TARGETS_PT", "TargetPolicy", "policy_for_target",
    "RouteExample", "route_examples",
    "guarantee_headline", "headline_sentence", "default_unit", "last_stage_calls_saved",
]


def label_of(config: StageConfig) -> str:
    return config.display_name + (" (recorded)" if config.backend == "recorded"
                                  and "recorded" not in config.display_name.lower() else "")


# ---- the policy a routed question runs with (compose.policies.policy_for_question) -------------------
def _shown_path(path) -> str:
    """A policy file's path as the page shows it: relative to the repository when inside it."""
    from pathlib import Path

    from cascade_core.locations import REPO_ROOT

    path = Path(path)
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def question_policy_title(chosen) -> str:
    """Whose policy a question runs with, in a few words: "arith's own calibrated policy",
    "mmlu's policy (the fallback for multiple-choice questions)" or "the preset's own thresholds"."""
    kind = "multiple-choice" if chosen.multiple_choice else "free-form"
    if chosen.applied.policy is None:
        return "the preset's own thresholds"
    if chosen.own:
        return f"{chosen.dataset}'s own calibrated policy"
    return f"{chosen.dataset}'s policy (the fallback for {kind} questions)"


def question_policy_text(chosen, thresholds_here: str | None = None) -> str:
    """The policy file, its guarantee and why it applies, in one caption (markdown). `thresholds_here`:
    the thresholds the page really routes with when they differ from the file's (the Route page's
    accuracy promise or the threshold explorer), said after it."""
    file = f"`{_shown_path(chosen.applied.file)}`" if chosen.applied.file is not None else "no policy file"
    text = f"File: {file}. Guarantee: {chosen.guarantee}. Why: {chosen.reason}."
    if thresholds_here and thresholds_here != chosen.applied.description:
        text += f" Routed here with other thresholds: {thresholds_here.removeprefix('thresholds: ')}."
    return text


def question_policy_record(chosen, thresholds: str) -> dict:
    """The policy a routed question ran with, for the page's summary and the downloaded trace."""
    file = chosen.applied.file
    return {"title": question_policy_title(chosen), "dataset": chosen.dataset, "own": chosen.own,
            "file": None if file is None else _shown_path(file), "guarantee": chosen.guarantee,
            "reason": chosen.reason, "thresholds": thresholds, "file_thresholds": chosen.applied.description}


def routed_with(record: Mapping) -> str:
    """One line after a routed question: the policy it ran with and its guarantee, or, where the page
    ran other thresholds (the accuracy promise, the explorer), those, which carry no file's guarantee."""
    if record.get("thresholds") in (None, record.get("file_thresholds")):
        return f"Routed with {record['title']}: {record['guarantee']}."
    return (f"Routed with {record['thresholds'].removeprefix('thresholds: ')}, not the thresholds of "
            f"{record['title']} ({record['guarantee']}).")
