"""The record table: every stage's cached answer to every question, aligned for replay.

A cascade's outcome on a question is fully determined by each stage's record of it, so once the
records of all stages sit in aligned (S, N) arrays, any policy is evaluated with array
operations. `RecordTable.from_frames` builds the table from the per-stage records the benchmark
runner writes (one parquet per stage, one row per question), keeping only the questions every
stage answered.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd

from cascade_core.cost import COST_UNITS, check_unit
from cascade_core.cost import dollars as dollar_cost
from cascade_core.records.schema import TABLE_FLOATS, TABLE_REQUIRED, TABLE_REQUIRED_RECORDED

_FLOAT_FIELDS = TABLE_FLOATS


@dataclass(frozen=True, eq=False)
class RecordTable:
    """Aligned records of N questions for S stages (stage order = cascade order, smallest first).

    Arrays of shape (S, N): `correct` (bool), `prediction` (int, -1 = unknown), `p_t`, `p_ik`
    (NaN = no probe / no hidden states), `margin`, `entropy`, `prompt_tokens`, `output_tokens`,
    `flops`, `seconds`, `dollars` (float). Per stage: `names`, `model_ids`, `has_hidden`,
    `recorded` (correctness only, no probabilities: such a stage can only be last, and its P(T)
    is NaN). Per question: `qids`, `subjects`, `splits` ("" when unknown).
    """

    names: tuple[str, ...]
    model_ids: tuple[str, ...]
    qids: np.ndarray
    subjects: np.ndarray
    splits: np.ndarray
    correct: np.ndarray
    prediction: np.ndarray
    p_t: np.ndarray
    p_ik: np.ndarray
    margin: np.ndarray
    entropy: np.ndarray
    prompt_tokens: np.ndarray
    output_tokens: np.ndarray
    flops: np.ndarray
    seconds: np.ndarray
    dollars: np.ndarray
    has_hidden: np.ndarray
    recorded: np.ndarray
    _costs: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        set_("names", tuple(str(n) for n in self.names))
        S = len(self.names)
        if S == 0:
            raise ValueError("a record table needs at least one stage")
        if len(set(self.names)) != S:
            raise ValueError(f"stage names must be unique, got {list(self.names)}")
        set_("model_ids", tuple(str(m) for m in self.model_ids))
        if len(self.model_ids) != S:
            raise ValueError(f"{len(self.model_ids)} model ids for {S} stages")
        set_("qids", np.asarray(self.qids).astype(str))
        N = len(self.qids)
        if N == 0:
            raise ValueError("a record table needs at least one question")
        if len(set(self.qids.tolist())) != N:  # a set: ~8x faster than np.unique on thousands of ids
            raise ValueError("question ids must be unique")
        for name in ("subjects", "splits"):
            array = np.asarray(getattr(self, name)).astype(str)
            if array.shape != (N,):
                raise ValueError(f"{name} must have shape ({N},), got {array.shape}")
            set_(name, array)
        correct = np.asarray(self.correct)
        if correct.shape != (S, N):
            raise ValueError(f"correct must have shape ({S}, {N}), got {correct.shape}")
        set_("correct", correct.astype(bool))
        prediction = np.asarray(self.prediction)
        if prediction.shape != (S, N):
            raise ValueError(f"prediction must have shape ({S}, {N}), got {prediction.shape}")
        set_("prediction", prediction.astype(np.int64))
        for name in _FLOAT_FIELDS:
            array = np.asarray(getattr(self, name), dtype=np.float64)
            if array.shape != (S, N):
                raise ValueError(f"{name} must have shape ({S}, {N}), got {array.shape}")
            set_(name, array)
        for name in ("has_hidden", "recorded"):
            array = np.asarray(getattr(self, name), dtype=bool)
            if array.shape != (S,):
                raise ValueError(f"{name} must have one flag per stage ({S}), got shape {array.shape}")
            set_(name, array)
        for s in range(S - 1):
            if self.recorded[s]:
                raise ValueError(f"stage {self.names[s]!r} is recorded (no probabilities): "
                                 "it can only be the last stage")
        for name in ("prompt_tokens", "output_tokens", "flops", "seconds", "dollars"):
            values = getattr(self, name)
            if np.isnan(values).any() or (values < 0).any():
                bad = int(np.argmax(np.isnan(values).any(axis=0) | (values < 0).any(axis=0)))
                raise ValueError(f"{name} must be >= 0 and not NaN (question {self.qids[bad]!r})")
        if self.recorded.any():
            p_t = self.p_t.copy()
            p_t[self.recorded] = np.nan  # a recording has no probabilities: never show one
            set_("p_t", p_t)
        for array in (self.correct, self.prediction, *(getattr(self, n) for n in _FLOAT_FIELDS)):
            array.setflags(write=False)

    # -- shape --------------------------------------------------------------------------------
    @property
    def n_stages(self) -> int:
        return len(self.names)

    @property
    def n_questions(self) -> int:
        return len(self.qids)

    def __len__(self) -> int:
        return self.n_questions

    def stage_index(self, stage: int | str) -> int:
        if isinstance(stage, str):
            if stage not in self.names:
                raise ValueError(f"no stage {stage!r}; stages: {list(self.names)}")
            return self.names.index(stage)
        if not -self.n_stages <= stage < self.n_stages:
            raise ValueError(f"stage {stage} out of range for {self.n_stages} stages")
        return stage % self.n_stages

    # -- costs --------------------------------------------------------------------------------
    def cost(self, unit: str) -> np.ndarray:
        """(S, N) cost of each stage's answer to each question in `unit` (see cascade_core.cost)."""
        check_unit(unit)
        if unit not in self._costs:
            if unit == "tokens":
                value = self.prompt_tokens + self.output_tokens
            elif unit == "calls":
                value = np.ones((self.n_stages, self.n_questions))
            else:
                value = getattr(self, unit)
            value = np.ascontiguousarray(value, dtype=np.float64)
            value.setflags(write=False)
            self._costs[unit] = value
        return self._costs[unit]

    def cost_stack(self) -> np.ndarray:
        """(U, S, N) costs in every unit of COST_UNITS, in that order (cached)."""
        if "_stack" not in self._costs:
            stack = np.stack([self.cost(u) for u in COST_UNITS])
            stack.setflags(write=False)
            self._costs["_stack"] = stack
        return self._costs["_stack"]

    # -- selections ---------------------------------------------------------------------------
    def _take(self, columns: np.ndarray, stages: np.ndarray | None = None) -> "RecordTable":
        st = np.arange(self.n_stages) if stages is None else stages
        pick = lambda a: a[np.ix_(st, columns)]  # noqa: E731
        return RecordTable(
            names=tuple(self.names[i] for i in st), model_ids=tuple(self.model_ids[i] for i in st),
            qids=self.qids[columns], subjects=self.subjects[columns], splits=self.splits[columns],
            correct=pick(self.correct), prediction=pick(self.prediction),
            **{name: pick(getattr(self, name)) for name in _FLOAT_FIELDS},
            has_hidden=self.has_hidden[st], recorded=self.recorded[st],
        )

    def subset(self, selector) -> "RecordTable":
        """Some questions: a boolean mask (N,), a list of question ids, or a split name."""
        if isinstance(selector, str):
            mask = self.splits == selector
            if not mask.any():
                known = sorted(set(self.splits.tolist()))
                raise ValueError(f"no question in split {selector!r}; splits: {known}")
            return self._take(np.flatnonzero(mask))
        array = np.asarray(selector)
        if array.dtype == bool:
            if array.shape != (self.n_questions,):
                raise ValueError(f"mask must have shape ({self.n_questions},), got {array.shape}")
            if not array.any():
                raise ValueError("the mask selects no question")
            return self._take(np.flatnonzero(array))
        wanted = array.astype(str)
        position = pd.Index(self.qids)
        found = position.get_indexer(wanted)
        if (found < 0).any():
            raise ValueError(f"{int((found < 0).sum())} question ids not in the table, e.g. {wanted[found < 0][0]!r}")
        if len(found) == 0:
            raise ValueError("no question ids given")
        return self._take(found)

    def stage_subset(self, stages: Sequence[int | str]) -> "RecordTable":
        """A table of some stages (by index or name), in the order given; e.g. a 2-stage cascade."""
        indices = np.array([self.stage_index(s) for s in stages], dtype=int)
        if len(indices) == 0:
            raise ValueError("choose at least one stage")
        if len(set(indices.tolist())) != len(indices):
            raise ValueError("a stage can appear only once")
        return self._take(np.arange(self.n_questions), indices)

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_frames(
        cls,
        frames: Sequence[pd.DataFrame],
        names: Sequence[str] | None = None,
        model_ids: Sequence[str] | None = None,
        recorded: Sequence[bool] | None = None,
        has_hidden: Sequence[bool] | None = None,
        prices: Sequence[tuple[float, float]] | None = None,
    ) -> "RecordTable":
        """Align per-stage records (one DataFrame per stage, one row per question) on `qid`.

        Keeps the questions every stage answered (inner join, in the first frame's order).
        Required columns: qid, correct, prompt_tokens, and for a stage that is not recorded also
        prediction, p_t, flops, seconds. Optional: p_ik, margin, entropy (NaN when absent),
        output_tokens (0), dollars (else from `prices` = (price_in, price_out) per stage, else
        0), subject, split (from the first frame that has them; splits must agree). `recorded`
        defaults to a true `recorded` column, `has_hidden` to "p_ik has a value somewhere".
        """
        frames = list(frames)
        S = len(frames)
        if S == 0:
            raise ValueError("no record frames given")
        names = [str(f["stage"].iloc[0]) if "stage" in f.columns and len(f) else f"stage{i}"
                 for i, f in enumerate(frames)] if names is None else [str(n) for n in names]
        if len(names) != S:
            raise ValueError(f"{len(names)} names for {S} frames")
        for option, values in (("model_ids", model_ids), ("recorded", recorded), ("has_hidden", has_hidden),
                               ("prices", prices)):
            if values is not None and len(values) != S:
                raise ValueError(f"{option} has {len(values)} values for {S} frames")
        if recorded is None:
            recorded = [bool("recorded" in f.columns and len(f) and f["recorded"].astype(bool).all()) for f in frames]
        for i, frame in enumerate(frames):
            required = TABLE_REQUIRED_RECORDED if recorded[i] else TABLE_REQUIRED
            missing = [c for c in required if c not in frame.columns]
            if missing:
                raise ValueError(f"records of stage {names[i]!r} lack column(s) {missing}")
            duplicated = frame["qid"].astype(str).duplicated()
            if duplicated.any():
                raise ValueError(f"records of stage {names[i]!r} repeat question id "
                                 f"{frame['qid'].astype(str)[duplicated].iloc[0]!r}")
        common = pd.Index(frames[0]["qid"].astype(str))
        for frame in frames[1:]:
            common = common[common.isin(frame["qid"].astype(str))]
        if len(common) == 0:
            raise ValueError(f"the stages {names} have no question in common")
        aligned = [f.assign(qid=f["qid"].astype(str)).set_index("qid").loc[common] for f in frames]

        def column(frame: pd.DataFrame, name: str, default: float) -> np.ndarray:
            if name not in frame.columns:
                return np.full(len(common), default, dtype=np.float64)
            return pd.to_numeric(frame[name], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)

        arrays: dict[str, list[np.ndarray]] = {k: [] for k in ("correct", "prediction", *_FLOAT_FIELDS)}
        for i, frame in enumerate(aligned):
            if frame["correct"].isna().any():
                raise ValueError(f"records of stage {names[i]!r} have a missing 'correct' value")
            arrays["correct"].append(frame["correct"].to_numpy().astype(bool))
            prediction = column(frame, "prediction", -1)
            arrays["prediction"].append(np.where(np.isnan(prediction), -1, prediction).astype(np.int64))
            for name in ("p_t", "p_ik", "margin", "entropy"):
                arrays[name].append(column(frame, name, np.nan))
            for name in ("prompt_tokens", "output_tokens", "flops", "seconds"):
                arrays[name].append(column(frame, name, 0.0))
            if "dollars" in frame.columns:
                arrays["dollars"].append(column(frame, "dollars", 0.0))
            else:
                price_in, price_out = prices[i] if prices is not None else (0.0, 0.0)
                arrays["dollars"].append(dollar_cost(arrays["prompt_tokens"][-1], arrays["output_tokens"][-1],
                                                     price_in, price_out))
        if has_hidden is None:
            has_hidden = [bool(np.isfinite(a).any()) for a in arrays["p_ik"]]
        if model_ids is None:
            model_ids = [str(f["model_id"].iloc[0]) if "model_id" in f.columns else names[i]
                         for i, f in enumerate(aligned)]

        def per_question(name: str) -> np.ndarray:
            values = None
            for i, frame in enumerate(aligned):
                if name not in frame.columns:
                    continue
                these = frame[name].astype(str).to_numpy()
                if values is None:
                    values = these
                elif name == "split" and (these != values).any():
                    bad = int(np.argmax(these != values))
                    raise ValueError(f"stage {names[i]!r} puts question {common[bad]!r} in split {these[bad]!r}, "
                                     f"an earlier stage in {values[bad]!r}: the records disagree on the split")
            return np.full(len(common), "", dtype=object).astype(str) if values is None else values

        return cls(
            names=tuple(names), model_ids=tuple(model_ids), qids=common.to_numpy().astype(str),
            subjects=per_question("subject"), splits=per_question("split"),
            **{k: np.stack(v) for k, v in arrays.items()},
            has_hidden=np.asarray(has_hidden, dtype=bool), recorded=np.asarray(recorded, dtype=bool),
        )


