"""`linernotes demo` at a tiny scale: the whole chain runs and every output it names exists."""

from pathlib import Path

import numpy as np
import soundfile as sf

from pipelines.demo.run import DEMO_GENERATION_S, run_demo
from provenance.store import LineageStore
from provenance.workspace import Workspace


def test_demo_runs_the_chain_and_names_its_outputs(ray_local, tmp_path):
    workspace = Workspace.at(tmp_path / "w").ensure()
    notes: list[tuple[str, int, int]] = []
    summary = run_demo(workspace, num_tracks=2, track_duration_s=12.0, steps=4,
                       progress=lambda *note: notes.append(note))
    # the second demo piece is offered under a non-commercial licence only: the commercial run rejects it
    assert summary["ingest"]["counts"]["tracks"] == {"input": 2, "accepted": 1, "rejected": 1,
                                                     "rejected_by_reason": {"license_not_commercial": 1}}
    assert summary["shard"]["num_segments"] == 2  # 12 s of one track in whole 5 s segments
    assert summary["train"]["counts"]["steps"] == 4
    for name, path in summary["outputs"].items():
        assert Path(path).exists(), name
    audio, rate = sf.read(summary["outputs"]["generation"], dtype="float32")
    assert len(audio) == round(DEMO_GENERATION_S * rate) and np.all(np.isfinite(audio))
    attribution = summary["generate"]["attribution"]
    assert attribution["tracks"][0]["track_id"] == "demo-bach-bwv153-1"  # the only track trained on
    store = LineageStore(workspace.store_url)
    kinds = [run["kind"] for run in store.list_runs()]
    assert kinds == ["run", "ingest", "shard", "train", "generate", "attribute"]  # the whole run, then its stages
    assert {run["parent_run_id"] for run in store.list_runs() if run["kind"] in ("ingest", "shard", "train")} == {
        summary["run_id"]}
    assert all(run["status"] == "succeeded" for run in store.list_runs())
    assert {message for message, _, _ in notes} >= {"rendering scores", "segments", "training steps"}
