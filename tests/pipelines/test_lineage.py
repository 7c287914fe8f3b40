"""`linernotes lineage` on both store backends: every kind of id, both directions, JSON and readable output."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from pipelines.cli import app
from pipelines.lineage.walk import LineageError, lineage
from provenance import records
from provenance.store import LineageStore
from provenance.workspace import STORE_URL_ENV, Workspace
from tests.provenance.lineage_graph import TRACKS, build_graph

runner = CliRunner()


@pytest.fixture
def workspace(store_url, tmp_path):
    """A workspace on the backend under test, with the graph of tests/provenance/lineage_graph.py and a
    catalog that describes t1..t3 (t4 only appears in the store)."""
    workspace = Workspace.at(tmp_path / "work", store_url=store_url).ensure()
    store = LineageStore(workspace.store_url)
    build_graph(store)
    store.close()
    tracks = [{"track_id": t, "isrc": f"USAAA26{i:05d}", "title": f"Song {t}", "artist": "A", "rights_holder": TRACKS[t],
               "license_id": "lic-1", "attribution": f"© {TRACKS[t]}", "genre": "", "tags": [], "description": "",
               "delivery_id": "d"} for i, t in enumerate(("t1", "t2", "t3"))]
    records.write_table(records.to_table(tracks, records.TRACK), workspace.catalog_table("tracks"))
    return workspace


def test_track_reaches_datasets_checkpoints_generations_and_attributions(workspace):
    found = lineage(workspace, "t1")
    assert found["kind"] == "track" and found["track"]["rights_holder"] == "Label One"
    assert found["track"]["isrc"] == "USAAA2600000"
    assert [(d["dataset_id"], d["segments"]) for d in found["datasets"]] == [("ds-a", 3)]
    assert [c["checkpoint_id"] for c in found["checkpoints"]] == ["ckpt-1"]
    assert [g["generation_id"] for g in found["generations"]] == ["gen-1"]
    assert [(a["generation_id"], a["method"], round(a["share"], 6)) for a in found["attributions"]] == [
        ("gen-1", "embedding", 0.7)]
    assert found["opted_out"] is None

    t2 = lineage(workspace, "t2")
    assert [d["dataset_id"] for d in t2["datasets"]] == ["ds-a", "ds-b", "ds-c"]
    assert [g["generation_id"] for g in t2["generations"]] == ["gen-1", "gen-2"]
    t4 = lineage(workspace, "t4")  # not in the catalog: still found through the store
    assert t4["track"] == {"track_id": "t4"} and [g["generation_id"] for g in t4["generations"]] == ["gen-2"]


def test_generation_comes_from_checkpoint_dataset_licences_and_holders(workspace):
    found = lineage(workspace, "gen-1")
    assert found["kind"] == "generation"
    assert found["checkpoint"]["checkpoint_id"] == "ckpt-1" and found["dataset"]["dataset_id"] == "ds-a"
    assert found["run"]["kind"] == "generate"
    assert [(t["track_id"], t["num_segments"]) for t in found["tracks"]] == [("t1", 3), ("t2", 2), ("t3", 1)]
    assert found["licenses"] == [{"license_id": "lic-1", "license_name": None, "tracks": 3}]
    assert found["rights_holders"] == [{"rights_holder": "Label One", "tracks": 1, "segments": 3},
                                       {"rights_holder": "Label Two", "tracks": 2, "segments": 3}]
    embedding = found["attributions"]["embedding"]
    assert [(t["track_id"], round(t["share"], 6)) for t in embedding["tracks"]] == [("t1", 0.7), ("t2", 0.3)]
    assert embedding["tracks"][0]["attribution"] == "© Label One"
    assert sum(h["share"] for h in embedding["rights_holders"]) == pytest.approx(1.0)
    assert [s["rank"] for s in embedding["segments"]] == [1, 2, 3]


def test_dataset_and_checkpoint_walk_both_ways(workspace):
    ds_a = lineage(workspace, "ds-a")
    assert [c["checkpoint_id"] for c in ds_a["checkpoints"]] == ["ckpt-1"]
    assert [g["generation_id"] for g in ds_a["generations"]] == ["gen-1"]
    assert [v["dataset_id"] for v in ds_a["versions"]] == ["ds-c"] and ds_a["derived_from"] == []
    ds_c = lineage(workspace, "ds-c")
    assert [p["parent_dataset_id"] for p in ds_c["derived_from"]] == ["ds-a"]
    assert ds_c["checkpoints"] == [] and {t["track_id"] for t in ds_c["tracks"]} == {"t2", "t3"}
    ckpt = lineage(workspace, "ckpt-2")
    assert ckpt["kind"] == "checkpoint" and ckpt["dataset"]["dataset_id"] == "ds-b"
    assert [g["generation_id"] for g in ckpt["generations"]] == ["gen-2"]
    assert {r["rights_holder"] for r in ckpt["rights_holders"]} == {"Label Two", "(unknown)"}


def test_unknown_id_and_kind_are_clear_errors(workspace):
    with pytest.raises(LineageError, match="no generation, checkpoint, dataset or track with id 'nope'"):
        lineage(workspace, "nope")
    with pytest.raises(LineageError, match="no dataset with id 't1'"):
        lineage(workspace, "t1", kind="dataset")
    with pytest.raises(ValueError, match="kind 'album'"):
        lineage(workspace, "t1", kind="album")


def test_cli_json_readable_and_errors(workspace, monkeypatch):
    monkeypatch.setenv(STORE_URL_ENV, workspace.store_url)  # the CLI reaches the same backend by env
    work = str(workspace.root)
    result = runner.invoke(app, ["lineage", "gen-1", "--workdir", work, "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["kind"] == "generation" and payload["dataset"]["dataset_id"] == "ds-a"
    readable = runner.invoke(app, ["lineage", "t1", "--workdir", work])
    assert readable.exit_code == 0, readable.output
    for expected in ("track t1", "Label One", "ds-a", "ckpt-1", "gen-1", "share 70.0%"):
        assert expected in readable.stdout
    missing = runner.invoke(app, ["lineage", "nope", "--workdir", work])
    assert missing.exit_code == 2 and len(missing.output.strip().splitlines()) == 1 and "nope" in missing.output


def test_global_store_url_option_selects_the_store(workspace, tmp_path, monkeypatch):
    monkeypatch.setenv(STORE_URL_ENV, "")  # recorded, so the value the option sets is undone after the test
    monkeypatch.delenv(STORE_URL_ENV)
    elsewhere = str(tmp_path / "empty-work")
    result = runner.invoke(app, ["--store-url", workspace.store_url, "lineage", "ckpt-1", "--workdir", elsewhere,
                                 "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["checkpoint"]["dataset_id"] == "ds-a"
