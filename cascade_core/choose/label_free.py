"""The label-free loss: keeping a stage's answer "loses" when it differs from the last stage's.

Without labels the reference is the last stage's own answer. For a question on which the cascade
keeps stage k's answer, the label-free loss is D = 1[answer_k not equivalent to answer_last]
(for multiple choice: another letter). Whatever the right answers are, the paired accuracy loss
L = 1[last right] - 1[cascade right] is at most D on every question (equivalent answers are
graded alike, `graders`; different ones lose at most 1), so mean(L) <= mean(D): a policy
certified for "at most `target` disagreement with the last stage, with probability >= 1 - delta"
is certified for "at most `target` accuracy lost against the last stage" for ANY labels.

The certification itself is unchanged (`selection`, `risk`): it counts paired losses from a
table's `correct` matrix against its last row. `label_free_table` hands it a table whose
`correct` says "agrees with the last stage" (the last row all true), so its +1 losses are the
disagreements, it has no -1 losses, and Learn-then-Test bounds exactly mean(D). Everything a
keep score is fit on (`learned`, `loss_aware`) then learns to predict agreement, not
correctness: the labels never enter.

A recorded last stage (RouteLLM's outcomes: right or wrong, not the answer) gives no reference
answer, and a question whose last-stage answer is unknown (prediction -1) gives none either:
both are refused, never treated as agreement.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from cascade_core.records.table import RecordTable

LOSS_NAME = "disagreement with the last stage (label-free)"


def disagreement_loss(predictions, equivalent: Callable[[object, object], bool] | None = None,
                      names: Sequence[str] | None = None) -> np.ndarray:
    """(S, N) bool: True where stage k's answer is not equivalent to the last stage's (row S-1 all
    False). `predictions`: (S, N) option indices (-1 = unknown, refused) or, with `equivalent`
    (a grader's `equivalent`), any answers, e.g. free-form texts."""
    if equivalent is None:
        pred = np.asarray(predictions)
        if pred.ndim != 2 or pred.shape[0] < 1:
            raise ValueError(f"predictions must be (stages, questions), got shape {pred.shape}")
        pred = pred.astype(np.int64)
        unknown = pred < 0
        if unknown.any():
            s, i = (int(x[0]) for x in np.nonzero(unknown))
            who = names[s] if names is not None else f"stage {s}"
            raise ValueError(f"{who} has no recorded answer for {int(unknown[s].sum())} question(s) (e.g. question "
                             f"#{i}): the label-free loss needs every stage's answer")
        return pred != pred[-1][None, :]
    rows = [list(r) for r in predictions]
    if not rows or len({len(r) for r in rows}) != 1:
        raise ValueError("predictions must be one equally long sequence of answers per stage")
    last = rows[-1]
    return np.array([[not equivalent(a, b) for a, b in zip(row, last)] for row in rows], dtype=bool)


def check_label_free(table: RecordTable) -> None:
    """Refuse a table whose last stage cannot be a label-free reference (module docstring)."""
    if table.recorded[-1]:
        raise ValueError(f"the last stage {table.names[-1]!r} replays recorded outcomes (right or wrong, not its "
                         "answer): the label-free guarantee needs a last stage whose answers are known; calibrate "
                         "with labels, or end the cascade with a benchmarked stage")


def label_free_table(table: RecordTable, loss: np.ndarray | None = None) -> RecordTable:
    """`table` with `correct` replaced by agreement with the last stage (`~loss`), for the existing
    Learn-then-Test certification (module docstring). `loss`: a precomputed (S, N)
    `disagreement_loss` (free-form answers by a grader); default: the table's option letters."""
    check_label_free(table)
    if loss is None:
        loss = disagreement_loss(table.prediction, names=table.names)
    loss = np.asarray(loss, dtype=bool)
    if loss.shape != table.correct.shape:
        raise ValueError(f"the loss has shape {loss.shape}, the table {table.correct.shape}")
    if loss[-1].any():
        raise ValueError("the last stage cannot disagree with itself: row S-1 of the loss must be all false")
    return dataclasses.replace(table, correct=~loss, _costs={})


def accuracy_loss_bound_holds(table: RecordTable, final_stage: np.ndarray) -> bool:
    """On labelled records: the accuracy lost against the last stage (given each question's
    answering stage) is at most the disagreement with it. True by construction; a check for
    tests and the report."""
    idx = np.arange(table.n_questions)
    lost = table.correct[-1].astype(int) - table.correct[final_stage, idx].astype(int)
    disagree = disagreement_loss(table.prediction, names=table.names)[final_stage, idx]
    return bool(np.all(lost <= disagree))
