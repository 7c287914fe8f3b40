"""``linernotes demo``: render a public-domain delivery, then run ``infra/runs/demo.yaml`` on it.

The spec's chain: ingest (commercial run: the one non-commercial demo track is rejected) → shard (5 s segments) →
train (Ray Train, one CPU worker) → generate (DDIM + Griffin-Lim) → attribute (embedding method), as one whole run
(``linernotes runs`` shows it with its stage Runs). About 5 minutes on 2 CPU cores at the defaults.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipelines.demo.delivery import build_demo_delivery
from pipelines.runner import run_spec
from pipelines.runspec import load_spec
from provenance.workspace import Workspace

DEMO_SPEC = Path(__file__).resolve().parents[2] / "infra" / "runs" / "demo.yaml"
DEMO_GENERATION_S = 8.0  # infra/runs/demo.yaml's generate.duration_s


def run_demo(workspace: Workspace, num_tracks: int = 6, track_duration_s: float = 30.0, steps: int = 1500,
             status: Callable[[str], None] | None = None,
             progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Render the demo delivery into ``workspace``, then run ``infra/runs/demo.yaml`` on it (``linernotes run``);
    returns one JSON-able summary: the whole run's id and every stage's result.

    Raises:
        pipelines.runner.RunFailed: a stage failed.
    """
    say = status or (lambda message: None)
    started = time.perf_counter()
    delivery_dir = workspace.root / "demo-delivery"
    say(f"rendering {num_tracks} public-domain scores from music21's corpus into {delivery_dir}")
    render_progress = None if progress is None else (lambda message, done, total: progress("rendering scores", done, total))
    delivery = build_demo_delivery(delivery_dir, num_tracks=num_tracks, max_duration_s=track_duration_s,
                                   progress=render_progress)
    spec = load_spec(DEMO_SPEC, [f"delivery={delivery.path}", f"train.steps={steps}"], workspace=str(workspace.root))
    say(f"running {DEMO_SPEC.relative_to(DEMO_SPEC.parents[2])}: ingest (a commercial, worldwide run), shard, "
        f"train ({steps} steps, Ray Train), generate and attribute")
    run = run_spec(spec, progress=progress, status=say, workspace=workspace)
    stages = {row["stage"]: row for row in run["stages"]}
    output = workspace.root / "demo-generation.wav"
    shutil.copyfile(stages["generate"]["outputs"]["wav"], output)
    stages["generate"]["outputs"]["out"] = str(output)
    return {
        "stage": "demo",
        "workdir": str(workspace.root),
        "run_id": run["run_id"],
        "elapsed_s": time.perf_counter() - started,
        "delivery": {"path": str(delivery.path), "tracks": len(delivery.track_ids), "files": delivery.num_files},
        **stages,
        "outputs": {
            "delivery": str(delivery.path),
            "catalog": str(workspace.catalog_dir),
            "dataset": str(workspace.dataset_dir(stages["shard"]["dataset_id"])),
            "checkpoint": stages["train"]["outputs"]["checkpoint"],
            "generation": str(output),
            "lineage": str(Path(workspace.root) / "lineage.sqlite"),
        },
    }
