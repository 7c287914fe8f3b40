"""Gaussian diffusion over normalised log-mels: DDPM training loss and the DDIM sampler with guidance.

- Forward process and loss: Ho et al. 2020, "Denoising Diffusion Probabilistic Models" (ε-prediction,
  linear betas), with the cosine schedule of Nichol & Dhariwal 2021.
- v-prediction: Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of Diffusion Models":
  the network predicts ``v = √ᾱ_t · ε − √(1 − ᾱ_t) · x_0``. It is the default here because ε-prediction
  turns a small ε error at high noise into a huge x_0 error (× √((1 − ᾱ)/ᾱ), ≈ 2·10⁴ at the last cosine
  step): on the tiny-data CPU demo ε-prediction sampled saturated noise while v-prediction followed the
  prompt's pitch. Both are ``prediction`` values of one class.
- Samplers: Song et al. 2021, "Denoising Diffusion Implicit Models" (DDIM; ``eta = 0`` is deterministic),
  and DDPM ancestral sampling (Ho et al. 2020, eq. 6-7) on a respaced sub-sequence of steps (Nichol &
  Dhariwal 2021, section 4), both through ``Parameterization.sample``.
- Guidance: Ho & Salimans 2022, "Classifier-Free Diffusion Guidance": the model is trained with the text
  dropped to the null condition with probability ``cond_dropout`` and sampled with
  ``out = out(x, ∅) + s · (out(x, c) − out(x, ∅))``; ε̂ and x̂_0 are affine in the network output, so
  guiding the output is guiding ε.

The model is any callable ``model(x_t, timesteps, texts) -> output`` (``training.model.MelUNet``) whose
output is ε or v. All randomness comes from an explicit ``torch.Generator``. Flow matching, the third
parameterization, lives in ``training.flow``; the interface all three share is
``training.parameterization.Parameterization``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

from training.parameterization import DenoiserModel, Parameterization

Prediction = Literal["epsilon", "v"]


def make_betas(num_steps: int, schedule: Literal["linear", "cosine"] = "cosine",
               beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """Noise variances β_1..β_T.

    ``linear``: evenly spaced from ``beta_start`` to ``beta_end`` (Ho et al. 2020; defined for T = 1000,
    so both ends are scaled by ``1000 / T``). ``cosine``: ᾱ(t) = cos²((t/T + s)/(1 + s) · π/2) with
    s = 0.008, β clipped to 0.999 (Nichol & Dhariwal 2021).

    Returns:
        float64 ``(num_steps,)`` in (0, 1).

    Raises:
        ValueError: unknown schedule or ``num_steps < 1``.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if schedule == "linear":
        scale = 1000.0 / num_steps
        return torch.linspace(beta_start * scale, min(beta_end * scale, 0.999), num_steps, dtype=torch.float64)
    if schedule == "cosine":
        s = 0.008
        t = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
        alpha_bar = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
        return torch.clamp(1 - alpha_bar[1:] / alpha_bar[:-1], max=0.999)
    raise ValueError(f"beta schedule must be 'linear' or 'cosine', got {schedule!r}")


