"""Calibrated policies: choose one with a guarantee (`calibrate`), find it, and apply it to a cascade.

`route`, `serve` and the app ask `applied_policy` which thresholds a preset runs with: the
preset's calibrated policy file when there is one (`<policies>/<preset>.json`), else the
thresholds written in the preset; `thresholds="preset"` forces the latter. Whichever applies
comes with a one-line description the user is shown, and the stages calibration switched off
come with the reason.

Which dataset's policy file a question runs with is decided here too (`policy_for_question`): the
question's own dataset's (`calibrate --dataset X` wrote `<policies>/X/<preset>.json`) when it has
one, else the policy of its kind (`kind_dataset`: MMLU's for multiple choice, the shipped free-form
set's for free-form), with the reason, so that `route`, `serve` and the app never differ on it;
`route --dataset X` / `serve --dataset X` name the questions' dataset (`served_policies`) and
`--policy FILE` names the file outright, which then wins over both.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, Sequence

import numpy as np

from cascade_core.locations import Locations, locations
from cascade_core.compose.tables import load_preset_table
from cascade_core.policy import CascadePolicy
from cascade_core.choose.policy_file import (PolicyFile, make_provenance, policy_file_from_calibrated, read_policy_file,
                                     write_policy_file)
from cascade_core.presets import Preset, load_preset

ThresholdSource = Literal["auto", "preset", "calibrated"]
THRESHOLD_SOURCES = ("auto", "preset", "calibrated")


FREE_FORM_DATASET = "arith"  # the shipped free-form set whose policy free-form questions run with


def policy_path(preset: Preset, where: Locations | None = None, dataset: str = "mmlu") -> Path:
    """Where `calibrate` writes the preset's policy file (and everything reads it): MMLU's is
    `<policies>/<preset>.json`, another dataset's `<policies>/<dataset>/<preset>.json`."""
    folder = (where or locations()).policies
    return folder / f"{preset.name}.json" if dataset == "mmlu" else folder / dataset / f"{preset.name}.json"


def calibration_stages(preset: Preset) -> list[str]:
    """The stages a policy file covers: the preset's enabled stages, in order."""
    return [c.name for c in preset.stages if c.enabled]


@dataclass(frozen=True)
class AppliedPolicy:
    """The policy a cascade runs with, where it came from, and why a stage is off."""

    source: str  # "calibrated" | "preset"
    description: str  # e.g. "thresholds: calibrated for <= 1 pt at delta 0.1 on 2,850 calibration questions"
    policy: CascadePolicy | None = None  # None: the preset's own thresholds
    off_reasons: dict[str, str] = field(default_factory=dict)
    file: Path | None = None
    biases: tuple = ()  # per stage (policy file order): a bias.LetterBias or None; () = none
    guarantee: dict = field(default_factory=dict)  # the policy file's `guarantee` ({}: the preset's thresholds)
    stages: tuple[str, ...] = ()  # the stages `policy` covers, in its order


def applied_policy(preset: Preset | str, where: Locations | None = None,
                   thresholds: ThresholdSource = "auto", dataset: str = "mmlu") -> AppliedPolicy:
    """Which thresholds `preset` runs with (see the module docstring); a bad file is an error, never
    ignored. `dataset`: whose calibrated policy (MMLU's for multiple choice, `FREE_FORM_DATASET`'s
    for free-form questions)."""
    preset = load_preset(preset) if not isinstance(preset, Preset) else preset
    if thresholds not in THRESHOLD_SOURCES:
        raise ValueError(f"thresholds must be one of {', '.join(THRESHOLD_SOURCES)}, got {thresholds!r}")
    path = policy_path(preset, where, dataset)
    if thresholds == "preset" or (thresholds == "auto" and not path.exists()):
        source = shown_path(preset.source) if preset.source else preset.name
        return AppliedPolicy("preset", f"thresholds: from the preset file ({source})")
    if not path.exists():
        raise FileNotFoundError(f"preset {preset.name!r} has no calibrated policy file at {path}; run "
                                f"`python -m cascade_core calibrate --preset {preset.name}` first")
    return file_policy(preset, path)


def file_policy(preset: Preset, path: Path | str) -> AppliedPolicy:
    """The policy file at `path` applied to `preset` (refused when it covers other stages)."""
    path = Path(path)
    found = read_policy_file(path, expect_stages=calibration_stages(preset))
    return AppliedPolicy("calibrated", f"thresholds: {found.description}", policy=found.cascade_policy(),
                         off_reasons=dict(found.off_reasons), file=path, biases=found.letter_biases(),
                         guarantee=dict(found.guarantee), stages=tuple(calibration_stages(preset)))


