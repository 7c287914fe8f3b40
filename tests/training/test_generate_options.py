"""Generate from ε/v and flow checkpoints: every sampler, musical conditions, variations by seed, guidance
and duration, continuation and inpainting of mel frames, and a neural (HiFi-GAN) vocoder from a local file."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cleaning.mel import log_mel
from tests.training.checkpoints import write_run
from tests.training.conftest import MEL_CONFIG, segment_audio
from training.generate import PEAK_DBFS, generate, generate_variations, load_checkpoint
from training.vocoder import HiFiGanGenerator, HiFiGanVocoder, save_hifigan


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def checkpoints(tiny_dataset, tmp_path_factory):
    torch.set_num_threads(1)
    out = {}
    for prediction in ("v", "flow"):
        run_dir = tmp_path_factory.mktemp(f"run-{prediction}")
        out[prediction] = load_checkpoint(write_run(tiny_dataset, run_dir, prediction, steps=12,
                                                    checkpoint_steps=(12,))[-1])
    return out


@pytest.mark.parametrize("prediction,sampler", [("v", "ddim"), ("v", "ddpm"), ("flow", "euler"), ("flow", "heun")])
def test_every_sampler_generates_exact_length_audio(checkpoints, prediction, sampler):
    result = generate(checkpoints[prediction], "sine mid calm", seed=1, duration_s=0.75, num_steps=4,
                      sampler=sampler, conditions={"bpm": 120, "key": "A minor", "instrument": "piano"})
    assert result.audio.shape == (1, round(0.75 * MEL_CONFIG.sample_rate_hz)) and np.isfinite(result.audio).all()
    assert 20 * np.log10(np.abs(result.audio).max()) == pytest.approx(PEAK_DBFS, abs=1e-3)
    assert result.sampler == f"{sampler}-4-cfg2.0"  # the checkpoint config's guidance scale is the default
    assert result.mel.shape == (MEL_CONFIG.n_mels, MEL_CONFIG.num_frames(round(0.75 * MEL_CONFIG.sample_rate_hz)))


def test_the_config_supplies_the_default_sampler_and_steps(checkpoints):
    assert generate(checkpoints["flow"], "noise", 0, 0.3).sampler == "heun-8-cfg2.0"
    assert generate(checkpoints["v"], "noise", 0, 0.3).sampler == "ddim-8-cfg2.0"
    with pytest.raises(ValueError, match="sampler must be one of"):
        generate(checkpoints["v"], "noise", 0, 0.3, sampler="heun")


def test_musical_conditions_change_the_generation(checkpoints):
    checkpoint = checkpoints["v"]
    torch.manual_seed(0)  # leave the zero-initialised regime so that the condition path shows in the output
    for module in checkpoint.model.musical_encoder.modules():
        if isinstance(module, torch.nn.Linear):
            module.reset_parameters()
    slow = generate(checkpoint, "sine", 3, 0.5, num_steps=3, conditions={"bpm": 70})
    fast = generate(checkpoint, "sine", 3, 0.5, num_steps=3, conditions={"bpm": 170})
    again = generate(checkpoint, "sine", 3, 0.5, num_steps=3, conditions={"bpm": 70})
    assert not np.allclose(slow.mel, fast.mel, atol=1e-4)
    assert np.array_equal(slow.mel, again.mel)


def test_variations_cover_the_grid_and_each_is_reproducible_alone(checkpoints):
    checkpoint = checkpoints["flow"]
    results = generate_variations(checkpoint, "sine low calm", seeds=[1, 2], guidance_scales=[1.0, 3.0],
                                  durations_s=[0.4, 0.6], num_steps=3)
    assert [(r.duration_s, r.seed, r.sampler) for r in results[:4]] == [
        (0.4, 1, "heun-3-cfg1.0"), (0.4, 2, "heun-3-cfg1.0"), (0.4, 1, "heun-3-cfg3.0"), (0.4, 2, "heun-3-cfg3.0")]
    assert {r.audio.shape[1] for r in results} == {round(0.4 * 16000), round(0.6 * 16000)}
    alone = generate(checkpoint, "sine low calm", 2, 0.6, num_steps=3, guidance_scale=3.0)
    assert np.array_equal(alone.mel, results[-1].mel)
    assert not np.allclose(results[0].mel, results[1].mel)  # seeds differ
    with pytest.raises(ValueError, match="at least one value"):
        generate_variations(checkpoint, "x", seeds=[])


@pytest.mark.parametrize("prediction", ["v", "flow"])
def test_continuation_keeps_the_context_frames(checkpoints, prediction):
    checkpoint = checkpoints[prediction]
    context = segment_audio("sine", 440.0, 0, np.random.default_rng(0))[:, :8000]  # 0.5 s
    result = generate(checkpoint, "sine mid", 5, 1.0, num_steps=4, context_audio=context,
                      context_sample_rate_hz=16000)
    assert result.sampler.endswith("-continue") and result.audio.shape == (1, 16000)
    kept = log_mel(context, MEL_CONFIG).shape[1] - 1  # frames whose centre precedes the context's end
    expected = np.maximum(log_mel(context, MEL_CONFIG), np.log(MEL_CONFIG.log_floor))[:, :kept]
    np.testing.assert_allclose(result.mel[:, :kept], expected, atol=1e-4)
    assert np.isfinite(result.mel[:, kept:]).all() and not np.allclose(result.mel[:, kept + 2:], expected[:, :1])


def test_inpainting_regenerates_only_the_interval(checkpoints):
    checkpoint = checkpoints["flow"]
    context = segment_audio("chord", 330.0, 0, np.random.default_rng(0))[:, :16000]  # 1 s
    result = generate(checkpoint, "chord", 2, 1.0, num_steps=4, context_audio=context, context_sample_rate_hz=16000,
                      regenerate_s=(0.4, 0.6))
    original = log_mel(context, MEL_CONFIG)
    frame_s = MEL_CONFIG.hop_length / MEL_CONFIG.sample_rate_hz
    times = np.arange(original.shape[1]) * frame_s
    inside = (times >= 0.4 - frame_s / 2) & (times < 0.6 - frame_s / 2)
    np.testing.assert_allclose(result.mel[:, ~inside], original[:, ~inside], atol=1e-4)
    assert np.abs(result.mel[:, inside] - original[:, inside]).mean() > 0.1
    assert result.sampler.endswith("-inpaint")
    with pytest.raises(ValueError, match="regenerated interval"):
        generate(checkpoint, "chord", 2, 1.0, context_audio=context, context_sample_rate_hz=16000,
                 regenerate_s=(0.8, 0.2))
    with pytest.raises(ValueError, match="needs context_audio"):
        generate(checkpoint, "chord", 2, 1.0, regenerate_s=(0.2, 0.4))


def test_a_hifigan_vocoder_loads_from_a_local_checkpoint(checkpoints, tmp_path):
    torch.manual_seed(0)
    generator = HiFiGanGenerator(n_mels=MEL_CONFIG.n_mels, upsample_rates=(10, 4, 4), upsample_kernel_sizes=(20, 8, 8),
                                 upsample_initial_channel=32, resblock_kernel_sizes=(3,),
                                 resblock_dilation_sizes=((1, 3),))
    path = save_hifigan(generator, MEL_CONFIG, tmp_path / "hifigan.pt")
    checkpoint = checkpoints["v"]
    result = generate(checkpoint, "sine", 4, 0.5, num_steps=3, vocoder=path)
    assert result.audio.shape == (1, 8000) and np.isfinite(result.audio).all()
    # the same mel through the in-memory generator gives the same waveform (up to the peak normalisation)
    direct = HiFiGanVocoder(generator, MEL_CONFIG)(result.mel, num_samples=8000)
    np.testing.assert_allclose(result.audio, direct * (10 ** (PEAK_DBFS / 20) / np.abs(direct).max()), atol=1e-5)
    griffin_lim = generate(checkpoint, "sine", 4, 0.5, num_steps=3)
    assert np.array_equal(griffin_lim.mel, result.mel) and not np.allclose(griffin_lim.audio, result.audio)
