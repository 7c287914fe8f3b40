"""The package floors of DESIGN.md: provenance ← cleaning ← training ← pipelines, each importing only the
floors below it; only pipelines/ imports apache_beam and ray.data; only training/ imports ray.train."""

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FLOORS = ["provenance", "cleaning", "training", "pipelines"]


def imports_of(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("package", FLOORS)
def test_packages_import_only_lower_floors(package):
    above = set(FLOORS[FLOORS.index(package) + 1:])
    offenders = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for name in imports_of(path):
            top = name.split(".")[0]
            if top in above:
                offenders.append(f"{path.relative_to(ROOT)} imports {name}")
            if package != "pipelines" and (top == "apache_beam" or name.startswith("ray.data")):
                offenders.append(f"{path.relative_to(ROOT)} imports {name} (only pipelines/ may)")
            if package != "training" and name.startswith("ray.train"):
                offenders.append(f"{path.relative_to(ROOT)} imports {name} (only training/ may)")
    assert not offenders, "\n".join(offenders)


def test_the_rule_catches_a_violation(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from training.model import MelUNet\nimport ray.data\n")
    assert {"training.model", "ray.data"} <= imports_of(bad)


# --- the import graph, by import-linter (contracts in pyproject.toml [tool.importlinter]) ---------------------

LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _lint_imports(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", str(root / "pyproject.toml")], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)


def test_the_tree_keeps_the_floors_and_has_no_import_circle():
    done = _lint_imports(ROOT)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "2 kept, 0 broken" in done.stdout


def test_a_deliberate_circle_breaks_the_contract(tmp_path):
    """The same contracts on a copy of the tree with one temporary circle (two modules importing each other)."""
    for package in FLOORS:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / "cleaning" / "circle_a.py").write_text("from cleaning import circle_b\n")
    (tmp_path / "cleaning" / "circle_b.py").write_text("from cleaning import circle_a\n")
    done = _lint_imports(tmp_path)
    assert done.returncode != 0
    assert "no import circle among the modules of any package BROKEN" in done.stdout
    assert ".circle_b -> .circle_a" in done.stdout or ".circle_a -> .circle_b" in done.stdout
    (tmp_path / "cleaning" / "circle_b.py").write_text("import pipelines.stage\n")  # an upward import instead
    done = _lint_imports(tmp_path)
    assert "floors: provenance <- cleaning <- training <- pipelines BROKEN" in done.stdout
