"""Who may import whom (DESIGN.md, "Layers"), checked in fresh interpreters.

A method module imported alone must leave `models`, `streamlit`, the app packages, the CLI and
the composition layer out of `sys.modules`; `models/` may import only the shared types of
`cascade_core`. A fresh interpreter per module, because one import anywhere in the test process
would hide another module's.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
METHOD_MODULES = ("signals", "probe", "policy", "cascade", "replay", "frontier", "selection", "stats", "cost",
                  "records", "record_schema", "calibration", "prompts", "types", "ui_data")
FORBIDDEN = ("models", "streamlit", "app_ui", "app", "pages", "cascade_core.cli", "cascade_core.compose.live",
             "cascade_core.compose.jobs", "cascade_core.compose.tables", "cascade_core.server", "torch", "transformers")

_PROBE = """
import importlib, json, sys
importlib.import_module(sys.argv[1])
forbidden = json.loads(sys.argv[2])
print(json.dumps(sorted(m for m in sys.modules if any(m == f or m.startswith(f + ".") for f in forbidden))))
"""


@pytest.mark.parametrize("name", METHOD_MODULES)
def test_a_method_module_imports_nothing_above_it(name):
    out = subprocess.run([sys.executable, "-c", _PROBE, f"cascade_core.{name}", json.dumps(FORBIDDEN)],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [], f"cascade_core.{name} pulls in these"


def _project_imports(path: Path) -> set[str]:
    """Every `cascade_core...`/`models...`/app module a file imports, at any depth (lazy ones too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m.split(".")[0] in ("cascade_core", "models", "app_ui", "streamlit")}


def test_models_import_only_the_shared_types():
    for path in sorted((REPO / "models").glob("*.py")):
        outside = {m for m in _project_imports(path) if not m.startswith("models") and m != "cascade_core.types"}
        assert not outside, f"{path.relative_to(REPO)} imports {sorted(outside)}"


def test_cli_and_pages_reach_models_only_through_the_composition_layer():
    files = [REPO / "app.py", *sorted((REPO / "pages").glob("*.py")), *sorted((REPO / "app_ui").glob("*.py"))]
    cli = REPO / "cascade_core" / "cli.py"
    for path in files:
        direct = {m for m in _project_imports(path) if m.split(".")[0] == "models"}
        assert not direct, f"{path.relative_to(REPO)} imports {sorted(direct)}"
    for path in sorted((REPO / "pages").glob("*.py")):
        assert "cascade_core.compose.live" not in _project_imports(path), f"{path.name}: load models via app_ui"
    # The CLI's one exception is `serve --single-stage`, owned by the server's entry point.
    direct = {m for m in _project_imports(cli) if m.split(".")[0] == "models"}
    assert direct <= {"models.hf"}, f"cli.py imports {sorted(direct)}"
