"""The takedown loop on both store backends, through the CLI: ingest → shard → attribute → takedown → new dataset
version without the recordings → later ingest and shard runs exclude them."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from typer.testing import CliRunner

from cleaning.audio import read_audio
from pipelines.cli import app
from pipelines.stages.train import run_attribute
from pipelines.stages.takedown import parse_takedown
from provenance.store import LineageStore
from provenance.workspace import STORE_URL_ENV, Workspace
from tests.pipelines.test_ingest import LICENSES, track, write_csv

runner = CliRunner()
HOLDERS = {"a": "Holder A", "b": "Holder A", "c": "Holder C", "d": "Holder D"}
SHARD_ARGS = ["--segment-s", "1", "--sample-rate-hz", "16000", "--set", "n_fft=512", "--set", "hop_length=160",
              "--set", "n_mels=32", "--set", "validation_fraction=0"]


def make_delivery(root):
    """Four 2 s recordings (distinct noise + tone, so no near duplicates), two of them Holder A's."""
    (root / "audio").mkdir(parents=True)
    rng = np.random.default_rng(7)
    t = np.arange(32000) / 16000
    for i, name in enumerate(HOLDERS):
        audio = 0.15 * rng.standard_normal(32000) + 0.3 * np.sin(2 * np.pi * (200 + 170 * i) * t)
        sf.write(root / "audio" / f"{name}.wav", audio.astype(np.float32), 16000)
    tracks = [track(name, "L-open", holder) for name, holder in HOLDERS.items()]
    tracks[0]["isrc"] = "USS1Z9900001"
    write_csv(root / "licenses.csv", LICENSES[:1], list(LICENSES[0]))
    write_csv(root / "tracks.csv", tracks, list(tracks[0]))
    write_csv(root / "files.csv", [{"track_id": t, "role": "mixture", "instrument": "", "path": f"audio/{t}.wav"}
                                   for t in HOLDERS], ["track_id", "role", "instrument", "path"])


