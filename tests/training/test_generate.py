"""Generation from a trained checkpoint: exact length, finite, audible, deterministic, validated."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.training.conftest import MEL_CONFIG
from training.generate import PEAK_DBFS, generate, load_checkpoint


pytestmark = pytest.mark.usefixtures("one_torch_thread")



@pytest.fixture(scope="module")
def checkpoint(trained):
    return load_checkpoint(trained[0].checkpoint_path)


def _dbfs(value: float) -> float:
    return 20 * math.log10(max(value, 1e-12))


def test_load_checkpoint_uses_the_ema_weights(trained, checkpoint):
    state = torch.load(trained[0].checkpoint_path, map_location="cpu", weights_only=True)
    for name, tensor in checkpoint.model.state_dict().items():
        assert torch.equal(tensor, state["ema_state"][name]), name
    assert not checkpoint.model.training
    assert checkpoint.mel_config == MEL_CONFIG and checkpoint.step == trained[1].steps
    assert checkpoint.text_encoder is checkpoint.model.text_encoder
    assert checkpoint.diffusion.num_steps == trained[1].diffusion_steps


@pytest.mark.parametrize("duration_s", [1.234, 0.5, 1 / 3])
def test_generate_gives_exact_length_finite_audible_audio(trained, duration_s):
    result = generate(trained[0].checkpoint_path, "sine mid calm", seed=3, duration_s=duration_s, num_steps=10)
    num_samples = round(duration_s * MEL_CONFIG.sample_rate_hz)
    assert result.audio.shape == (1, num_samples) and result.audio.dtype == np.float32
    assert np.isfinite(result.audio).all()
    assert _dbfs(float(np.abs(result.audio).max())) == pytest.approx(PEAK_DBFS, abs=1e-3)  # > -40 dBFS
    assert _dbfs(float(np.sqrt(np.mean(result.audio**2)))) > -40.0  # not a lone click
    assert result.sample_rate_hz == MEL_CONFIG.sample_rate_hz and result.sampler == "ddim-10-cfg3.0"
    assert result.mel.shape == (MEL_CONFIG.n_mels, MEL_CONFIG.num_frames(num_samples))
    assert result.mel.min() >= math.log(MEL_CONFIG.log_floor) - 1e-6


def test_generate_is_deterministic_for_a_seed(checkpoint):
    first = generate(checkpoint, "noise bright", seed=11, duration_s=0.5, num_steps=5, guidance_scale=2.0)
    again = generate(checkpoint, "noise bright", seed=11, duration_s=0.5, num_steps=5, guidance_scale=2.0)
    other = generate(checkpoint, "noise bright", seed=12, duration_s=0.5, num_steps=5, guidance_scale=2.0)
    assert np.array_equal(first.audio, again.audio) and np.array_equal(first.mel, again.mel)
    assert not np.array_equal(first.mel, other.mel)
    assert first.sampler == "ddim-5-cfg2.0"


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"duration_s": 0.0}, "duration_s"),
    ({"duration_s": -1.0}, "duration_s"),
    ({"duration_s": float("nan")}, "duration_s"),
    ({"duration_s": float("inf")}, "duration_s"),
    ({"duration_s": 1e6}, "duration_s"),
    ({"duration_s": 0.001}, "one mel hop"),
    ({"num_steps": 0}, "num_steps"),
    ({"num_steps": 101}, "num_steps"),
    ({"guidance_scale": -1.0}, "guidance_scale"),
])
def test_generate_rejects_bad_arguments(checkpoint, kwargs, message):
    arguments = {"prompt": "sine", "seed": 0, "duration_s": 0.5, "num_steps": 5, **kwargs}
    with pytest.raises(ValueError, match=message):
        generate(checkpoint, **arguments)


def test_load_checkpoint_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "checkpoint.pt")
