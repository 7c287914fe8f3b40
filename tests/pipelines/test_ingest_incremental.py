"""Ingest is incremental and resumable, and the same on Beam's multi-process DirectRunner."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import soundfile as sf

from cleaning.audio import read_audio
from cleaning.measure import measure_pcm_sha256
from pipelines.catalog import resolve_catalog
from pipelines.stages.ingest.stage import IngestConfig, run_ingest
from provenance.store import LineageStore
from provenance.workspace import Workspace
from tests.pipelines.test_ingest import LICENSES, track, write_csv

AS_OF = "2026-11-21"
STABLE = {"tracks": ["track_id", "title", "license_id", "rights_holder"],
          "audio_files": ["track_id", "role", "instrument", "sha256", "num_samples", "peak_dbfs", "loudness_lufs"],
          "rejections": ["record_kind", "record_id", "reason", "detail"]}


def make_delivery(root, num_tracks: int, seconds: float = 20.0):
    rng = np.random.default_rng(0)
    (root / "audio").mkdir(parents=True)
    tracks, files = [], []
    for i in range(num_tracks):
        tracks.append(track(f"t{i:02d}", "L-open"))
        for stem in ("bass", "other"):
            audio = 0.2 * rng.standard_normal((int(seconds * 44100), 2)).astype(np.float32)
            sf.write(root / "audio" / f"t{i:02d}-{stem}.flac", audio, 44100, subtype="PCM_16")
            files.append({"track_id": f"t{i:02d}", "role": stem, "instrument": "", "path": f"audio/t{i:02d}-{stem}.flac"})
    write_csv(root / "licenses.csv", LICENSES[:1], list(LICENSES[0]))
    write_csv(root / "tracks.csv", tracks, list(tracks[0]))
    write_csv(root / "files.csv", files, ["track_id", "role", "instrument", "path"])


def catalog(workspace: Workspace) -> dict[str, list[dict]]:
    return {name: pq.read_table(workspace.catalog_table(name), columns=columns).to_pylist()
            for name, columns in STABLE.items()}


def ingest(delivery, workspace, **config):
    return run_ingest(delivery, workspace, IngestConfig(as_of=AS_OF, **config))


def test_rerun_does_no_new_work_and_a_changed_file_is_measured_again(tmp_path):
    delivery = tmp_path / "d"
    make_delivery(delivery, 3, seconds=2.0)
    workspace = Workspace.at(tmp_path / "w")
    first = ingest(delivery, workspace)
    assert first.counts["work"] == {"audio_measured": 9, "audio_from_cache": 0}  # 6 stems + 3 mixtures
    before = catalog(workspace)
    again = ingest(delivery, workspace)  # nothing changed: the runner reports the first run, cached
    assert again.status == "cached" and again.run_id == first.run_id
    assert catalog(workspace) == before
    (workspace.catalog_table("tracks")).unlink()  # the catalog overwritten since (here: lost): no new measuring
    restored = ingest(delivery, workspace)
    assert restored.counts["reused_from"] == first.run_id and restored.counts["work"]["audio_measured"] == 0
    assert catalog(workspace) == before

    changed = delivery / "audio" / "t01-bass.flac"
    sf.write(changed, np.full((2 * 44100, 2), 0.1, np.float32), 44100, subtype="PCM_16")  # same length, new PCM
    os.utime(changed, ns=(time.time_ns(), time.time_ns() + 10**9))
    third = ingest(delivery, workspace)
    # the changed stem and its track's mixture are measured again; the other 7 come from the cache
    assert third.counts["work"] == {"audio_measured": 2, "audio_from_cache": 7}
    after = {(r["track_id"], r["role"]): r for r in catalog(workspace)["audio_files"]}
    old = {(r["track_id"], r["role"]): r for r in before["audio_files"]}
    assert after[("t01", "bass")]["sha256"] != old[("t01", "bass")]["sha256"]
    assert after[("t01", "mixture")]["sha256"] != old[("t01", "mixture")]["sha256"]
    assert after[("t00", "bass")] == old[("t00", "bass")]


def test_a_killed_run_finishes_on_the_next_invocation_with_the_same_outputs(tmp_path):
    delivery = tmp_path / "d"
    make_delivery(delivery, 6)
    killed = Workspace.at(tmp_path / "killed")
    cache = killed.root / "cache" / "measurements"
    command = [sys.executable, "-m", "pipelines.cli", "ingest", str(delivery), "--as-of", AS_OF,
               "--workdir", str(killed.root), "--json"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (cache.is_dir() and any(cache.glob("*.json"))):
        assert proc.poll() is None, "ingest finished before it could be killed"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not killed.catalog_table("tracks").exists(), "the catalog is written only when a run completes"
    measured_before_kill = len(list(cache.glob("*.json")))
    assert measured_before_kill >= 1

    resumed = ingest(delivery, killed)
    assert resumed.counts["work"]["audio_from_cache"] >= measured_before_kill
    clean = Workspace.at(tmp_path / "clean")
    ingest(delivery, clean)
    assert catalog(killed) == catalog(clean)


def test_multi_process_direct_runner_gives_the_same_catalog(tmp_path):
    delivery = tmp_path / "d"
    make_delivery(delivery, 3, seconds=1.0)
    single, multi = Workspace.at(tmp_path / "single"), Workspace.at(tmp_path / "multi")
    ingest(delivery, single)
    result = ingest(delivery, multi, beam_options=("--direct_num_workers=2", "--direct_running_mode=multi_processing"))
    assert result.counts["tracks"]["accepted"] == 3
    assert catalog(multi) == catalog(single)


def _mixtures(workspace: Workspace, catalog_id: str) -> dict[str, dict]:
    """track → the built mixture row of a catalog version, checked against the audio its file holds now."""
    rows = pq.read_table(resolve_catalog(workspace, catalog_id).table("audio_files")).to_pylist()
    out = {}
    for row in rows:
        if row["role"] == "mixture":
            assert measure_pcm_sha256(read_audio(row["uri"])[0]) == row["sha256"], f"{row['uri']} changed"
            out[row["track_id"]] = row
    return out


def test_a_built_mixture_is_named_by_its_stems_and_never_overwritten(tmp_path):
    """Issue 17: two stem sets for one track id build two mixture files; the first catalog's mixture is intact."""
    first_delivery, second_delivery = tmp_path / "d1", tmp_path / "d2"
    make_delivery(first_delivery, 2, seconds=1.0)
    make_delivery(second_delivery, 2, seconds=1.0)
    sf.write(second_delivery / "audio" / "t01-bass.flac", np.full((44100, 2), 0.1, np.float32), 44100,
             subtype="PCM_16")  # t01 gets other stems in the second delivery; t00's are the same
    workspace = Workspace.at(tmp_path / "w")
    first = ingest(first_delivery, workspace).stage_result.output_ids["catalog"]
    built = _mixtures(workspace, first)
    assert {row["derived_from"] for row in built.values()} == {"sum_of_stems"}
    second = ingest(second_delivery, workspace).stage_result.output_ids["catalog"]
    assert second != first
    rebuilt = _mixtures(workspace, second)
    assert rebuilt["t01"]["uri"] != built["t01"]["uri"] and rebuilt["t01"]["sha256"] != built["t01"]["sha256"]
    assert rebuilt["t00"]["uri"] == built["t00"]["uri"]  # the same stems: the same file
    assert _mixtures(workspace, first) == built, "the first catalog's mixtures changed under it"


