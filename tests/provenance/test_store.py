"""The lineage store on both backends (SQLite file, PostgreSQL server): records round-trip, writes are
idempotent where documented, and the lineage walks return the graph's edges in both directions."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from provenance.store import LineageStore
from provenance.workspace import STORE_URL_ENV, Workspace
from tests.provenance.lineage_graph import build_graph, dataset_record, segment_row


@pytest.fixture
def store(store_url: str):
    store = LineageStore(store_url)
    yield store
    store.close()


def test_backend_is_the_one_named(store: LineageStore, store_url: str) -> None:
    assert store.engine.dialect.name == sa.make_url(store_url).get_backend_name()


def test_runs_round_trip_with_json_and_unicode(store: LineageStore) -> None:
    config = {"delivery": "/data/Ørsted — ニ", "nested": {"b": [1, 2.5, None]}}
    run_id = store.start_run("ingest", config)
    assert store.get_run(run_id)["status"] == "running"
    store.finish_run(run_id, {"accepted": 3, "rejected": {"opted_out": 1}}, {"tracks": "/x/tracks.parquet"})
    run = store.get_run(run_id)
    assert run["status"] == "succeeded" and run["finished_at"] >= run["started_at"]
    assert run["config"] == config
    assert run["counts"] == {"accepted": 3, "rejected": {"opted_out": 1}}
    assert run["outputs"] == {"tracks": "/x/tracks.parquet"}
    other = store.start_run("shard", {})
    assert [r["run_id"] for r in store.list_runs("ingest")] == [run_id]
    assert {r["run_id"] for r in store.list_runs()} == {run_id, other}
    assert store.get_run("no-such-run") is None


def test_dataset_registration_is_idempotent_and_latest_is_newest(store: LineageStore) -> None:
    run_id = store.start_run("shard", {})
    store.add_dataset(dataset_record("ds-1", run_id, {"t1": 2}), {"t1": 2})
    store.add_dataset({**dataset_record("ds-1", run_id, {"t1": 9}), "uri": "/elsewhere"}, {"t1": 9})
    assert store.get_dataset("ds-1")["uri"] == "/data/ds-1"
    assert store.dataset_track_segments("ds-1") == {"t1": 2}
    store.add_dataset(dataset_record("ds-2", run_id, {"t2": 1}), {"t2": 1})
    assert store.latest_dataset()["dataset_id"] == "ds-2"
    assert [d["dataset_id"] for d in store.list_datasets()] == ["ds-1", "ds-2"]


def test_attributions_replace_earlier_result_for_same_query_and_method(store: LineageStore) -> None:
    run_id = store.start_run("attribute", {})
    long_segment = "t1" * 100 + "@0"  # 202 characters: segment ids of long track ids fit on both backends
    store.add_attributions("pcm-1", "embedding", run_id, "ds-1",
                           [{**segment_row("t1@0", 1, 0.6)}, {**segment_row("t1@0", 2, 0.4), "segment_id": long_segment}])
    store.add_attributions("pcm-1", "dtrak", run_id, "ds-1", [segment_row("t2@0", 1, 1.0)])
    store.add_attributions("pcm-1", "embedding", run_id, "ds-1", [segment_row("t3@0", 1, 1.0)])
    rows = store.get_attributions("pcm-1")
    assert [(r["method"], r["segment_id"]) for r in rows] == [("dtrak", "t2@0"), ("embedding", "t3@0")]
    assert [r["segment_id"] for r in store.get_attributions("pcm-1", "embedding")] == ["t3@0"]


def test_opt_outs_are_idempotent_and_validated(store: LineageStore) -> None:
    assert store.add_opt_out("rights_holder", "Label One", "withdrawn") is True
    assert store.add_opt_out("rights_holder", "Label One", "again") is False
    assert store.add_opt_out("isrc", "USRC17607839") is True
    assert [(o["kind"], o["value"], o["reason"]) for o in store.list_opt_outs()] == [
        ("isrc", "USRC17607839", ""), ("rights_holder", "Label One", "withdrawn")]
    with pytest.raises(ValueError, match="not one of"):
        store.add_opt_out("label", "x")
    with pytest.raises(ValueError, match="empty"):
        store.add_opt_out("track_id", "  ")


def test_walk_down_from_tracks(store: LineageStore) -> None:
    build_graph(store)
    assert store.datasets_with_tracks(["t2"]) == {"ds-a": ["t2"], "ds-b": ["t2"], "ds-c": ["t2"]}
    assert store.datasets_with_tracks(["t1", "t4", "nope"]) == {"ds-a": ["t1"], "ds-b": ["t4"]}
    assert store.datasets_with_tracks([]) == {}
    assert [c["checkpoint_id"] for c in store.checkpoints_of_datasets(["ds-a"])] == ["ckpt-1"]
    assert [c["checkpoint_id"] for c in store.checkpoints_of_datasets(["ds-a", "ds-b", "ds-c"])] == ["ckpt-1", "ckpt-2"]
    assert store.checkpoints_of_datasets([]) == []
    assert [g["generation_id"] for g in store.generations_of_checkpoints(["ckpt-2"])] == ["gen-2"]
    attributed = store.attributions_to_tracks(["t1", "t2"])
    assert [(r["generation_id"], r["track_id"]) for r in attributed] == [("gen-1", "t1"), ("gen-1", "t2")]
    assert attributed[0]["share"] == pytest.approx(0.7)
    assert (attributed[0]["best_rank"], attributed[0]["segments"]) == (1, 2)
    assert attributed[0]["rights_holder"] == "Label One"
    assert store.attributions_to_tracks(["t3"]) == []


def test_dataset_versions_link_both_ways(store: LineageStore) -> None:
    runs = build_graph(store)
    store.add_dataset_parent("ds-c", "ds-a", runs["takedown"], "repeat")  # idempotent
    parents = store.dataset_parents("ds-c")
    assert [(p["parent_dataset_id"], p["run_id"], p["reason"]) for p in parents] == [
        ("ds-a", runs["takedown"], "takedown track_id=t1")]
    assert [c["dataset_id"] for c in store.dataset_children("ds-a")] == ["ds-c"]
    assert store.dataset_children("ds-c") == [] and store.dataset_parents("ds-a") == []


def test_many_tracks_in_one_walk(store: LineageStore) -> None:
    """More ids than SQLite allows in one statement's parameters (chunked)."""
    run_id = store.start_run("shard", {})
    tracks = {f"track-{i:05d}": 1 for i in range(1200)}
    store.add_dataset(dataset_record("ds-big", run_id, tracks), tracks)
    found = store.datasets_with_tracks(list(tracks) + ["absent"])
    assert list(found) == ["ds-big"] and len(found["ds-big"]) == 1200


def test_workspace_store_url_from_argument_or_environment(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv(STORE_URL_ENV, raising=False)
    assert Workspace.at(tmp_path).store_url == f"sqlite:///{tmp_path.resolve() / 'lineage.sqlite'}"
    monkeypatch.setenv(STORE_URL_ENV, "postgresql+psycopg://u@h:1/db")
    assert Workspace.at(tmp_path).store_url == "postgresql+psycopg://u@h:1/db"
    assert Workspace.at(tmp_path, store_url="sqlite:////x.sqlite").store_url == "sqlite:////x.sqlite"
