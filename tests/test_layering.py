"""The package floors of DESIGN.md: provenance ← cleaning ← training ← pipelines, each importing only the
floors below it; only pipelines/ imports apache_beam and ray.data; only training/ imports ray.train."""

import ast
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
