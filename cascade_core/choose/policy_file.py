"""Policy files: a calibrated policy with where it came from, for `route`, `serve` and the app.

`calibrate` chooses a policy on the calibration split with a stated guarantee; the file keeps
everything needed to run it (per stage: on/off, rule, thresholds, fitted parts) and everything
needed to trust it (records' hashes, split, questions, target, delta, bound, calibration
figures). Readers check it against the preset they run: a file made for other stages is refused
with a message naming the file and what differs, never silently applied.

Format (JSON, written atomically):

    {"format": "cascade-policy-file", "version": 1, "preset": "default",
     "stages": ["smollm2-135m", ...],          # the preset's enabled stages, in order
     "policy": {...},                          # CascadePolicy.to_dict() (or a SubjectPolicy's)
     "off_reasons": {"smollm2-135m": "..."},   # why calibration switched a stage off
     "guarantee": {"mode": "target", "target_pt": 1.0, "delta": 0.1, "bound": "...", ...},
     "provenance": {"dataset": "mmlu", "split": "calibration", "questions": 2850,
                    "records_sha256": {"stage": "..."}, "created_at": "...", "code_version": "..."},
     "calibration": {...},                     # figures on the calibration split
     "biases": [null, {"kind": "letter_bias", "offsets": [...]}, ...]}  # per stage, optional

It is the one serialisation of a calibrated policy: `policy_file_from_calibrated` writes a
`calibrated.CalibratedPolicy` into one, `PolicyFile.calibrated` gives it back (policy, guarantee,
figures, biases); `cascade_policy` and `letter_biases` are what a cascade runs with.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from cascade_core.io import atomic_write_json

if TYPE_CHECKING:
    from cascade_core.choose.calibrated_policy import CalibratedPolicy
    from cascade_core.policy import CascadePolicy

FORMAT = "cascade-policy-file"
VERSION = 1


class PolicyFileError(ValueError):
    """A policy file that cannot be used: damaged, another format, or made for other stages."""


def file_sha256(path: Path | str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class PolicyFile:
    """What a policy file holds; `policy` is the plain dict of a CascadePolicy or SubjectPolicy."""

    preset: str
    stages: tuple[str, ...]
    policy: dict
    guarantee: dict
    provenance: dict
    calibration: dict = field(default_factory=dict)
    off_reasons: dict = field(default_factory=dict)
    biases: list = field(default_factory=list)  # per stage: a LetterBias dict or None; [] = none

    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "preset": self.preset, "stages": list(self.stages),
                "policy": self.policy, "off_reasons": dict(self.off_reasons), "guarantee": self.guarantee,
                "provenance": self.provenance, "calibration": self.calibration, "biases": list(self.biases)}

    @property
    def description(self) -> str:
        """One line for the CLI, the server and the app, e.g. "calibrated for <= 1 pt at delta 0.1 on
        2,850 questions"."""
        g, n = self.guarantee, self.provenance.get("questions")
        on = f" on {n:,} {self.provenance.get('split', 'calibration')} questions" if isinstance(n, int) else ""
        if g.get("mode") == "budget":
            unit = g.get("unit", "")
            return f"calibrated for a budget of {g.get('budget'):g} {unit} per question at delta {g.get('delta'):g}{on}"
        if g.get("loss") == "label_free":  # label_free: certified on the disagreement with the last stage
            return (f"calibrated label-free for <= {g.get('target_pt'):g} pt against the last stage's answers "
                    f"at delta {g.get('delta'):g}{on}")
        return f"calibrated for <= {g.get('target_pt'):g} pt at delta {g.get('delta'):g}{on}"

    def cascade_policy(self) -> "CascadePolicy":
        """The policy the file holds (a CascadePolicy's dict)."""
        from cascade_core.policy import CascadePolicy

        return CascadePolicy.from_dict(self.policy)

    def letter_biases(self) -> tuple:
        """Per stage, a `bias.LetterBias` or None; () = none."""
        from cascade_core.bias import LetterBias

        return tuple(None if b is None else LetterBias.from_dict(b) for b in self.biases)

    def calibrated(self) -> "CalibratedPolicy":
        """The calibrated policy the file was written from (`policy_file_from_calibrated`); figures
        that were not finite come back as None. A file without a certification is refused."""
        from cascade_core.choose.calibrated_policy import CalibratedPolicy
        from cascade_core.choose.ltt import Guarantee

        g = self.guarantee
        try:
            return CalibratedPolicy(policy=self.cascade_policy(), stages=self.stages, rule=str(g["rule"]),
                                    guarantee=Guarantee.from_dict(g["certification"]), unit=str(g["unit"]),
                                    calibration=dict(self.calibration), cv=dict(g.get("cv") or {}),
                                    biases=self.letter_biases())
        except KeyError as err:
            raise PolicyFileError(f"policy file of preset {self.preset!r}: its guarantee lacks {err}") from None


