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
import json
import logging
import math
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs
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

CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_FORMAT = 2
CHECKPOINT_DIR_PREFIX = "checkpoint_"
PROGRESS_FILE = "progress.json"
TENSORBOARD_DIR = "tensorboard"

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


class RunStorage:
    """A run folder ``storage_path/run_name`` on a pyarrow filesystem (local folder, s3://, gs://, file://).

    Raises:
        ValueError: (at construction) a URI pyarrow cannot open.
    """

    def __init__(self, storage_path: str, run_name: str) -> None:
        if "://" in str(storage_path):
            try:
                self.fs, base = pafs.FileSystem.from_uri(str(storage_path))
            except (ValueError, OSError) as err:  # pyarrow's ArrowInvalid is a ValueError
                raise ValueError(f"storage_path {storage_path!r} cannot be opened by pyarrow.fs: {err}") from err
            self.uri_prefix = str(storage_path).split("://", 1)[0] + "://"
        else:
            self.fs, base = pafs.LocalFileSystem(), str(Path(storage_path).expanduser().resolve())
            self.uri_prefix = ""
        self.storage_path, self.base, self.run_name = str(storage_path), base.rstrip("/"), run_name
        self.run_dir = f"{self.base}/{run_name}"
        self.is_local = isinstance(self.fs, pafs.LocalFileSystem)

    def path(self, *parts: str) -> str:
        return "/".join([self.run_dir, *parts])

    def uri(self, *parts: str) -> str:
        path = self.path(*parts)
        return f"{self.uri_prefix}{path}" if self.uri_prefix else path

    def exists(self, path: str) -> bool:
        return self.fs.get_file_info(path).type != pafs.FileType.NotFound

    def read_bytes(self, path: str) -> bytes:
        with self.fs.open_input_stream(path) as stream:
            return stream.read()

    def write_bytes(self, path: str, data: bytes) -> None:
        """Write via a temporary name and a move (atomic on a local disk)."""
        self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        tmp = f"{path.rsplit('/', 1)[0]}/.{path.rsplit('/', 1)[1]}.tmp"
        with self.fs.open_output_stream(tmp) as stream:
            stream.write(data)
        self.fs.move(tmp, path)

    def fetch(self, path: str) -> Path:
        """A local path of the file at ``path``: itself on a local disk, else a downloaded copy."""
        if self.is_local:
            return Path(path)
        local = Path(tempfile.mkdtemp(prefix="linernotes-ckpt-")) / Path(path).name
        local.write_bytes(self.read_bytes(path))
        return local

    def checkpoints(self) -> list[str]:
        """Paths of this run's ``checkpoint_*/checkpoint.pt`` files, oldest step first."""
        if not self.exists(self.run_dir):
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(self.run_dir, allow_not_found=True))
        names = sorted(info.base_name for info in infos
                       if info.type == pafs.FileType.Directory and info.base_name.startswith(CHECKPOINT_DIR_PREFIX))
        return [self.path(name, CHECKPOINT_FILE) for name in names if self.exists(self.path(name, CHECKPOINT_FILE))]