def kind_dataset(multiple_choice: bool) -> str:
    """The dataset whose policy a question of this kind runs with when its own dataset has none:
    MMLU's for multiple choice, `FREE_FORM_DATASET`'s for free-form (a policy certified on one kind
    of question says nothing about the other)."""
    return "mmlu" if multiple_choice else FREE_FORM_DATASET


def guarantee_summary(guarantee: dict) -> str:
    """A policy file's guarantee in words: labelled or label-free, target (or budget) and delta, e.g.
    "label-free: at most 1 pt lost against the last stage's answers, with probability >= 90% (delta 0.1)";
    "no guarantee" for the preset's own thresholds ({})."""
    if not guarantee:
        return "no guarantee (the preset's own thresholds)"
    delta = guarantee.get("delta")
    odds = f", with probability >= {1 - float(delta):.0%} (delta {float(delta):g})" if delta is not None else ""
    if guarantee.get("mode") == "budget":
        return f"budget: at most {guarantee.get('budget'):g} {guarantee.get('unit', '')} per question{odds}"
    target = guarantee.get("target_pt")
    target = f"{float(target):g}" if target is not None else "?"
    if guarantee.get("loss") == "label_free":
        return f"label-free: at most {target} pt lost against the last stage's answers, for any labels{odds}"
    return f"labelled: at most {target} accuracy pt lost against the last stage{odds}"


def shown_path(path: Path | str) -> str:
    """A file as what answers without a key (/health, traces) names it: by its path inside the
    repository, else by its file name alone, never by a folder of the host."""
    from cascade_core.locations import REPO_ROOT

    path = Path(path).resolve()
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else path.name


@dataclass(frozen=True)
class QuestionPolicy:
    """The policy one question runs with (`policy_for_question`): the applied policy, whose dataset's
    file it is, whether that is the question's own dataset, and why, in one sentence. The sentence is
    kept as its parts, the files it names as `Path`s, so that it reads with full paths on the user's
    machine (`reason`) and with `shown_path`'s names where no key is asked (`shown_reason`)."""

    applied: AppliedPolicy
    dataset: str  # whose policy file applies (or was looked for, when the preset's thresholds apply)
    own: bool  # True: the question's own dataset's policy file
    why: tuple[str | Path, ...]  # the reason: text and the files it names
    multiple_choice: bool = True  # the question's kind

    def __post_init__(self):
        if isinstance(self.why, (str, Path)):
            object.__setattr__(self, "why", (self.why,))

    @property
    def reason(self) -> str:
        """The reason as the user's own machine says it (the CLI's lines, the app): files by their full path."""
        return "".join(str(part) for part in self.why)

    @property
    def shown_reason(self) -> str:
        """The reason as /health and traces say it: files named as `shown_path` names them."""
        return "".join(shown_path(part) if isinstance(part, Path) else part for part in self.why)

    @property
    def guarantee(self) -> str:
        return guarantee_summary(self.applied.guarantee)

    def to_dict(self) -> dict:
        """What a trace, `route --json` and the server's /health say about it. /health answers without
        a key, so the file is named by its path inside the repository, else by its file name alone, and
        identified by its sha256 (as the monitor names it); the reason names the files it mentions (a
        `--policy` argument, a missing policy file's path) the same way (`shown_reason`)."""
        from cascade_core.choose.policy_file import file_sha256

        file = self.applied.file
        shown = sha = None
        if file is not None:
            shown = shown_path(file)
            sha = file_sha256(Path(file).resolve()) if Path(file).resolve().is_file() else None
        return {"kind": "multiple-choice" if self.multiple_choice else "free-form", "dataset": self.dataset,
                "own": self.own, "file": shown, "file_sha256": sha, "guarantee": self.guarantee,
                "reason": self.shown_reason, "thresholds": self.applied.description}

    def line(self) -> str:
        """One line for `route`'s table and `serve`'s log: which file, which guarantee, why."""
        file = self.applied.file or "the preset's own thresholds"
        kind = "multiple-choice" if self.multiple_choice else "free-form"
        return f"policy ({kind}): {file}; {self.guarantee}; why: {self.reason}"