def cli(*args):
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_takedown_loop(ray_local, store_url, tmp_path, monkeypatch):
    monkeypatch.setenv(STORE_URL_ENV, store_url)
    delivery, work = tmp_path / "delivery", tmp_path / "work"
    make_delivery(delivery)
    ingested = cli("ingest", str(delivery), "--as-of", "2026-11-21", "--workdir", str(work))
    assert ingested["counts"]["tracks"]["accepted"] == 4
    first = cli("shard", *SHARD_ARGS, "--workdir", str(work))
    assert first["num_tracks"] == 4 and first["num_segments"] == 8

    # a checkpoint and a generation recorded on that dataset; the generation's attribution is computed for real
    workspace = Workspace.at(work)
    store = LineageStore(workspace.store_url)
    run_id = store.start_run("train", {})
    store.add_checkpoint({"checkpoint_id": "ckpt-x", "dataset_id": first["dataset_id"], "run_id": run_id, "step": 1,
                          "config_sha256": "0" * 64, "uri": "/nowhere/checkpoint.pt"})
    store.add_generation({"generation_id": "gen-x", "checkpoint_id": "ckpt-x", "run_id": run_id, "prompt": "p",
                          "conditioning": "{}", "seed": 0, "sampler": "ddim", "duration_s": 2.0, "uri": "/nowhere.wav"})
    audio, rate = read_audio(delivery / "audio" / "a.wav")
    attributed = run_attribute(workspace, audio, rate, "gen-x", dataset_id=first["dataset_id"], top_k=4, store=store)
    assert attributed.result.segments[0].track_id == "a"
    store.close()
    # the same query against the same dataset and config is cached (no new Run); another top_k is not
    again = run_attribute(workspace, audio, rate, "gen-x", dataset_id=first["dataset_id"], top_k=4)
    assert again.status == "cached" and again.run_id == attributed.run_id and again.result == attributed.result
    assert run_attribute(workspace, audio, rate, "gen-x", dataset_id=first["dataset_id"], top_k=3).status == "ran"
    run_attribute(workspace, audio, rate, "gen-x", dataset_id=first["dataset_id"], top_k=4, force=True)

    taken = cli("takedown", "--rights-holder", "holder a", "--reason", "withdrawn", "--workdir", str(work))
    assert taken["added"] is True and taken["kind"] == "rights_holder"
    assert [t["track_id"] for t in taken["tracks"]] == ["a", "b"]
    assert taken["tracks"][0]["isrc"] == "USS1Z9900001"
    assert taken["datasets"] == [{"dataset_id": first["dataset_id"], "tracks": ["a", "b"], "num_segments": 4}]
    assert [c["checkpoint_id"] for c in taken["checkpoints"]] == ["ckpt-x"]
    assert [g["generation_id"] for g in taken["generations"]] == ["gen-x"]
    assert {(a["generation_id"], a["track_id"]) for a in taken["attributions"]} >= {("gen-x", "a")}
    [rebuilt] = taken["rebuilt"]
    new_id = rebuilt["dataset_id"]
    assert rebuilt["parent_dataset_id"] == first["dataset_id"] and new_id != first["dataset_id"]
    assert (rebuilt["num_tracks"], rebuilt["num_segments"]) == (2, 4)
    index = pq.read_table(workspace.dataset_dir(new_id) / "index.parquet").to_pylist()
    assert {row["track_id"] for row in index} == {"c", "d"}
    report = json.loads(open(taken["report_path"]).read())
    assert report["counts"] == taken["counts"] and report["counts"]["generations"] == 1
    # on the stage contract: the re-shard is a child Run of the takedown, through the runner
    assert taken["status"] == "ran" and taken["outputs"]["report"] == taken["report_path"]
    with LineageStore(workspace.store_url) as store:
        assert store.get_run(rebuilt["shard_run_id"])["parent_run_id"] == taken["run_id"]

    # lineage: the new version points at the old; the old dataset's track still shows where it went
    version = cli("lineage", new_id, "--workdir", str(work))
    assert [p["parent_dataset_id"] for p in version["derived_from"]] == [first["dataset_id"]]
    assert {t["track_id"] for t in version["tracks"]} == {"c", "d"}
    track_a = cli("lineage", "a", "--workdir", str(work))
    assert "Holder A" in track_a["opted_out"] and [g["generation_id"] for g in track_a["generations"]] == ["gen-x"]

    # later runs exclude the recordings: ingest rejects them, a shard builds (reuses) the version without them
    again = cli("ingest", str(delivery), "--as-of", "2026-11-21", "--workdir", str(work))
    assert again["counts"]["tracks"]["accepted"] == 2
    assert again["counts"]["tracks"]["rejected_by_reason"] == {"opted_out": 2}
    reshard = cli("shard", *SHARD_ARGS, "--workdir", str(work))
    assert reshard["dataset_id"] == new_id and reshard["reused"] is True

    # training refuses the old dataset, before any work, and names the version without the recordings
    refused = runner.invoke(app, ["train", "--dataset", first["dataset_id"], "--steps", "1", "--workdir", str(work)])
    assert refused.exit_code == 2 and f"train on dataset {new_id}" in refused.output
    assert "2 opted-out track(s) (a, b)" in refused.output
    assert len(LineageStore(workspace.store_url).list_runs("train")) == 1, "no train run may start (1: ckpt-x)"

    # a second takedown of the same holder registers nothing new and affects both versions' history only
    repeat = cli("takedown", "--rights-holder", "Holder A", "--no-rebuild", "--workdir", str(work))
    assert repeat["added"] is False and repeat["rebuilt"] == []
    assert repeat["status"] == "ran" and repeat["run_id"] != taken["run_id"]  # a takedown is never cached
    assert cli("takedown", "--rights-holder", "Holder A", "--no-rebuild", "--workdir", str(work))["status"] == "ran"
    assert [d["dataset_id"] for d in repeat["datasets"]] == [first["dataset_id"]]


def test_shard_leaves_out_opted_out_tracks_with_a_rejection(ray_local, tmp_path, monkeypatch):
    monkeypatch.delenv(STORE_URL_ENV, raising=False)
    delivery, work = tmp_path / "delivery", tmp_path / "work"
    make_delivery(delivery)
    cli("ingest", str(delivery), "--as-of", "2026-11-21", "--workdir", str(work))
    cli("rights", "opt-out", "--isrc", "USS1Z9900001", "--workdir", str(work))  # after the catalog was curated
    sharded = cli("shard", *SHARD_ARGS, "--workdir", str(work))
    assert sharded["num_tracks"] == 3
    assert [(r["record_id"], r["reason"]) for r in sharded["rejections"]] == [("a", "opted_out")]
    assert "USS1Z9900001" in sharded["rejections"][0]["detail"]


def test_bad_takedown_arguments_fail_before_anything_is_registered(tmp_path, monkeypatch):
    monkeypatch.delenv(STORE_URL_ENV, raising=False)
    work = str(tmp_path / "work")
    for args in ([], ["--track", "a", "--isrc", "USS1Z9900001"], ["--track", "  "]):
        result = runner.invoke(app, ["takedown", *args, "--workdir", work])
        assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert LineageStore(Workspace.at(work).store_url).list_opt_outs() == []
    assert parse_takedown("isrc", " us-s1z-99-00001 ") == ("isrc", "USS1Z9900001")
    with pytest.raises(ValueError, match="not one of"):
        parse_takedown("label", "x")
