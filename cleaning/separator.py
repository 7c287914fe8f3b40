"""A small demucs separator for blind cleaning and its evaluation: build, train on stem windows by random
mixing, save and load as a demucs package, and its per-example separation loss.

The model is ``demucs.demucs.Demucs`` (Défossez et al., "Music Source Separation in the Waveform Domain",
2019) in a tiny configuration. A saved separator is demucs's own package (``klass``, ``args``,
``kwargs``, ``state``), so ``demucs.states.load_model`` and ``demucs.apply.apply_model`` use it directly.

Examples are fixed-length windows at ``sample_rate_hz``, mono. A batch is a dict of tensors:

- ``mixture``: float32 ``(B, 1, T)``;
- ``targets``: float32 ``(B, S, 1, T)``, one per source of the separator;
- ``mask``: float32 ``(B, S)``, 1 for the sources the example's loss covers.

``SeparationLoss`` is the per-example loss of DESIGN.md (``provenance.unlearning.PerExampleLoss``): the L1
separation loss per example, mean over the masked sources' samples, float32 ``(B,)``.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from demucs.demucs import Demucs

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class SeparatorSpec:
    """A tiny demucs configuration.

    Attributes:
        sources: output names, e.g. ``("bass", "drums", "other", "vocals")``.
        sample_rate_hz: rate of the windows.
        channels: width of the first encoder layer (demucs uses 64; 8 trains in seconds on a CPU).
        depth: encoder/decoder layers (each divides time by ``stride`` = 4).
    """

    sources: tuple[str, ...]
    sample_rate_hz: int = 16000
    channels: int = 8
    depth: int = 3


def build_separator(spec: SeparatorSpec, seed: int = 0) -> Demucs:
    """A freshly initialised mono ``Demucs`` for ``spec`` (weights from ``torch.manual_seed(seed)``).

    Raises:
        ValueError: no sources, or a non-positive size.
    """
    if not spec.sources or spec.channels < 1 or spec.depth < 1 or spec.sample_rate_hz < 1:
        raise ValueError(f"bad separator spec {spec}")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return Demucs(sources=list(spec.sources), audio_channels=1, channels=spec.channels, depth=spec.depth,
                      samplerate=spec.sample_rate_hz, segment=4, lstm_layers=0, resample=False, dconv_mode=0,
                      norm_starts=spec.depth + 1, rewrite=False, glu=False)


def save_separator(model: torch.nn.Module, path: str | os.PathLike[str]) -> str:
    """Write ``model`` as a demucs package (``demucs.states.serialize_model``'s layout) atomically.

    Returns:
        sha256 hex digest of the written file (the separator's checksum in lineage).
    """
    args, kwargs = model._init_args_kwargs  # recorded by demucs's @capture_init
    package = {"klass": model.__class__, "args": args, "kwargs": kwargs, "training_args": {},
               "state": {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}}
    buffer = io.BytesIO()
    torch.save(package, buffer)
    data = buffer.getvalue()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return hashlib.sha256(data).hexdigest()


def stem_example(stem: np.ndarray, source_index: int, accompaniment: np.ndarray, num_sources: int) -> dict[str, np.ndarray]:
    """One training example: a stem window mixed with an accompaniment, the stem the target of its source.

    Args:
        stem: float32 ``(T,)`` mono window; the target of source ``source_index``.
        accompaniment: float32 ``(S, T)``: the other sources' windows (row ``source_index`` ignored).

    Returns:
        ``mixture`` ``(1, T)``, ``targets`` ``(S, 1, T)``, ``mask`` ``(S,)`` one-hot at ``source_index``.
    """
    targets = np.array(accompaniment, dtype=np.float32, copy=True)
    targets[source_index] = stem
    mask = np.zeros(num_sources, dtype=np.float32)
    mask[source_index] = 1.0
    return {"mixture": targets.sum(axis=0, keepdims=True), "targets": targets[:, None, :], "mask": mask}


def mixture_example(sources: np.ndarray) -> dict[str, np.ndarray]:
    """One example of a real multitrack: ``sources`` float32 ``(S, T)`` (zeros for an absent source).

    The mixture is their sum; the mask covers every source that is not all zero.
    """
    sources = np.asarray(sources, dtype=np.float32)
    mask = (np.abs(sources).max(axis=1) > 0).astype(np.float32)
    return {"mixture": sources.sum(axis=0, keepdims=True), "targets": sources[:, None, :], "mask": mask}


def collate(examples: Sequence[dict[str, np.ndarray]]) -> Batch:
    """Stack examples into a batch of float32 tensors."""
    return {key: torch.from_numpy(np.stack([e[key] for e in examples]).astype(np.float32))
            for key in ("mixture", "targets", "mask")}


def batches(examples: Sequence[dict[str, np.ndarray]], batch_size: int) -> list[Batch]:
    """Examples in order, ``batch_size`` at a time (the last batch may be smaller)."""
    return [collate(examples[i:i + batch_size]) for i in range(0, len(examples), batch_size)]


class SeparationLoss:
    """Per-example L1 separation loss: mean ``|ŷ_s − y_s|`` over the samples of the masked sources.

    ``__call__(model, batch) -> float32 (B,)``, differentiable w.r.t. the model's parameters; no
    randomness (the batch fixes mixture and targets), so before and after an update see the same inputs.
    """

    def __call__(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        estimate = model(batch["mixture"])  # (B, S, 1, T)
        error = (estimate - batch["targets"]).abs().mean(dim=(2, 3))  # (B, S)
        mask = batch["mask"]
        return (error * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


class RandomMixer:
    """Random-mix training data from a pool of stem windows (the usual separation augmentation).

    Each example draws one window per source from the pool (a source with no windows stays silent),
    sums them into a mixture, and asks for every drawn source back.

    Args:
        windows: per source, float32 ``(n_s, T)`` (``n_s`` may be 0).
        seed: numpy seed of the draws.
    """

    def __init__(self, windows: Sequence[np.ndarray], seed: int = 0) -> None:
        self.windows = [np.asarray(w, dtype=np.float32) for w in windows]
        lengths = {w.shape[1] for w in self.windows if len(w)}
        if len(lengths) != 1:
            raise ValueError(f"windows must share one length and not all be empty, got lengths {lengths}")
        self.length = lengths.pop()
        self.rng = np.random.default_rng(seed)

    def batch(self, batch_size: int) -> Batch:
        examples = []
        for _ in range(batch_size):
            sources = np.zeros((len(self.windows), self.length), dtype=np.float32)
            for s, pool in enumerate(self.windows):
                if len(pool):
                    sources[s] = pool[int(self.rng.integers(len(pool)))] * self.rng.uniform(0.5, 1.5)
            examples.append(mixture_example(sources))
        return collate(examples)

    def __iter__(self) -> Iterator[Batch]:  # pragma: no cover - convenience
        while True:
            yield self.batch(8)


def train_separator(model: torch.nn.Module, mixer: RandomMixer, *, steps: int, batch_size: int = 8,
                    learning_rate: float = 3e-3, seed: int = 0, progress: Any = None,
                    lr_schedule: str = "constant") -> list[float]:
    """Train ``model`` in place with Adam on random mixes, L1 loss (``SeparationLoss``).

    Args:
        lr_schedule: ``"constant"`` or ``"cosine"`` (``CosineAnnealingLR`` from ``learning_rate`` to 0 over
            ``steps``, Loshchilov & Hutter 2017: the last steps average out the step-to-step noise, so the
            final model depends less on where the last batches happened to push it).

    Returns:
        the loss of every step (float).

    Raises:
        ValueError: an unknown ``lr_schedule``.
    """
    if lr_schedule not in ("constant", "cosine"):
        raise ValueError(f"lr_schedule must be constant or cosine, got {lr_schedule!r}")
    loss_fn = SeparationLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(steps, 1))
                 if lr_schedule == "cosine" else None)
    model.train()
    losses: list[float] = []
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for step in range(steps):
            loss = loss_fn(model, mixer.batch(batch_size)).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            losses.append(float(loss.detach()))
            if progress is not None:
                progress("train separator", step + 1, steps)
    model.eval()
    return losses


def cut_windows(audio: np.ndarray, window_samples: int, max_windows: int | None = None) -> np.ndarray:
    """Mono, non-overlapping windows of ``audio`` (float32 ``(channels, samples)``): ``(n, window_samples)``.

    A trailing part shorter than a window is dropped; with ``max_windows`` the windows are spread evenly
    over the stem. Raises ValueError for audio shorter than one window.
    """
    mono = np.asarray(audio, dtype=np.float32).mean(axis=0)
    count = mono.shape[0] // window_samples
    if count == 0:
        raise ValueError(f"audio of {mono.shape[0]} samples is shorter than one window of {window_samples}")
    starts = np.arange(count) * window_samples
    if max_windows is not None and count > max_windows:
        starts = starts[np.linspace(0, count - 1, max_windows).round().astype(int)]
    return np.stack([mono[s:s + window_samples] for s in starts])