class GaussianDiffusion(Parameterization):
    """The DDPM forward process, the denoising loss (``Parameterization.per_example_loss``), DDPM and DDIM samplers.

    Args:
        num_steps: T, the number of diffusion steps; timesteps index ``0 .. T-1``.
        schedule, beta_start, beta_end: see ``make_betas``.
        prediction: what the network outputs: ``"epsilon"`` (the noise, Ho et al. 2020) or ``"v"``
            (Salimans & Ho 2022).

    Attributes:
        betas: float64 ``(T,)``.
        alphas_cumprod: float64 ``(T,)``, ᾱ_t = Π_{s≤t} (1 − β_s), decreasing from ≈1 to ≈0.

    Raises:
        ValueError: unknown ``prediction`` or schedule.
    """

    def __init__(self, num_steps: int = 1000, schedule: Literal["linear", "cosine"] = "cosine",
                 beta_start: float = 1e-4, beta_end: float = 0.02, prediction: Prediction = "v") -> None:
        if prediction not in ("epsilon", "v"):
            raise ValueError(f"prediction must be 'epsilon' or 'v', got {prediction!r}")
        self.num_steps = num_steps
        self.prediction = prediction
        self.samplers = ("ddim", "ddpm")
        self.betas = make_betas(num_steps, schedule, beta_start, beta_end)
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)

    def _alpha_bar(self, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """ᾱ at ``timesteps``, float32 shaped ``(batch, 1, 1)`` on ``like``'s device."""
        values = self.alphas_cumprod[timesteps.cpu()].to(device=like.device, dtype=like.dtype)
        return values.reshape(-1, *([1] * (like.ndim - 1)))

    def q_sample(self, x0: torch.Tensor, timesteps: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Sample x_t ~ q(x_t | x_0) = N(√ᾱ_t · x_0, (1 − ᾱ_t) · I) (Ho et al. 2020, eq. 4).

        Args:
            x0: float32 ``(batch, n_mels, frames)`` clean normalised log-mel.
            timesteps: int64 ``(batch,)`` in ``[0, T)``.
            noise: ε, same shape as ``x0``.

        Returns:
            float32 x_t, same shape as ``x0``.
        """
        alpha_bar = self._alpha_bar(timesteps, x0)
        return alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise

    def target(self, x0: torch.Tensor, timesteps: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """What the network should output, shaped as ``x0``: ε, or ``v = √ᾱ_t · ε − √(1 − ᾱ_t) · x_0``."""
        if self.prediction == "epsilon":
            return noise
        alpha_bar = self._alpha_bar(timesteps, x0)
        return alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * x0

    def to_eps_and_x0(self, output: torch.Tensor, x_t: torch.Tensor,
                      timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Turn a network output (ε or v) at ``x_t`` into the estimates ``(ε̂, x̂_0)``, each shaped as ``x_t``.

        ε: ``x̂_0 = (x_t − √(1 − ᾱ) ε̂) / √ᾱ``.
        v: ``x̂_0 = √ᾱ x_t − √(1 − ᾱ) v̂`` and ``ε̂ = √(1 − ᾱ) x_t + √ᾱ v̂``.
        """
        alpha_bar = self._alpha_bar(timesteps, x_t)
        if self.prediction == "epsilon":
            return output, (x_t - (1 - alpha_bar).sqrt() * output) / alpha_bar.sqrt()
        return ((1 - alpha_bar).sqrt() * x_t + alpha_bar.sqrt() * output,
                alpha_bar.sqrt() * x_t - (1 - alpha_bar).sqrt() * output)

    def noise_path(self, x0: torch.Tensor, timesteps: torch.Tensor,
                   noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x_t, timesteps, target)``: ``q_sample`` and ε or v. With ``Parameterization.per_example_loss``
        this is Ho et al. 2020's "L_simple" (eq. 14) for ε; for v the same with the v target, which equals
        the ε-MSE plus the x_0-MSE of the implied estimates. ``timesteps``: int64 ``(batch,)`` in ``[0, T)``."""
        if timesteps.is_floating_point():
            raise ValueError("GaussianDiffusion timesteps must be integers in [0, T)")
        return self.q_sample(x0, timesteps, noise), timesteps, self.target(x0, timesteps, noise)

    def ddim_timesteps(self, num_steps: int) -> list[int]:
        """The DDIM sub-sequence τ: ``num_steps`` evenly spaced steps of ``[0, T)``, descending from T − 1
        (pure noise) and, for two or more steps, ending at 0.

        Raises:
            ValueError: ``num_steps`` outside ``[1, T]``.
        """
        if not 1 <= num_steps <= self.num_steps:
            raise ValueError(f"num_steps must be in [1, {self.num_steps}] (the diffusion steps), got {num_steps}")
        return sorted({int(t) for t in np.linspace(self.num_steps - 1, 0, num_steps).round()}, reverse=True)

    def ddim_sample(self, model: DenoiserModel, shape: tuple[int, int, int], texts: Sequence[str],
                    generator: torch.Generator, num_steps: int = 50, guidance_scale: float = 1.0,
                    eta: float = 0.0, x0_clip: float | None = None,
                    device: torch.device | str = "cpu") -> torch.Tensor:
        """DDIM (Song et al. 2021, eq. 12) with classifier-free guidance: ``sample(sampler="ddim")`` with ``eta``.

        ``eta`` = 0 is deterministic DDIM, 1 adds DDPM-like ancestral noise; see ``sample`` for the rest.

        Raises:
            ValueError: bad ``num_steps``, ``guidance_scale``, ``eta``, or ``len(texts) != batch``.
        """
        return self.sample(model, shape, texts, generator, sampler="ddim", num_steps=num_steps,
                           guidance_scale=guidance_scale, x0_clip=x0_clip, device=device, eta=eta)

    @torch.no_grad()
    def sample(self, model: DenoiserModel, shape: tuple[int, int, int], texts: Sequence[str],
               generator: torch.Generator, *, sampler: str | None = None, num_steps: int = 50,
               guidance_scale: float = 1.0, conditions: torch.Tensor | None = None,
               known: torch.Tensor | None = None, known_mask: torch.Tensor | None = None,
               x0_clip: float | None = None, device: torch.device | str = "cpu", eta: float = 0.0) -> torch.Tensor:
        """DDIM or DDPM ancestral sampling over ``ddim_timesteps(num_steps)`` (see ``Parameterization.sample``).

        Each step evaluates the (guided) network, converts its output to ``(ε̂, x̂_0)`` (``to_eps_and_x0``),
        optionally clips x̂_0 to ``±x0_clip`` (as Ho et al. 2020 clip to the data range) and recomputes ε̂,
        then steps from ᾱ_t to ᾱ_prev (1 after the last step):

        - ``ddim``: ``x_prev = √ᾱ_prev · x̂_0 + √(1 − ᾱ_prev − σ²) · ε̂ + σ z`` with
          ``σ = eta · √((1 − ᾱ_prev)/(1 − ᾱ_t)) · √(1 − ᾱ_t/ᾱ_prev)`` (Song et al. 2021, eq. 12, 16);
        - ``ddpm``: the posterior q(x_prev | x_t, x̂_0) of the respaced chain, β' = 1 − ᾱ_t/ᾱ_prev:
          mean ``√ᾱ_prev β'/(1 − ᾱ_t) · x̂_0 + √(1 − β') (1 − ᾱ_prev)/(1 − ᾱ_t) · x_t``, variance
          ``β' (1 − ᾱ_prev)/(1 − ᾱ_t)`` (Ho et al. 2020, eq. 6-7; ``eta`` is ignored).

        Raises:
            ValueError: see ``Parameterization.sample``; ``eta`` outside ``[0, 1]``.
        """
        sampler, known, mask = self._check_sample_args(shape, texts, sampler, guidance_scale, known, known_mask,
                                                       device)
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {eta}")
        steps = self.ddim_timesteps(num_steps)
        x = torch.randn(shape, generator=generator, dtype=torch.float32).to(device)
        if known is not None:
            alpha_bar_first = float(self.alphas_cumprod[steps[0]])
            x = self._replace_known(x, known, mask, math.sqrt(alpha_bar_first) * known
                                    + math.sqrt(1 - alpha_bar_first) * x)
        for index, t in enumerate(steps):
            t_batch = torch.full((shape[0],), t, dtype=torch.int64, device=device)
            output = self._guided(model, x, t_batch, texts, conditions, guidance_scale)
            eps, x0 = self.to_eps_and_x0(output, x, t_batch)
            alpha_bar = float(self.alphas_cumprod[t])
            alpha_bar_prev = float(self.alphas_cumprod[steps[index + 1]]) if index + 1 < len(steps) else 1.0
            if x0_clip is not None:
                x0 = x0.clamp(-x0_clip, x0_clip)
                eps = (x - math.sqrt(alpha_bar) * x0) / math.sqrt(1 - alpha_bar)
            if sampler == "ddim":
                sigma = eta * math.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev))
                x = math.sqrt(alpha_bar_prev) * x0 + math.sqrt(max(1 - alpha_bar_prev - sigma**2, 0.0)) * eps
            else:
                beta = 1 - alpha_bar / alpha_bar_prev
                x = (math.sqrt(alpha_bar_prev) * beta / (1 - alpha_bar) * x0
                     + math.sqrt(1 - beta) * (1 - alpha_bar_prev) / (1 - alpha_bar) * x)
                sigma = math.sqrt(max(beta * (1 - alpha_bar_prev) / (1 - alpha_bar), 0.0))
            if sigma > 0:
                x = x + sigma * torch.randn(shape, generator=generator, dtype=torch.float32).to(device)
            if known is not None:
                z = torch.randn(shape, generator=generator, dtype=torch.float32).to(device)
                x = self._replace_known(x, known, mask, math.sqrt(alpha_bar_prev) * known
                                        + math.sqrt(1 - alpha_bar_prev) * z)
        return x
