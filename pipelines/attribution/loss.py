"""The per-example loss of a linernotes checkpoint for attribution: one adapter for D-TRAK and unlearning.

``DiffusionLoss`` implements ``provenance.unlearning.PerExampleLoss`` over ``MelBatch`` by calling only
``checkpoint.diffusion.per_example_loss(model, x0, texts, timesteps=..., noise=...)``, so it follows the
checkpoint's parameterization (ε, v, flow) without knowing it. Two objectives:

- ``"loss"``: the training loss (the denoising MSE), as unlearning attribution uses it (Choi et al. 2025,
  "Large-Scale Training Data Attribution for Music Generative Models via Unlearning"; Wang et al. 2024);
- ``"square"``: the squared L2 norm of the model output, D-TRAK's best output function (Zheng et al.,
  ICLR 2024, "Intriguing Properties of Data Attribution on Diffusion Models", §4 and Tables 1–2).

Both average over ``K`` fixed timesteps (evenly spaced over ``[0, T)``, as D-TRAK selects them) with
fixed noise: the noise for timestep ``k`` is drawn once from a generator seeded with ``(noise_seed, k)``
and shared by every example, frame by frame (noise for frame ``f`` does not depend on the clip length),
so a training segment and the same audio as a query see identical noise and timesteps, and "before"
and "after" an unlearning step do too.

Silence masking (Choi et al. 2025 mask silent regions of the generated track): with a ``frame_mask``,
the model output on masked frames is detached, so masked frames contribute no gradient (the loss value
still counts them; only gradients drive the unlearning step and the D-TRAK features).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

Objective = Literal["loss", "square"]
SILENCE_BELOW_PEAK_DB = 60.0
"""A frame is silent when its mean mel magnitude is this many dB below the clip's loudest frame."""


@dataclass(frozen=True)
class MelBatch:
    """A batch for ``DiffusionLoss``.

    Attributes:
        x0: float32 ``(B, n_mels, frames)``, normalised log-mel (``(log_mel − mel_mean) / mel_std``).
        texts: ``B`` conditioning texts (``""`` is the null condition).
        frame_mask: bool ``(B, frames)``, True where a frame counts (not silent); None counts all.
    """

    x0: torch.Tensor
    texts: tuple[str, ...]
    frame_mask: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.x0.shape[0])

    def __getitem__(self, index: Any) -> "MelBatch":
        """The sub-batch of ``index`` (an int, slice or index tensor), still batched."""
        rows = torch.arange(len(self))[index].reshape(-1)
        mask = None if self.frame_mask is None else self.frame_mask[rows]
        return MelBatch(self.x0[rows], tuple(self.texts[int(i)] for i in rows), mask)

    def to(self, device: torch.device | str) -> "MelBatch":
        mask = None if self.frame_mask is None else self.frame_mask.to(device)
        return MelBatch(self.x0.to(device), self.texts, mask)


def evenly_spaced_timesteps(num_steps: int, count: int) -> list[int]:
    """``count`` timesteps evenly spaced over ``[0, num_steps)``, centred in their bins (D-TRAK's choice of
    uniformly spaced timesteps). Raises ValueError unless ``1 ≤ count ≤ num_steps``."""
    if not 1 <= count <= num_steps:
        raise ValueError(f"need 1 ≤ num_timesteps ≤ {num_steps} (the diffusion steps); got {count}")
    return [int(math.floor((k + 0.5) * num_steps / count)) for k in range(count)]