def policy_for_question(preset: Preset | str, multiple_choice: bool, dataset: str | None = None,
                        where: Locations | None = None, thresholds: ThresholdSource = "auto",
                        policy_file: Path | str | None = None) -> QuestionPolicy:
    """The calibrated policy a question runs with: its own dataset's (`dataset`, where it was drawn
    from; None for a typed question) when that dataset has a policy file for this preset, else its
    kind's (`kind_dataset`), else the preset's thresholds; a policy file present but unusable is an
    error (`applied_policy`), never skipped. The caller vouches that the question is of `dataset`'s
    kind (its questions are either all multiple choice or all free-form). `policy_file` (`--policy
    FILE`) wins over all of it; its dataset is the one its provenance names (the kind's when that is
    no dataset here, e.g. audited traffic), whose probes then read P(IK) (`apply_question_policy`)."""
    preset = load_preset(preset) if not isinstance(preset, Preset) else preset
    kind = "multiple-choice" if multiple_choice else "free-form"
    fallback = kind_dataset(multiple_choice)
    if policy_file is not None:
        applied = file_policy(preset, policy_file)
        named = read_policy_file(policy_file).provenance.get("dataset")
        certified_on = _known_dataset(named, where) or fallback
        return QuestionPolicy(applied, certified_on, certified_on != fallback,
                              ("--policy ", Path(policy_file), f" names it (calibrated on {named or 'unnamed'} "
                               "records), which wins over the dataset's and the kind's policy"), multiple_choice)
    if thresholds == "preset":
        return QuestionPolicy(applied_policy(preset, where, "preset", fallback), fallback, False,
                              "the preset's own thresholds were asked for (thresholds=preset)", multiple_choice)
    if dataset and dataset != fallback:
        own_path = policy_path(preset, where, dataset)
        if own_path.exists():
            return QuestionPolicy(applied_policy(preset, where, thresholds, dataset), dataset, True,
                                  f"{dataset} has its own calibrated policy file (`calibrate --dataset {dataset}`)",
                                  multiple_choice)
    applied = applied_policy(preset, where, thresholds, fallback)
    if dataset == fallback:
        reason = ((f"{dataset} has its own calibrated policy file (`calibrate --dataset {dataset}`), which is also "
                   f"the policy for {kind} questions",) if applied.policy is not None else
                  (f"{dataset} has no calibrated policy file (", policy_path(preset, where, fallback),
                   "): the preset's own thresholds apply"))
        return QuestionPolicy(applied, fallback, applied.policy is not None, reason, multiple_choice)
    if dataset:
        lacks = (f"{dataset} has no calibrated policy file of its own (`calibrate --dataset {dataset}` writes ",
                 policy_path(preset, where, dataset), ")")
    else:
        lacks = ("a typed question comes from no dataset",)
    reason = ((*lacks, f", so this {kind} question runs with the policy for its kind, {fallback}'s")
              if applied.policy is not None else
              (*lacks, f", and the policy for its kind ({fallback}'s, ", policy_path(preset, where, fallback),
               ") was not calibrated: the preset's own thresholds apply"))
    return QuestionPolicy(applied, fallback, False, reason, multiple_choice)


def apply_question_policy(stages: Sequence, chosen: QuestionPolicy, multiple_choice: bool,
                          where: Locations | None = None) -> list:
    """The runtime stages (their `policy` already the one to run) as they run a question under
    `chosen`: when that is the question's own dataset's policy rather than its kind's, each stage
    reads P(IK) with the probe trained on that dataset's records (`probes train --dataset X`,
    `<probes>/X/<stage>.npz`), since the policy was certified on that probe's P(IK); a stage without
    one has no P(IK). A calibrated policy that reads P(IK) at a stage before the last that has no
    probe for this kind of question is refused (it was certified on a signal the stage lacks), as
    `apply_free_form` does; a stage whose policy is not the file's (switched on by hand at the
    preset's thresholds) and the MMLU policy of a multiple-choice question keep today's rule (they
    route on P(T) alone there, and the trace says so)."""
    where = where or locations()
    slot = "probe" if multiple_choice else "free_form_probe"
    stages = dataset_probes(stages, chosen, multiple_choice, where)
    if chosen.applied.policy is None or (multiple_choice and chosen.dataset == "mmlu"):
        return stages
    certified = dict(zip(chosen.applied.stages, chosen.applied.policy.stages))
    enabled = [s for s in stages if s.policy.enabled]
    needs = [s.name for s in enabled[:-1]
             if certified.get(s.name) == s.policy and s.policy.rule != "pt_only" and getattr(s, slot) is None]
    if needs:
        raise ValueError(f"{chosen.applied.file}: its rule(s) read P(IK) at {', '.join(needs)}, which has no probe "
                         f"trained on {chosen.dataset}'s records: train it (`probes train --dataset {chosen.dataset}`) "
                         "or calibrate with --rule pt_only")
    return stages


