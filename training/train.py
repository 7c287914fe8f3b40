"""Diffusion training on Ray Train: ``train()`` on the driver, ``train_loop_per_worker`` on every rank.

The loop reads top to bottom (nanoGPT style): build the model, optimizer and EMA copy, restore from the
latest checkpoint if there is one, then step: warm-up + cosine learning rate, denoising loss (ε or v
target) with condition dropout (Ho et al. 2020; Ho & Salimans 2022) under bf16 autocast on GPU, gradient
clipping, AdamW (Loshchilov & Hutter 2019), EMA update, TensorBoard scalars and a Ray Train report every
``log_every`` steps, a checkpoint every ``checkpoint_every`` steps. Data-parallel ranks are DDP
(``ray.train.torch.prepare_model``; gloo on CPU, NCCL on GPU).

Ray Train is the V2 API (``RAY_TRAIN_V2_ENABLED`` defaults to on in Ray 2.60; setting it to ``0`` selects
the legacy V1 and is not supported here). Run state and checkpoints go to ``storage_path/run_name``,
a local folder or any pyarrow filesystem URI (``s3://``, ``gs://``, ``file://``).

**Checkpoints and exact resume.** A checkpoint (``checkpoint_NNNNNNNNN/checkpoint.pt``) holds the model,
EMA and optimizer state, the step, the data position (batches consumed per rank and the reader layout,
see ``training.data.MelBatchStream``), the config, the dataset id and the normalisation statistics.
Re-running with the same ``storage_path`` and ``run_name``: a finished run (``final/checkpoint.pt``
exists) is returned without starting Ray Train; an interrupted one continues from its newest checkpoint.
The noise, timesteps and condition dropout of step ``s`` on rank ``r`` come from generators seeded with
``(seed, s, r)`` and the data stream resumes at its exact position, so N steps + a resume for N more give
the same losses and weights as 2N steps straight (bit-exact on CPU). A checkpoint from another config or
dataset raises ``ValueError``.
"""

from __future__ import annotations

import copy
import logging
import math
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
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
from training.conditioning import encode_conditions
from training.config import TrainConfig
from training.data import MelBatchStream, shard_statistics
from training.model import build_model
from training.objectives import build_parameterization
from training.parameterization import Parameterization
from training.progress import PROGRESS_FILE, TENSORBOARD_DIR, ProgressPoller, TensorBoardWriter, gpu_metrics, \
    write_progress
from training.run_storage import CHECKPOINT_DIR_PREFIX, CHECKPOINT_FILE, RunStorage
from training.schedule import ema_decay_at, learning_rate_at, update_ema

__all__ = ["CHECKPOINT_DIR_PREFIX", "CHECKPOINT_FILE", "CHECKPOINT_FORMAT", "PROGRESS_FILE", "TENSORBOARD_DIR",
           "RunStorage", "TrainResult", "ema_decay_at", "learning_rate_at", "train", "train_loop_per_worker",
           "update_ema"]

CHECKPOINT_FORMAT = 2

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    """What a run left behind.

    Attributes:
        checkpoint_path: a local ``checkpoint.pt``: ``storage_path/run_name/final/checkpoint.pt`` for a
            finished run in a local folder; the newest ``checkpoint_*`` of a run stopped early
            (``stop_after_steps``); a downloaded copy when the storage is remote.
        step: optimizer steps taken (``== config.steps`` unless stopped early).
        losses: training loss of every step (mean over ranks), float, length ``step``.
        mel_mean, mel_std: the log-mel normalisation statistics of the train shards.
        config_sha256: ``TrainConfig.sha256()``, for the Checkpoint record.
        checkpoint_uri: where the checkpoint lives in the storage (a path, or a URI for remote storage).
        finished: ``step >= config.steps``.
    """

    checkpoint_path: Path
    step: int
    losses: list[float] = field(repr=False)
    mel_mean: float
    mel_std: float
    config_sha256: str
    checkpoint_uri: str = ""
    finished: bool = True


