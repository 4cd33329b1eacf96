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
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from cascade_core.io import atomic_write_json

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
        """One line for the CLI, the server and the app, e.g. "calibrated for <= 1 pt at delta 0.1 on 2,850 questions"."""
        g, n = self.guarantee, self.provenance.get("questions")
        on = f" on {n:,} {self.provenance.get('split', 'calibration')} questions" if isinstance(n, int) else ""
        if g.get("mode") == "budget":
            unit = g.get("unit", "")
            return f"calibrated for a budget of {g.get('budget'):g} {unit} per question at delta {g.get('delta'):g}{on}"
        return f"calibrated for <= {g.get('target_pt'):g} pt at delta {g.get('delta'):g}{on}"


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


def read_policy_file(path: Path | str, expect_stages: Sequence[str] | None = None) -> PolicyFile:
    """Load and check a policy file; `expect_stages`: the enabled stages of the preset it will run."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as err:
        raise PolicyFileError(f"{path}: not a readable policy file ({err})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise PolicyFileError(f"{path}: not a policy file (format {data.get('format') if isinstance(data, dict) else None!r}, "
                              f"expected {FORMAT!r})")
    if data.get("version") != VERSION:
        raise PolicyFileError(f"{path}: policy file version {data.get('version')!r}, this code reads {VERSION}")
    for key, kind in (("preset", str), ("stages", list), ("policy", dict), ("guarantee", dict), ("provenance", dict)):
        if not isinstance(data.get(key), kind):
            raise PolicyFileError(f"{path}: key {key!r} must be a {kind.__name__}, got {type(data.get(key)).__name__}")
    stages = tuple(str(s) for s in data["stages"])
    if expect_stages is not None and tuple(expect_stages) != stages:
        raise PolicyFileError(f"{path}: made for stages {list(stages)}, but the preset runs {list(expect_stages)}; "
                              "run `calibrate` again for this preset")
    return PolicyFile(preset=data["preset"], stages=stages, policy=data["policy"], guarantee=data["guarantee"],
                      provenance=data["provenance"], calibration=data.get("calibration") or {},
                      off_reasons=data.get("off_reasons") or {}, biases=list(data.get("biases") or []))
