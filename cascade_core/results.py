"""Moved: the record loader is `cascade_core.compose.tables`. This alias stays only until
tests/test_report.py imports from there (then delete this file); it defines nothing itself."""

from cascade_core.compose.tables import (GPT4_STAGE, MissingRecordsError, load_preset_table,  # noqa: F401
                                         load_report_inputs)
from models.recorded import RECORDED_MODELS as _MODELS

# The old per-model (correctness, tokens, non-embedding) view, derived from the one table.
RECORDED_COLUMNS = {name: (correct, tokens, non_embedding) for name, (correct, tokens, _, non_embedding) in _MODELS.items()}
