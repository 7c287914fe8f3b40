"""Linear datamodeling score (LDS) of D-TRAK at CPU scale: shared by the test (synthetic mels, seconds) and
``make bench`` (the attribution test dataset's mels).

LDS (Park et al. 2023, §2; D-TRAK, Zheng et al., ICLR 2024, §3): train models on random half-subsets
S_1..S_M of the training examples; for a held-out query q, LDS(q) is the Spearman correlation over subsets
between the attribution-predicted output Σ_{i∈S_m} τ(q, i) and the actual output of the model trained on S_m
(−loss of q at fixed timesteps and noise); LDS is its mean over queries. Random scores give LDS ≈ 0.

The model is a 2-layer convolutional denoiser with the project's Gaussian diffusion (v-prediction); the
features and kernel are the project's own (``provenance.dtrak``, ``pipelines.attribution.loss``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import spearmanr

from pipelines.attribution.loss import DiffusionLoss, MelBatch
from provenance import dtrak


class TinyDenoiser(torch.nn.Module):
    """x_t (B, n_mels, frames), t (B,), texts → output (B, n_mels, frames); the timestep enters as 8 sinusoid
    channels. A model the diffusion's ``per_example_loss`` accepts like the checkpoint's U-Net."""

    def __init__(self, n_mels: int, hidden: int = 48, num_steps: int = 100) -> None:
        super().__init__()
        self.num_steps = num_steps
        self.inp = torch.nn.Conv1d(n_mels + 8, hidden, 5, padding=2)
        self.out = torch.nn.Conv1d(hidden, n_mels, 5, padding=2)

    def forward(self, x, t, texts):
        freqs = torch.exp(-torch.arange(4, dtype=torch.float32) * 2.0)
        angles = t.float()[:, None] / self.num_steps * 20.0 * freqs[None]
        emb = torch.cat([angles.sin(), angles.cos()], dim=1)[:, :, None].expand(-1, -1, x.shape[-1])
        return self.out(torch.nn.functional.silu(self.inp(torch.cat([x, emb], dim=1))))


@dataclass(frozen=True)
class LdsResult:
    """LDS per method (mean Spearman over queries) and the random-score baseline's distribution."""

    dtrak_square: float
    trak_loss: float
    random: np.ndarray  # (draws,) LDS of random scores

    def summary(self, subsets: int, queries: int) -> str:
        return (f"LDS (Spearman, {subsets} half-subsets, {queries} held-out queries): D-TRAK square "
                f"{self.dtrak_square:.3f}, loss-gradient TRAK {self.trak_loss:.3f}, random scores "
                f"{self.random.mean():.3f} ± {self.random.std():.3f} (99th percentile {np.percentile(self.random, 99):.3f})")


def train_denoiser(diffusion, x_train: torch.Tensor, rows: np.ndarray, steps: int, hidden: int = 48,
                   learning_rate: float = 3e-3) -> TinyDenoiser:
    """A ``TinyDenoiser`` trained full-batch on ``x_train[rows]`` (the same initialisation and noise stream for
    every subset, so the subsets differ only in their data)."""
    torch.manual_seed(0)
    model = TinyDenoiser(x_train.shape[1], hidden, int(diffusion.num_steps))
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    generator = torch.Generator().manual_seed(1)
    batch = x_train[torch.from_numpy(np.asarray(rows))]
    for _ in range(steps):
        loss = diffusion.per_example_loss(model, batch, [""] * len(batch), generator=generator).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


