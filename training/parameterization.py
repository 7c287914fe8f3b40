"""One interface for the three training objectives and their samplers.

"The Principles of Diffusion Models" (Lai, Song, Kim, Ermon) presents DDPM, score-based and flow-based
models as one framework: a path from data ``x_0`` to noise ``ε``, a network trained by regression on a
target along that path, and a sampler that integrates back. Here:

| ``prediction`` | class | path x_t | network target | samplers |
|---|---|---|---|---|
| ``epsilon`` | ``GaussianDiffusion`` | √ᾱ_t x_0 + √(1−ᾱ_t) ε (Ho et al. 2020) | ε | ``ddpm``, ``ddim`` |
| ``v`` | ``GaussianDiffusion`` | same | v = √ᾱ_t ε − √(1−ᾱ_t) x_0 (Salimans & Ho 2022) | ``ddpm``, ``ddim`` |
| ``flow`` | ``FlowMatching`` | (1−t) x_0 + t ε (rectified flow, Liu et al. 2023) | u = ε − x_0 | ``euler``, ``heun`` |

Every parameterization offers the same calls: ``per_example_loss`` / ``loss`` (the trainer, D-TRAK and
unlearning use them), ``sample`` (with classifier-free guidance, Ho & Salimans 2022, and inpainting of
known mel frames by replacement, RePaint, Lugmayr et al. 2022, without its resampling jumps), and the
integer step count ``num_steps`` (T) that ``timesteps`` index. ``training.objectives.build_parameterization``
builds the one a ``TrainConfig`` names.

Conditions: ``texts`` (a sequence of strings, ``""`` the null text) and, optionally, ``conditions``: float32
``(batch, K)`` musical-condition vectors (``training.conditioning``; NaN = unknown). ``conditions`` is
passed to the model only when given, so any ``model(x_t, timesteps, texts)`` callable keeps working.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol

import torch

from training.conditioning import drop_conditions, unknown_conditions


class DenoiserModel(Protocol):
    """``model(x_t (B, n_mels, frames), timesteps (B,), texts, [conditions=(B, K)])`` → ``(B, n_mels, frames)``."""

    def __call__(self, x: torch.Tensor, timesteps: torch.Tensor, texts: Sequence[str],
                 **kwargs: Any) -> torch.Tensor: ...


class Parameterization:
    """Base class: condition dropout, guided network evaluation and inpainting masks shared by all.

    Subclasses define ``num_steps``, ``prediction``, ``samplers``, ``noise_path`` and ``sample``.
    """

    num_steps: int
    prediction: str
    samplers: tuple[str, ...] = ()

    def noise_path(self, x0: torch.Tensor, timesteps: torch.Tensor,
                   noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x_t, model_time, target)`` for clean ``x0``, ``timesteps`` and ``noise`` (all shaped as ``x0``
        except ``timesteps`` ``(batch,)``; ``model_time`` ``(batch,)`` is what the network receives)."""
        raise NotImplementedError

    def draw_timesteps(self, batch: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
        """Training timesteps for a batch: int64 ``(batch,)`` uniform in ``[0, T)``."""
        return torch.randint(0, self.num_steps, (batch,), generator=generator, device=device)

    def per_example_loss(self, model: DenoiserModel, x0: torch.Tensor, texts: Sequence[str],
                         generator: torch.Generator | None = None, cond_dropout: float = 0.0,
                         timesteps: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                         conditions: torch.Tensor | None = None) -> torch.Tensor:
        """Regression loss per example: ``mean ‖target − model(x_t, t, c)‖²`` over mel bins and frames.

        Random draws, in this order, from ``generator`` (None: torch's global RNG, which the unlearning core
        seeds): timesteps (when not given), noise (when not given), the joint condition-dropout mask
        (``cond_dropout > 0``), and, with ``conditions``, the per-condition dropout mask.

        Args:
            model: the denoising network.
            x0: float32 ``(batch, n_mels, frames)`` clean normalised log-mel.
            texts: ``batch`` conditioning texts.
            generator: source of randomness on ``x0``'s device.
            cond_dropout: probability of training an example on the null condition (empty text, all musical
                conditions unknown) for classifier-free guidance (Ho & Salimans 2022); each musical
                condition is also dropped alone with this probability, so a subset can be given at sampling.
            timesteps: ``(batch,)`` to use instead of random draws: int64 in ``[0, T)`` for every
                parameterization (flow matching maps k to t = (k + 1) / T), or, for flow matching only,
                floating t in ``[0, 1]``.
            noise: ε to use instead of a standard-normal draw, shaped as ``x0``.
            conditions: optional float32 ``(batch, K)`` musical conditions (NaN = unknown).

        Returns:
            float32 ``(batch,)``, differentiable w.r.t. the model's parameters.
        """
        batch = x0.shape[0]
        if timesteps is None:
            timesteps = self.draw_timesteps(batch, generator, x0.device)
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        if cond_dropout > 0:
            dropped = torch.rand(batch, generator=generator, device=x0.device) < cond_dropout
            texts = ["" if drop else text for text, drop in zip(texts, dropped.tolist(), strict=True)]
            if conditions is not None:
                conditions = conditions.to(x0.device)
                conditions = torch.where(dropped[:, None], unknown_conditions(batch, x0.device), conditions)
                conditions = drop_conditions(conditions, cond_dropout, generator)
        x_t, model_time, target = self.noise_path(x0, timesteps, noise)
        output = _call(model, x_t, model_time, texts, conditions)
        return ((output - target) ** 2).mean(dim=tuple(range(1, x0.ndim)))

    def loss(self, model: DenoiserModel, x0: torch.Tensor, texts: Sequence[str],
             generator: torch.Generator | None = None, cond_dropout: float = 0.0,
             conditions: torch.Tensor | None = None) -> torch.Tensor:
        """Batch-mean of ``per_example_loss``: a float32 scalar to back-propagate."""
        return self.per_example_loss(model, x0, texts, generator=generator, cond_dropout=cond_dropout,
                                     conditions=conditions).mean()

    def sample(self, model: DenoiserModel, shape: tuple[int, int, int], texts: Sequence[str],
               generator: torch.Generator, *, sampler: str | None = None, num_steps: int = 50,
               guidance_scale: float = 1.0, conditions: torch.Tensor | None = None,
               known: torch.Tensor | None = None, known_mask: torch.Tensor | None = None,
               x0_clip: float | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
        """Sample clean normalised log-mels ``(batch, n_mels, frames)`` float32 on ``device``.

        Args:
            model: the denoising network (in eval mode).
            shape: ``(batch, n_mels, frames)``.
            texts: ``batch`` prompts; ``""`` is unconditional.
            generator: a CPU ``torch.Generator``: the initial noise and every later draw come from it, so a
                sample is a function of its seed (on a given device and torch build).
            sampler: one of ``self.samplers``; None: the first.
            num_steps: network evaluations per sample (Heun: about twice as many).
            guidance_scale: s of classifier-free guidance, ``out_∅ + s · (out_c − out_∅)``: 1 is plain
                conditional sampling, 0 unconditional; finite and >= 0.
            conditions: optional float32 ``(batch, K)`` musical conditions (the null branch sees all unknown).
            known: float32 ``shape`` clean normalised mel whose frames under ``known_mask`` are kept
                (continuation, inpainting); RePaint replacement: after every step the known frames are set
                to ``known`` noised to the new noise level, and to ``known`` itself at the end.
            known_mask: bool ``(batch, frames)`` or ``(frames,)``, True where ``known`` holds.
            x0_clip: clip the clean-sample estimate to ``±x0_clip`` at every step; None does not clip.
            device: where the model runs.

        Raises:
            ValueError: unknown sampler, bad ``num_steps`` or ``guidance_scale``, ``len(texts) != batch``,
                a ``known`` / ``known_mask`` of the wrong shape, or only one of them.
        """
        raise NotImplementedError

    # shared by the samplers ---------------------------------------------------------------------------

    def _check_sample_args(self, shape: tuple[int, int, int], texts: Sequence[str], sampler: str | None,
                           guidance_scale: float, known: torch.Tensor | None,
                           known_mask: torch.Tensor | None, device: torch.device | str
                           ) -> tuple[str, torch.Tensor | None, torch.Tensor | None]:
        """Validate; return ``(sampler, known on device, mask (batch, 1, frames) bool on device)``."""
        sampler = sampler or self.samplers[0]
        if sampler not in self.samplers:
            raise ValueError(f"sampler must be one of {list(self.samplers)} for prediction={self.prediction!r}, "
                             f"got {sampler!r}")
        if not (math.isfinite(guidance_scale) and guidance_scale >= 0):
            raise ValueError(f"guidance_scale must be finite and >= 0, got {guidance_scale}")
        if len(texts) != shape[0]:
            raise ValueError(f"{len(texts)} texts for a batch of {shape[0]}")
        if (known is None) != (known_mask is None):
            raise ValueError("known and known_mask go together: give both (inpainting/continuation) or neither")
        if known is None or known_mask is None:
            return sampler, None, None
        if tuple(known.shape) != tuple(shape):
            raise ValueError(f"known must have the sample shape {tuple(shape)}, got {tuple(known.shape)}")
        mask = known_mask.to(torch.bool)
        if mask.ndim == 1:
            mask = mask.expand(shape[0], -1)
        if tuple(mask.shape) != (shape[0], shape[2]):
            raise ValueError(f"known_mask must be (frames,) or (batch, frames) = ({shape[0]}, {shape[2]}), "
                             f"got {tuple(known_mask.shape)}")
        return sampler, known.to(device=device, dtype=torch.float32), mask[:, None, :].to(device)

    @staticmethod
    def _guided(model: DenoiserModel, x: torch.Tensor, model_time: torch.Tensor, texts: Sequence[str],
                conditions: torch.Tensor | None, guidance_scale: float) -> torch.Tensor:
        """Network output with classifier-free guidance: one batched pass for conditional and null."""
        if guidance_scale == 1.0:
            return _call(model, x, model_time, texts, conditions)
        batch = x.shape[0]
        both_conditions = None
        if conditions is not None:
            both_conditions = torch.cat([conditions, unknown_conditions(batch, conditions.device)])
        both = _call(model, torch.cat([x, x]), torch.cat([model_time, model_time]), [*texts, *([""] * batch)],
                     both_conditions)
        output_cond, output_null = both.chunk(2)
        return output_null + guidance_scale * (output_cond - output_null)

    @staticmethod
    def _replace_known(x: torch.Tensor, known: torch.Tensor | None, mask: torch.Tensor | None,
                       noised_known: torch.Tensor | None) -> torch.Tensor:
        """RePaint step: the frames under ``mask`` take ``noised_known``'s values."""
        if known is None or mask is None or noised_known is None:
            return x
        return torch.where(mask, noised_known, x)


def _call(model: DenoiserModel, x: torch.Tensor, model_time: torch.Tensor, texts: Sequence[str],
          conditions: torch.Tensor | None) -> torch.Tensor:
    """``model(x, t, texts)``, with ``conditions=`` only when there are conditions."""
    if conditions is None:
        return model(x, model_time, list(texts))
    return model(x, model_time, list(texts), conditions=conditions.to(x.device))