def train(shard_paths: list[str], dataset_id: str, mel_config: MelConfig, config: TrainConfig,
          storage_path: str, run_name: str,
          progress: Callable[[str, int, int], None] | None = None,
          stop_after_steps: int | None = None) -> TrainResult:
    """Train a ``MelUNet`` on the train shards of a dataset with Ray Train's ``TorchTrainer``.

    The caller has connected to Ray (``ray.init``). The log-mel statistics and the sample count are
    measured here, on the driver, with one pass over ``shard_paths``; the workers read the shards
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
        ValueError: no shards, a storage URI pyarrow cannot open, ``stop_after_steps < 1``, or a
            checkpoint of another config or dataset in the run folder (raised here, before Ray Train starts).
        FileNotFoundError: a shard does not exist.
        ray.train.TrainingFailedError: a worker failed (the cause is attached).
    """
    if not shard_paths:
        raise ValueError("shard_paths is empty: pass the dataset's train shards")
    if stop_after_steps is not None and stop_after_steps < 1:
        raise ValueError(f"stop_after_steps must be >= 1, got {stop_after_steps}")
    missing = [path for path in shard_paths if not Path(path).exists()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} shard(s) do not exist, e.g. {missing[0]}")
    storage = RunStorage(storage_path, run_name)
    final_path = storage.path("final", CHECKPOINT_FILE)
    if storage.exists(final_path):  # a finished run: check it is this run, then do no new work
        local = storage.fetch(final_path)
        state = torch.load(local, map_location="cpu", weights_only=True, mmap=True)
        _check_resumable(state, config, dataset_id)
        if int(state["step"]) >= config.steps:
            logger.info("run %s already finished at step %d: %s", run_name, state["step"], final_path)
            return _result(local, config, storage.uri("final", CHECKPOINT_FILE))
    existing = storage.checkpoints()
    if existing:  # an interrupted run: refuse another config or dataset before any cluster work
        state = torch.load(storage.fetch(existing[-1]), map_location="cpu", weights_only=True, mmap=True)
        _check_resumable(state, config, dataset_id)
        logger.info("resuming run %s from step %d", run_name, state["step"])
    stats = shard_statistics(shard_paths)
    loop_config = {
        "shard_paths": [str(Path(path).resolve()) for path in shard_paths],
        "dataset_id": dataset_id,
        "mel_config": mel_config.to_dict(),
        "config": config.to_dict(),
        "mel_mean": stats.mel_mean,
        "mel_std": stats.mel_std,
        "samples_per_epoch": config.samples_per_epoch or stats.num_samples,
        "storage_path": storage.storage_path,
        "run_name": run_name,
        "resume_from": existing[-1] if existing else None,
        "stop_after_steps": stop_after_steps,
    }
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
    with _poll_progress(storage, config.steps, progress):
        result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"run {run_name} finished without a checkpoint under {storage.storage_path}")
    checkpoint_path = f"{result.checkpoint.path.rstrip('/')}/{CHECKPOINT_FILE}"
    state = torch.load(storage.fetch(checkpoint_path), map_location="cpu", weights_only=True, mmap=True)
    if int(state["step"]) < config.steps:  # stopped early: the newest checkpoint is the result
        return _result(storage.fetch(checkpoint_path), config, storage.uri(*checkpoint_path[len(storage.run_dir) + 1:]
                                                                           .split("/")))
    storage.write_bytes(final_path, storage.read_bytes(checkpoint_path))
    return _result(storage.fetch(final_path), config, storage.uri("final", CHECKPOINT_FILE))


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """One rank's training loop (run by Ray Train; ``loop_config`` is built by ``train``)."""
    config = TrainConfig(**loop_config["config"])
    mel_config = MelConfig(**loop_config["mel_config"])
    dataset_id, mel_mean, mel_std = loop_config["dataset_id"], loop_config["mel_mean"], loop_config["mel_std"]
    storage = RunStorage(loop_config["storage_path"], loop_config["run_name"])
    stop_at = min(config.steps, loop_config.get("stop_after_steps") or config.steps)
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()

    # model (identical initial weights on every rank), its EMA copy, the diffusion process
    torch.manual_seed(config.seed)
    raw_model = build_model(config, mel_config.n_mels)
    ema_model = copy.deepcopy(raw_model).requires_grad_(False)
    diffusion = build_parameterization(config)

    # resume from the newest checkpoint: Ray Train's (a restart after a failure), else the run folder's
    step, losses, optimizer_state = 0, [], None
    state = None
    resume = ray.train.get_checkpoint()
    if resume is not None:
        with resume.as_directory() as checkpoint_dir:
            state = torch.load(Path(checkpoint_dir) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    elif loop_config.get("resume_from"):
        state = torch.load(storage.fetch(loop_config["resume_from"]), map_location="cpu", weights_only=True)
    if state is not None:
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

    # data: this rank's share of the shards, continuing exactly where the checkpoint left it
    stream = MelBatchStream(loop_config["shard_paths"], mel_mean, mel_std, config.crop_frames,
                            mel_config.log_floor, batch_size=config.batch_size, seed=config.seed,
                            samples_per_epoch=loop_config["samples_per_epoch"], rank=rank, world_size=world_size,
                            shuffle_buffer=config.shuffle_buffer, start_batch=step)
    batches = iter(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=config.num_loader_workers,
                                               pin_memory=device.type == "cuda"))
    generator = torch.Generator(device=device)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and config.bf16
                else nullcontext())
    board = _TensorBoard(storage, step) if rank == 0 and config.tensorboard else None

    def data_position() -> dict[str, Any]:
        return {"batches_consumed_per_rank": step, "batch_size": config.batch_size, "world_size": world_size,
                "num_loader_workers": config.num_loader_workers, "samples_per_epoch": loop_config["samples_per_epoch"],
                "seed": config.seed}

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
                    "data_position": data_position(),
                }, Path(checkpoint_dir) / CHECKPOINT_FILE)
                checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir)
                if board is not None:
                    board.sync()
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"{CHECKPOINT_DIR_PREFIX}{step:09d}")

    model.train()
    started = window_start = time.perf_counter()
    window_steps, data_wait_s = 0, 0.0
    metrics: dict[str, float] = {"step": step}
    while step < stop_at:
        learning_rate = learning_rate_at(step, config)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate
        wait_start = time.perf_counter()
        batch = next(batches)
        data_wait_s += time.perf_counter() - wait_start
        step_seed = int(np.random.SeedSequence([config.seed, step, rank]).generate_state(1)[0])
        generator.manual_seed(step_seed)
        torch.manual_seed(step_seed)  # any randomness drawn from the global RNG (dropout) is per-step too
        with autocast:
            conditions = (torch.from_numpy(np.stack([encode_conditions(meta) for meta in batch["meta"]]))
                          if config.musical_conditioning else None)
            loss = diffusion.loss(model, batch["mel"].to(device, non_blocking=True), list(batch["text"]),
                                  generator=generator, cond_dropout=config.cond_dropout, conditions=conditions)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(raw_model.parameters(), config.grad_clip or math.inf)
        optimizer.step()
        update_ema(ema_model, raw_model, ema_decay_at(step, config.ema_decay))
        step += 1
        window_steps += 1
        losses.append(_mean_over_ranks(loss.detach().float(), world_size))

        if step % config.log_every == 0 or step == stop_at:
            elapsed = time.perf_counter() - window_start
            metrics = {"step": step, "loss": float(np.mean(losses[-config.log_every:])),
                       "learning_rate": learning_rate, "grad_norm": float(grad_norm),
                       "samples_per_s": window_steps * config.batch_size * world_size / max(elapsed, 1e-9),
                       "data_wait_fraction": data_wait_s / max(elapsed, 1e-9),
                       "elapsed_s": time.perf_counter() - started, **_gpu_metrics(device)}
            window_start, window_steps, data_wait_s = time.perf_counter(), 0, 0.0
            if rank == 0:
                logger.info("step %d loss %.4f lr %.2e %.1f samples/s", step, metrics["loss"], learning_rate,
                            metrics["samples_per_s"])
                if board is not None:
                    board.log(metrics, step)
                _write_progress(storage, metrics, config.steps)
        if step < stop_at and config.checkpoint_every and step % config.checkpoint_every == 0:
            save_and_report(metrics)
        elif step < stop_at and step % config.log_every == 0:
            ray.train.report(metrics)
    save_and_report(metrics)  # the last checkpoint (also after a resume that had nothing left to do)
    if board is not None:
        board.close()