def test_tables_of_another_code_version_are_never_reused(tmp_path, monkeypatch):
    """Issue 17: a run whose catalog was lost takes an earlier run's tables only when that run has its cache key
    (code version included); other code measures nothing again (the measurement cache) but judges anew."""
    delivery = tmp_path / "d"
    make_delivery(delivery, 2, seconds=1.0)
    workspace = Workspace.at(tmp_path / "w")
    first = ingest(delivery, workspace)
    first_catalog = first.stage_result.output_ids["catalog"]
    new_commit = "0.0.0+gfeedfacecafe"  # as after a commit: the runner's cache key and the Run record it
    monkeypatch.setattr("pipelines.stage.code_version", lambda: new_commit)
    monkeypatch.setattr("provenance.store.code_version", lambda: new_commit)
    newer = ingest(delivery, workspace)  # the catalog is whole, but the key differs: a new Run
    assert newer.status == "ran" and "reused_from" not in newer.counts
    assert newer.counts["work"] == {"audio_measured": 0, "audio_from_cache": 6}  # 4 stems + 2 built mixtures
    assert newer.stage_result.output_ids["catalog"] != first_catalog  # its own tables (its run id in the rows)
    assert pq.read_table(workspace.catalog_table("tracks"))["run_id"].to_pylist() == [newer.run_id] * 2

    shutil.rmtree(resolve_catalog(workspace, newer.stage_result.output_ids["catalog"]).root)  # lost
    restored = ingest(delivery, workspace)  # the same code version: the lost version's own tables come back
    assert restored.counts["reused_from"] == newer.run_id
    assert restored.stage_result.output_ids["catalog"] == newer.stage_result.output_ids["catalog"]
    with LineageStore(workspace.store_url) as store:
        versions = {run["run_id"]: run["code_version"] for run in store.list_runs("ingest")}
    assert versions[first.run_id] != new_commit and versions[restored.run_id] == new_commit
