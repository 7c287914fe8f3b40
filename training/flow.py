"""Flow matching on the straight path (rectified flow) with Euler and Heun samplers.

Rectified flow (Liu, Gong & Liu 2023, "Flow Straight and Fast"; conditional flow matching, Lipman et al.
2023) joins data and noise by a straight line, ``x_t = (1 − t) · x_0 + t · ε`` with t ∈ [0, 1], and
trains the network to predict the path's velocity ``u = dx_t/dt = ε − x_0`` by mean-squared error,
t uniform. Sampling integrates ``dx/dt = u(x, t)`` from t = 1 (pure noise) to t = 0 with Euler steps or
Heun's second-order method (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based
Generative Models", Algorithm 1, deterministic). The network sees ``t · T`` as its timestep, so the
same sinusoidal timestep embedding serves all three parameterizations.

Integer timesteps (what D-TRAK and the unlearning core pass for every parameterization) map to
``t = (k + 1) / T`` for k in ``[0, T)``: k = T − 1 is pure noise, as in DDPM.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from training.parameterization import DenoiserModel, Parameterization


class FlowMatching(Parameterization):
    """Rectified-flow training target and ODE samplers (``prediction="flow"``).

    Args:
        num_steps: T, the resolution of integer timesteps (``t = (k + 1) / T``) and the scale of the
            network's time input (``t · T``).

    Raises:
        ValueError: ``num_steps < 1``.
    """

    def __init__(self, num_steps: int = 1000) -> None:
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        self.num_steps = num_steps
        self.prediction = "flow"
        self.samplers = ("euler", "heun")

    def time(self, timesteps: torch.Tensor) -> torch.Tensor:
        """t ∈ [0, 1] of ``timesteps``: floating values are t already; integers k map to ``(k + 1) / T``.

        Raises:
            ValueError: t outside [0, 1].
        """
        t = timesteps.float() if timesteps.is_floating_point() else (timesteps.float() + 1) / self.num_steps
        if t.numel() and (float(t.min()) < 0 or float(t.max()) > 1):
            raise ValueError(f"flow-matching times must lie in [0, 1] (integers in [0, {self.num_steps})), "
                             f"got {float(t.min())}..{float(t.max())}")
        return t

    def draw_timesteps(self, batch: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
        """Training times: float32 ``(batch,)`` uniform in [0, 1)."""
        return torch.rand(batch, generator=generator, device=device)

    def noise_path(self, x0: torch.Tensor, timesteps: torch.Tensor,
                   noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x_t = (1 − t) x_0 + t ε, t · T, u = ε − x_0)``."""
        t = self.time(timesteps).to(x0.device)
        t_b = t.reshape(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
        return (1 - t_b) * x0 + t_b * noise, t * self.num_steps, noise - x0

    @torch.no_grad()
    def sample(self, model: DenoiserModel, shape: tuple[int, int, int], texts: Sequence[str],
               generator: torch.Generator, *, sampler: str | None = None, num_steps: int = 50,
               guidance_scale: float = 1.0, conditions: torch.Tensor | None = None,
               known: torch.Tensor | None = None, known_mask: torch.Tensor | None = None,
               x0_clip: float | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
        """Integrate from t = 1 to 0 on ``num_steps`` uniform intervals (see ``Parameterization.sample``).

        ``euler``: ``x ← x + (t_next − t) · û(x, t)``. ``heun``: Euler predictor, then the trapezoid
        corrector ``x ← x + (t_next − t) · (û(x, t) + û(x', t_next)) / 2`` except on the last interval (to
        t = 0), 2 · num_steps − 1 evaluations. Guidance mixes velocities (affine in x̂_0 and ε̂). With
        ``x0_clip`` the estimate ``x̂_0 = x − t û`` is clipped and û recomputed as ``(x − x̂_0) / t``. With
        ``known``, the known frames are reset to ``(1 − t) · known + t · z`` after every step (RePaint).

        Raises:
            ValueError: ``num_steps < 1``; see ``Parameterization.sample``.
        """
        sampler, known, mask = self._check_sample_args(shape, texts, sampler, guidance_scale, known, known_mask,
                                                       device)
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        times = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64).tolist()
        x = torch.randn(shape, generator=generator, dtype=torch.float32).to(device)

        def velocity(x_now: torch.Tensor, t: float) -> torch.Tensor:
            t_model = torch.full((shape[0],), t * self.num_steps, dtype=torch.float32, device=device)
            u = self._guided(model, x_now, t_model, texts, conditions, guidance_scale)
            if x0_clip is not None and t > 0:
                x0 = (x_now - t * u).clamp(-x0_clip, x0_clip)
                u = (x_now - x0) / t
            return u

        for t, t_next in zip(times[:-1], times[1:], strict=True):
            u = velocity(x, t)
            x_next = x + (t_next - t) * u
            if sampler == "heun" and t_next > 0:
                x_next = x + (t_next - t) * 0.5 * (u + velocity(x_next, t_next))
            x = x_next
            if known is not None:
                z = torch.randn(shape, generator=generator, dtype=torch.float32).to(device)
                x = self._replace_known(x, known, mask, (1 - t_next) * known + t_next * z)
        if x0_clip is not None:
            x = x.clamp(-x0_clip, x0_clip)
        return x
