"""``linernotes demo``: render a public-domain delivery and run the whole chain on it.

ingest (commercial run: the one non-commercial demo track is rejected) → shard (5 s segments) → train (Ray
Train, one CPU worker) → generate (DDIM + Griffin-Lim) → attribute (embedding method). About 5 minutes on
2 CPU cores at the defaults.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipelines.config import load_config
from pipelines.demo.delivery import build_demo_delivery
from pipelines.engines import Engine
from pipelines.stages.ingest.stage import IngestConfig, run_ingest
from pipelines.stages.train import run_generate, run_train
from pipelines.stages.shard.stage import ShardConfig, run_shard
from provenance.workspace import Workspace

DEMO_SEGMENT_S = 5.0
DEMO_VALIDATION_FRACTION = 0.3  # the Corelli track hashes to 0.28: one track held out
DEMO_PROMPT = "baroque chorale flute oboe clarinet bassoon"
DEMO_GENERATION_S = 8.0


def run_demo(workspace: Workspace, num_tracks: int = 6, track_duration_s: float = 30.0, steps: int = 1500,
             status: Callable[[str], None] | None = None,
             progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Run the demo end to end in ``workspace``; returns one JSON-able summary of every stage."""
    from training.config import TrainConfig

    say = status or (lambda message: None)
    started = time.perf_counter()
    delivery_dir = workspace.root / "demo-delivery"
    say(f"rendering {num_tracks} public-domain scores from music21's corpus into {delivery_dir}")
    render_progress = None if progress is None else (lambda message, done, total: progress("rendering scores", done, total))
    delivery = build_demo_delivery(delivery_dir, num_tracks=num_tracks, max_duration_s=track_duration_s,
                                   progress=render_progress)

    with Engine() as engine:  # one local Ray for shard and train
        say("ingest: rights policy for a commercial, worldwide run; decode and measure every stem (Beam)")
        ingest = run_ingest(delivery.path, workspace, IngestConfig(purpose="commercial", territory="Worldwide",
                                                                   as_of=dt.date.today()), status=say, engine=engine)
        say(f"shard: {DEMO_SEGMENT_S:g} s segments at 32 kHz, WebDataset tars (Ray Data)")
        shard = run_shard(workspace, ShardConfig(segment_s=DEMO_SEGMENT_S,
                                                 validation_fraction=DEMO_VALIDATION_FRACTION),
                          progress=progress, engine=engine)
        train_config = load_config(TrainConfig, steps=steps)
        say(f"train: {steps} steps of the mel diffusion U-Net (Ray Train, 1 CPU worker)")
        train = run_train(workspace, train_config, dataset_id=shard.dataset_id, status=say, progress=progress,
                          engine=engine)
    output = workspace.root / "demo-generation.wav"
    generation = run_generate(workspace, DEMO_PROMPT, seed=0, duration_s=DEMO_GENERATION_S, out=output,
                              checkpoint_id=train.checkpoint_id, status=say, progress=progress)
    return {
        "stage": "demo",
        "workdir": str(workspace.root),
        "elapsed_s": time.perf_counter() - started,
        "delivery": {"path": str(delivery.path), "tracks": len(delivery.track_ids), "files": delivery.num_files},
        "ingest": ingest.to_json(),
        "shard": shard.to_json(),
        "train": train.to_json(),
        "generate": generation.to_json(),
        "outputs": {
            "delivery": str(delivery.path),
            "catalog": str(workspace.catalog_dir),
            "dataset": str(workspace.dataset_dir(shard.dataset_id)),
            "checkpoint": str(train.checkpoint_path),
            "generation": str(output),
            "lineage": str(Path(workspace.root) / "lineage.sqlite"),
        },
    }
