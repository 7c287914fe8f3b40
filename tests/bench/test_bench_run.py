"""A whole curation run (`make bench`): `linernotes run` on a small delivery made in code (ingest → shard → train),
each stage's wall time from its Run, then the same command again, every stage cached, as a ratio of the first run's
time (the baseline, measured in the same session). Catalog scale is the ingest benchmark's. Nothing gates on time."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import soundfile as sf
import yaml

from provenance.store import LineageStore
from tests.conftest import sine
from tests.pipelines.test_ingest import LICENSES, track, write_csv

pytestmark = pytest.mark.bench

LINERNOTES = str(Path(sys.executable).with_name("linernotes"))
NUM_TRACKS = 8


def _delivery(root: Path) -> Path:
    root.mkdir()
    names = [f"t{i:02d}" for i in range(NUM_TRACKS)]
    for i, name in enumerate(names):
        sf.write(root / f"{name}.wav", (sine(110 * (i + 2), 20.0, 44100, 0.3, 2)).T, 44100)
    write_csv(root / "licenses.csv", LICENSES[:1], list(LICENSES[0]))
    write_csv(root / "tracks.csv", [track(n, "L-open") for n in names], list(track("t00", "L-open")))
    write_csv(root / "files.csv", [{"track_id": n, "role": "mixture", "instrument": "", "path": f"{n}.wav"}
                                   for n in names], ["track_id", "role", "instrument", "path"])
    return root


def test_whole_run_and_its_cached_rerun(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({
        "delivery": str(_delivery(tmp_path / "delivery")), "purpose": {"as_of": "2026-11-21"},
        "stages": {"ingest": {}, "shard": {"segment_s": 4.0}, "train": {"steps": 20, "batch_size": 4}},
    }, sort_keys=False))
    work = tmp_path / "work"

    def run() -> tuple[dict, float]:
        started = time.perf_counter()
        done = subprocess.run([LINERNOTES, "run", str(spec), "--workdir", str(work), "--json"], capture_output=True,
                              text=True, env=os.environ.copy(), check=True)
        return json.loads(done.stdout.strip().splitlines()[-1]), time.perf_counter() - started

    first, first_s = run()
    again, again_s = run()
    with LineageStore(f"sqlite:///{work / 'lineage.sqlite'}") as store:
        stage_s = {r["kind"]: (dt.datetime.fromisoformat(str(r["finished_at"]))
                               - dt.datetime.fromisoformat(str(r["started_at"]))).total_seconds()
                   for r in store.list_runs() if r["parent_run_id"] == first["run_id"]}
    print(f"\n{NUM_TRACKS} tracks of 20 s; the first run is the baseline")
    print(f"{'':<22}{'wall s':>8}{'ratio':>8}")
    for name, seconds in stage_s.items():
        print(f"{'  ' + name:<22}{seconds:>8.1f}{seconds / first_s:>8.2f}")
    print(f"{'first run (baseline)':<22}{first_s:>8.1f}{1.0:>8.2f}")
    print(f"{'cached re-run':<22}{again_s:>8.1f}{again_s / first_s:>8.3f}")
    assert [s["status"] for s in again["stages"]] == ["cached"] * 3