class DiffusionLoss:
    """``PerExampleLoss`` of a diffusion checkpoint: the ``objective`` averaged over fixed timesteps and noise.

    Args:
        diffusion: the checkpoint's ``diffusion`` (has ``num_steps`` and ``per_example_loss``).
        objective: ``"loss"`` or ``"square"`` (see the module docstring).
        num_timesteps: K, evenly spaced over ``[0, T)``.
        noise_seed: seed of the fixed noise.

    Calling it with ``(model, MelBatch)`` returns float32 ``(B,)``, differentiable w.r.t. the model's
    parameters: ``(1/K) Σ_k f_k`` per example, with ``f_k`` the objective at timestep ``t_k``.

    Raises:
        ValueError: unknown objective, bad ``num_timesteps``.
    """

    def __init__(self, diffusion: Any, objective: Objective = "loss", num_timesteps: int = 8,
                 noise_seed: int = 0) -> None:
        if objective not in ("loss", "square"):
            raise ValueError(f"objective must be 'loss' or 'square'; got {objective!r}")
        self.diffusion = diffusion
        self.objective = objective
        self.timesteps = evenly_spaced_timesteps(int(diffusion.num_steps), num_timesteps)
        self.noise_seed = int(noise_seed)
        self._noise: dict[tuple[int, int, int], torch.Tensor] = {}

    def noise(self, k: int, n_mels: int, frames: int) -> torch.Tensor:
        """float32 ``(n_mels, frames)`` fixed noise of timestep index ``k`` (frame ``f``'s values do not
        depend on ``frames``)."""
        key = (k, n_mels, frames)
        if key not in self._noise:
            generator = torch.Generator().manual_seed(self.noise_seed * 1_000_003 + k)
            self._noise[key] = torch.randn((frames, n_mels), generator=generator).T.contiguous()
        return self._noise[key]

    def __call__(self, model: Any, batch: MelBatch) -> torch.Tensor:
        x0 = batch.x0
        size, n_mels, frames = x0.shape
        steps = len(self.timesteps)
        x0_k = x0.repeat(steps, 1, 1)
        texts_k = list(batch.texts) * steps
        timesteps = torch.tensor(self.timesteps, dtype=torch.int64, device=x0.device).repeat_interleave(size)
        noise = torch.stack([self.noise(k, n_mels, frames) for k in range(steps)]).to(x0.device)
        noise = noise.repeat_interleave(size, dim=0)
        mask = None if batch.frame_mask is None else batch.frame_mask.repeat(steps, 1)
        captured: list[torch.Tensor] = []

        def wrapped(x_t: torch.Tensor, t: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
            output = model(x_t, t, texts)
            if mask is not None:
                output = torch.where(mask[:, None, :].to(output.device), output, output.detach())
            captured.append(output)
            return output

        values = self.diffusion.per_example_loss(wrapped, x0_k, texts_k, timesteps=timesteps, noise=noise)
        if self.objective == "square":
            if len(captured) != 1:
                raise RuntimeError("the 'square' objective needs per_example_loss to call the model exactly once")
            values = (captured[0] ** 2).mean(dim=tuple(range(1, captured[0].ndim)))
        return values.reshape(steps, size).mean(dim=0)


def silence_mask(log_mel: np.ndarray, below_peak_db: float = SILENCE_BELOW_PEAK_DB) -> np.ndarray:
    """bool ``(frames,)``: True where a frame of a natural-log magnitude mel ``(n_mels, frames)`` is not
    silent, i.e. its mean magnitude is within ``below_peak_db`` dB of the loudest frame's. A clip that is
    silent throughout keeps every frame (nothing else to attribute)."""
    magnitude = np.exp(np.asarray(log_mel, dtype=np.float64)).mean(axis=0)
    level_db = 20.0 * np.log10(np.maximum(magnitude, 1e-12))
    mask = level_db >= level_db.max() - below_peak_db
    return mask if mask.any() else np.ones_like(mask)


def windows(mel: np.ndarray, frames: int) -> list[tuple[int, int]]:
    """``(start, stop)`` frame ranges cutting ``(n_mels, total)`` into windows of ``frames`` (the last one
    ends at ``total`` and may overlap the one before; a clip shorter than ``frames`` is one window)."""
    total = mel.shape[-1]
    if total <= frames:
        return [(0, total)]
    starts = list(range(0, total - frames + 1, frames))
    if starts[-1] + frames < total:
        starts.append(total - frames)
    return [(s, s + frames) for s in starts]
