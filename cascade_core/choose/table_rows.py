"""`TableRows`: some questions of a record table, as the arrays the searches read.

Why not a RecordTable subset: building one checks every array, which costs more than the
guarantee search itself in the re-split study's hot loop; this view slices each array once, on
first use.
"""

from __future__ import annotations

import functools

import numpy as np


class TableRows:
    """The arrays the guarantee search and `replay.route` read, for some questions of a table,
    without building a RecordTable (its checks cost more than the search in the re-split study's
    hot loop). `rows`: a bool mask or indices into `table`'s questions."""

    def __init__(self, table, rows=None):
        source = table._source if isinstance(table, TableRows) else table
        base = table._rows if isinstance(table, TableRows) else np.arange(table.n_questions)
        self._source = source
        self._rows = base if rows is None else base[rows]
        self.names, self.recorded, self.n_stages = source.names, source.recorded, source.n_stages
        self.n_questions = len(self._rows)
        self._cache: dict = {}

    def _get(self, name: str) -> np.ndarray:  # sliced on first use: most searches read few arrays
        if name not in self._cache:
            self._cache[name] = getattr(self._source, name)[..., self._rows]
        return self._cache[name]

    # Each sliced once, then a plain attribute (the searches read them in tight loops).
    correct = functools.cached_property(lambda self: self._get("correct"))
    p_t = functools.cached_property(lambda self: self._get("p_t"))
    p_ik = functools.cached_property(lambda self: self._get("p_ik"))
    margin = functools.cached_property(lambda self: self._get("margin"))
    entropy = functools.cached_property(lambda self: self._get("entropy"))
    subjects = functools.cached_property(lambda self: self._get("subjects"))

    def cost(self, unit: str) -> np.ndarray:
        key = f"cost:{unit}"
        if key not in self._cache:
            self._cache[key] = self._source.cost(unit)[:, self._rows]
        return self._cache[key]

    def cost_stack(self) -> np.ndarray:
        if "stack" not in self._cache:
            # Contiguous like a RecordTable's own: the sweep's products then add in the same order,
            # and ties in cost (a free local stage on or off) break the same way.
            self._cache["stack"] = np.ascontiguousarray(self._source.cost_stack()[:, :, self._rows])
        return self._cache["stack"]

    def subset(self, rows) -> "TableRows":
        return TableRows(self, rows)