class _TensorBoard:
    """Rank 0's ``torch.utils.tensorboard`` writer for ``<run>/tensorboard``.

    On a local storage it writes there directly; on a remote one it writes to a local folder that
    ``sync()`` copies to the storage (at every checkpoint and at the end). A resumed run purges
    events after its resume step, so TensorBoard shows one continuous curve.
    """

    def __init__(self, storage: RunStorage, step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.storage = storage
        self.local_dir = (Path(storage.path(TENSORBOARD_DIR)) if storage.is_local
                          else Path(tempfile.mkdtemp(prefix="linernotes-tb-")))
        self.writer = SummaryWriter(log_dir=str(self.local_dir), purge_step=step if step else None)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for name in ("loss", "learning_rate", "samples_per_s", "grad_norm", "data_wait_fraction"):
            self.writer.add_scalar(f"train/{name}", metrics[name], step)
        for name, value in metrics.items():
            if name.startswith("gpu_"):
                self.writer.add_scalar(f"gpu/{name[4:]}", value, step)
        self.writer.flush()

    def sync(self) -> None:
        self.writer.flush()
        if not self.storage.is_local:
            self.storage.fs.create_dir(self.storage.path(TENSORBOARD_DIR), recursive=True)
            pafs.copy_files(str(self.local_dir), self.storage.path(TENSORBOARD_DIR),
                            source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self.storage.fs)

    def close(self) -> None:
        self.sync()
        self.writer.close()


def _gpu_metrics(device: torch.device) -> dict[str, float]:
    """On CUDA: allocated and peak memory (GiB) and, when NVML is available, utilization (%)."""
    if device.type != "cuda":
        return {}
    metrics = {"gpu_memory_allocated_gib": torch.cuda.memory_allocated(device) / 2**30,
               "gpu_max_memory_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30}
    try:
        metrics["gpu_utilization_pct"] = float(torch.cuda.utilization(device))
    except Exception:  # noqa: BLE001 - NVML (pynvml) missing or unsupported: report memory only
        pass
    return metrics


def _write_progress(storage: RunStorage, metrics: dict[str, float], steps: int) -> None:
    """Rank 0's progress note for the driver: ``{"step", "steps", "loss"}`` in the run folder."""
    try:
        storage.write_bytes(storage.path(PROGRESS_FILE), json.dumps(
            {"step": int(metrics["step"]), "steps": steps, "loss": metrics.get("loss")}).encode())
    except OSError as err:  # progress is a convenience; never fail training over it
        logger.warning("could not write progress: %s", err)


class _poll_progress:
    """While training runs, read the run's progress note every 0.5 s on a daemon thread; call ``progress``."""

    def __init__(self, storage: RunStorage, steps: int, progress: Callable[[str, int, int], None] | None) -> None:
        self.storage, self.steps, self.progress = storage, steps, progress
        self.path = storage.path(PROGRESS_FILE)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "_poll_progress":
        if self.progress is not None:
            try:
                self.storage.fs.delete_file(self.path)
            except (FileNotFoundError, OSError):
                pass
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
            note = json.loads(self.storage.read_bytes(self.path))
        except (FileNotFoundError, OSError, json.JSONDecodeError):
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
