"""The trainer's WebDataset stream (``MelBatchStream``): conditioning fields, rank/worker splits, uneven
shards, fixed epochs, seeded order and an exact resume position, through real DataLoader workers."""

from __future__ import annotations

import io
import itertools
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from training.data import (CONDITIONING_FIELDS, MelBatchStream, loader_batches_consumed, shard_statistics)

N_MELS, FRAMES, CROP = 8, 40, 16
KEYS = ("C major", "A minor", "F# major")


def write_shards(root: Path, sizes: list[int]) -> list[str]:
    """Shards of ``sizes`` samples; sample ``i``'s mel is the constant ``i`` (float16 ``(8, 40)``) so a crop
    names its sample; its json has the musical fields; its ``flac`` member is NOT audio (never decoded)."""
    paths, index = [], 0
    for shard, size in enumerate(sizes):
        path = root / f"train-{shard:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for _ in range(size):
                key = f"s{index:04d}"
                buffer = io.BytesIO()
                np.save(buffer, np.full((N_MELS, FRAMES), float(index), dtype=np.float16))
                meta = {"segment_id": key, "text": f"piano {index}", "bpm": 60.0 + index, "key": KEYS[index % 3],
                        "instrument": "piano", "duration_s": 10.0, "tags": ["piano"], "rights_holder": "R"}
                for name, data in ((f"{key}.flac", b"not audio: the stream must not decode this"),
                                   (f"{key}.json", json.dumps(meta).encode()), (f"{key}.mel.npy", buffer.getvalue())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                index += 1
        paths.append(str(path))
    return paths


def make_stream(paths, *, batch_size=2, seed=0, rank=0, world_size=1, start_batch=0, shuffle_buffer=4,
                samples_per_epoch=None) -> MelBatchStream:
    stats = shard_statistics(paths)
    return MelBatchStream(paths, stats.mel_mean, stats.mel_std, CROP, 1e-5, batch_size=batch_size, seed=seed,
                          samples_per_epoch=samples_per_epoch or stats.num_samples, rank=rank,
                          world_size=world_size, shuffle_buffer=shuffle_buffer, start_batch=start_batch)


def sample_indices(batch, stream: MelBatchStream) -> list[int]:
    """The sample index each crop of a batch came from (its constant value, un-normalised)."""
    values = batch["mel"] * stream.mel_std + stream.mel_mean
    assert torch.allclose(values, values[:, :1, :1].expand_as(values), atol=1e-3)  # one sample per crop
    return [int(round(float(v))) for v in values[:, 0, 0]]


def take(stream: MelBatchStream, n: int, num_loader_workers: int = 0) -> list[dict]:
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=num_loader_workers)
    return list(itertools.islice(iter(loader), n))


def test_batches_carry_mel_text_and_musical_fields(tmp_path):
    paths = write_shards(tmp_path, [6])
    stream = make_stream(paths, batch_size=3)
    batch = take(stream, 1)[0]
    assert batch["mel"].shape == (3, N_MELS, CROP) and batch["mel"].dtype == torch.float32
    assert set(batch["cond"]) == set(CONDITIONING_FIELDS)
    for i, index in enumerate(sample_indices(batch, stream)):
        assert batch["key"][i] == f"s{index:04d}" and batch["text"][i] == f"piano {index}"
        assert batch["cond"]["bpm"][i] == 60.0 + index and batch["cond"]["key"][i] == KEYS[index % 3]
        assert batch["cond"]["instrument"][i] == "piano" and batch["cond"]["duration_s"][i] == 10.0
        assert batch["cond"]["genre"][i] is None  # absent fields are None, not dropped
        assert batch["meta"][i]["rights_holder"] == "R"