def train(shard_paths: list[str], dataset_id: str, mel_config: MelConfig, config: TrainConfig,
          storage_path: str, run_name: str,
          progress: Callable[[str, int, int], None] | None = None,
          stop_after_steps: int | None = None) -> TrainResult:
    """Train a ``MelUNet`` on the train shards of a dataset with Ray Train's ``TorchTrainer``.

    The caller has connected to Ray (``ray.init``). The log-mel statistics and the sample count (of the
    examples ``config.source`` names: mixtures, or stems) are measured here, on the driver, with one pass over
    ``shard_paths``; the workers read the shards
    themselves, so the paths must be visible to every worker (a shared file system on a cluster).

    Args:
        shard_paths: the dataset's train WebDataset tars (local paths).
        dataset_id: the Dataset record's key, saved in the checkpoint.
        mel_config: the parameters the shards' ``mel.npy`` were computed with.
        config: hyper-parameters and resources (``num_workers``, ``use_gpu``).
        storage_path: Ray Train's storage: a local folder or a pyarrow URI (``s3://``, ``gs://``,
            ``file://``) every worker can reach.
        run_name: the run's folder under ``storage_path``; reusing it resumes or returns the finished
            run (see the module doc).
        progress: called as ``("training steps", step, steps)`` while the run goes.
        stop_after_steps: checkpoint and stop once the run reaches this step (a planned preemption, or a
            time-sliced job); the next call with the same run name continues. None: run to ``steps``.

    Returns:
        The checkpoint's path, step count, per-step losses and normalisation statistics.

    Raises:
        training.stems.NoStemsError: ``config.source == "stems"`` on shards without stem members (raised here,
            before Ray Train starts).
        ValueError: no shards, a storage URI pyarrow cannot open, ``stop_after_steps < 1``, or a
            checkpoint of another config or dataset in the run folder (raised here, before Ray Train starts).
        FileNotFoundError: a shard does not exist.
        ray.train.TrainingFailedError: a worker failed (the cause is attached).
    """
    _check_inputs(shard_paths, stop_after_steps)
    storage = RunStorage(storage_path, run_name)
    finished = _finished_run(storage, config, dataset_id)
    if finished is not None:  # a finished run of this config and dataset: no new work
        return finished
    existing = storage.checkpoints()
    if existing:  # an interrupted run: refuse another config or dataset before any cluster work
        state = torch.load(storage.fetch(existing[-1]), map_location="cpu", weights_only=True, mmap=True)
        _check_resumable(state, config, dataset_id)
        logger.info("resuming run %s from step %d", run_name, state["step"])
    loop_config = _loop_config(shard_paths, dataset_id, mel_config, config, storage,
                               resume_from=existing[-1] if existing else None, stop_after_steps=stop_after_steps)
    trainer = ray.train.torch.TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=config.num_workers, use_gpu=config.use_gpu),
        run_config=ray.train.RunConfig(
            storage_path=storage.base, storage_filesystem=storage.fs, name=run_name,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.num_checkpoints_kept),
            failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
        ),
    )
    with ProgressPoller(storage, config.steps, progress):
        result = trainer.fit()
    return _collect_result(storage, result.checkpoint, config)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """One rank's training loop (run by Ray Train; ``loop_config`` is built by ``train``).

    Builds or restores this rank's state (``_start_rank``), then takes optimizer steps until
    ``stop_after_steps`` (or ``steps``): metrics every ``log_every`` steps, a checkpoint every
    ``checkpoint_every`` steps and one at the end. Module-level, so that Ray Train can pickle it.
    """
    run = _start_rank(loop_config)
    config = run.config
    stop_at = min(config.steps, loop_config.get("stop_after_steps") or config.steps)
    batches = _open_batches(run)
    generator = torch.Generator(device=run.device)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if run.device.type == "cuda" and config.bf16
                else nullcontext())
    run.board = TensorBoardWriter(run.storage, run.step) if run.rank == 0 and config.tensorboard else None

    run.model.train()
    throughput = _Throughput()
    metrics: dict[str, float] = {"step": run.step}
    while run.step < stop_at:
        learning_rate = learning_rate_at(run.step, config)
        for group in run.optimizer.param_groups:
            group["lr"] = learning_rate
        batch = throughput.next_batch(batches)
        grad_norm = _train_step(run, batch, generator, autocast)

        if run.step % config.log_every == 0 or run.step == stop_at:
            metrics = {"step": run.step, "loss": float(np.mean(run.losses[-config.log_every:])),
                       "learning_rate": learning_rate, "grad_norm": float(grad_norm),
                       **throughput.measure(config.batch_size * run.world_size), **gpu_metrics(run.device)}
            _log_metrics(run, metrics)
        if run.step < stop_at and config.checkpoint_every and run.step % config.checkpoint_every == 0:
            _save_and_report(run, metrics)
        elif run.step < stop_at and run.step % config.log_every == 0:
            ray.train.report(metrics)
    _save_and_report(run, metrics)  # the last checkpoint (also after a resume that had nothing left to do)
    if run.board is not None:
        run.board.close()


