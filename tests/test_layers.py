"""Who may import whom (../shared/DESIGN.md, "Layers"), checked on whole packages.

`cascade_core/` is stacked in floors that follow the data flow: the live method at the top of the
package (types, signals, prompts, policy, the cascade, probes, presets and the leaf helpers),
then `records/` (questions, splits, the runners, records and features), `choose/` (a policy chosen
offline and its guarantee), `report/` (what was measured), `compose/` (wiring backends and files
for the entry points), `monitor/` (a served cascade watching itself), `server/`, and the CLI. A
module may import its own floor and the floors below it, never one above. `models/` may import only
the shared types. Statically (every import at any depth, lazy ones too, read with `ast`), and in
fresh interpreters for the method floors: imported alone, they must leave models, torch, streamlit
and the app out of `sys.modules` (one import anywhere in the test process would hide another
module's).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "cascade_core"
# Floors from the ground up; "" is the top of the package (the live method and the leaves).
FLOORS = ("", "records", "choose", "report", "compose", "monitor", "server", "cli")
METHOD_FLOORS = ("", "records", "choose")
FORBIDDEN = ("models", "streamlit", "app_ui", "app", "pages", "cascade_core.cli", "cascade_core.compose",
             "cascade_core.server", "torch", "transformers")


def _floor_of(module: str) -> str:
    """The floor of a dotted `cascade_core...` module name."""
    parts = module.split(".")[1:]
    if not parts:
        return ""  # the package's face: its version
    if parts[0] == "__main__":
        return "cli"
    return parts[0] if parts[0] in FLOORS else ""


def _modules() -> list[tuple[str, Path]]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(REPO).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found.append((".".join(parts), path))
    return found


def _project_imports(path: Path) -> set[str]:
    """Every `cascade_core...`/`models...`/app module a file imports, at any depth (lazy ones too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            if node.module == "cascade_core":
                found.update(f"cascade_core.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m.split(".")[0] in ("cascade_core", "models", "app_ui", "streamlit")}


def test_the_package_has_the_floors_this_test_names():
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    unknown = folders - set(FLOORS) - {"presets"}
    assert not unknown, f"sub-packages with no floor in tests/test_layers.py: {sorted(unknown)}"


@pytest.mark.parametrize("module,path", _modules(), ids=[m for m, _ in _modules()])
def test_no_module_imports_a_floor_above_its_own(module, path):
    floor = FLOORS.index(_floor_of(module))
    above = sorted(m for m in _project_imports(path)
                   if m.startswith("cascade_core") and FLOORS.index(_floor_of(m)) > floor)
    assert not above, f"{module} (floor {FLOORS[floor] or 'top'}) imports {above}"
    outside = sorted(m for m in _project_imports(path) if m.split(".")[0] in ("app_ui", "streamlit"))
    assert not outside, f"{module} imports the app: {outside}"


_PROBE = """
import importlib, json, sys
for name in json.loads(sys.argv[1]):
    importlib.import_module(name)
forbidden = json.loads(sys.argv[2])
print(json.dumps(sorted(m for m in sys.modules if any(m == f or m.startswith(f + ".") for f in forbidden))))
"""


@pytest.mark.parametrize("floor", METHOD_FLOORS, ids=[f or "top" for f in METHOD_FLOORS])
def test_the_method_floors_pull_in_no_model_and_no_app(floor):
    """All of a floor's modules in one fresh interpreter: if together they pull in none of
    FORBIDDEN, neither does any one of them alone."""
    names = [m for m, _ in _modules() if _floor_of(m) == floor]
    out = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(names), json.dumps(FORBIDDEN)],
                         cwd=REPO, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [], f"floor {floor or 'top'} pulls in these"


def test_models_import_only_the_shared_types():
    for path in sorted((REPO / "models").glob("*.py")):
        outside = {m for m in _project_imports(path) if not m.startswith("models") and m != "cascade_core.types"}
        assert not outside, f"{path.relative_to(REPO)} imports {sorted(outside)}"


def test_cli_and_pages_reach_models_only_through_the_composition_layer():
    files = [REPO / "app.py", *sorted((REPO / "pages").glob("*.py")), *sorted((REPO / "app_ui").glob("*.py"))]
    for path in files:
        direct = {m for m in _project_imports(path) if m.split(".")[0] == "models"}
        assert not direct, f"{path.relative_to(REPO)} imports {sorted(direct)}"
    for path in sorted((REPO / "pages").glob("*.py")):
        assert "cascade_core.compose.live" not in _project_imports(path), f"{path.name}: load models via app_ui"
    # The CLI's one exception is `serve --single-stage`, owned by the server's entry point.
    direct = {m for m in _project_imports(PACKAGE / "cli.py") if m.split(".")[0] == "models"}
    assert direct <= {"models.hf"}, f"cli.py imports {sorted(direct)}"