def linear_datamodeling_score(diffusion, x_train: torch.Tensor, x_query: torch.Tensor, *, num_subsets: int,
                              steps: int, projection_dim: int = 2048, num_timesteps: int = 10,
                              random_draws: int = 200, seed: int = 0) -> LdsResult:
    """LDS of D-TRAK (``Square`` objective) and of loss-gradient TRAK at the model trained on all of
    ``x_train`` (float32 ``(N, n_mels, frames)``), for queries ``x_query`` (float32 ``(Q, n_mels, frames)``).
    Runs torch on one thread (these models are too small to gain from more; restored after)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _linear_datamodeling_score(diffusion, x_train, x_query, num_subsets, steps, projection_dim,
                                          num_timesteps, random_draws, seed)
    finally:
        torch.set_num_threads(threads)


def _linear_datamodeling_score(diffusion, x_train, x_query, num_subsets, steps, projection_dim, num_timesteps,
                               random_draws, seed) -> LdsResult:
    count = len(x_train)
    rng = np.random.default_rng(seed)
    subsets = [np.sort(rng.choice(count, count // 2, replace=False)) for _ in range(num_subsets)]
    evaluation = DiffusionLoss(diffusion, "loss", num_timesteps=20, noise_seed=7)
    queries = MelBatch(x_query, ("",) * len(x_query))
    actual = []
    for rows in subsets:
        model = train_denoiser(diffusion, x_train, rows, steps)
        with torch.no_grad():
            actual.append([-float(v) for v in evaluation(model, queries)])
    actual = np.array(actual)  # (subsets, queries)
    full = train_denoiser(diffusion, x_train, np.arange(count), steps)

    def lds_of(tau: np.ndarray) -> float:  # tau: (N, Q)
        predicted = np.stack([tau[rows].sum(axis=0) for rows in subsets])  # (subsets, queries)
        return float(np.mean([spearmanr(predicted[:, q], actual[:, q]).statistic for q in range(tau.shape[1])]))

    def trak(objective: str) -> np.ndarray:
        loss = DiffusionLoss(diffusion, objective, num_timesteps=num_timesteps, noise_seed=0)
        params = list(full.parameters())
        projector = dtrak.GradientProjector(dtrak.num_parameters(params), projection_dim, seed=0, check_dim=False)
        phi = dtrak.project_gradients(full, loss, MelBatch(x_train, ("",) * count), projector, params=params)
        phi_q = dtrak.project_gradients(full, loss, queries, projector, params=params)
        kernel_inverse = dtrak.kernel_inverse_of(phi.T.astype(np.float64) @ phi)
        return phi.astype(np.float64) @ (kernel_inverse @ phi_q.T.astype(np.float64))

    draws = np.random.default_rng(seed + 1).standard_normal((random_draws, count, len(x_query)))
    return LdsResult(dtrak_square=lds_of(trak("square")), trak_loss=lds_of(trak("loss")),
                     random=np.array([lds_of(tau) for tau in draws]))


def synthetic_mels(prototypes: int, train_per: int, query_per: int, n_mels: int = 16, frames: int = 32,
                   spread: float = 0.5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, Sequence[int]]:
    """Normalised log-mel-like patches: ``prototypes`` smooth spectro-temporal patterns, each seen
    ``train_per`` times in training and ``query_per`` times as held-out queries, every instance the pattern
    plus ``spread`` × smooth noise. Returns float32 ``x_train (P·train_per, n_mels, frames)``,
    ``x_query (P·query_per, n_mels, frames)`` and each training example's prototype."""
    rng = np.random.default_rng(seed)
    kernel = np.exp(-0.5 * (np.arange(-3, 4) / 1.5) ** 2)
    kernel /= kernel.sum()

    def smooth(a: np.ndarray) -> np.ndarray:
        a = np.apply_along_axis(lambda r: np.convolve(r, kernel, mode="same"), -1, a)
        return np.apply_along_axis(lambda c: np.convolve(c, kernel, mode="same"), -2, a)

    centers = smooth(rng.standard_normal((prototypes, n_mels, frames))) * 3.0
    def draw(per: int) -> np.ndarray:
        return np.concatenate([centers[p] + spread * smooth(rng.standard_normal((per, n_mels, frames))) * 3.0
                               for p in range(prototypes)])

    x_train, x_query = draw(train_per), draw(query_per)
    mean, std = x_train.mean(), x_train.std()
    labels = [p for p in range(prototypes) for _ in range(train_per)]
    return (torch.from_numpy(((x_train - mean) / std).astype(np.float32)),
            torch.from_numpy(((x_query - mean) / std).astype(np.float32)), labels)
