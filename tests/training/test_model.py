"""MelUNet: any frame count, constructor arguments round-trip, the condition reaches the output."""

from __future__ import annotations

import pytest
import torch

from training.model import MelUNet, timestep_embedding


pytestmark = pytest.mark.usefixtures("one_torch_thread")



def _randomise_output_layer(model: MelUNet) -> None:
    """The output layer starts at zero (ε = 0); give it weights so that the output shows the inputs."""
    torch.manual_seed(1)
    model.out_conv.reset_parameters()


@pytest.mark.parametrize("frames", [1, 7, 37, 128, 129])
def test_forward_keeps_shape_for_any_frame_count(frames):
    torch.manual_seed(0)
    model = MelUNet(n_mels=16, base_channels=8, channel_mults=(1, 2, 2, 2), text_dim=8, text_buckets=32)
    _randomise_output_layer(model)
    mel = torch.randn(3, 16, frames)
    out = model(mel, torch.tensor([0, 10, 999]), ["a", "", "b c"])
    assert out.shape == (3, 16, frames) and out.dtype == torch.float32
    assert torch.isfinite(out).all() and out.abs().sum() > 0


def test_kwargs_rebuild_the_same_model():
    torch.manual_seed(0)
    model = MelUNet(n_mels=12, base_channels=16, channel_mults=(1, 2), text_dim=8, text_buckets=64)
    rebuilt = MelUNet(**model.model_kwargs)
    rebuilt.load_state_dict(model.state_dict())  # strict: same architecture
    mel, t = torch.randn(2, 12, 20), torch.tensor([3, 400])
    torch.testing.assert_close(rebuilt(mel, t, ["a", "b"]), model(mel, t, ["a", "b"]))


def test_timestep_and_text_change_the_prediction():
    torch.manual_seed(0)
    model = MelUNet(n_mels=8, base_channels=8, channel_mults=(1, 2), text_dim=8, text_buckets=64)
    for module in model.modules():  # leave the identity-at-init regime so the condition shows
        if isinstance(module, torch.nn.Conv1d):
            module.reset_parameters()
    mel = torch.randn(1, 8, 16).repeat(3, 1, 1)
    out = model(mel, torch.tensor([10, 10, 900]), ["piano", "drums", "piano"])
    assert not torch.allclose(out[0], out[1], atol=1e-5)  # text
    assert not torch.allclose(out[0], out[2], atol=1e-5)  # timestep


def test_rejects_wrong_shapes():
    model = MelUNet(n_mels=8, base_channels=8, channel_mults=(1,), text_dim=4, text_buckets=8)
    with pytest.raises(ValueError, match=r"\(batch, 8, frames\)"):
        model(torch.randn(1, 9, 10), torch.tensor([0]), [""])
    with pytest.raises(ValueError, match="batch sizes disagree"):
        model(torch.randn(2, 8, 10), torch.tensor([0]), ["", ""])


def test_timestep_embedding_is_sinusoidal():
    emb = timestep_embedding(torch.tensor([0, 7]), 16)
    assert emb.shape == (2, 16)
    torch.testing.assert_close(emb[0], torch.cat([torch.ones(8), torch.zeros(8)]))
    torch.testing.assert_close(emb[1, 0], torch.cos(torch.tensor(7.0)))  # lowest index: frequency 1
