"""Diffusion training on Ray Train: ``train()`` on the driver, ``train_loop_per_worker`` on every rank.

The loop reads top to bottom (nanoGPT style): build the model, optimizer and EMA copy, restore from the
latest checkpoint if Ray Train hands one over, then step: warm-up + cosine learning rate, denoising
loss (ε or v target) with condition dropout (Ho et al. 2020; Ho & Salimans 2022), gradient clipping,
AdamW (Loshchilov & Hutter 2019), EMA update, and a report every ``log_every`` steps. The config, the mel config, the
dataset id and the normalisation statistics are saved inside every checkpoint.

Ray Train is the V2 API (``RAY_TRAIN_V2_ENABLED`` defaults to on in Ray 2.60; setting it to ``0`` selects
the legacy V1 and is not supported here). Re-running with the same ``storage_path`` and ``run_name``:
a finished run (its ``final/checkpoint.pt`` exists) is returned without starting Ray Train; an
interrupted one is resumed by Ray Train from its latest checkpoint and continues its step count,
optimizer, EMA and learning-rate schedule (the data order after a resume is seeded by the resume step:
deterministic, but not the order an uninterrupted run would have seen). Either way a checkpoint from
another config or dataset raises ``ValueError``.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import shutil
import tempfile
import time
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn

from cleaning.mel import MelConfig
from training.config import TrainConfig
from training.data import MelTextStream, measure_mel_stats
from training.model import build_model
from training.parameterization import build_parameterization

CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_FORMAT = 1
PROGRESS_FILE = "progress.json"

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    """What a finished run left behind.

    Attributes:
        checkpoint_path: ``storage_path/run_name/final/checkpoint.pt``, a copy of the last checkpoint
            Ray Train persisted (Ray's own copy stays in its ``checkpoint_*`` folder beside it).
        step: optimizer steps taken, ``== config.steps``.
        losses: training loss of every step (mean over ranks), float, length ``step``.
        mel_mean, mel_std: the log-mel normalisation statistics of the train shards.
        config_sha256: ``TrainConfig.sha256()``, for the Checkpoint record.
    """

    checkpoint_path: Path
    step: int
    losses: list[float] = field(repr=False)
    mel_mean: float
    mel_std: float
    config_sha256: str


def train(shard_paths: list[str], dataset_id: str, mel_config: MelConfig, config: TrainConfig,
          storage_path: str, run_name: str,
          progress: Callable[[str, int, int], None] | None = None) -> TrainResult:
    """Train a ``MelUNet`` on the train shards of a dataset with Ray Train's ``TorchTrainer``.

    The caller has connected to Ray (``ray.init``). The log-mel statistics are measured here, on the
    driver, with one pass over ``shard_paths``; the workers read the shards themselves, so the paths must
    be visible to every worker (a shared file system on a cluster).

    Args:
        shard_paths: the dataset's train WebDataset tars (local paths).
        dataset_id: the Dataset record's key, saved in the checkpoint.
        mel_config: the parameters the shards' ``mel.npy`` were computed with.
        config: hyper-parameters and resources (``num_workers``, ``use_gpu``).
        storage_path: a local folder for Ray Train's run state and checkpoints.
        run_name: the run's folder under ``storage_path``; reusing it resumes or returns the finished
            run (see the module doc).

    Returns:
        The final checkpoint's path, step count, per-step losses and normalisation statistics.

    Raises:
        ValueError: no shards, a URL as ``storage_path``, or a checkpoint of another config or dataset
            in the run folder (raised here for a finished run, as a ``TrainingFailedError`` from the
            workers for an interrupted one).
        FileNotFoundError: a shard does not exist.
        ray.train.TrainingFailedError: a worker failed (the cause is attached).
    """
    if not shard_paths:
        raise ValueError("shard_paths is empty: pass the dataset's train shards")
    if "://" in str(storage_path):
        raise ValueError(f"storage_path must be a local folder, got {storage_path!r}")
    missing = [path for path in shard_paths if not Path(path).exists()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} shard(s) do not exist, e.g. {missing[0]}")
    storage = Path(storage_path).resolve()
    final_path = storage / run_name / "final" / CHECKPOINT_FILE
    if final_path.is_file():  # a finished run: check it is this run, then do no new work
        state = torch.load(final_path, map_location="cpu", weights_only=True, mmap=True)
        _check_resumable(state, config, dataset_id)
        if int(state["step"]) >= config.steps:
            logger.info("run %s already finished at step %d: %s", run_name, state["step"], final_path)
            return _result(final_path, config)
    mel_mean, mel_std = measure_mel_stats(shard_paths)
    loop_config = {
        "shard_paths": [str(Path(path).resolve()) for path in shard_paths],
        "dataset_id": dataset_id,
        "mel_config": mel_config.to_dict(),
        "config": config.to_dict(),
        "mel_mean": mel_mean,
        "mel_std": mel_std,
        "progress_path": str(storage / run_name / PROGRESS_FILE),
    }
    trainer = ray.train.torch.TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=config.num_workers, use_gpu=config.use_gpu),
        run_config=ray.train.RunConfig(
            storage_path=str(storage), name=run_name,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
    )
    with _poll_progress(storage / run_name / PROGRESS_FILE, config.steps, progress):
        result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"run {run_name} finished without a checkpoint under {storage}")
    final_path.parent.mkdir(parents=True, exist_ok=True)
    with result.checkpoint.as_directory() as checkpoint_dir:
        tmp_path = final_path.with_name(f".{CHECKPOINT_FILE}.tmp")
        shutil.copyfile(Path(checkpoint_dir) / CHECKPOINT_FILE, tmp_path)
        os.replace(tmp_path, final_path)
    return _result(final_path, config)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """One rank's training loop (run by Ray Train; ``loop_config`` is built by ``train``)."""
    config = TrainConfig(**loop_config["config"])
    mel_config = MelConfig(**loop_config["mel_config"])
    dataset_id, mel_mean, mel_std = loop_config["dataset_id"], loop_config["mel_mean"], loop_config["mel_std"]
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()

    # model (identical initial weights on every rank), its EMA copy, the diffusion process
    torch.manual_seed(config.seed)
    raw_model = build_model(config, mel_config.n_mels)
    ema_model = copy.deepcopy(raw_model).requires_grad_(False)
    diffusion = build_parameterization(config)

    # resume from the latest checkpoint Ray Train hands over (a re-run, or a restart after a failure)
    step, losses, optimizer_state = 0, [], None
    resume = ray.train.get_checkpoint()
    if resume is not None:
        with resume.as_directory() as checkpoint_dir:
            state = torch.load(Path(checkpoint_dir) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
        _check_resumable(state, config, dataset_id)
        raw_model.load_state_dict(state["model_state"])
        ema_model.load_state_dict(state["ema_state"])
        step, losses, optimizer_state = int(state["step"]), list(state["losses"]), state["optimizer_state"]
        logger.info("resuming at step %d of %d", step, config.steps)

    ema_model.to(device)
    model = ray.train.torch.prepare_model(raw_model)  # to the device; DDP when world_size > 1
    optimizer = torch.optim.AdamW(raw_model.parameters(), lr=config.learning_rate,
                                  weight_decay=config.weight_decay)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)

    # data: this rank's share of the shards, seeded by (seed, resume step)
    data_seed = int(np.random.SeedSequence([config.seed, step]).generate_state(1)[0])
    stream = MelTextStream(loop_config["shard_paths"], mel_mean, mel_std, config.crop_frames,
                           mel_config.log_floor, seed=data_seed, rank=rank, world_size=world_size,
                           shuffle_buffer=config.shuffle_buffer, with_conditions=config.musical_conditioning)
    batches = iter(torch.utils.data.DataLoader(stream, batch_size=config.batch_size,
                                               num_workers=config.num_loader_workers))
    generator = torch.Generator(device=device).manual_seed(
        int(np.random.SeedSequence([config.seed, step, rank]).generate_state(1)[0]))

    def save_and_report(metrics: dict[str, float]) -> None:
        """Report with a checkpoint written by rank 0 (every rank must call this together)."""
        with tempfile.TemporaryDirectory() as checkpoint_dir:
            checkpoint = None
            if rank == 0:
                torch.save({
                    "format": CHECKPOINT_FORMAT,
                    "model_kwargs": raw_model.model_kwargs,
                    "model_state": raw_model.state_dict(),
                    "ema_state": ema_model.state_dict(),
                    "optimizer_state": optimizer.state_dict(),
                    "step": step,
                    "config": config.to_dict(),
                    "config_sha256": config.sha256(),
                    "mel_config": mel_config.to_dict(),
                    "dataset_id": dataset_id,
                    "mel_mean": float(mel_mean),
                    "mel_std": float(mel_std),
                    "losses": list(losses),
                }, Path(checkpoint_dir) / CHECKPOINT_FILE)
                checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir)
            ray.train.report(metrics, checkpoint=checkpoint)

    model.train()
    started = time.perf_counter()
    metrics: dict[str, float] = {"step": step}
    while step < config.steps:
        learning_rate = learning_rate_at(step, config)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate
        mel, texts, *conditions = next(batches)
        loss = diffusion.loss(model, mel.to(device), list(texts), generator=generator,
                              cond_dropout=config.cond_dropout, conditions=conditions[0] if conditions else None)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(raw_model.parameters(), config.grad_clip or math.inf)
        optimizer.step()
        update_ema(ema_model, raw_model, ema_decay_at(step, config.ema_decay))
        step += 1
        losses.append(_mean_over_ranks(loss.detach(), world_size))

        metrics = {"step": step, "loss": float(np.mean(losses[-config.log_every:])),
                   "learning_rate": learning_rate, "grad_norm": float(grad_norm),
                   "elapsed_s": time.perf_counter() - started}
        if step < config.steps and config.checkpoint_every and step % config.checkpoint_every == 0:
            save_and_report(metrics)
        elif step < config.steps and step % config.log_every == 0:
            ray.train.report(metrics)
        if (step % config.log_every == 0 or step == config.steps) and rank == 0:
            logger.info("step %d loss %.4f lr %.2e", step, metrics["loss"], learning_rate)
            _write_progress(loop_config.get("progress_path"), metrics, config.steps)
    save_and_report(metrics)  # the final checkpoint (also after a resume that had nothing left to do)


