"""A workspace for the white-box attribution tests: a small dataset in the shard stage's format, registered
in the lineage store, and a checkpoint trained on it by the real ``training.train`` (Ray Train, 1 worker).

Eight tracks of distinct synthetic material (sines, chords, noise bands, pulses) with three 1.5 s segments
each at 8 kHz: 21 train segments (7 tracks) and 3 validation segments (1 track). Every segment of a track
differs from its siblings (pitch glide, swell rate, noise seed), so self-retrieval must tell them apart.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np

from cleaning.audio import encode_flac, read_audio
from cleaning.mel import MelConfig, log_mel
from provenance.records import SHARD_ENTRY, canonical_json, sample_key, segment_id, sha256_hex, to_table, write_table
from provenance.store import LineageStore
from provenance.workspace import Workspace

MEL_CONFIG = MelConfig(sample_rate_hz=8000, n_fft=256, hop_length=80, n_mels=32)
SEGMENT_S = 1.5
SEGMENTS_PER_TRACK = 3
# (track_id, text, kind, frequency_hz, rights_holder); the last track is the validation split
TRACKS = [
    ("t-low", "sine low calm", "sine", 180.0, "North Label"),
    ("t-mid", "sine mid calm", "sine", 420.0, "North Label"),
    ("t-high", "sine high bright", "sine", 1100.0, "South Music"),
    ("t-noise", "noise bright", "noise", 2000.0, "South Music"),
    ("t-chord", "chord mid", "chord", 300.0, "East Rights"),
    ("t-pulse", "pulse low", "pulse", 150.0, "East Rights"),
    ("t-hum", "noise low dark", "noise", 300.0, "West Songs"),
    ("t-val", "sine mid bright", "sine", 660.0, "West Songs"),
]
TRAIN_CONFIG = dict(steps=80, batch_size=8, crop_frames=64, warmup_steps=10, log_every=20, base_channels=16,
                    channel_mults=(1, 2), text_dim=16, text_buckets=64, diffusion_steps=100, num_workers=1,
                    learning_rate=2e-3, min_learning_rate=2e-4, checkpoint_every=0)


def segment_audio(kind: str, frequency_hz: float, index: int, rng: np.random.Generator) -> np.ndarray:
    """float32 ``(1, samples)``: a test signal whose details depend on the segment ``index``."""
    rate = MEL_CONFIG.sample_rate_hz
    t = np.arange(int(SEGMENT_S * rate)) / rate
    swell = 0.3 + 0.2 * np.sin(2 * np.pi * (0.7 + 0.9 * index) * t)
    glide = frequency_hz * (1 + 0.08 * index * t / SEGMENT_S)
    phase = 2 * np.pi * np.cumsum(glide) / rate
    if kind == "sine":
        wave = swell * np.sin(phase)
    elif kind == "chord":
        wave = swell * 0.5 * (np.sin(phase) + np.sin(1.5 * phase))
    elif kind == "pulse":
        gate = (np.sin(2 * np.pi * (2 + index) * t) > 0.3).astype(np.float64)
        wave = 0.5 * gate * np.sin(phase)
    else:
        white = rng.standard_normal(t.size)
        spectrum = np.fft.rfft(white)
        freqs = np.fft.rfftfreq(t.size, 1 / rate)
        spectrum *= np.exp(-0.5 * ((freqs - frequency_hz) / (200 + 150 * index)) ** 2)
        wave = swell * np.fft.irfft(spectrum, t.size)
        wave = 0.4 * wave / np.max(np.abs(wave))
    return wave.astype(np.float32)[None]


def write_dataset(workspace: Workspace, store: LineageStore) -> tuple[str, dict[str, np.ndarray]]:
    """Write and register the dataset; returns ``(dataset_id, segment_id → decoded segment audio)``."""
    rng = np.random.default_rng(0)
    staged = workspace.datasets_dir / ".staging"
    staged.mkdir(parents=True, exist_ok=True)
    samples: dict[str, list] = {"train": [], "validation": []}
    decoded: dict[str, np.ndarray] = {}
    segment_samples = int(SEGMENT_S * MEL_CONFIG.sample_rate_hz)
    for track_index, (track_id, text, kind, frequency_hz, holder) in enumerate(TRACKS):
        split = "validation" if track_index == len(TRACKS) - 1 else "train"
        for index in range(SEGMENTS_PER_TRACK):
            seg_id = segment_id(track_id, index * segment_samples)
            flac = encode_flac(segment_audio(kind, frequency_hz, index, rng), MEL_CONFIG.sample_rate_hz)
            audio, _ = read_audio(io.BytesIO(flac))
            decoded[seg_id] = audio
            buffer = io.BytesIO()
            np.save(buffer, log_mel(audio, MEL_CONFIG).astype(np.float16))
            meta = {"segment_id": seg_id, "track_id": track_id, "text": text, "tags": text.split(),
                    "license_id": "lic-test", "rights_holder": holder, "title": track_id, "artist": "Test Artist",
                    "attribution": f"{track_id} courtesy of {holder}"}
            members = {"flac": flac, "mel.npy": buffer.getvalue(), "json": json.dumps(meta).encode()}
            samples[split].append((sample_key(seg_id), members, {"segment_id": seg_id, "track_id": track_id,
                                                                 "split": split, "start_sample": index * segment_samples}))
    shards: dict[str, list[str]] = {"train": [], "validation": []}
    rows = []
    for split, entries in samples.items():
        for start in range(0, len(entries), 8):
            name = f"{split}-{start // 8:06d}.tar"
            shards[split].append(name)
            with tarfile.open(staged / name, "w", format=tarfile.USTAR_FORMAT) as tar:
                for key, members, row in entries[start:start + 8]:
                    for ext in sorted(members):
                        info = tarfile.TarInfo(f"{key}.{ext}")
                        info.size, info.mtime, info.mode = len(members[ext]), 0, 0o644
                        tar.addfile(info, io.BytesIO(members[ext]))
                    rows.append({**row, "num_samples": segment_samples, "start_s": row["start_sample"] / 8000,
                                 "duration_s": SEGMENT_S, "shard": name, "key": key,
                                 "members": [f"{key}.{ext}" for ext in sorted(members)],
                                 "sha256": sha256_hex(members["flac"])})
    dataset_id = "ds-" + sha256_hex(canonical_json(rows))[:16]
    write_table(to_table(rows, SHARD_ENTRY), staged / "index.parquet")
    manifest = {"dataset_id": dataset_id, "config": {"segment_s": SEGMENT_S, "sample_rate_hz": 8000,
                                                     "mel": MEL_CONFIG.to_dict()},
                "shards": shards, "counts": {split: len(entries) for split, entries in samples.items()}}
    (staged / "dataset.json").write_text(json.dumps(manifest, indent=2))
    staged.rename(workspace.dataset_dir(dataset_id))
    run_id = store.start_run("shard", {"test": True})
    store.finish_run(run_id, {"segments": len(rows)})
    store.add_dataset({"dataset_id": dataset_id, "run_id": run_id, "config_sha256": "0" * 64,
                       "uri": str(workspace.dataset_dir(dataset_id)), "num_tracks": len(TRACKS),
                       "num_segments": len(rows), "num_train_segments": len(samples["train"]),
                       "num_validation_segments": len(samples["validation"]), "num_shards": 2},
                      {t[0]: SEGMENTS_PER_TRACK for t in TRACKS})
    return dataset_id, decoded


def make_workspace(root: Path) -> tuple[Workspace, str, dict[str, np.ndarray], dict]:
    """A workspace with the dataset and a trained checkpoint (``pipelines.stages.train.run_train``, real Ray Train).

    Returns ``(workspace, dataset_id, segment_id → audio, checkpoint row)``.
    """
    from pipelines.stages.train import run_train
    from training.config import TrainConfig

    workspace = Workspace.at(root).ensure()
    store = LineageStore(workspace.store_url)
    try:
        dataset_id, decoded = write_dataset(workspace, store)
    finally:
        store.close()
    job = run_train(workspace, TrainConfig(**TRAIN_CONFIG), dataset_id=dataset_id)
    store = LineageStore(workspace.store_url)
    try:
        checkpoint = store.get_checkpoint(job.checkpoint_id)
    finally:
        store.close()
    return workspace, dataset_id, decoded, checkpoint
