"""Griffin-Lim vocoder (Griffin & Lim 1984): a sine's log-mel comes back as that sine."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cleaning.mel import MelConfig, log_mel
from tests.conftest import sine
from training.vocoder import GriffinLimVocoder

CONFIG = MelConfig(sample_rate_hz=16000, n_fft=512, hop_length=160, n_mels=64)


def _dominant_frequency_hz(audio: np.ndarray, sample_rate_hz: int) -> float:
    spectrum = np.abs(np.fft.rfft(audio[0] * np.hanning(audio.shape[-1])))
    return float(np.argmax(spectrum)) * sample_rate_hz / audio.shape[-1]


@pytest.mark.parametrize("frequency_hz", [440.0, 1000.0])
def test_sine_round_trip_keeps_pitch_and_level(frequency_hz):
    audio = sine(frequency_hz, 1.0, CONFIG.sample_rate_hz, amplitude=0.5)
    out = GriffinLimVocoder(CONFIG)(log_mel(audio, CONFIG), num_samples=audio.shape[-1])
    assert out.shape == (1, 16000) and out.dtype == np.float32 and np.isfinite(out).all()
    assert abs(_dominant_frequency_hz(out, CONFIG.sample_rate_hz) - frequency_hz) < 0.05 * frequency_hz
    rms_ratio = np.sqrt(np.mean(out**2)) / np.sqrt(np.mean(audio**2))
    assert 0.5 < rms_ratio < 2.0  # magnitude (power 1) mel in, the same level out


def test_deterministic_and_leaves_the_global_rng_alone():
    mel = log_mel(sine(440.0, 0.5, CONFIG.sample_rate_hz), CONFIG)
    vocoder = GriffinLimVocoder(CONFIG, n_iter=8)
    state = torch.random.get_rng_state()
    first = vocoder(mel)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert np.array_equal(first, vocoder(mel))
    assert first.shape == (1, (mel.shape[1] - 1) * CONFIG.hop_length)
    assert not np.array_equal(first, GriffinLimVocoder(CONFIG, n_iter=8, seed=1)(mel))


def test_rejects_wrong_shapes():
    with pytest.raises(ValueError, match=r"\(64, frames >= 2\)"):
        GriffinLimVocoder(CONFIG)(np.zeros((32, 10), dtype=np.float32))
    with pytest.raises(ValueError, match="non-finite"):
        GriffinLimVocoder(CONFIG)(np.full((64, 10), np.nan, dtype=np.float32))
