"""A workspace with a real (tiny) dataset, a catalog, a generation WAV and its stored ``embedding`` attribution,
for the API and report tests. The attribution is computed by ``pipelines.stages.train.run_attribute`` for real."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cleaning.audio import write_audio
from pipelines.stages.train import run_attribute
from provenance import records
from provenance.store import LineageStore
from provenance.workspace import Workspace
from tests.training.conftest import MEL_CONFIG, TRACKS, segment_audio, write_tiny_dataset

GENERATION_ID = "gen-00000000000test"
HOLDERS = {"t-low": "Low Records", "t-mid": "Mid & Co <Publishing>", "t-high": "High Fidelity",
           "t-noise": "Noise Ltd", "t-chord": "Mid & Co <Publishing>", "t-val": "Validation Label"}


@dataclass
class Attributed:
    workspace: Workspace
    generation_id: str
    dataset_id: str
    checkpoint_id: str


def make_attributed_workspace(root: Path, store_url: str | None = None) -> Attributed:
    """Dataset of tests/training/conftest.py (5 tracks × 2 train segments), registered; a 2 s "generation"
    that is t-mid's first segment plus a little noise, attributed with the embedding method (top 5)."""
    workspace = Workspace.at(root, store_url=store_url).ensure()
    (Path(root) / "staging").mkdir(parents=True)
    staging = write_tiny_dataset(Path(root) / "staging")
    dataset_id = json.loads((staging / "dataset.json").read_text())["dataset_id"]
    shutil.move(str(staging), workspace.dataset_dir(dataset_id))

    licenses = [{"license_id": "lic-test", "licensor": "Test", "license_name": "Test Training Licence",
                 "license_url": "https://example.org/licence", "territories": ["Worldwide"], "ai_training": "allowed",
                 "commercial_use": True, "attribution_required": True, "delivery_id": "d"}]
    tracks = [{"track_id": t, "isrc": "", "title": text.title(), "artist": "Tester", "rights_holder": HOLDERS[t],
               "license_id": "lic-test", "attribution": f"“{text}” courtesy of {HOLDERS[t]}", "genre": "", "tags": [],
               "description": "", "delivery_id": "d"} for t, text, _, _ in TRACKS]
    records.write_table(records.to_table(licenses, records.LICENSE), workspace.catalog_table("licenses"))
    records.write_table(records.to_table(tracks, records.TRACK), workspace.catalog_table("tracks"))

    store = LineageStore(workspace.store_url)
    try:
        run_id = store.start_run("shard", {"tiny": True})
        segments = {t: 2 for t, *_ in TRACKS}
        store.add_dataset({"dataset_id": dataset_id, "run_id": run_id, "config_sha256": "0" * 64,
                           "uri": str(workspace.dataset_dir(dataset_id)), "num_tracks": 6, "num_segments": 12,
                           "num_train_segments": 10, "num_validation_segments": 2, "num_shards": 3}, segments)
        store.add_checkpoint({"checkpoint_id": "ckpt-tiny", "dataset_id": dataset_id, "run_id": run_id, "step": 4,
                              "config_sha256": "0" * 64, "uri": str(root / "checkpoint.pt")})
        rng = np.random.default_rng(1)
        audio = segment_audio("sine", 440.0, 0, np.random.default_rng(0), MEL_CONFIG.sample_rate_hz)
        audio = (audio + 0.01 * rng.standard_normal(audio.shape)).astype(np.float32)
        wav = write_audio(workspace.generation_dir(GENERATION_ID) / "generation.wav", audio,
                          MEL_CONFIG.sample_rate_hz, subtype="PCM_16")
        gen_run = store.start_run("generate", {"prompt": "sine mid calm"})
        store.add_generation({"generation_id": GENERATION_ID, "checkpoint_id": "ckpt-tiny", "run_id": gen_run,
                              "prompt": "sine mid calm", "conditioning": "{}", "seed": 0, "sampler": "ddim-50",
                              "duration_s": 2.0, "uri": str(wav)})
        store.finish_run(gen_run, {"generations": 1})
        run_attribute(workspace, audio, MEL_CONFIG.sample_rate_hz, GENERATION_ID, dataset_id=dataset_id, top_k=5,
                      store=store)
    finally:
        store.close()
    return Attributed(workspace, GENERATION_ID, dataset_id, "ckpt-tiny")
