"""The HiFi-GAN generator (Kong et al. 2020) as a vocoder: shapes, our checkpoint format, the authors' release
format with weight norm folded, mismatches refused."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from cleaning.mel import MelConfig
from training.vocoder import (GriffinLimVocoder, HiFiGanGenerator, HiFiGanVocoder, fold_weight_norm, load_vocoder,
                              save_hifigan)

MEL = MelConfig(sample_rate_hz=16000, n_fft=512, hop_length=160, n_mels=32)
TINY = dict(n_mels=32, upsample_rates=(10, 4, 4), upsample_kernel_sizes=(20, 8, 8), upsample_initial_channel=32,
            resblock_kernel_sizes=(3, 5), resblock_dilation_sizes=((1, 3), (1, 3)))


def test_generator_upsamples_by_the_hop_and_stays_in_range():
    torch.manual_seed(0)
    generator = HiFiGanGenerator(**TINY)
    assert generator.hop_length == 160
    with torch.no_grad():
        out = generator(torch.randn(2, 32, 25))
    assert out.shape == (2, 1, 25 * 160) and float(out.abs().max()) <= 1.0


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(0)
    generator = HiFiGanGenerator(**TINY)
    path = save_hifigan(generator, MEL, tmp_path / "g.pt")
    vocoder = load_vocoder(path, MEL)
    assert isinstance(vocoder, HiFiGanVocoder)
    mel = np.random.default_rng(0).normal(-5, 1, (32, 40)).astype(np.float32)
    np.testing.assert_array_equal(vocoder(mel, num_samples=6000), HiFiGanVocoder(generator, MEL)(mel, 6000))
    assert vocoder(mel).shape == (1, 40 * 160)
    assert isinstance(load_vocoder(None, MEL), GriffinLimVocoder)
    assert isinstance(load_vocoder("griffin-lim", MEL), GriffinLimVocoder)
    with pytest.raises(ValueError, match="trained on mels"):
        load_vocoder(path, MelConfig(sample_rate_hz=16000, n_fft=512, hop_length=160, n_mels=32, log_floor=1e-4))
    with pytest.raises(ValueError, match="hop"):
        HiFiGanVocoder(generator, MelConfig(sample_rate_hz=16000, n_fft=512, hop_length=128, n_mels=32))
    with pytest.raises(FileNotFoundError, match="no vocoder checkpoint"):
        load_vocoder(tmp_path / "missing.pt", MEL)


def test_the_authors_release_format_loads_with_weight_norm_folded(tmp_path):
    # build the authors' layout: every conv weight-normed (torch.nn.utils.weight_norm → weight_g / weight_v)
    torch.manual_seed(0)
    reference = HiFiGanGenerator(**TINY)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for module in reference.modules():
            if isinstance(module, (torch.nn.Conv1d, torch.nn.ConvTranspose1d)):
                torch.nn.utils.weight_norm(module)
                module.weight_g.data.uniform_(0.5, 2.0)  # a g that differs from ‖v‖
    state = reference.state_dict()
    assert any(key.endswith(".weight_g") for key in state)
    torch.save({"generator": state}, tmp_path / "generator_v1")
    (tmp_path / "config.json").write_text(json.dumps({
        "resblock": "1", "num_mels": 32, "upsample_rates": [10, 4, 4], "upsample_kernel_sizes": [20, 8, 8],
        "upsample_initial_channel": 32, "resblock_kernel_sizes": [3, 5], "resblock_dilation_sizes": [[1, 3], [1, 3]]}))
    vocoder = load_vocoder(tmp_path / "generator_v1", MEL)
    mel = torch.randn(1, 32, 12)
    with torch.no_grad():
        torch.testing.assert_close(vocoder.generator(mel), reference(mel), atol=1e-5, rtol=1e-4)
    folded = fold_weight_norm(state)
    assert not any(key.endswith(("_g", "_v")) for key in folded)
    (tmp_path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_vocoder(tmp_path / "generator_v1", MEL)
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a HiFi-GAN generator checkpoint"):
        load_vocoder(tmp_path / "other.pt", MEL)
