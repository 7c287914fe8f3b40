"""The WebDataset stream: statistics, normalised crops, seeded order, endless epochs, rank splits."""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import tarfile

import numpy as np
import pytest

from tests.training.conftest import MEL_CONFIG, TRACKS
from training.data import MelTextStream, crop_or_pad, iter_mel_samples, measure_mel_stats, read_dataset_info

FRAMES = MEL_CONFIG.num_frames(32000)  # 2 s segments at 16 kHz


def _mels_read_with_tarfile(paths) -> list[np.ndarray]:
    mels = []
    for path in paths:
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".mel.npy"):
                    mels.append(np.load(io.BytesIO(tar.extractfile(member).read())).astype(np.float32))
    return mels


def _stream(info, mean, std, **kwargs) -> MelTextStream:
    defaults = {"crop_frames": 64, "log_floor": MEL_CONFIG.log_floor, "seed": 0}
    return MelTextStream(info.shards["train"], mean, std, **{**defaults, **kwargs})


def test_read_dataset_info(tiny_dataset):
    info = read_dataset_info(tiny_dataset)
    assert info.mel_config == MEL_CONFIG and info.segment_s == 2.0 and info.dataset_id.startswith("ds-")
    assert [p.rsplit("/", 1)[-1] for p in info.shards["train"]] == ["train-000000.tar", "train-000001.tar"]
    assert len(info.shards["validation"]) == 1


def test_read_dataset_info_missing_shard(tmp_path, tiny_dataset):
    manifest = json.loads((tiny_dataset / "dataset.json").read_text())
    manifest["shards"]["train"].append("train-000009.tar")
    (tmp_path / "dataset.json").write_text(json.dumps(manifest))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_dataset_info(tmp_path)


def test_samples_carry_mel_and_json_only(tiny_dataset):
    samples = list(iter_mel_samples(read_dataset_info(tiny_dataset).shards["train"]))
    assert len(samples) == 10
    assert {s["meta"]["text"] for s in samples} == {text for _, text, _, _ in TRACKS[:-1]}
    assert all(s["mel"].shape == (MEL_CONFIG.n_mels, FRAMES) and s["mel"].dtype == np.float32 for s in samples)


def test_measure_mel_stats_matches_numpy(tiny_dataset):
    paths = read_dataset_info(tiny_dataset).shards["train"]
    everything = np.concatenate([m.ravel() for m in _mels_read_with_tarfile(paths)]).astype(np.float64)
    mean, std = measure_mel_stats(paths)
    assert mean == pytest.approx(everything.mean(), rel=1e-9)
    assert std == pytest.approx(everything.std(), rel=1e-9)


def test_stream_yields_normalised_windows_of_real_samples(tiny_dataset):
    info = read_dataset_info(tiny_dataset)
    mean, std = measure_mel_stats(info.shards["train"])
    normalised = [(m - mean) / std for m in _mels_read_with_tarfile(info.shards["train"])]
    texts = {text for _, text, _, _ in TRACKS[:-1]}
    for mel, text in itertools.islice(iter(_stream(info, mean, std)), 12):
        assert mel.shape == (MEL_CONFIG.n_mels, 64) and mel.dtype == np.float32 and text in texts
        # the crop is a window of one of the normalised mels
        assert any(np.allclose(full[:, start:start + 64], mel, atol=1e-5)
                   for full in normalised for start in range(FRAMES - 64 + 1))


def test_stream_is_seeded_and_endless(tiny_dataset):
    info = read_dataset_info(tiny_dataset)
    mean, std = measure_mel_stats(info.shards["train"])

    def take(seed: int, n: int) -> list[bytes]:
        return [mel.tobytes() for mel, _ in itertools.islice(iter(_stream(info, mean, std, seed=seed)), n)]

    first = take(0, 35)  # 3.5 epochs of 10 samples
    assert len(first) == 35
    assert first == take(0, 35)
    assert first != take(1, 35)


def test_short_samples_are_padded_with_normalised_silence():
    rng = np.random.default_rng(0)
    mel = np.ones((3, 5), dtype=np.float32)
    out = crop_or_pad(mel, 8, rng, pad_value=-2.0)
    assert out.shape == (3, 8) and np.all(out[:, :5] == 1.0) and np.all(out[:, 5:] == -2.0)


def test_ranks_read_disjoint_samples(tiny_dataset):
    info = read_dataset_info(tiny_dataset)
    mean, std = measure_mel_stats(info.shards["train"])

    def first_epoch(rank: int, world_size: int, n: int) -> set[str]:
        stream = _stream(info, mean, std, crop_frames=FRAMES, rank=rank, world_size=world_size)
        return {hashlib.sha256(mel.tobytes()).hexdigest() for mel, _ in itertools.islice(iter(stream), n)}

    # 2 shards, 2 ranks: one shard each
    halves = [first_epoch(rank, 2, 5) for rank in range(2)]
    assert len(halves[0]) == len(halves[1]) == 5 and not halves[0] & halves[1]
    # 2 shards, 3 ranks: every rank reads both shards and keeps every third sample
    thirds = [first_epoch(rank, 3, 3) for rank in range(3)]
    assert sum(len(part) for part in thirds) == 9 and len(set().union(*thirds)) == 9
    with pytest.raises(ValueError, match="rank 2 outside"):
        _stream(info, mean, std, rank=2, world_size=2)