def dataset_probes(stages: Sequence, chosen: QuestionPolicy, multiple_choice: bool,
                   where: Locations | None = None) -> list:
    """The stages with the P(IK) probes of `chosen`'s dataset for this kind of question (`probe` or
    `free_form_probe`) when it is a dataset's own policy rather than its kind's; else unchanged."""
    stages = list(stages)
    if not (chosen.own and chosen.dataset != kind_dataset(multiple_choice)):
        return stages
    where = where or locations()
    slot = "probe" if multiple_choice else "free_form_probe"
    return [replace(s, **{slot: _dataset_probe(s, chosen.dataset, where)}) for s in stages]


def _known_dataset(name, where: Locations | None) -> str | None:
    """`name` when it is a dataset here (built in, or benchmarked under the results folder), else None."""
    from cascade_core.records.registry import dataset_name, looks_like_file

    if not name or looks_like_file(str(name)):
        return None
    try:
        return dataset_name(str(name), (where or locations()).results)
    except ValueError:
        return None


def served_policies(preset: Preset | str, dataset: str | None = None, where: Locations | None = None,
                    thresholds: ThresholdSource = "auto",
                    policy_file: Path | str | None = None) -> dict[bool, QuestionPolicy]:
    """What `route` and `serve` run each kind of question with (True: multiple choice, False:
    free-form), each through `policy_for_question`: `dataset` (`--dataset NAME`, checked against
    the registry: an unknown name is refused with the known ones) is the questions' dataset for its
    own kind, the other kind runs with its kind's policy; `policy_file` (`--policy FILE`) applies to
    both. Free-form questions fall back to the preset's thresholds under `thresholds="calibrated"`
    too (that option asks for the multiple-choice policy file). Nothing loads a model."""
    preset = load_preset(preset) if not isinstance(preset, Preset) else preset
    where = where or locations()
    mc_dataset = None
    if dataset is not None:
        dataset = dataset_is(dataset, where)
        mc_dataset = dataset_multiple_choice(dataset, where)
    free_thresholds = "preset" if thresholds == "preset" else "auto"
    return {mc: policy_for_question(preset, mc, dataset if dataset is not None and mc_dataset == mc else None, where,
                                    thresholds if mc else free_thresholds, policy_file)
            for mc in (True, False)}


def dataset_is(dataset: str, where: Locations | None = None) -> str:
    """The registry's name of `dataset` (`records.registry.dataset_name`); unknown: a ValueError
    listing the known ones."""
    from cascade_core.records.registry import dataset_name

    return dataset_name(dataset, (where or locations()).results)


def dataset_multiple_choice(dataset: str, where: Locations | None = None) -> bool:
    """Whether a dataset's questions are multiple choice (its registry metadata's `kind`)."""
    from cascade_core.records.registry import read_metadata

    return read_metadata(dataset, (where or locations()).results).get("kind", "mc") == "mc"


def _dataset_probe(stage, dataset: str, where: Locations):
    """A stage's P(IK) probe trained on `dataset`'s records, or None (no file, or no hidden states)."""
    if stage.recorded or not getattr(stage.backend, "has_hidden_states", False):
        return None
    path = where.probe_path(stage, dataset)
    if not path.exists():
        return None
    from cascade_core.probe import PIKProbe

    return PIKProbe.load(path, expected_model_id=stage.backend.model_id)


def apply_free_form(stages: Sequence, applied: AppliedPolicy, preset: Preset) -> list:
    """The runtime stages with a free-form policy file's per-stage policies as their free-form
    policies (`cascade.for_free_form`); unchanged when no free-form policy was calibrated, so
    free-form questions then run with the multiple-choice thresholds, as the trace says.

    A stage reads P(IK) for a free-form answer only with a free-form probe (`free_form_probe`), so
    a free-form policy that needs P(IK) at a stage without one is refused: it was certified on a
    signal that stage lacks."""
    if applied.policy is None:
        return list(stages)
    names = calibration_stages(preset)
    by_name = dict(zip(names, applied.policy.stages))
    probed = {s.name for s in stages if getattr(s, "free_form_probe", None) is not None}
    needs = [n for n, p in by_name.items()
             if p.enabled and p.rule != "pt_only" and n != names[-1] and n not in probed]
    if needs:
        raise ValueError(f"{applied.file}: free-form policy with rule(s) that read P(IK) at {', '.join(needs)}, "
                         "which has no free-form probe: train it (`probes train --dataset "
                         f"{applied.file.parent.name}`) or calibrate with --rule pt_only")
    out = []
    for stage in stages:
        policy = by_name.get(stage.name)
        if policy is None:
            out.append(stage)
            continue
        reason = applied.off_reasons.get(stage.name, "") if not policy.enabled else ""
        out.append(replace(stage, free_form_policy=policy, free_form_policy_source=f"{applied.description} "
                           f"(free-form policy, {applied.file.parent.name})", free_form_off_reason=reason))
    return out