def _finite(value):
    """`value` with every non-finite float as None (the file is strict JSON)."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _off_reasons(policy, names: Sequence[str], target_pt: float | None, delta: float) -> dict[str, str]:
    why = (f"calibration switched it off: no threshold of this stage was certified to keep the loss "
           f"<= {target_pt:g} pt at delta {delta:g} more cheaply" if target_pt is not None else
           f"calibration switched it off: the most accurate policy certified within the budget at delta {delta:g} "
           "does not use it")
    return {name: why for name, stage in zip(names, policy.stages) if not stage.enabled}


def policy_file_from_calibrated(chosen: "CalibratedPolicy", preset: str, provenance: dict, *,
                                target_pt: float | None = None, budget: float | None = None,
                                rule_choice: str = "auto") -> PolicyFile:
    """The policy file of `chosen` (`calibrated.calibrate_policy`) for `preset`, with its
    `provenance` (`make_provenance`). `target_pt` / `budget`: the promise as it was asked (accuracy
    points / mean cost per question; by default the one `chosen` was certified for); `rule_choice`:
    the rule asked for ("auto": chosen by cross-validation). Each stage calibration switched off
    gets the reason."""
    g = chosen.guarantee
    loss = g.mode == "loss"
    target_pt = (g.target * 100 if target_pt is None else target_pt) if loss else None
    budget = None if loss else (g.target if budget is None else budget)
    guarantee = {"mode": "target" if loss else "budget", "target_pt": target_pt, "budget": budget, "unit": chosen.unit,
                 "delta": float(g.delta), "rule": chosen.rule, "rule_choice": rule_choice,
                 "letter_bias": bool(chosen.biases), "certification": g.to_dict(), "cv": _finite(chosen.cv)}
    return PolicyFile(preset=preset, stages=tuple(chosen.stages), policy=chosen.policy.to_dict(), guarantee=guarantee,
                      provenance=provenance, calibration=_finite(chosen.calibration),
                      off_reasons=_off_reasons(chosen.policy, chosen.stages, target_pt, g.delta),
                      biases=[None if b is None else b.to_dict() for b in chosen.biases])


def make_provenance(record_files: dict[str, Path], dataset: str, split: str, questions: int,
                    code_version: str = "") -> dict:
    """Provenance of a calibration: each stage's records hash (a changed file shows), split, size, time."""
    return {"dataset": dataset, "split": split, "questions": int(questions),
            "records_sha256": {name: file_sha256(path) for name, path in record_files.items()},
            "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "code_version": code_version}


def write_policy_file(path: Path | str, policy_file: PolicyFile) -> Path:
    path = Path(path)
    atomic_write_json(path, policy_file.to_dict())
    return path


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def threshold_range(key: str, rule: str) -> tuple[float, float]:
    """A keep threshold's range: P(T) and P(IK) are probabilities; the learned score is one too,
    the loss-aware score a difference of two (`policy.LossAwareScore`)."""
    return (-1.0, 1.0) if key == "tau_learned" and rule == "loss_aware" else (0.0, 1.0)


def _check_cascade_policy(path: Path, where: str, policy, n_stages: int) -> None:
    """Fail closed: every threshold a finite number in its range, `enabled` a boolean, a known rule,
    at least one stage on; the message names the file and the key (`policy.stages[1].tau_t`)."""
    from cascade_core.policy import RULES, CascadePolicy

    if not isinstance(policy, dict) or not isinstance(policy.get("stages"), list):
        raise PolicyFileError(f"{path}: key {where!r} must be an object with a list 'stages'")
    if len(policy["stages"]) != n_stages:
        raise PolicyFileError(f"{path}: {where} has {len(policy['stages'])} stages but 'stages' names {n_stages}")
    for i, stage in enumerate(policy["stages"]):
        at = f"{where}.stages[{i}]"
        if not isinstance(stage, dict):
            raise PolicyFileError(f"{path}: key {at} must be an object, got {type(stage).__name__}")
        rule = stage.get("rule", "both")
        if rule not in RULES:
            raise PolicyFileError(f"{path}: key {at}.rule is {rule!r}; rules: {', '.join(RULES)}")
        if not isinstance(stage.get("enabled", True), bool):
            raise PolicyFileError(f"{path}: key {at}.enabled must be true or false, got {stage.get('enabled')!r}")
        for key in ("tau_t", "tau_ik", "tau_learned"):
            if key not in stage:
                continue
            value, (low, high) = stage[key], threshold_range(key, rule)
            if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                    or not low <= value <= high):
                raise PolicyFileError(f"{path}: key {at}.{key} must be a number in [{low:g}, {high:g}], got {value!r}")
    if not any(stage.get("enabled", True) for stage in policy["stages"]):
        raise PolicyFileError(f"{path}: {where} switches every stage off; at least one must answer")
    try:
        CascadePolicy.from_dict(policy)
    except (ValueError, TypeError, KeyError) as err:
        raise PolicyFileError(f"{path}: key {where}: {err}") from None


