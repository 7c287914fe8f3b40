"""Training benchmarks (`make bench`): the WebDataset loader against reading the same tars raw, and the
training step's consumption for the default model size. Prints ratios measured in the same run; nothing
here gates on absolute times. GPU figures (MFU, busy fraction, peak memory) need a GPU and are not measured
by this CPU benchmark."""

from __future__ import annotations

import io
import itertools
import json
import tarfile
import time

import numpy as np
import pytest
import torch

from training.config import TrainConfig
from training.data import MelBatchStream, shard_statistics
from training.diffusion import GaussianDiffusion
from training.model import MelUNet

pytestmark = pytest.mark.bench

N_MELS, FRAMES = 64, 1001          # 10 s segments at a 10 ms hop, the shard stage's layout
AUDIO_BYTES = 320_000              # ≈ a 10 s mono 32 kHz FLAC member (skipped by the loader, read by the baseline)
NUM_SHARDS, PER_SHARD = 8, 24


def _write_shards(root) -> list[str]:
    rng = np.random.default_rng(0)
    paths = []
    for shard in range(NUM_SHARDS):
        path = root / f"train-{shard:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(PER_SHARD):
                key = f"s{shard:03d}{i:04d}"
                mel = io.BytesIO()
                np.save(mel, (rng.standard_normal((N_MELS, FRAMES)) * 2 - 8).astype(np.float16))
                meta = json.dumps({"segment_id": key, "text": "piano calm", "bpm": 90.0, "key": "C major"}).encode()
                for name, data in ((f"{key}.flac", rng.bytes(AUDIO_BYTES)), (f"{key}.json", meta),
                                   (f"{key}.mel.npy", mel.getvalue())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(str(path))
    return paths


def _raw_read(paths) -> tuple[int, float]:
    """Baseline: every member of every tar read with the standard library's tarfile, nothing decoded."""
    start, samples = time.perf_counter(), 0
    for path in paths:
        with tarfile.open(path) as tar:
            for member in tar:
                tar.extractfile(member).read()
                samples += member.name.endswith(".json")
    return samples, time.perf_counter() - start


def _loader_rate(paths, stats, config: TrainConfig, num_loader_workers: int, num_batches: int) -> float:
    """Segments/s delivered by MelBatchStream through a DataLoader, after its first batch (start-up)."""
    stream = MelBatchStream(paths, stats.mel_mean, stats.mel_std, config.crop_frames, 1e-5,
                            batch_size=config.batch_size, seed=0, samples_per_epoch=stats.num_samples,
                            shuffle_buffer=config.shuffle_buffer)
    loader = iter(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=num_loader_workers))
    first = next(loader)
    assert first["mel"].shape == (config.batch_size, N_MELS, config.crop_frames)
    start = time.perf_counter()
    batches = list(itertools.islice(loader, num_batches))
    elapsed = time.perf_counter() - start
    # checked after the clock stops: a torch op per batch costs more than the loader itself on a loaded CPU
    assert all(b["mel"].shape == first["mel"].shape and torch.isfinite(b["mel"]).all() for b in batches)
    return num_batches * config.batch_size / elapsed


def _train_rate(config: TrainConfig, num_steps: int) -> tuple[float, int]:
    """Samples/s of the trainer's step (loss, backward, clip, AdamW) for ``config``'s model on this CPU."""
    torch.manual_seed(0)
    model = MelUNet(n_mels=N_MELS, base_channels=config.base_channels, channel_mults=config.channel_mults,
                    text_dim=config.text_dim, text_buckets=config.text_buckets)
    diffusion = GaussianDiffusion(config.diffusion_steps, config.beta_schedule, config.beta_start, config.beta_end,
                                  config.prediction)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate)
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(config.batch_size, N_MELS, config.crop_frames)
    texts = ["piano calm"] * config.batch_size

    def step() -> None:
        loss = diffusion.loss(model, x0, texts, generator=generator, cond_dropout=config.cond_dropout)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(num_steps):
        step()
    return num_steps * config.batch_size / (time.perf_counter() - start), sum(p.numel() for p in model.parameters())


def test_loader_throughput_against_raw_tars_and_training_consumption(tmp_path):
    config = TrainConfig()  # the default model size, batch and crop
    paths = _write_shards(tmp_path)
    stats = shard_statistics(paths)
    raw_samples, raw_s = _raw_read(paths)
    assert raw_samples == stats.num_samples == NUM_SHARDS * PER_SHARD
    raw_rate = raw_samples / raw_s
    rates = {k: _loader_rate(paths, stats, config, k, num_batches=40) for k in (1, 2, 4)}
    train_rate, num_params = _train_rate(config, num_steps=5)

    print(f"\nloader: {NUM_SHARDS} shards × {PER_SHARD} segments (mel {N_MELS}×{FRAMES} float16 + "
          f"{AUDIO_BYTES // 1000} kB audio), batch {config.batch_size}, crop {config.crop_frames}, "
          f"{torch.get_num_threads()} torch threads")
    print(f"{'':<34}{'segments/s':>12}{'per worker':>12}{'vs raw':>8}")
    print(f"{'raw tarfile read (baseline)':<34}{raw_rate:>12.1f}{raw_rate:>12.1f}{1.0:>8.2f}")
    for k, rate in rates.items():
        print(f"{f'MelBatchStream, {k} loader worker(s)':<34}{rate:>12.1f}{rate / k:>12.1f}{rate / raw_rate:>8.2f}")
    print(f"training step, default model ({num_params / 1e6:.2f} M parameters, CPU): {train_rate:.1f} samples/s")
    print(f"loader (4 workers) / step consumption: {rates[4] / train_rate:.1f}×  (target ≥ 2×)")
    assert all(rate > 0 for rate in rates.values()) and train_rate > 0