def apply_to_stages(stages: Sequence, applied: AppliedPolicy, preset: Preset) -> list:
    """The runtime stages with the applied policy's per-stage policies (by name), source and off reasons."""
    if applied.policy is None:
        return [replace(s, policy_source=applied.description) for s in stages]
    names = calibration_stages(preset)
    by_name = dict(zip(names, applied.policy.stages))
    biases = dict(zip(names, applied.biases)) if applied.biases else {}
    out = []
    for stage in stages:
        policy = by_name.get(stage.name, stage.policy)
        reason = applied.off_reasons.get(stage.name, "") if not policy.enabled else ""
        out.append(replace(stage, policy=policy, policy_source=applied.description, off_reason=reason,
                           bias=biases.get(stage.name, stage.bias)))
    return out


def stage_summary(policy, is_last: bool, off_reason: str = "") -> str:
    """One stage of a policy in words, for the CLI and the app: its rule and the thresholds it uses."""
    from cascade_core.policy import SCORED_RULES

    if not policy.enabled:
        return f"off: {off_reason or 'switched off'}"
    if is_last:
        return "last stage: always answers"
    if policy.rule in SCORED_RULES:
        return f"keep when its {policy.rule} score >= {policy.tau_learned:.4g}"
    parts = {"pt_only": [f"P(T) >= {policy.tau_t:.4g}"], "pik_only": [f"P(IK) >= {policy.tau_ik:.4g}"]}
    both = [f"P(T) >= {policy.tau_t:.4g}", f"P(IK) >= {policy.tau_ik:.4g}"]
    return "keep when " + " and ".join(parts.get(policy.rule, both))


def debiased_table(table, where: Locations, dataset: str = "mmlu"):
    """The table with every local stage but the last debiased by its letter bias, fit on the
    table's calibration questions (`bias.fit_letter_bias`); and the biases, one per stage (None
    for the last and for recorded stages). Reads the raw option probabilities from the records."""
    import pandas as pd

    from cascade_core.bias import fit_letter_bias, with_letter_bias

    biases: list = [None] * table.n_stages
    calibration = table.splits == "calibration"
    for s, name in enumerate(table.names[:-1]):
        if table.recorded[s]:
            continue
        records = pd.read_parquet(where.record_path(name, dataset), columns=["qid", "option_probs", "answer"])
        records = records.set_index(records["qid"].astype(str)).loc[list(table.qids)]
        probs = np.array([np.asarray(p, dtype=np.float64) for p in records["option_probs"]])
        biases[s] = fit_letter_bias(probs[calibration])
        table = with_letter_bias(table, s, probs, records["answer"].to_numpy(), biases[s])
    return table, biases


