"""The package's layers: each module imports only from its own layer and the layers below it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import bloodcell

PACKAGE = Path(bloodcell.__file__).parent
BASICS = "basics"
# Each layer and the layers it may import (besides itself). Basics are the top-level modules.
ALLOWED: dict[str, set[str]] = {
    BASICS: set(),
    "images": {BASICS},
    "datasets": {BASICS, "images"},
    "inference": {BASICS, "images"},
    "training": {BASICS, "images", "datasets", "inference"},
    "evaluation": {BASICS, "images", "datasets", "inference"},
    "reporting": {BASICS, "images", "datasets", "inference", "evaluation"},
    "workflows": {BASICS, "images", "datasets", "inference", "training", "evaluation", "reporting"},
    "research": {BASICS, "images", "datasets", "inference", "training", "evaluation", "reporting"},
    "app": {BASICS, "images", "datasets", "inference", "training", "evaluation", "reporting", "workflows", "research"},
}


def layer_of(module: str) -> str:
    """'bloodcell.training.loop' -> 'training'; top-level modules ('bloodcell.runs') are basics."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in ALLOWED) else BASICS


def imported_modules(path: Path) -> set[str]:
    """Every bloodcell module a source file imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("bloodcell.")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("bloodcell"):
            if node.module == "bloodcell":  # from bloodcell import runs, __version__
                found |= {f"bloodcell.{a.name}" for a in node.names if not a.name.startswith("__")}
            else:
                found.add(node.module)
    return found


def module_name(path: Path) -> str:
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    return ".".join(relative.parts[:-1] if relative.name == "__init__" else relative.parts)


def test_every_module_imports_only_its_own_layer_and_those_below():
    violations = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        if name in ("bloodcell", "bloodcell.__main__"):
            continue  # entry points: the public API's lazy names and `python -m bloodcell` reach every layer
        layer = layer_of(name)
        for target in imported_modules(path):
            target_layer = layer_of(target)
            if target_layer != layer and target_layer not in ALLOWED[layer]:
                violations.append(f"{name} ({layer}) imports {target} ({target_layer})")
    assert not violations, "\n".join(violations)


def test_the_layers_are_the_package_folders_and_each_says_what_it_owns():
    folders = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert folders == set(ALLOWED) - {BASICS}
    for folder in folders:
        doc = ast.get_docstring(ast.parse((PACKAGE / folder / "__init__.py").read_text()))
        assert doc and "Imports:" in doc, f"{folder}/__init__.py must say what it owns and may import"


def test_the_top_level_stays_small_and_no_layer_outgrows_its_plan():
    top = [p for p in PACKAGE.glob("*.py")]
    assert len(top) <= 9, sorted(p.name for p in top)
    for folder in set(ALLOWED) - {BASICS}:
        assert len(list((PACKAGE / folder).glob("*.py"))) <= 11, folder


def test_classifying_and_serving_never_import_training_code():
    code = (
        "import sys, bloodcell, bloodcell.inference.classifier, bloodcell.app.serve, bloodcell.reporting.explain, "
        "bloodcell.evaluation.scoring; bloodcell.Classifier; "
        "print(sorted(m for m in sys.modules if m.startswith(('bloodcell', 'optuna'))))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "bloodcell.inference.classifier" in loaded
    for module in ("bloodcell.training", "bloodcell.workflows", "bloodcell.research", "optuna"):
        assert f"'{module}" not in loaded, f"{module} was imported"
