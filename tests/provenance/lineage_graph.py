"""A small lineage graph registered directly in a store, for the store and lineage-walk tests.

    ds-a (t1: 3 segments, t2: 2, t3: 1) ── ckpt-1 ── gen-1 (embedding: t1 0.5 + 0.2, t2 0.3)
    ds-b (t2: 1, t4: 2)                 ── ckpt-2 ── gen-2 (embedding: t4 1.0)
    ds-c (t2: 2, t3: 1) derived from ds-a by a takedown of t1
"""

from __future__ import annotations

from provenance.store import LineageStore

TRACKS = {"t1": "Label One", "t2": "Label Two", "t3": "Label Two", "t4": "Label Four"}


def dataset_record(dataset_id: str, run_id: str, tracks: dict[str, int]) -> dict:
    return {"dataset_id": dataset_id, "run_id": run_id, "config_sha256": "c" * 64, "uri": f"/data/{dataset_id}",
            "num_tracks": len(tracks), "num_segments": sum(tracks.values()),
            "num_train_segments": sum(tracks.values()), "num_validation_segments": 0, "num_shards": 1}


def segment_row(segment_id: str, rank: int, share: float) -> dict:
    track_id = segment_id.split("@")[0]
    return {"segment_id": segment_id, "rank": rank, "score": 1.0 - rank / 10, "track_id": track_id,
            "rights_holder": TRACKS[track_id], "share": share}


def build_graph(store: LineageStore) -> dict[str, str]:
    """Register the graph above; returns the run ids by name."""
    run = {name: store.start_run(kind, {"name": name}) for name, kind in
           (("shard_a", "shard"), ("shard_b", "shard"), ("takedown", "takedown"), ("train_1", "train"),
            ("train_2", "train"), ("gen_1", "generate"), ("gen_2", "generate"), ("attr_1", "generate_attribute"),
            ("attr_2", "generate_attribute"))}
    store.add_dataset(dataset_record("ds-a", run["shard_a"], {"t1": 3, "t2": 2, "t3": 1}), {"t1": 3, "t2": 2, "t3": 1})
    store.add_dataset(dataset_record("ds-b", run["shard_b"], {"t2": 1, "t4": 2}), {"t2": 1, "t4": 2})
    store.add_dataset(dataset_record("ds-c", run["takedown"], {"t2": 2, "t3": 1}), {"t2": 2, "t3": 1})
    store.add_dataset_parent("ds-c", "ds-a", run["takedown"], "takedown track_id=t1")
    for number, dataset_id in ((1, "ds-a"), (2, "ds-b")):
        store.add_checkpoint({"checkpoint_id": f"ckpt-{number}", "dataset_id": dataset_id,
                              "run_id": run[f"train_{number}"], "step": 100 * number, "config_sha256": "d" * 64,
                              "uri": f"/ckpt/{number}/checkpoint.pt"})
        store.add_generation({"generation_id": f"gen-{number}", "checkpoint_id": f"ckpt-{number}",
                              "run_id": run[f"gen_{number}"], "prompt": f"prompt {number}", "conditioning": "{}",
                              "seed": number, "sampler": "ddim-50", "duration_s": 4.0,
                              "uri": f"/gen/{number}/generation.wav"})
    store.add_attributions("gen-1", "embedding", run["attr_1"], "ds-a", [
        segment_row("t1@0", 1, 0.5), segment_row("t2@320000", 2, 0.3), segment_row("t1@640000", 3, 0.2)])
    store.add_attributions("gen-2", "embedding", run["attr_2"], "ds-b", [segment_row("t4@0", 1, 1.0)])
    return run