def _write_progress(path: str | None, metrics: dict[str, float], steps: int) -> None:
    """Rank 0's progress note for the driver: ``{"step", "steps", "loss"}``, written atomically."""
    if not path:
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(json.dumps({"step": int(metrics["step"]), "steps": steps, "loss": metrics.get("loss")}))
    os.replace(tmp, target)


class _poll_progress:
    """While training runs, read ``path`` every 0.5 s on a daemon thread and call ``progress``."""

    def __init__(self, path: Path, steps: int, progress: Callable[[str, int, int], None] | None) -> None:
        self.path, self.steps, self.progress = path, steps, progress
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "_poll_progress":
        if self.progress is not None:
            self.path.unlink(missing_ok=True)
            self.progress("training steps", 0, self.steps)
            self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.stop.set()
            self.thread.join(timeout=5)
            self._read()

    def _run(self) -> None:
        while not self.stop.wait(0.5):
            self._read()

    def _read(self) -> None:
        try:
            note = json.loads(self.path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return
        self.progress("training steps", int(note["step"]), int(note["steps"]))


def learning_rate_at(step: int, config: TrainConfig) -> float:
    """Linear warm-up to ``learning_rate`` over ``warmup_steps``, then half-cosine decay to
    ``min_learning_rate`` at ``steps`` (Loshchilov & Hutter 2017, SGDR; as in nanoGPT)."""
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / (config.warmup_steps + 1)
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    coefficient = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return config.min_learning_rate + coefficient * (config.learning_rate - config.min_learning_rate)


def ema_decay_at(step: int, ceiling: float) -> float:
    """EMA decay at ``step``: ``min(ceiling, (1 + step) / (10 + step))``, the ``num_updates`` warm-up
    of TensorFlow's ``ExponentialMovingAverage``, so short runs do not keep mostly initial weights."""
    return min(ceiling, (1.0 + step) / (10.0 + step))


@torch.no_grad()
def update_ema(ema_model: nn.Module, model: nn.Module, decay: float) -> None:
    """``ema ← decay · ema + (1 − decay) · θ`` for every parameter; buffers are copied."""
    for ema_param, param in zip(ema_model.parameters(), model.parameters(), strict=True):
        ema_param.lerp_(param.detach(), 1.0 - decay)
    for ema_buffer, buffer in zip(ema_model.buffers(), model.buffers(), strict=True):
        ema_buffer.copy_(buffer)


def _result(final_path: Path, config: TrainConfig) -> TrainResult:
    state = torch.load(final_path, map_location="cpu", weights_only=True, mmap=True)
    return TrainResult(checkpoint_path=final_path, step=int(state["step"]), losses=list(state["losses"]),
                       mel_mean=float(state["mel_mean"]), mel_std=float(state["mel_std"]),
                       config_sha256=config.sha256())


def _mean_over_ranks(value: torch.Tensor, world_size: int) -> float:
    """The mean of a scalar over all ranks (an all-reduce when there are several)."""
    if world_size > 1 and dist.is_available() and dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= world_size
    return float(value)


def _check_resumable(state: dict[str, Any], config: TrainConfig, dataset_id: str) -> None:
    """Refuse to continue a checkpoint written under another config or dataset."""
    if state.get("config_sha256") != config.sha256() or state.get("dataset_id") != dataset_id:
        raise ValueError(
            f"the run folder holds a checkpoint of dataset {state.get('dataset_id')!r} with config "
            f"{str(state.get('config_sha256'))[:12]}, not dataset {dataset_id!r} with config "
            f"{config.sha256()[:12]}: choose a new run_name or storage_path")