@dataclass
class _Rank:
    """One rank's training run: what ``train_loop_per_worker`` steps, and what a checkpoint saves.

    Attributes:
        loop_config: the driver's settings (``train``'s ``_loop_config``).
        raw_model: the ``MelUNet``; ``model`` is the same module prepared by Ray Train (DDP when
            ``world_size > 1``), the one the loss is computed through.
        ema_model: the EMA copy of ``raw_model``'s weights (on ``device``, no gradients).
        step: optimizer steps taken (``== batches_consumed_per_rank``).
        losses: the training loss of every step so far (mean over ranks).
        board: rank 0's TensorBoard writer, when ``config.tensorboard``.
    """

    loop_config: dict[str, Any]
    config: TrainConfig
    mel_config: MelConfig
    storage: RunStorage
    rank: int
    world_size: int
    device: torch.device
    raw_model: nn.Module
    ema_model: nn.Module
    model: nn.Module
    diffusion: Parameterization
    optimizer: torch.optim.Optimizer
    step: int = 0
    losses: list[float] = field(default_factory=list)
    board: TensorBoardWriter | None = None


def _start_rank(loop_config: dict[str, Any]) -> _Rank:
    """This rank's model (identical initial weights on every rank), EMA copy, diffusion process and
    AdamW optimizer (Loshchilov & Hutter 2019), restored from the newest checkpoint when there is one.

    Raises:
        ValueError: the checkpoint is of another config or dataset.
    """
    config = TrainConfig(**loop_config["config"])
    mel_config = MelConfig(**loop_config["mel_config"])
    storage = RunStorage(loop_config["storage_path"], loop_config["run_name"])
    context = ray.train.get_context()
    device = ray.train.torch.get_device()

    torch.manual_seed(config.seed)
    raw_model = build_model(config, mel_config.n_mels)
    ema_model = copy.deepcopy(raw_model).requires_grad_(False)
    diffusion = build_parameterization(config)

    step, losses, optimizer_state = 0, [], None
    state = _resume_state(loop_config, storage)
    if state is not None:
        _check_resumable(state, config, loop_config["dataset_id"])
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
    return _Rank(loop_config=loop_config, config=config, mel_config=mel_config, storage=storage,
                 rank=context.get_world_rank(), world_size=context.get_world_size(), device=device,
                 raw_model=raw_model, ema_model=ema_model, model=model, diffusion=diffusion, optimizer=optimizer,
                 step=step, losses=losses)


def _resume_state(loop_config: dict[str, Any], storage: RunStorage) -> dict[str, Any] | None:
    """The newest checkpoint's state: Ray Train's (a restart after a failure), else the run folder's
    (``resume_from``, found by the driver); None for a fresh run."""
    resume = ray.train.get_checkpoint()
    if resume is not None:
        with resume.as_directory() as checkpoint_dir:
            return torch.load(Path(checkpoint_dir) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    if loop_config.get("resume_from"):
        return torch.load(storage.fetch(loop_config["resume_from"]), map_location="cpu", weights_only=True)
    return None


def _open_batches(run: _Rank) -> Iterator[dict[str, Any]]:
    """This rank's share of the shards, continuing exactly where the checkpoint left it (``start_batch``)."""
    config, loop_config = run.config, run.loop_config
    stream = MelBatchStream(loop_config["shard_paths"], loop_config["mel_mean"], loop_config["mel_std"],
                            config.crop_frames, run.mel_config.log_floor, batch_size=config.batch_size,
                            seed=config.seed, samples_per_epoch=loop_config["samples_per_epoch"], rank=run.rank,
                            world_size=run.world_size, shuffle_buffer=config.shuffle_buffer, start_batch=run.step,
                            source=config.source, mel_config=run.mel_config)
    return iter(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=config.num_loader_workers,
                                            pin_memory=run.device.type == "cuda"))


