"""A command line that starts fast: ``--help`` and the read-only commands import no torch, Ray, Beam or numba
(each command imports its stage's libraries only when it runs it). Run as a user runs them: the console script."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "ray", "apache_beam", "numba")

# Runs the console script's app in this interpreter, then reports which heavy modules were imported.
PROBE = """
import sys
from pipelines.cli import app
sys.argv = ["linernotes", *sys.argv[1:]]
try:
    app()
except SystemExit as done:
    code = done.code
else:
    code = 0
loaded = sorted(m for m in {heavy!r} if m in sys.modules)
print("LOADED=" + ",".join(loaded), file=sys.stderr)
sys.exit(code or 0)
"""


@pytest.mark.parametrize("args", [["--help"], ["runs"], ["runs", "--json"], ["stages"], ["stages", "--json"],
                                  ["rights", "explain", "t-1"],
                                  ["lineage", "t-1"], ["clean", "--help"], ["train", "--help"]],
                         ids=lambda a: " ".join(a))
def test_light_commands_import_no_model_or_engine_library(tmp_path, args):
    env = {**os.environ, "LINERNOTES_WORKDIR": str(tmp_path / "w"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", PROBE.format(heavy=HEAVY), *args], capture_output=True, text=True,
                          env=env, timeout=120)
    loaded = [line for line in done.stderr.splitlines() if line.startswith("LOADED=")]
    assert loaded == ["LOADED="], done.stderr[-2000:]
    assert done.returncode in (0, 2), done.stderr[-2000:]  # 2: "no such track" from a fresh workspace


def test_help_of_the_console_script_lists_every_command():
    linernotes = Path(sys.executable).with_name("linernotes")
    done = subprocess.run([str(linernotes), "--help"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "200"})
    assert done.returncode == 0, done.stderr
    for command in ("ingest", "shard", "train", "submit", "generate", "attribute", "index", "demo", "stages",
                    "rights", "runs", "lineage", "takedown", "report", "serve", "clean", "evaluate", "variations"):
        assert f" {command} " in done.stdout, command


def test_progress_without_a_terminal_is_a_line_per_phase_every_few_seconds(monkeypatch):
    from pipelines.cli import common

    clock = iter([0.0, 1.0, 2.0, 6.5, 7.0, 8.0, 20.0])
    monkeypatch.setattr(common.time, "monotonic", lambda: next(clock))
    lines: list[str] = []
    progress = common.PlainProgress(every_s=5.0, write=lines.append)
    for done in (0, 1, 2, 3, 4):  # at 0, 1, 2, 6.5, 7 s: the first, then one 5 s later
        progress("segments", done, 10)
    progress("shards", 0, 0)  # at 8 s: a new phase prints at once, with no total
    progress("segments", 10, 10)  # at 20 s: the last always prints
    assert lines == ["segments: 0/10 (0 %, 0 s)", "segments: 3/10 (30 %, 6 s)", "shards: 0 (0 s)",
                     "segments: 10/10 (100 %, 20 s)"]