def _check_policy(path: Path, policy: dict, n_stages: int) -> None:
    """A cascade policy (`stages`) or a per-subject one (`default` + `by_subject`), each checked."""
    if "stages" in policy:
        _check_cascade_policy(path, "policy", policy, n_stages)
        return
    if "default" not in policy:
        raise PolicyFileError(f"{path}: key 'policy' holds neither 'stages' nor a per-subject 'default'")
    _check_cascade_policy(path, "policy.default", policy["default"], n_stages)
    by_subject = policy.get("by_subject") or {}
    if not isinstance(by_subject, dict):
        raise PolicyFileError(f"{path}: key 'policy.by_subject' must be an object")
    for subject, sub in by_subject.items():
        _check_cascade_policy(path, f"policy.by_subject.{subject}", sub, n_stages)


def read_policy_file(path: Path | str, expect_stages: Sequence[str] | None = None) -> PolicyFile:
    """Load and check a policy file; `expect_stages`: the enabled stages of the preset it will run."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"), parse_constant=_no_constant)
    except FileNotFoundError:
        raise
    except RecursionError:  # 100,000 nested brackets: the parser's recursion, never a traceback
        raise PolicyFileError(f"{path}: not a readable policy file (nested too deeply to parse)") from None
    except (OSError, ValueError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise PolicyFileError(f"{path}: not a readable policy file ({first})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else None
        raise PolicyFileError(f"{path}: not a policy file (format {found!r}, expected {FORMAT!r})")
    if data.get("version") != VERSION:
        raise PolicyFileError(f"{path}: policy file version {data.get('version')!r}, this code reads {VERSION}")
    for key, kind in (("preset", str), ("stages", list), ("policy", dict), ("guarantee", dict), ("provenance", dict)):
        if not isinstance(data.get(key), kind):
            raise PolicyFileError(f"{path}: key {key!r} must be a {kind.__name__}, got {type(data.get(key)).__name__}")
    stages = tuple(str(s) for s in data["stages"])
    if expect_stages is not None and tuple(expect_stages) != stages:
        raise PolicyFileError(f"{path}: made for stages {list(stages)}, but the preset runs {list(expect_stages)}; "
                              "run `calibrate` again for this preset")
    n_policy, biases = data["policy"].get("stages"), data.get("biases") or []
    if isinstance(n_policy, list) and len(n_policy) != len(stages):
        raise PolicyFileError(f"{path}: the policy has {len(n_policy)} stages but 'stages' names {len(stages)}")
    if biases and len(biases) != len(stages):
        raise PolicyFileError(f"{path}: 'biases' has {len(biases)} entries for {len(stages)} stages")
    _check_policy(path, data["policy"], len(stages))
    return PolicyFile(preset=data["preset"], stages=stages, policy=data["policy"], guarantee=data["guarantee"],
                      provenance=data["provenance"], calibration=data.get("calibration") or {},
                      off_reasons=data.get("off_reasons") or {}, biases=list(biases))
