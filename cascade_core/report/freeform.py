"""The report of a free-form dataset (`report --dataset arith`): models, the two free-form P(T)s,
both guarantees over re-splits, the oracle, and what a P(IK) gate saves.

What the MMLU report shows with options (letters, option probabilities, GPT-4's recorded
outcomes) has no meaning here; this one answers the questions a user asks of their own
free-form set:
- per model: accuracy per group, and how well each signal separates right from wrong answers
  (AUROC on the test split): `p_t` (geometric mean of the token probabilities, what the live
  cascade routes on), `p_t_min` (the least likely token) and P(IK) (the probe on the prompt);
- the guarantee, labelled and label-free (`label_free`), redone on `resplits` group-stratified
  halves (`resplit.stratified_halves`): each chooses the Learn-then-Test policy on one half and
  is measured on the other; held share (accuracy lost against the last stage within the target,
  and for label-free also the disagreement it certifies), mean and 5th-percentile FLOPs saved,
  beside the oracle's saving at the same target (`cascades.oracle_saving`) and the share of it
  realised;
- the P(IK) gate: P(IK) is read from the prompt's pass, before any token is generated, so a
  stage whose rule escalates a question on P(IK) alone need not generate its answer at all. For
  the labelled `both` policy on the committed split: the generation time and tokens skipped.

A shipped set that documents how its questions were chosen (`mmlu-open`: the exclusion rule's
counts, `mmlu_open.read_summary`) gets that section first; a dataset whose stages have no records
yet gets a report that says so and what to run (`no_records_report`), not an error.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from cascade_core.signal_quality import auroc
from cascade_core.choose.label_free import label_free_table
from cascade_core.records.table import RecordTable
from cascade_core.choose.replay import route
from cascade_core.report.cascades import oracle_saving
from cascade_core.choose.resplit import choose, stratified_halves
from cascade_core.choose.selection import select_policy
from cascade_core.choose.table_rows import TableRows

RULES = ("pt_only", "both")


def _num(x) -> float | None:
    return float(x) if x is not None and np.isfinite(x) else None


def _outcome(policy, test, unit: str) -> tuple[float, float]:
    """(accuracy lost against the last stage, share of its cost saved) of `policy` on `test`."""
    final, visited = route(test, policy)
    right = test.correct[final, np.arange(test.n_questions)]
    cost = test.cost(unit)
    reference = cost[-1].sum()
    return float(test.correct[-1].mean() - right.mean()), float(1 - (cost * visited).sum() / reference)


def model_rows(table: RecordTable, frames: dict[str, pd.DataFrame]) -> list[dict]:
    """Per stage: test accuracy, per-group accuracy, the signals' AUROC, tokens and seconds."""
    test = table.splits == "test"
    rows = []
    for s, name in enumerate(table.names):
        frame = frames[name].set_index("qid").loc[table.qids]
        y = table.correct[s][test]
        groups = pd.Series(table.correct[s][test]).groupby(table.subjects[test]).mean()
        rows.append({
            "stage": name, "accuracy": float(y.mean()), "by_group": {str(k): float(v) for k, v in groups.items()},
            "auroc_p_t": _num(auroc(table.p_t[s][test], y)),
            "auroc_p_t_min": _num(auroc(frame["p_t_min"].to_numpy(dtype=float)[test], y)),
            "auroc_p_ik": _num(auroc(table.p_ik[s][test], y)) if np.isfinite(table.p_ik[s]).all() else None,
            "output_tokens_mean": float(frame["output_tokens"].mean()),
            "seconds_mean": float(frame["seconds"].mean()),
            "first_token_seconds_mean": float(frame["first_token_seconds"].mean()),
        })
    return rows


