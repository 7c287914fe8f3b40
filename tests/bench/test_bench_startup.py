"""Command-line start-up (`make bench`): `linernotes --help`, `linernotes runs` and `linernotes stages` against
`python -c pass` in the same run (the interpreter's own start-up is the baseline). Target: --help and runs under
0.5 s; nothing gates on absolute times."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.bench

LINERNOTES = str(Path(sys.executable).with_name("linernotes"))


def _median_s(command: list[str], env: dict[str, str], repeats: int = 5) -> float:
    subprocess.run(command, capture_output=True, env=env, check=True)  # warm the page cache and bytecode
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run(command, capture_output=True, env=env, check=True)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def test_cli_start_up_against_the_interpreter(tmp_path):
    env = {**os.environ, "LINERNOTES_WORKDIR": str(tmp_path / "w")}
    rows = [("python -c pass (baseline)", [sys.executable, "-c", "pass"]),
            ("linernotes --help", [LINERNOTES, "--help"]),
            ("linernotes runs", [LINERNOTES, "runs"]),
            ("linernotes stages", [LINERNOTES, "stages"])]
    medians = {name: _median_s(command, env) for name, command in rows}
    base = medians["python -c pass (baseline)"]
    print(f"\n{'command':<28}{'median s':>10}{'ratio':>8}")
    for name, seconds in medians.items():
        print(f"{name:<28}{seconds:>10.3f}{seconds / base:>8.1f}")
    assert all(seconds >= base * 0.5 for seconds in medians.values())  # each ran: none is faster than half of Python
