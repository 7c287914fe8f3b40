"""Linear datamodeling score of D-TRAK at CPU scale (no Ray: a tiny denoiser trained in-process).

LDS (Park et al. 2023, §2; D-TRAK, Zheng et al. 2024, §3): train models on random half-subsets S_1..S_M of
the training segments; for a held-out query q, LDS(q) is the Spearman correlation over subsets between the
attribution-predicted output Σ_{i∈S_m} τ(q, i) and the actual output of the model trained on S_m (here −loss
of q at fixed timesteps and noise). Here: a 2-layer convolutional denoiser (≈ 9k parameters) with the
project's Gaussian diffusion (v-prediction, T = 100) on the 21 train segments of the attribution test
dataset, 24 subsets, its 3 validation segments as queries.
"""

from __future__ import annotations

import numpy as np
import torch

from pipelines.attribution_loss import DiffusionLoss, MelBatch
from pipelines.attribution_index import read_shard_index
from pipelines.index import iter_segment_mels, train_entries
from provenance import dtrak
from provenance.store import LineageStore
from provenance.workspace import Workspace
from tests.pipelines.attribution_support import write_dataset

LDS_SUBSETS = 24
LDS_STEPS = 150


class TinyDenoiser(torch.nn.Module):
    """x_t (B, n_mels, frames), t (B,), texts → output (B, n_mels, frames); the timestep enters as 8 sinusoid
    channels. A model the diffusion's ``per_example_loss`` accepts like the checkpoint's U-Net."""

    def __init__(self, n_mels: int, hidden: int = 48) -> None:
        super().__init__()
        self.inp = torch.nn.Conv1d(n_mels + 8, hidden, 5, padding=2)
        self.out = torch.nn.Conv1d(hidden, n_mels, 5, padding=2)

    def forward(self, x, t, texts):
        freqs = torch.exp(-torch.arange(4, dtype=torch.float32) * 2.0)
        angles = t.float()[:, None] / 100.0 * 20.0 * freqs[None]
        emb = torch.cat([angles.sin(), angles.cos()], dim=1)[:, :, None].expand(-1, -1, x.shape[-1])
        return self.out(torch.nn.functional.silu(self.inp(torch.cat([x, emb], dim=1))))


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def test_linear_datamodeling_score(tmp_path):
    from training.diffusion import GaussianDiffusion

    workspace = Workspace.at(tmp_path).ensure()
    store = LineageStore(workspace.store_url)
    try:
        dataset_id, _ = write_dataset(workspace, store)
    finally:
        store.close()
    diffusion = GaussianDiffusion(100)
    train = train_entries(workspace, dataset_id)
    validation = sorted((r for r in read_shard_index(workspace, dataset_id) if r["split"] == "validation"),
                        key=lambda r: (r["shard"], r["key"]))
    train_mels = np.stack([m for _, m, _ in iter_segment_mels(workspace.dataset_dir(dataset_id), train)])
    query_mels = np.stack([m for _, m, _ in iter_segment_mels(workspace.dataset_dir(dataset_id), validation)])
    mean, std = float(train_mels.mean()), float(train_mels.std())
    x_train = torch.from_numpy((train_mels - mean) / std)
    x_query = torch.from_numpy((query_mels - mean) / std)
    n_mels, count = x_train.shape[1], x_train.shape[0]
    texts = ("",) * count

    def train_on(rows: np.ndarray) -> TinyDenoiser:
        torch.manual_seed(0)  # the same initialisation for every subset
        model = TinyDenoiser(n_mels)
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        generator = torch.Generator().manual_seed(1)
        batch = x_train[torch.from_numpy(rows)]
        for _ in range(LDS_STEPS):
            loss = diffusion.per_example_loss(model, batch, [""] * len(rows), generator=generator).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return model

    rng = np.random.default_rng(0)
    subsets = [np.sort(rng.choice(count, count // 2, replace=False)) for _ in range(LDS_SUBSETS)]
    evaluation = DiffusionLoss(diffusion, "loss", num_timesteps=20, noise_seed=7)
    actual = []
    for rows in subsets:
        model = train_on(rows)
        with torch.no_grad():
            actual.append([-float(v) for v in evaluation(model, MelBatch(x_query, ("",) * len(x_query)))])
    actual = np.array(actual)  # (subsets, queries)
    full = train_on(np.arange(count))

    def lds(objective: str) -> float:
        loss = DiffusionLoss(diffusion, objective, num_timesteps=10, noise_seed=0)
        params = [p for p in full.parameters()]
        projector = dtrak.GradientProjector(dtrak.num_parameters(params), 2048, seed=0)
        phi = dtrak.project_gradients(full, loss, MelBatch(x_train, texts), projector, params=params)
        phi_q = dtrak.project_gradients(full, loss, MelBatch(x_query, ("",) * len(x_query)), projector, params=params)
        tau = phi.astype(np.float64) @ (dtrak.kernel_inverse_of(phi.T.astype(np.float64) @ phi) @ phi_q.T)
        predicted = np.stack([tau[rows].sum(axis=0) for rows in subsets])  # (subsets, queries)
        return float(np.mean([_spearman(predicted[:, q], actual[:, q]) for q in range(len(x_query))]))

    square, trak_loss = lds("square"), lds("loss")
    random_lds = [float(np.mean([_spearman(np.stack([s[rows].sum() for rows in subsets]), actual[:, q])
                                 for q in range(len(x_query))]))
                  for s in np.random.default_rng(1).standard_normal((200, count))]
    print(f"\nLDS (Spearman, {LDS_SUBSETS} half-subsets, {len(x_query)} held-out queries): D-TRAK square "
          f"{square:.3f}, loss-gradient TRAK {trak_loss:.3f}, random scores {np.mean(random_lds):.3f} "
          f"± {np.std(random_lds):.3f}")
    assert square > np.percentile(random_lds, 99)  # far better than chance
