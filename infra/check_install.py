"""Checks an installed environment in seconds: every module of the four packages imports, and the CLI starts.

Run by `make install` right after `uv sync`, so a broken binary dependency (a torchaudio built against another
torch, a missing system library) stops the install with one line that names the module and the import error,
not a traceback in the tenth minute of a test run.

Exit status: 0 when every module imports and `linernotes --help` exits 0; 1 otherwise, after one line per failure.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import subprocess
import sys
import time
from pathlib import Path

PACKAGES = ("provenance", "cleaning", "training", "pipelines")
FIX = "the locked environment is broken: fix the pins in pyproject.toml, then `make lock` and `make install`"


def module_names(root: Path) -> list[str]:
    """Every module and subpackage of the four packages, found on disk (no import needed to list them), but for
    ``__main__`` modules (``python -m`` entry points)."""
    names: list[str] = []
    for package in PACKAGES:
        names.append(package)
        for info in pkgutil.walk_packages([str(root / package)], prefix=f"{package}."):
            if not info.name.endswith(".__main__"):  # an entry point: importing it would run it
                names.append(info.name)
    return sorted(names)


def import_failures(names: list[str]) -> list[str]:
    """One line per module that fails to import: `module: ErrorType: message` (the message's first line)."""
    failures = []
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as err:  # noqa: BLE001 - any import error is the finding, reported on one line
            message = str(err).strip().splitlines()[0] if str(err).strip() else ""
            failures.append(f"{name}: {type(err).__name__}: {message}")
    return failures


def cli_failure() -> str | None:
    """Runs the installed console script's `--help`; the failure's last line, or None when it exits 0."""
    script = Path(sys.executable).with_name("linernotes")
    done = subprocess.run([str(script), "--help"], capture_output=True, text=True, env={**os.environ, "COLUMNS": "120"})
    if done.returncode == 0:
        return None
    lines = (done.stderr or done.stdout).strip().splitlines()
    return f"linernotes --help: exit {done.returncode}: {lines[-1] if lines else 'no output'}"


def main() -> int:
    root = Path(__file__).resolve().parents[1]
    started = time.perf_counter()
    names = module_names(root)
    failures = import_failures(names)
    if failure := cli_failure():
        failures.append(failure)
    for failure in failures:
        print(f"install check failed: {failure} ({FIX})", file=sys.stderr)
    if not failures:
        print(f"install check: {len(names)} modules import, linernotes --help runs ({time.perf_counter() - started:.1f} s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
