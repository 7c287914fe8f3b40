"""What a training run reports while it goes: rank 0's progress note and TensorBoard scalars, GPU
metrics, and the driver's poller that turns the note into ``progress(...)`` calls.

Both files live in the run folder (``training.run_storage.RunStorage``): ``progress.json`` and
``tensorboard/``.
"""

from __future__ import annotations

import json
import logging
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import pyarrow.fs as pafs
import torch

from training.run_storage import RunStorage

PROGRESS_FILE = "progress.json"
TENSORBOARD_DIR = "tensorboard"

logger = logging.getLogger(__name__)


class TensorBoardWriter:
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


def gpu_metrics(device: torch.device) -> dict[str, float]:
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


def write_progress(storage: RunStorage, metrics: dict[str, float], steps: int) -> None:
    """Rank 0's progress note for the driver: ``{"step", "steps", "loss"}`` in the run folder."""
    try:
        storage.write_bytes(storage.path(PROGRESS_FILE), json.dumps(
            {"step": int(metrics["step"]), "steps": steps, "loss": metrics.get("loss")}).encode())
    except OSError as err:  # progress is a convenience; never fail training over it
        logger.warning("could not write progress: %s", err)


class ProgressPoller:
    """While training runs, read the run's progress note every 0.5 s on a daemon thread; call ``progress``.

    A context manager around ``TorchTrainer.fit()``; does nothing when ``progress`` is None.
    """

    def __init__(self, storage: RunStorage, steps: int, progress: Callable[[str, int, int], None] | None) -> None:
        self.storage, self.steps, self.progress = storage, steps, progress
        self.path = storage.path(PROGRESS_FILE)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "ProgressPoller":
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
