"""The calibrated policy: everything `calibrate` writes to a policy file, chosen by one pure function.

`calibrate_policy` takes the calibration records and the user's promise (at most `target` accuracy
lost against the last stage, or a mean cost `budget`, at risk `delta`) and returns the policy
(per stage: on/off, rule, thresholds, fitted keep-score model, letter bias) with how it was chosen
and what it did on calibration. Its one serialisation is the policy file
(`policy_file.policy_file_from_calibrated`, read back by `PolicyFile.calibrated`): plain JSON,
no pickle, so `route`, `serve` and the app rebuild exactly the chosen policy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from cascade_core.bias import LetterBias
from cascade_core.cost import check_unit
from cascade_core.policy import CascadePolicy
from cascade_core.records.table import RecordTable
from cascade_core.choose.replay import replay
from cascade_core.choose.resplit import choose, loss_and_saving
from cascade_core.choose.ltt import GUARANTEE_RULES, Guarantee, guaranteed_policy, usable_rules

@dataclass(frozen=True)
class CalibratedPolicy:
    """A chosen policy and its provenance (what the policy file holds besides the records hash)."""

    policy: CascadePolicy
    stages: tuple[str, ...]
    rule: str
    guarantee: Guarantee
    unit: str  # what the thresholds minimise (target mode) or what the budget counts
    calibration: dict  # accuracy, reference_accuracy, accuracy_loss, saving, calls_saved, cost_reduction,
    #                    answer_rate (per stage), unit, n_questions
    cv: dict = field(default_factory=dict)  # rule -> {"accuracy_loss", "saving"} (target mode)
    biases: tuple[LetterBias | None, ...] = ()  # per stage; () = none

    def describe(self) -> str:
        """One line for `route`, `serve` and the app, e.g. "calibrated for <= 1 pt at delta 0.1 on 2,850 questions"."""
        g = self.guarantee
        what = f"<= {g.target * 100:g} pt" if g.mode == "loss" else f"mean {self.unit} <= {g.target:g}"
        return f"thresholds: calibrated for {what} at delta {g.delta:g} on {g.n_calibration:,} questions"


def calibrate_policy(calib: RecordTable, target_max_loss: float | None = 0.01, delta: float = 0.1,
                     cost_budget: float | None = None, unit: str = "flops", rules=GUARANTEE_RULES, folds: int = 2,
                     seed: int = 0, biases=(), bound: str = "wsr") -> CalibratedPolicy:
    """Choose the policy on `calib` (the calibration split) with a Learn-then-Test guarantee.

    Target mode (default): at most `target_max_loss` accuracy lost against the last stage, with
    probability >= 1 - delta; the rule is chosen among `rules` by `folds`-fold CV inside `calib`
    (largest held-out saving in `unit` within the target) and its thresholds certified on all of
    `calib`. Budget mode (`cost_budget`, mean `unit` per question): the most accurate certified
    policy of each rule, the rule with the best calibration accuracy. `biases`: per-stage
    `LetterBias` already applied to `calib` (stored with the policy; `()` = none). `bound`: the
    paired loss's p-value (`risk`; "wsr", the betting bound, is valid and the tightest).
    """
    check_unit(unit)
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    rules = usable_rules(calib, rules)
    saving_unit = unit
    cv: dict = {}
    if cost_budget is None:
        target = 0.01 if target_max_loss is None else float(target_max_loss)
        rule, policies, scores = choose(calib, rules, target, delta, unit, folds, seed, saving_unit, bound)
        cv = {r: {"accuracy_loss": v[0], "saving": v[1]} for r, v in scores.items()}
        policy, guarantee, _ = guaranteed_policy(calib, unit, rule, target, None, delta, None, bound, seed=seed)
    else:
        best = None
        for r in rules:
            pol, g, _ = guaranteed_policy(calib, unit, r, None, float(cost_budget), delta, None, "binomial", seed=seed)
            acc = replay(calib, pol).accuracy
            if best is None or acc > best[0]:
                best = (acc, r, pol, g)
        _, rule, policy, guarantee = best
    loss, saving = loss_and_saving(policy, calib, saving_unit)
    result = replay(calib, policy)
    calibration = {"n_questions": int(calib.n_questions), "accuracy": result.accuracy,
                   "reference_accuracy": float(calib.correct[-1].mean()), "accuracy_loss": loss,
                   "saving": saving, "calls_saved": float(np.mean(result.final_stage != calib.n_stages - 1)),
                   "unit": unit, "cost_reduction": float(result.compute_reduction[unit]),
                   "answer_rate": [float(x) for x in result.answer_rate]}
    return CalibratedPolicy(policy=policy, stages=tuple(calib.names), rule=rule, guarantee=guarantee, unit=unit,
                            calibration=calibration, cv=cv, biases=tuple(biases))