def synthetic_table(n_questions: int = 1000, n_stages: int = 3, seed: int = 0,
                    accuracies: Sequence[float] | None = None, with_p_ik: bool = True) -> RecordTable:
    """A seeded fake table whose confidences carry signal (for tests, benchmarks and demos).

    Larger stages are more accurate and cost more; P(T) and P(IK) are noisy functions of the
    stage's own correctness, so thresholds trade accuracy for cost as on real records.
    """
    rng = np.random.default_rng(seed)
    accuracies = list(accuracies) if accuracies is not None else list(np.linspace(0.35, 0.75, n_stages))
    if len(accuracies) != n_stages:
        raise ValueError(f"{len(accuracies)} accuracies for {n_stages} stages")
    S, N = n_stages, n_questions
    difficulty = rng.normal(size=N)
    correct = np.stack([difficulty + rng.normal(scale=0.8, size=N) < np.quantile(difficulty,
                                                                                 a) + 0.0 for a in accuracies])
    logit_t = 1.2 * np.where(correct, 1.0, -0.2) + rng.normal(scale=1.0, size=(S, N))
    p_t = 0.25 + 0.75 / (1.0 + np.exp(-logit_t))
    logit_ik = 1.5 * np.where(correct, 1.0, -1.0) + rng.normal(scale=1.2, size=(S, N))
    p_ik = 1.0 / (1.0 + np.exp(-logit_ik)) if with_p_ik else np.full((S, N), np.nan)
    params = np.geomspace(1e8, 1e8 * 10 ** (S - 1), S)[:, None]
    prompt = rng.integers(60, 400, size=N)[None, :] + np.arange(S)[:, None] * 3
    prompt = prompt.astype(np.float64)
    margin = np.clip(p_t - (1 - p_t) / 3 + rng.normal(scale=0.02, size=(S, N)), 0, 1)
    return RecordTable(
        names=tuple(f"stage{i + 1}" for i in range(S)), model_ids=tuple(f"model-{i + 1}" for i in range(S)),
        qids=np.array([f"q{j:06d}" for j in range(N)]),
        subjects=np.array([f"subject{j % 7}" for j in range(N)]),
        splits=np.where(rng.random(N) < 0.5, "calibration", "test"),
        correct=correct, prediction=np.where(correct, 0, 1),
        p_t=p_t, p_ik=p_ik, margin=margin, entropy=1.4 * (1 - p_t),
        prompt_tokens=prompt, output_tokens=np.zeros((S, N)), flops=2 * params * prompt,
        seconds=prompt * params / 1e11, dollars=prompt * np.array([0.0] * (S - 1) + [5.0])[:, None] / 1e6,
        has_hidden=np.full(S, with_p_ik), recorded=np.zeros(S, dtype=bool),
    )
