"""The three parameterizations (ε, v, flow) and their samplers (DDPM, DDIM, Euler, Heun): losses fall on a
tiny dataset, samplers give finite mels of the requested shape, exact networks are integrated exactly,
guidance extrapolates, inpainting keeps the known frames."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from training.conditioning import CONDITION_NAMES, stack_conditions
from training.config import TrainConfig
from training.data import iter_mel_samples, measure_mel_stats, read_dataset_info
from training.diffusion import GaussianDiffusion
from training.flow import FlowMatching
from training.model import MelUNet, build_model
from training.objectives import build_parameterization

pytestmark = pytest.mark.usefixtures("one_torch_thread")


SAMPLERS = [("epsilon", "ddpm"), ("epsilon", "ddim"), ("v", "ddpm"), ("v", "ddim"), ("flow", "euler"),
            ("flow", "heun")]


def _parameterization(prediction: str, num_steps: int = 1000):
    return FlowMatching(num_steps) if prediction == "flow" else GaussianDiffusion(num_steps, prediction=prediction)


class Oracle(nn.Module):
    """The exact network for a data distribution with one point x* per text (ε, v or the flow velocity)."""

    def __init__(self, parameterization, targets: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.p, self.targets = parameterization, targets

    def forward(self, x, timesteps, texts):
        x0 = torch.stack([self.targets[text] for text in texts])
        if isinstance(self.p, FlowMatching):
            t = (timesteps.float() / self.p.num_steps)[:, None, None]
            return (x - x0) / t  # u = ε − x0 with ε = (x − (1 − t) x0) / t
        alpha_bar = self.p.alphas_cumprod[timesteps].float()[:, None, None]
        eps = (x - alpha_bar.sqrt() * x0) / (1 - alpha_bar).sqrt()
        return eps if self.p.prediction == "epsilon" else alpha_bar.sqrt() * eps - (1 - alpha_bar).sqrt() * x0


@pytest.fixture(scope="module")
def tiny_batch(tiny_dataset):
    info = read_dataset_info(tiny_dataset)
    mean, std = measure_mel_stats(info.shards["train"])
    samples = list(iter_mel_samples(info.shards["train"]))
    x0 = torch.from_numpy(np.stack([(s["mel"][:, :64] - mean) / std for s in samples])).float()
    metas = [{**s["meta"], "bpm": 60 + 10 * i, "key": "A minor", "duration_s": 2.0} for i, s in enumerate(samples)]
    return x0, [s["meta"]["text"] for s in samples], stack_conditions(metas)


@pytest.mark.parametrize("prediction", ["epsilon", "v", "flow"])
def test_each_parameterization_loss_falls_on_a_tiny_dataset(tiny_batch, prediction):
    x0, texts, conditions = tiny_batch
    config = TrainConfig(prediction=prediction, base_channels=16, channel_mults=(1, 2), text_dim=16, text_buckets=64,
                         attention_levels=(-1,), attention_heads=2)
    torch.manual_seed(0)
    model = build_model(config, n_mels=x0.shape[1])
    parameterization = build_parameterization(config)
    assert parameterization.prediction == prediction

    def held_out_loss() -> float:  # fixed timesteps and noise: the same examples before and after
        generator = torch.Generator().manual_seed(123)
        with torch.no_grad():
            return float(parameterization.per_example_loss(model, x0, texts, generator=generator,
                                                           conditions=conditions).mean())

    before = held_out_loss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(60):
        loss = parameterization.loss(model, x0, texts, generator=generator, cond_dropout=0.1, conditions=conditions)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = held_out_loss()
    # zero-initialised output: ε- and v-MSE ≈ 1, flow MSE = E‖ε − x0‖² ≈ 2 on standardised data
    assert (1.5 < before < 2.6) if prediction == "flow" else (0.7 < before < 1.3)
    assert after < 0.7 * before, (before, after)


@pytest.mark.parametrize("prediction,sampler", SAMPLERS)
def test_samplers_give_finite_mels_of_the_requested_shape_deterministically(prediction, sampler):
    torch.manual_seed(0)
    model = MelUNet(n_mels=16, base_channels=8, channel_mults=(1, 2), text_dim=8, text_buckets=32,
                    attention_levels=(1,), attention_heads=2, musical_conditioning=True).eval()
    model.out_conv.reset_parameters()  # a non-trivial output
    parameterization = _parameterization(prediction, 100)
    conditions = stack_conditions([{"bpm": 120, "key": "C major"}, {}])

    def sample(seed: int, **kwargs) -> torch.Tensor:
        return parameterization.sample(model, (2, 16, 23), ["piano", ""], torch.Generator().manual_seed(seed),
                                       sampler=sampler, num_steps=6, guidance_scale=3.0, conditions=conditions,
                                       x0_clip=5.0, **kwargs)

    first, again, other = sample(7), sample(7), sample(8)
    assert first.shape == (2, 16, 23) and first.dtype == torch.float32 and torch.isfinite(first).all()
    assert torch.equal(first, again) and not torch.allclose(first, other)
    assert float(first.abs().max()) <= 5.0 + 1e-5


@pytest.mark.parametrize("prediction,sampler", SAMPLERS)
def test_the_exact_network_is_integrated_to_its_data_point(prediction, sampler):
    parameterization = _parameterization(prediction)
    target = torch.randn(5, 12, generator=torch.Generator().manual_seed(3))
    sample = parameterization.sample(Oracle(parameterization, {"x": target}), (2, 5, 12), ["x", "x"],
                                     torch.Generator().manual_seed(0), sampler=sampler, num_steps=20)
    torch.testing.assert_close(sample, target.expand(2, 5, 12), atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("prediction,sampler", SAMPLERS)
@pytest.mark.parametrize("scale", [0.0, 3.0])
def test_guidance_extrapolates_from_null_to_condition(prediction, sampler, scale):
    # every network output is affine in x*, so guided sampling with the exact network lands on
    # x*_∅ + s (x*_c − x*_∅) for the deterministic samplers and the DDPM posterior alike
    parameterization = _parameterization(prediction)
    cond, null = torch.full((2, 8), 1.0), torch.full((2, 8), -0.5)
    sample = parameterization.sample(Oracle(parameterization, {"c": cond, "": null}), (1, 2, 8), ["c"],
                                     torch.Generator().manual_seed(0), sampler=sampler, num_steps=10,
                                     guidance_scale=scale)
    torch.testing.assert_close(sample[0], null + scale * (cond - null), atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("prediction,sampler", SAMPLERS)
def test_inpainting_keeps_the_known_frames_and_fills_the_rest(prediction, sampler):
    torch.manual_seed(0)
    model = MelUNet(n_mels=8, base_channels=8, channel_mults=(1, 2), text_dim=8, text_buckets=32).eval()
    model.out_conv.reset_parameters()
    parameterization = _parameterization(prediction, 100)
    known = torch.randn(2, 8, 20, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(20, dtype=torch.bool)
    mask[:8] = True  # continuation: the first 8 frames are given
    mask[15:] = True  # ... and the last 5 (inpainting of frames 8-14)
    out = parameterization.sample(model, (2, 8, 20), ["a", "b"], torch.Generator().manual_seed(0), sampler=sampler,
                                  num_steps=5, known=known, known_mask=mask, x0_clip=5.0)
    assert torch.equal(out[..., mask], known[..., mask])
    assert torch.isfinite(out).all() and not torch.allclose(out[..., ~mask], known[..., ~mask], atol=1e-2)
    with pytest.raises(ValueError, match="known_mask must be"):
        parameterization.sample(model, (2, 8, 20), ["a", "b"], torch.Generator(), sampler=sampler, num_steps=2,
                                known=known, known_mask=torch.ones(19, dtype=torch.bool))


def test_inpainting_with_the_exact_network_is_seamless():
    # the exact network's data point agrees with the known frames: the filled frames land on it too
    parameterization = FlowMatching(1000)
    target = torch.randn(3, 16, generator=torch.Generator().manual_seed(2))
    mask = torch.arange(16) < 6
    out = parameterization.sample(Oracle(parameterization, {"x": target}), (1, 3, 16), ["x"],
                                  torch.Generator().manual_seed(0), sampler="heun", num_steps=20,
                                  known=target[None], known_mask=mask)
    torch.testing.assert_close(out[0], target, atol=1e-3, rtol=1e-3)


def test_flow_loss_is_zero_for_the_exact_velocity_and_maps_integer_timesteps():
    flow = FlowMatching(100)
    target = torch.randn(4, 6)
    x0 = target.expand(3, 4, 6)
    oracle = Oracle(flow, {"x": target})
    generator = torch.Generator().manual_seed(0)
    assert flow.per_example_loss(oracle, x0, ["x"] * 3, generator=generator).abs().max() < 1e-4
    assert flow.per_example_loss(oracle, x0, ["x"] * 3, timesteps=torch.tensor([0, 50, 99])).abs().max() < 1e-4
    torch.testing.assert_close(flow.time(torch.tensor([0, 49, 99])), torch.tensor([0.01, 0.5, 1.0]))
    noise = torch.randn(3, 4, 6, generator=generator)
    x_t, model_time, velocity = flow.noise_path(x0, torch.tensor([0.0, 0.5, 1.0]), noise)
    torch.testing.assert_close(x_t[2], noise[2])  # t = 1: pure noise
    torch.testing.assert_close(velocity, noise - x0)
    torch.testing.assert_close(model_time, torch.tensor([0.0, 50.0, 100.0]))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        flow.time(torch.tensor([1.5]))


def test_per_example_loss_uses_the_global_rng_reproducibly():
    # the unlearning core seeds torch's global RNG before each evaluation: same seed, same loss
    torch.manual_seed(0)
    model = MelUNet(n_mels=8, base_channels=8, channel_mults=(1, 2), text_dim=8, text_buckets=32,
                    musical_conditioning=True)
    model.out_conv.reset_parameters()
    x0 = torch.randn(3, 8, 16)
    conditions = stack_conditions([{"bpm": 90}, {"key": "Gm"}, {}])
    for parameterization in (GaussianDiffusion(100), FlowMatching(100)):
        losses = []
        for _ in range(2):
            torch.manual_seed(5)
            losses.append(parameterization.per_example_loss(model, x0, ["a", "b", ""], cond_dropout=0.5,
                                                            conditions=conditions))
        assert losses[0].shape == (3,) and losses[0].dtype == torch.float32
        assert torch.equal(losses[0], losses[1]) and losses[0].requires_grad


def test_sampler_and_argument_checks():
    with pytest.raises(ValueError, match="sampler must be one of"):
        FlowMatching(10).sample(Oracle(FlowMatching(10), {}), (1, 1, 1), ["x"], torch.Generator(), sampler="ddim")
    with pytest.raises(ValueError, match="known and known_mask go together"):
        GaussianDiffusion(10).sample(Oracle(GaussianDiffusion(10), {}), (1, 1, 2), ["x"], torch.Generator(),
                                     known=torch.zeros(1, 1, 2))
    with pytest.raises(ValueError, match="guidance_scale"):
        FlowMatching(10).sample(Oracle(FlowMatching(10), {}), (1, 1, 1), ["x"], torch.Generator(),
                                guidance_scale=float("nan"))
    with pytest.raises(ValueError, match="sampler 'euler' does not fit prediction='v'"):
        TrainConfig(prediction="v", sampler="euler")
    assert TrainConfig(prediction="flow").default_sampler == "heun"
    assert TrainConfig().default_sampler == "ddim"
    assert len(CONDITION_NAMES) == 4