def _train_step(run: _Rank, batch: dict[str, Any], generator: torch.Generator,
                autocast: AbstractContextManager[Any]) -> torch.Tensor:
    """One optimizer step on ``batch``; advances ``run.step`` and appends the loss to ``run.losses``.

    The noise, timesteps and condition dropout come from generators seeded with ``(seed, step, rank)``,
    so a resumed run draws what a straight run would. Returns the gradient norm before clipping.
    """
    config = run.config
    step_seed = int(np.random.SeedSequence([config.seed, run.step, run.rank]).generate_state(1)[0])
    generator.manual_seed(step_seed)
    torch.manual_seed(step_seed)  # any randomness drawn from the global RNG (dropout) is per-step too
    with autocast:
        conditions = (torch.from_numpy(np.stack([encode_conditions(meta) for meta in batch["meta"]]))
                      if config.musical_conditioning else None)
        loss = run.diffusion.loss(run.model, batch["mel"].to(run.device, non_blocking=True), list(batch["text"]),
                                  generator=generator, cond_dropout=config.cond_dropout, conditions=conditions)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = nn.utils.clip_grad_norm_(run.raw_model.parameters(), config.grad_clip or math.inf)
    run.optimizer.step()
    update_ema(run.ema_model, run.raw_model, ema_decay_at(run.step, config.ema_decay))
    run.step += 1
    run.losses.append(_mean_over_ranks(loss.detach().float(), run.world_size))
    return grad_norm


class _Throughput:
    """Wall-clock of one logging window: samples per second and the fraction of it spent waiting for data."""

    def __init__(self) -> None:
        self.started = self.window_start = time.perf_counter()
        self.window_steps, self.data_wait_s = 0, 0.0

    def next_batch(self, batches: Iterator[dict[str, Any]]) -> dict[str, Any]:
        """The next batch (one per step), timing the wait for it."""
        wait_start = time.perf_counter()
        batch = next(batches)
        self.data_wait_s += time.perf_counter() - wait_start
        self.window_steps += 1
        return batch

    def measure(self, samples_per_step: int) -> dict[str, float]:
        """``samples_per_s``, ``data_wait_fraction`` of the window and ``elapsed_s`` of the run; starts a new window."""
        elapsed = time.perf_counter() - self.window_start
        metrics = {"samples_per_s": self.window_steps * samples_per_step / max(elapsed, 1e-9),
                   "data_wait_fraction": self.data_wait_s / max(elapsed, 1e-9),
                   "elapsed_s": time.perf_counter() - self.started}
        self.window_start, self.window_steps, self.data_wait_s = time.perf_counter(), 0, 0.0
        return metrics


def _log_metrics(run: _Rank, metrics: dict[str, float]) -> None:
    """Rank 0: the log line, the TensorBoard scalars and the progress note for the driver."""
    if run.rank != 0:
        return
    logger.info("step %d loss %.4f lr %.2e %.1f samples/s", run.step, metrics["loss"], metrics["learning_rate"],
                metrics["samples_per_s"])
    if run.board is not None:
        run.board.log(metrics, run.step)
    write_progress(run.storage, metrics, run.config.steps)


def _save_and_report(run: _Rank, metrics: dict[str, float]) -> None:
    """Report with a checkpoint written by rank 0 (every rank must call this together)."""
    with tempfile.TemporaryDirectory() as checkpoint_dir:
        checkpoint = None
        if run.rank == 0:
            torch.save(_checkpoint_state(run), Path(checkpoint_dir) / CHECKPOINT_FILE)
            checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir)
            if run.board is not None:
                run.board.sync()
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"{CHECKPOINT_DIR_PREFIX}{run.step:09d}")


def _checkpoint_state(run: _Rank) -> dict[str, Any]:
    """What ``checkpoint.pt`` holds (format ``CHECKPOINT_FORMAT``; see the module doc)."""
    config, loop_config = run.config, run.loop_config
    return {
        "format": CHECKPOINT_FORMAT,
        "model_kwargs": run.raw_model.model_kwargs,
        "model_state": run.raw_model.state_dict(),
        "ema_state": run.ema_model.state_dict(),
        "optimizer_state": run.optimizer.state_dict(),
        "step": run.step,
        "config": config.to_dict(),
        "config_sha256": config.sha256(),
        "mel_config": run.mel_config.to_dict(),
        "dataset_id": loop_config["dataset_id"],
        "mel_mean": float(loop_config["mel_mean"]),
        "mel_std": float(loop_config["mel_std"]),
        "losses": list(run.losses),
        "data_position": {"batches_consumed_per_rank": run.step, "batch_size": config.batch_size,
                          "world_size": run.world_size, "num_loader_workers": config.num_loader_workers,
                          "samples_per_epoch": loop_config["samples_per_epoch"], "seed": config.seed},
    }


