"""Small checkpoints in the trainer's format, trained in-process (no Ray) on the tiny dataset, for the
generate / evaluate tests: a run folder with checkpoints at several steps, as Ray Train leaves them."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch

from training.conditioning import stack_conditions
from training.config import TrainConfig
from training.data import iter_mel_samples, measure_mel_stats, read_dataset_info
from training.model import build_model
from training.objectives import build_parameterization
from training.train import update_ema

SMALL = dict(base_channels=16, channel_mults=(1, 2), text_dim=16, text_buckets=64, diffusion_steps=100,
             attention_levels=(-1,), attention_heads=2, sample_steps=8, guidance_scale=2.0)


def write_run(dataset_dir: Path, run_dir: Path, prediction: str = "v", steps: int = 30,
              checkpoint_steps: tuple[int, ...] = (10, 30)) -> list[Path]:
    """Train ``steps`` full-batch steps on 64-frame crops of the train split; write ``checkpoint.pt`` files at
    ``checkpoint_steps`` (``checkpoint_00000/`` ..., the last also as ``final/``). Returns their paths."""
    info = read_dataset_info(dataset_dir)
    mean, std = measure_mel_stats(info.shards["train"])
    samples = list(iter_mel_samples(info.shards["train"]))
    x0 = torch.from_numpy(np.stack([(s["mel"][:, :64] - mean) / std for s in samples])).float()
    texts = [s["meta"]["text"] for s in samples]
    conditions = stack_conditions([{**s["meta"], "duration_s": 2.0} for s in samples])
    config = TrainConfig(prediction=prediction, steps=steps, **SMALL)
    torch.manual_seed(0)
    model = build_model(config, info.mel_config.n_mels)
    ema = copy.deepcopy(model).requires_grad_(False)
    parameterization = build_parameterization(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    losses, paths = [], []
    for step in range(1, steps + 1):
        loss = parameterization.loss(model, x0, texts, generator=generator, cond_dropout=0.1, conditions=conditions)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        update_ema(ema, model, 0.5)
        losses.append(float(loss.detach()))
        if step in checkpoint_steps:
            folder = run_dir / (f"checkpoint_{len(paths):05d}")
            folder.mkdir(parents=True, exist_ok=True)
            state = {"format": 1, "model_kwargs": model.model_kwargs, "model_state": model.state_dict(),
                     "ema_state": ema.state_dict(), "step": step, "config": config.to_dict(),
                     "config_sha256": config.sha256(), "mel_config": info.mel_config.to_dict(),
                     "dataset_id": info.dataset_id, "mel_mean": float(mean), "mel_std": float(std),
                     "losses": list(losses)}
            torch.save(state, folder / "checkpoint.pt")
            paths.append(folder / "checkpoint.pt")
    (run_dir / "final").mkdir(exist_ok=True)
    (run_dir / "final" / "checkpoint.pt").write_bytes(paths[-1].read_bytes())
    return paths