def guarantee_study(table: RecordTable, target: float, delta: float, resplits: int, unit: str = "flops",
                    seed: int = 0, label_free: bool = False) -> dict:
    """Held share and savings of the guaranteed choice over `resplits` re-splits, per rule.

    Label-free chooses on agreement with the last stage (`label_free_table`) and is measured on
    the true accuracy loss (the labels exist here) and on the disagreement it certified."""
    chosen_on = label_free_table(table) if label_free else table
    rules = tuple(r for r in RULES if r != "both" or np.isfinite(table.p_ik[:-1]).all())
    halves = stratified_halves(table.subjects, resplits, seed)
    out = {}
    for rule in rules:
        loss, disagreement, saving = np.empty(resplits), np.empty(resplits), np.empty(resplits)
        oracle = np.empty(resplits)
        for i, cal in enumerate(halves):
            _, policies, _ = choose(TableRows(chosen_on, cal), (rule,), target, delta, unit, 2, seed + i, unit)
            test = TableRows(table, ~cal)
            loss[i], saving[i] = _outcome(policies[rule], test, unit)
            disagreement[i] = _outcome(policies[rule], TableRows(chosen_on, ~cal), unit)[0] if label_free else loss[i]
            oracle[i] = oracle_saving(table.subset(~cal), unit, target)["compute_reduction_at_target"] or np.nan
        out[rule] = {
            "held_share": float(np.mean(loss <= target + 1e-12)),
            "certified_held_share": float(np.mean(disagreement <= target + 1e-12)),
            "saving_mean": float(saving.mean()), "saving_p05": float(np.percentile(saving, 5)),
            "loss_mean": float(loss.mean()), "oracle_saving_mean": float(np.nanmean(oracle)),
            "share_of_oracle": float(saving.mean() / np.nanmean(oracle)) if np.nanmean(oracle) > 0 else None,
        }
    return out


def gate_savings(table: RecordTable, frames: dict[str, pd.DataFrame], target: float, delta: float,
                 unit: str = "flops") -> dict | None:
    """For the labelled `both` policy chosen on the committed calibration split: on the test split,
    the questions each routed stage escalates because P(IK) < tau_ik (whatever P(T) would be), and
    the generation time and tokens a P(IK) gate skips there (`seconds - first_token_seconds`)."""
    if not np.isfinite(table.p_ik[:-1]).all():
        return None
    cal = table.splits == "calibration"
    policy = select_policy(TableRows(table, cal), target_max_loss=target, unit=unit, rule="both", delta=delta).policy
    test = ~cal
    stages = {}
    total_seconds = skipped_seconds = 0.0
    total_tokens = skipped_tokens = 0
    for s in policy.enabled_indices[:-1]:
        name = table.names[s]
        frame = frames[name].set_index("qid").loc[table.qids[test]]
        _, visited = route(TableRows(table, test), policy)
        reached = visited[s]
        gated = reached & (table.p_ik[s][test] < policy.stages[s].tau_ik)
        generation = (frame["seconds"] - frame["first_token_seconds"]).to_numpy(dtype=float)
        tokens = frame["output_tokens"].to_numpy()
        stages[name] = {"tau_ik": float(policy.stages[s].tau_ik), "reached": int(reached.sum()),
                        "gated": int(gated.sum()), "seconds_skipped": float(generation[gated].sum()),
                        "tokens_skipped": int(tokens[gated].sum()),
                        "seconds_of_stage": float(frame["seconds"].to_numpy()[reached].sum())}
        total_seconds += float(frame["seconds"].to_numpy()[reached].sum())
        skipped_seconds += float(generation[gated].sum())
        total_tokens += int(tokens[reached].sum())
        skipped_tokens += int(tokens[gated].sum())
    return {"stages": stages, "seconds_skipped": skipped_seconds, "seconds_of_routed_stages": total_seconds,
            "tokens_skipped": skipped_tokens, "tokens_of_routed_stages": total_tokens,
            "test_questions": int(test.sum())}


SWEEP = (0.02, 0.05, 0.10)  # looser targets: where a cascade starts to save, when it does not at the headline one


def selection_summary(dataset: str) -> dict | None:
    """How a shipped set's questions were chosen, when it says (`mmlu-open`), else None."""
    if dataset != "mmlu-open":
        return None
    from cascade_core.records.mmlu_open import read_summary

    return read_summary()


BENCH_COMMANDS = {"arith": "make bench-arith", "mmlu-open": "make bench-mmlu-open"}


def no_records_report(dataset: str, why: str) -> dict:
    """The report of a dataset whose stages are not (all) benchmarked yet: why (paths inside the
    checkout written relative to it, so a committed report names no machine's folders), and what to run."""
    from cascade_core.locations import DATA_DIR

    why = why.replace(f"{DATA_DIR.parent}/", "")
    return {"dataset": dataset, "no_records": why, "selection": selection_summary(dataset),
            "command": BENCH_COMMANDS.get(dataset, f"python -m cascade_core bench --dataset {dataset}")}