def _check_inputs(shard_paths: list[str], stop_after_steps: int | None) -> None:
    """Raise ``ValueError`` (no shards, ``stop_after_steps < 1``) or ``FileNotFoundError`` (a missing shard)."""
    if not shard_paths:
        raise ValueError("shard_paths is empty: pass the dataset's train shards")
    if stop_after_steps is not None and stop_after_steps < 1:
        raise ValueError(f"stop_after_steps must be >= 1, got {stop_after_steps}")
    missing = [path for path in shard_paths if not Path(path).exists()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} shard(s) do not exist, e.g. {missing[0]}")


def _finished_run(storage: RunStorage, config: TrainConfig, dataset_id: str) -> TrainResult | None:
    """The result of this run when ``final/checkpoint.pt`` holds all ``config.steps``, else None.

    Raises:
        ValueError: the final checkpoint is of another config or dataset.
    """
    final_path = storage.path("final", CHECKPOINT_FILE)
    if not storage.exists(final_path):
        return None
    local = storage.fetch(final_path)
    state = torch.load(local, map_location="cpu", weights_only=True, mmap=True)
    _check_resumable(state, config, dataset_id)
    if int(state["step"]) < config.steps:
        return None
    logger.info("run %s already finished at step %d: %s", storage.run_name, state["step"], final_path)
    return _result(local, config, storage.uri("final", CHECKPOINT_FILE))


def _loop_config(shard_paths: list[str], dataset_id: str, mel_config: MelConfig, config: TrainConfig,
                 storage: RunStorage, resume_from: str | None, stop_after_steps: int | None) -> dict[str, Any]:
    """The settings every rank gets (plain data, pickled by Ray Train), with the log-mel statistics and the
    sample count measured here, on the driver, in one pass over ``shard_paths``."""
    stats = shard_statistics(shard_paths, config.source, mel_config)
    return {
        "shard_paths": [str(Path(path).resolve()) for path in shard_paths],
        "dataset_id": dataset_id,
        "mel_config": mel_config.to_dict(),
        "config": config.to_dict(),
        "mel_mean": stats.mel_mean,
        "mel_std": stats.mel_std,
        "samples_per_epoch": config.samples_per_epoch or stats.num_samples,
        "storage_path": storage.storage_path,
        "run_name": storage.run_name,
        "resume_from": resume_from,
        "stop_after_steps": stop_after_steps,
    }


def _collect_result(storage: RunStorage, checkpoint: ray.train.Checkpoint | None, config: TrainConfig) -> TrainResult:
    """The result of ``TorchTrainer.fit()``: its newest checkpoint when the run stopped early, else that
    checkpoint copied to ``final/checkpoint.pt``."""
    if checkpoint is None:
        raise RuntimeError(f"run {storage.run_name} finished without a checkpoint under {storage.storage_path}")
    checkpoint_path = f"{checkpoint.path.rstrip('/')}/{CHECKPOINT_FILE}"
    state = torch.load(storage.fetch(checkpoint_path), map_location="cpu", weights_only=True, mmap=True)
    if int(state["step"]) < config.steps:  # stopped early: the newest checkpoint is the result
        relative = checkpoint_path[len(storage.run_dir) + 1:].split("/")
        return _result(storage.fetch(checkpoint_path), config, storage.uri(*relative))
    final_path = storage.path("final", CHECKPOINT_FILE)
    storage.write_bytes(final_path, storage.read_bytes(checkpoint_path))
    return _result(storage.fetch(final_path), config, storage.uri("final", CHECKPOINT_FILE))


def _result(local_path: Path, config: TrainConfig, uri: str = "") -> TrainResult:
    state = torch.load(local_path, map_location="cpu", weights_only=True, mmap=True)
    step = int(state["step"])
    return TrainResult(checkpoint_path=Path(local_path), step=step, losses=list(state["losses"]),
                       mel_mean=float(state["mel_mean"]), mel_std=float(state["mel_std"]),
                       config_sha256=config.sha256(), checkpoint_uri=uri or str(local_path),
                       finished=step >= config.steps)


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
