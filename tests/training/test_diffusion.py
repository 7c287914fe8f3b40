"""DDPM schedule, forward process and loss (Ho et al. 2020); DDIM (Song et al. 2021) with guidance."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from training.data import iter_mel_samples, measure_mel_stats, read_dataset_info
from training.diffusion import GaussianDiffusion, make_betas
from training.model import MelUNet


pytestmark = pytest.mark.usefixtures("one_torch_thread")



class Oracle(nn.Module):
    """The exact network of a data distribution with one point x* per text: ε = (x_t − √ᾱ_t x*) / √(1 − ᾱ_t),
    and v = √ᾱ_t ε − √(1 − ᾱ_t) x*."""

    def __init__(self, diffusion: GaussianDiffusion, targets: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.diffusion, self.targets = diffusion, targets

    def forward(self, x, timesteps, texts):
        x0 = torch.stack([self.targets[text] for text in texts])
        alpha_bar = self.diffusion.alphas_cumprod[timesteps].float()[:, None, None]
        eps = (x - alpha_bar.sqrt() * x0) / (1 - alpha_bar).sqrt()
        return eps if self.diffusion.prediction == "epsilon" else alpha_bar.sqrt() * eps - (1 - alpha_bar).sqrt() * x0


PREDICTIONS = pytest.mark.parametrize("prediction", ["epsilon", "v"])


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_schedules_go_from_clean_to_pure_noise(schedule):
    diffusion = GaussianDiffusion(1000, schedule)
    alpha_bar = diffusion.alphas_cumprod
    assert alpha_bar.shape == (1000,)
    assert torch.all(alpha_bar[1:] < alpha_bar[:-1])
    assert alpha_bar[0] > 0.999 and alpha_bar[-1] < 1e-3 and alpha_bar[-1] > 0
    betas = make_betas(1000, schedule)
    assert torch.all((betas > 0) & (betas < 1))


def test_unknown_schedule_raises():
    with pytest.raises(ValueError, match="'linear' or 'cosine'"):
        make_betas(10, "sigmoid")  # type: ignore[arg-type]


def test_q_sample_has_the_forward_process_moments():
    diffusion = GaussianDiffusion(1000, "linear")
    generator = torch.Generator().manual_seed(0)
    x0 = torch.full((4000, 1, 1), 2.0)
    t = torch.full((4000,), 300)
    xt = diffusion.q_sample(x0, t, torch.randn(x0.shape, generator=generator))
    alpha_bar = float(diffusion.alphas_cumprod[300])
    assert abs(float(xt.mean()) - 2.0 * alpha_bar**0.5) < 0.05
    assert abs(float(xt.var()) - (1 - alpha_bar)) < 0.05


@PREDICTIONS
def test_ddpm_loss_falls_on_a_tiny_fixed_dataset(tiny_dataset, prediction):
    info = read_dataset_info(tiny_dataset)
    mean, std = measure_mel_stats(info.shards["train"])
    samples = list(iter_mel_samples(info.shards["train"]))
    x0 = torch.from_numpy(np.stack([(s["mel"][:, :64] - mean) / std for s in samples])).float()
    texts = [s["meta"]["text"] for s in samples]
    torch.manual_seed(0)
    model = MelUNet(n_mels=x0.shape[1], base_channels=16, channel_mults=(1, 2), text_dim=16, text_buckets=64)
    diffusion = GaussianDiffusion(1000, "cosine", prediction=prediction)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(100):
        loss = diffusion.loss(model, x0, texts, generator=generator, cond_dropout=0.1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    initial, final = np.mean(losses[:10]), np.mean(losses[-10:])
    assert 0.8 < initial < 1.2  # the zero-initialised output predicts 0: MSE ≈ E[ε²] = 1 (E[v²] ≈ 1 too)
    assert final < 0.7 * initial


@PREDICTIONS
def test_per_example_loss_is_zero_for_the_oracle_and_one_for_zero(prediction):
    diffusion = GaussianDiffusion(1000, prediction=prediction)
    target = torch.randn(4, 6)
    oracle = Oracle(diffusion, {"x": target})
    x0 = target.expand(3, 4, 6)
    generator = torch.Generator().manual_seed(0)
    assert diffusion.per_example_loss(oracle, x0, ["x"] * 3, generator=generator).abs().max() < 1e-5
    zero = diffusion.per_example_loss(lambda x, t, c: torch.zeros_like(x), torch.zeros(64, 8, 64), [""] * 64,
                                      generator=generator)
    # E[ε²] = 1; for v with x_0 = 0, E[v²] = E[ᾱ_t] over uniform t
    expected = 1.0 if prediction == "epsilon" else float(diffusion.alphas_cumprod.mean())
    assert zero.shape == (64,) and abs(float(zero.mean()) - expected) < 0.1


@PREDICTIONS
def test_to_eps_and_x0_inverts_the_forward_process(prediction):
    diffusion = GaussianDiffusion(1000, prediction=prediction)
    generator = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(5, 3, 7, generator=generator), torch.randn(5, 3, 7, generator=generator)
    t = torch.tensor([0, 10, 500, 900, 999])
    x_t = diffusion.q_sample(x0, t, noise)
    eps, x0_hat = diffusion.to_eps_and_x0(diffusion.target(x0, t, noise), x_t, t)
    torch.testing.assert_close(eps, noise, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(x0_hat[:4], x0[:4], atol=1e-3, rtol=1e-3)  # ε → x_0 is ill-conditioned at t = T-1


def test_unknown_prediction_raises():
    with pytest.raises(ValueError, match="'epsilon' or 'v'"):
        GaussianDiffusion(10, prediction="x0")  # type: ignore[arg-type]


@PREDICTIONS
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_with_the_exact_network_returns_the_data_point(eta, prediction):
    diffusion = GaussianDiffusion(1000, prediction=prediction)
    target = torch.randn(5, 12, generator=torch.Generator().manual_seed(3))
    sample = diffusion.ddim_sample(Oracle(diffusion, {"x": target, "": target}), (2, 5, 12), ["x", "x"],
                                   torch.Generator().manual_seed(0), num_steps=20, eta=eta)
    torch.testing.assert_close(sample, target.expand(2, 5, 12), atol=1e-4, rtol=1e-4)


@PREDICTIONS
@pytest.mark.parametrize("scale", [0.0, 1.0, 3.0])
def test_classifier_free_guidance_extrapolates_from_null_to_condition(scale, prediction):
    # ε and v are affine in x*, so guided DDIM with the exact network lands on x*_∅ + s (x*_c − x*_∅)
    diffusion = GaussianDiffusion(1000, prediction=prediction)
    cond, null = torch.full((2, 8), 1.0), torch.full((2, 8), -0.5)
    sample = diffusion.ddim_sample(Oracle(diffusion, {"c": cond, "": null}), (1, 2, 8), ["c"],
                                   torch.Generator().manual_seed(0), num_steps=10, guidance_scale=scale)
    torch.testing.assert_close(sample[0], null + scale * (cond - null), atol=1e-4, rtol=1e-4)


def test_x0_clip_bounds_the_sample():
    diffusion = GaussianDiffusion(1000)
    target = torch.full((2, 8), 10.0)
    sample = diffusion.ddim_sample(Oracle(diffusion, {"x": target}), (1, 2, 8), ["x"],
                                   torch.Generator().manual_seed(0), num_steps=10, x0_clip=5.0)
    torch.testing.assert_close(sample, torch.full((1, 2, 8), 5.0))


def test_ddim_is_finite_shaped_and_deterministic_for_a_seed():
    torch.manual_seed(0)
    model = MelUNet(n_mels=16, base_channels=8, channel_mults=(1, 2), text_dim=8, text_buckets=32).eval()
    model.out_conv.reset_parameters()  # a non-trivial ε
    diffusion = GaussianDiffusion(100)

    def sample(seed: int) -> torch.Tensor:
        return diffusion.ddim_sample(model, (2, 16, 23), ["piano", ""], torch.Generator().manual_seed(seed),
                                     num_steps=8, guidance_scale=3.0, x0_clip=5.0)

    first, again, other = sample(7), sample(7), sample(8)
    assert first.shape == (2, 16, 23) and first.dtype == torch.float32 and torch.isfinite(first).all()
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


def test_ddim_timesteps_and_argument_checks():
    diffusion = GaussianDiffusion(1000)
    steps = diffusion.ddim_timesteps(50)
    assert len(steps) == 50 and steps[0] == 999 and steps[-1] == 0 and steps == sorted(steps, reverse=True)
    assert diffusion.ddim_timesteps(1) == [999]
    with pytest.raises(ValueError, match="num_steps"):
        diffusion.ddim_timesteps(1001)
    with pytest.raises(ValueError, match="guidance_scale"):
        diffusion.ddim_sample(Oracle(diffusion, {}), (1, 1, 1), ["x"], torch.Generator(), guidance_scale=-1)
