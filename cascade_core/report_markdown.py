"""Where `cmd_report` finds the renderer: it lives in `cascade_core.report.markdown`."""

from cascade_core.report.markdown import NEAR_CHANCE_AUROC, render

__all__ = ["NEAR_CHANCE_AUROC", "render"]
