"""A tiny dataset in the shard stage's on-disk format: 12 two-second segments of sines and noise."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from cleaning.audio import encode_flac
from cleaning.mel import MelConfig, log_mel
from provenance.records import SHARD_ENTRY, canonical_json, sample_key, segment_id, sha256_hex, to_table, write_table

MEL_CONFIG = MelConfig(sample_rate_hz=16000, n_fft=512, hop_length=160, n_mels=32)
SEGMENT_S = 2.0
# (track_id, text, kind, frequency_hz): two segments per track; the last track is the validation split
TRACKS = [
    ("t-low", "sine low calm", "sine", 220.0),
    ("t-mid", "sine mid calm", "sine", 440.0),
    ("t-high", "sine high bright", "sine", 880.0),
    ("t-noise", "noise bright", "noise", 0.0),
    ("t-chord", "chord mid", "chord", 330.0),
    ("t-val", "sine mid bright", "sine", 660.0),
]


def segment_audio(kind: str, frequency_hz: float, index: int, rng: np.random.Generator,
                  sample_rate_hz: int = MEL_CONFIG.sample_rate_hz) -> np.ndarray:
    """float32 ``(1, samples)`` test signal: a sine (with a slow amplitude swell), noise or a two-tone chord."""
    num_samples = int(SEGMENT_S * sample_rate_hz)
    t = np.arange(num_samples) / sample_rate_hz
    swell = 0.3 + 0.2 * np.sin(2 * np.pi * (0.5 + index) * t)
    if kind == "sine":
        wave = swell * np.sin(2 * np.pi * frequency_hz * t)
    elif kind == "chord":
        wave = swell * 0.5 * (np.sin(2 * np.pi * frequency_hz * t) + np.sin(2 * np.pi * 1.5 * frequency_hz * t))
    else:
        wave = 0.2 * rng.standard_normal(num_samples)
    return wave.astype(np.float32)[None]


def write_tiny_dataset(root: Path, mel_config: MelConfig = MEL_CONFIG) -> Path:
    """Write ``root/dataset.json``, ``train-00000{0,1}.tar``, ``validation-000000.tar`` and ``index.parquet``."""
    rng = np.random.default_rng(0)
    samples: dict[str, list[tuple[str, dict[str, bytes], dict]]] = {"train": [], "validation": []}
    for track_index, (track_id, text, kind, frequency_hz) in enumerate(TRACKS):
        split = "validation" if track_index == len(TRACKS) - 1 else "train"
        for index in range(2):
            start_sample = index * int(SEGMENT_S * mel_config.sample_rate_hz)
            seg_id = segment_id(track_id, start_sample)
            audio = segment_audio(kind, frequency_hz, index, rng, mel_config.sample_rate_hz)
            mel_buffer = io.BytesIO()
            np.save(mel_buffer, log_mel(audio, mel_config).astype(np.float16))
            meta = {"segment_id": seg_id, "track_id": track_id, "text": text, "tags": text.split(),
                    "license_id": "lic-test", "rights_holder": "Test Rights"}
            members = {"flac": encode_flac(audio, mel_config.sample_rate_hz), "mel.npy": mel_buffer.getvalue(),
                       "json": json.dumps(meta).encode("utf-8")}
            samples[split].append((sample_key(seg_id), members, {"segment_id": seg_id, "track_id": track_id,
                                                                 "split": split, "start_sample": start_sample}))
    shards: dict[str, list[str]] = {"train": [], "validation": []}
    index_rows = []
    per_shard = {"train": 5, "validation": 5}
    for split, entries in samples.items():
        for shard_index in range(0, len(entries), per_shard[split]):
            name = f"{split}-{shard_index // per_shard[split]:06d}.tar"
            shards[split].append(name)
            with tarfile.open(root / name, "w", format=tarfile.USTAR_FORMAT) as tar:
                for key, members, row in entries[shard_index:shard_index + per_shard[split]]:
                    for ext in sorted(members):
                        info = tarfile.TarInfo(f"{key}.{ext}")
                        info.size, info.mtime, info.mode = len(members[ext]), 0, 0o644
                        tar.addfile(info, io.BytesIO(members[ext]))
                    num_samples = int(SEGMENT_S * mel_config.sample_rate_hz)
                    index_rows.append({**row, "num_samples": num_samples,
                                       "start_s": row["start_sample"] / mel_config.sample_rate_hz,
                                       "duration_s": SEGMENT_S, "shard": name, "key": key,
                                       "members": [f"{key}.{ext}" for ext in sorted(members)],
                                       "sha256": sha256_hex(members["flac"])})
    write_table(to_table(index_rows, SHARD_ENTRY), root / "index.parquet")
    manifest = {"dataset_id": "ds-" + sha256_hex(canonical_json(index_rows))[:16],
                "config": {"segment_s": SEGMENT_S, "sample_rate_hz": mel_config.sample_rate_hz,
                           "mel": mel_config.to_dict()},
                "shards": shards, "counts": {split: len(entries) for split, entries in samples.items()}}
    (root / "dataset.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny dataset folder (10 train segments in 2 shards, 2 validation segments in 1)."""
    return write_tiny_dataset(tmp_path_factory.mktemp("tiny_dataset"))


TINY_TRAIN_CONFIG = dict(steps=4, batch_size=4, crop_frames=64, warmup_steps=1, log_every=2, base_channels=16,
                         channel_mults=(1, 2), text_dim=16, text_buckets=64, diffusion_steps=100, num_workers=2,
                         learning_rate=1e-3, min_learning_rate=1e-4)


@pytest.fixture(scope="session")
def trained(ray_local, tiny_dataset, tmp_path_factory):
    """``(TrainResult, TrainConfig, storage folder)`` of a 4-step, 2-worker Ray Train run on the tiny dataset."""
    from training.config import TrainConfig
    from training.data import read_dataset_info
    from training.train import train

    info = read_dataset_info(tiny_dataset)
    config = TrainConfig(**TINY_TRAIN_CONFIG)
    storage = tmp_path_factory.mktemp("ray_storage")
    TRAIN_PROGRESS.clear()
    result = train(info.shards["train"], info.dataset_id, info.mel_config, config, str(storage), "tiny-run",
                   progress=lambda *note: TRAIN_PROGRESS.append(note))
    return result, config, storage


TRAIN_PROGRESS: list[tuple[str, int, int]] = []
"""The ``(message, step, steps)`` notes the ``trained`` fixture's run reported."""