def calibrate(preset: Preset | str, where: Locations | None = None, dataset: str = "mmlu",
              target_pt: float | None = 1.0, delta: float = 0.1, budget: float | None = None,
              unit: str | None = None, rule: str = "auto", seed: int = 0,
              letter_bias: bool = False, label_free: bool | None = None) -> tuple[Path, PolicyFile]:
    """Choose the preset's policy on the calibration split with a Learn-then-Test guarantee, write it.

    Target mode (default): at most `target_pt` accuracy points lost against the last stage, with
    probability >= 1 - delta over the calibration draw; `rule="auto"` picks the keep score by
    cross-validation inside calibration (`calibrated.calibrate_policy`). Budget mode (`budget`,
    in `unit` per question): the most accurate policy certified to cost at most that. `unit`
    defaults to dollars when a stage has prices (an API or recorded stage), else FLOPs.
    `letter_bias`: debias the early local stages' letters first (`debiased_table`); the biases
    go into the file and the live stages apply them, so their answers can change.
    `label_free`: certify the disagreement with the last stage's answers instead of the accuracy
    lost (`label_free`: the same promise for any labels); None: only when the dataset has no
    answers. The file then says so (`guarantee.loss`), with both figures when labels exist.
    """
    from cascade_core.records.runner import code_version
    from cascade_core.choose.calibrated_policy import calibrate_policy
    from cascade_core.records.schema import records_dtype
    from cascade_core.choose.ltt import GUARANTEE_RULES

    preset = load_preset(preset) if not isinstance(preset, Preset) else preset
    where = where or locations()
    if budget is not None:
        target_pt = None
    names = calibration_stages(preset)
    table = load_preset_table(preset, dataset, where.results, include_recorded=True)
    if list(table.names) != names:
        raise ValueError(f"preset {preset.name!r}: records cover {list(table.names)}, its enabled stages are {names}; "
                         "benchmark the missing stages first")
    if rule != "auto" and rule not in GUARANTEE_RULES:
        raise ValueError(f"unknown rule {rule!r}; use auto or one of {', '.join(GUARANTEE_RULES)}")
    biases: list = []
    if letter_bias:
        table, biases = debiased_table(table, where, dataset)
    has_answers = _has_answers(dataset, where)
    if label_free is None:
        label_free = not has_answers
    elif not label_free and not has_answers:
        raise ValueError(f"dataset {dataset!r} has no answers: only the label-free guarantee applies "
                         "(calibrate --label-free)")
    labelled = table.subset("calibration") if has_answers else None
    rules = GUARANTEE_RULES if rule == "auto" else (rule,)
    if label_free:
        from cascade_core.choose.label_free import label_free_table

        # loss_aware scores "stage right minus reference right"; label-free the reference always
        # agrees with itself, so that score is `learned` with a constant subtracted (and unfittable).
        if rule == "loss_aware":
            raise ValueError("rule loss_aware models the last stage's own correctness, which the label-free loss fixes "
                             "(it always agrees with itself); use learned, pt_only or both")
        rules = tuple(r for r in rules if r != "loss_aware")
        table = label_free_table(table)
    calib = table.subset("calibration")
    if unit is None:  # dollars when a stage has prices (local stages cost none), else FLOPs
        unit = "dollars" if any(c.price_in or c.price_out for c in preset.stages if c.enabled) else "flops"
    chosen = calibrate_policy(calib, target_max_loss=None if target_pt is None else target_pt / 100.0, delta=delta,
                              cost_budget=budget, unit=unit, rules=rules, seed=seed,
                              biases=tuple(biases))
    record_files = {n: where.record_path(n, dataset) for n in names if where.record_path(n, dataset).exists()}
    provenance = make_provenance(record_files, dataset, "calibration", calib.n_questions, code_version())
    # the number format the records were made in: route, serve and the app say when a stage runs in another
    provenance["records_dtype"] = {n: d for n, path in record_files.items() if (d := records_dtype(path))}
    if label_free:
        chosen = label_free_figures(chosen, labelled)
    found = policy_file_from_calibrated(chosen, preset.name, provenance, target_pt=target_pt, budget=budget,
                                        rule_choice=rule)
    if label_free:
        from cascade_core.choose.label_free import LOSS_NAME

        found = replace(found, guarantee={**found.guarantee, "loss": "label_free", "loss_name": LOSS_NAME})
    path = write_policy_file(policy_path(preset, where, dataset), found)
    return path, found


def _has_answers(dataset: str, where: Locations) -> bool:
    """Whether the dataset's questions have answers (MMLU does; a file says in its metadata)."""
    if dataset == "mmlu":
        return True
    from cascade_core.records.registry import read_metadata

    return bool(read_metadata(dataset, where.results).get("has_answers", True))


def label_free_figures(chosen, labelled):
    """A label-free choice's calibration figures: its agreement with the last stage (what was
    certified) and, when the questions have answers, its accuracy against theirs (`labelled`,
    the same calibration questions with their correctness); None where there are no answers."""
    from cascade_core.choose.replay import replay

    figures = dict(chosen.calibration)
    figures["agreement"] = figures.pop("accuracy")
    figures["disagreement"] = figures.pop("accuracy_loss")
    figures.pop("reference_accuracy")
    figures["loss"] = "label_free"
    if labelled is None:
        figures.update(accuracy=None, reference_accuracy=None, accuracy_loss=None)
    else:
        accuracy = replay(labelled, chosen.policy).accuracy
        reference = float(labelled.correct[-1].mean())
        figures.update(accuracy=accuracy, reference_accuracy=reference, accuracy_loss=reference - accuracy)
    return replace(chosen, calibration=figures)