def _selection_lines(selection: dict | None) -> list[str]:
    if not selection:
        return []
    names = {"long_answer": "right option longer than four words (and not a number)",
             "latex_answer": "right option in LaTeX", "refers_to_options": "question refers to its options",
             "several_blanks": "question with two or more blanks",
             "option_reference": "right option points at other options (or is a verdict pair / item list)",
             "ambiguous_grading": "another option grades the same as the right one"}
    lines = ["## The questions", "",
             f"From {selection['source']}: {selection['selected']:,} questions over {selection['subjects']} subjects, "
             f"chosen (seed {selection['seed']}, spread over the subjects) among {selection['eligible']:,} eligible "
             f"ones; asked without their options, with the prompt `{selection['prompt'].replace(chr(10), ' / ')}`, "
             "graded `choices` (normalised text equal to the right option's, or to its bare number when it is a "
             f"number with a unit: {selection['with_number_alias']} questions). Excluded by the stated rule "
             "(`cascade_core/records/mmlu_open.py`; each question counted under the first reason that applies):", "",
             "| reason | questions |", "|---|---|"]
    lines += [f"| {names.get(k, k)} | {v:,} |" for k, v in selection["excluded"].items()]
    lines += [f"| **excluded in all** | {selection['excluded_total']:,} of {selection['questions_in_mmlu']:,} |", ""]
    return lines


def freeform_report(table: RecordTable, frames: dict[str, pd.DataFrame], dataset: str, target: float = 0.01,
                    delta: float = 0.1, resplits: int = 200, unit: str = "flops", seed: int = 0,
                    sweep: tuple[float, ...] = SWEEP) -> dict:
    """Every figure of the free-form report, JSON-ready (module docstring); `sweep`: the same
    study (rule pt_only, both guarantees) and the gate at looser targets."""
    return {
        "dataset": dataset, "questions": int(table.n_questions), "stages": list(table.names),
        "selection": selection_summary(dataset),
        "groups": sorted(set(map(str, table.subjects))), "target": target, "delta": delta,
        "resplits": resplits, "unit": unit,
        "models": model_rows(table, frames),
        "labelled": guarantee_study(table, target, delta, resplits, unit, seed),
        "label_free": guarantee_study(table, target, delta, resplits, unit, seed, label_free=True),
        "gate": gate_savings(table, frames, target, delta, unit),
        "sweep": [{"target": t,
                   "labelled": guarantee_study(table, t, delta, resplits, unit, seed)["pt_only"],
                   "label_free": guarantee_study(table, t, delta, resplits, unit, seed, label_free=True)["pt_only"],
                   "gate": gate_savings(table, frames, t, delta, unit)} for t in sweep],
    }