@pytest.mark.timeout(180)
def test_uneven_shards_two_ranks_two_loader_workers_never_starve(tmp_path):
    """3 shards of 5, 3 and 2 samples read by 2 ranks × 2 DataLoader workers (4 readers > 3 shards):
    every rank gets the same, endless supply of whole batches, and epoch 0 covers every sample."""
    paths = write_shards(tmp_path, [5, 3, 2])
    epoch_zero: set[int] = set()
    for rank in range(2):
        stream = make_stream(paths, rank=rank, world_size=2)
        batches = take(stream, 12, num_loader_workers=2)  # 12 batches of 2 = 8 epochs' worth per rank
        assert len(batches) == 12 and all(b["mel"].shape == (2, N_MELS, CROP) for b in batches)
        for worker in range(2):  # the DataLoader alternates workers; a reader's epoch is ceil(10 / 4) = 3 samples
            epoch_zero |= set([i for b in batches[worker::2] for i in sample_indices(b, stream)][:3])
    assert epoch_zero == set(range(10))


def test_as_many_shards_as_readers_split_disjointly_by_rank_and_worker(tmp_path):
    """4 equal shards, 2 ranks × 2 workers: one shard per reader per epoch, disjoint, all covered."""
    paths = write_shards(tmp_path, [4, 4, 4, 4])
    per_reader: list[set[int]] = []
    for rank in range(2):
        stream = make_stream(paths, rank=rank, world_size=2)
        batches = take(stream, 4, num_loader_workers=2)  # 2 batches per worker = its 4-sample epoch
        for worker in range(2):
            indices = [i for b in batches[worker::2] for i in sample_indices(b, stream)]
            assert len(indices) == 4
            per_reader.append(set(indices))
    assert all(len(s) == 4 for s in per_reader) and len(set().union(*per_reader)) == 16
    # each reader's epoch is exactly one whole shard (samples 4s..4s+3)
    assert sorted(min(s) // 4 for s in per_reader) == [0, 1, 2, 3]
    assert all(max(s) - min(s) == 3 for s in per_reader)


@pytest.mark.parametrize("num_loader_workers", [0, 2])
def test_resume_at_any_batch_continues_the_stream_exactly(tmp_path, num_loader_workers):
    paths = write_shards(tmp_path, [5, 3, 2])
    straight = take(make_stream(paths, rank=1, world_size=2), 10, num_loader_workers)
    for start in (1, 3, 6):  # odd starts: the DataLoader's worker 0 must play worker start % k
        resumed = take(make_stream(paths, rank=1, world_size=2, start_batch=start), 10 - start, num_loader_workers)
        assert [b["key"] for b in resumed] == [b["key"] for b in straight[start:]]
        assert all(torch.equal(a["mel"], b["mel"]) for a, b in zip(resumed, straight[start:]))


def test_order_is_seeded_and_epochs_reshuffle(tmp_path):
    paths = write_shards(tmp_path, [6, 6])
    keys = lambda seed: [k for b in take(make_stream(paths, seed=seed, shuffle_buffer=6), 12) for k in b["key"]]  # noqa: E731
    first = keys(0)
    assert first == keys(0) and first != keys(1)
    assert sorted(first[:12]) == sorted(first[12:]) == [f"s{i:04d}" for i in range(12)]  # each epoch: every sample
    assert first[:12] != first[12:]  # ... in a new order


def test_loader_batches_consumed_matches_round_robin():
    for k in (1, 2, 3):
        for start in range(10):
            delivered = [sum(1 for i in range(start) if i % k == w) for w in range(k)]
            assert [loader_batches_consumed(start, w, k) for w in range(k)] == delivered


def test_bad_stream_arguments_fail_at_construction(tmp_path):
    paths = write_shards(tmp_path, [2])
    with pytest.raises(ValueError, match="empty"):
        MelBatchStream([], 0.0, 1.0, CROP, 1e-5, batch_size=1, seed=0, samples_per_epoch=1)
    with pytest.raises(ValueError, match="batch_size"):
        MelBatchStream(paths, 0.0, 1.0, CROP, 1e-5, batch_size=0, seed=0, samples_per_epoch=1)
    with pytest.raises(ValueError, match="rank 2 outside"):
        MelBatchStream(paths, 0.0, 1.0, CROP, 1e-5, batch_size=1, seed=0, samples_per_epoch=1, rank=2, world_size=2)