def render_freeform(report: dict) -> str:
    """The report as Markdown (docs/RESULTS-<dataset>.md for a shipped set)."""
    pct = lambda x: "–" if x is None or not np.isfinite(x) else f"{100 * x:.1f}%"  # noqa: E731
    num = lambda x: "–" if x is None or not np.isfinite(x) else f"{x:.3f}"  # noqa: E731
    if report.get("no_records"):
        return "\n".join([f"# Results on `{report['dataset']}` (free-form)", "",
                          f"Generated by `python -m cascade_core report --dataset {report['dataset']}`.", "",
                          f"**No records yet**: {report['no_records']}. Nothing below is measured; run "
                          f"`{report['command']}` (resumable) to benchmark every stage, train the probes, calibrate "
                          "and write this report.", "", *_selection_lines(report.get("selection"))]).rstrip() + "\n"
    lines = [f"# Results on `{report['dataset']}` (free-form)", "",
             f"Generated by `python -m cascade_core report --dataset {report['dataset']}` from the committed records: "
             f"{report['questions']:,} questions, stages {' -> '.join(report['stages'])}. Figures on the test split "
             "unless said otherwise; guarantees over re-splits.", "",
             "## Models", "",
             "| model | accuracy | AUROC P(T) (geometric mean) | AUROC min token prob. | AUROC P(IK) | tokens "
             "| s / question | s to first token |",
             "|---|---|---|---|---|---|---|---|"]
    if report.get("selection"):
        lines[lines.index("## Models"):lines.index("## Models")] = _selection_lines(report["selection"])
    for m in report["models"]:
        lines.append(f"| {m['stage']} | {pct(m['accuracy'])} | {num(m['auroc_p_t'])} | {num(m['auroc_p_t_min'])} | "
                     f"{num(m['auroc_p_ik'])} | {m['output_tokens_mean']:.1f} | {m['seconds_mean']:.2f} | "
                     f"{m['first_token_seconds_mean']:.2f} |")
    # one row per group, one column per stage: MMLU-open's 56 subjects as columns would not read on a screen
    models = report["models"]
    lines += ["", "Accuracy per group (test split):", "", "| group | " + " | ".join(m["stage"] for m in models) + " |",
              "|---|" + "---|" * len(models)]
    for g in report["groups"]:
        lines.append(f"| {g} | " + " | ".join(pct(m["by_group"].get(g)) for m in models) + " |")
    lines += ["", "P(T) is the geometric mean of the generated tokens' probabilities (what the live cascade routes "
              "on); the alternative is the probability of the least likely token. P(IK) is the probe on the "
              "prompt's last hidden state, trained on the calibration split.", "",
              f"## The guarantee: at most {100 * report['target']:g} pt lost against the last stage, delta "
              f"{report['delta']:g}, {report['resplits']} re-splits", "",
              "Each re-split chooses the policy on one half (stratified by group) and measures it on the other. "
              "Label-free chooses on agreement with the last stage's answers, no labels used; it certifies the "
              "disagreement, which bounds the accuracy lost for any labels. Saving: "
              f"{report['unit']} saved against the last stage alone; oracle: the most any router saves at the "
              "same target on the same half.", "",
              "| guarantee | rule | held (accuracy) | held (certified loss) | saved, mean | saved, 5th pct "
              "| oracle saves | share of oracle |",
              "|---|---|---|---|---|---|---|---|"]
    for kind in ("labelled", "label_free"):
        for rule, r in report[kind].items():
            lines.append(f"| {kind.replace('_', '-')} | {rule} | {pct(r['held_share'])} | "
                         f"{pct(r['certified_held_share'])} | {pct(r['saving_mean'])} | {pct(r['saving_p05'])} | "
                         f"{pct(r['oracle_saving_mean'])} | {pct(r['share_of_oracle'])} |")
    if report.get("sweep"):
        lines += ["", "At looser targets (rule pt_only, the same re-splits):", "",
                  "| target | guarantee | held (accuracy) | held (certified loss) | saved, mean | saved, 5th pct "
                  "| oracle saves |",
                  "|---|---|---|---|---|---|---|"]
        for row in report["sweep"]:
            for kind in ("labelled", "label_free"):
                r = row[kind]
                lines.append(f"| {100 * row['target']:g} pt | {kind.replace('_', '-')} | {pct(r['held_share'])} | "
                             f"{pct(r['certified_held_share'])} | {pct(r['saving_mean'])} | {pct(r['saving_p05'])} | "
                             f"{pct(r['oracle_saving_mean'])} |")
    lines += ["", "## Generation skipped by the P(IK) gate", "",
              "Labelled `both` policy chosen on the committed calibration split, measured on its test split: a "
              "question whose P(IK) is below the stage's tau_ik escalates whatever its P(T), so its answer need not "
              "be generated (P(IK) comes from the prompt's pass).", ""]
    gates = [(report["target"], report.get("gate"))] + [(row["target"], row["gate"]) for row in report.get("sweep", [])]
    rows = [(t, name, g) for t, gate in gates if gate for name, g in gate["stages"].items()]
    if all(gate is None for _, gate in gates):
        lines.append("No probe for every routed stage: no gate.")
    elif not rows:
        lines.append("At none of these targets does the chosen policy route through an earlier stage: nothing to gate.")
    else:
        lines += ["| target | stage | tau_ik | questions reaching it | escalated by P(IK) | generation seconds skipped "
                  "| tokens skipped |",
                  "|---|---|---|---|---|---|---|"]
        for t, name, g in rows:
            lines.append(f"| {100 * t:g} pt | {name} | {g['tau_ik']:.3f} | {g['reached']} | {g['gated']} | "
                         f"{g['seconds_skipped']:.1f} of {g['seconds_of_stage']:.1f} | {g['tokens_skipped']} |")
    return "\n".join(lines) + "\n"
