import math
from pathlib import Path

import numpy as np
import pytest

import cleaning.quality as quality
from cleaning.audio import read_audio
from cleaning.measure import measure_peak_dbfs
from cleaning.quality import (check_stem_formats, check_stems, measure_dc_offset, measure_dc_offset_dbfs,
                              measure_stem_residual_db, measure_true_peak_dbtp)
from tests.conftest import sine

MUSDB = Path(__file__).resolve().parents[2].parent / "shared" / "corpus" / "audio" / "musdb_sample" / \
    "Music_Delta_80s_Rock"


def quarter_rate_sine(sample_rate_hz: int, duration_s: float = 1.0) -> np.ndarray:
    """Full-scale sine at fs/4 with a 45° phase: every sample is ±1/√2, the waveform between them peaks at 1."""
    n = np.arange(int(duration_s * sample_rate_hz))
    return np.sin(np.pi / 2 * n + np.pi / 4).astype(np.float32)[None]


@pytest.mark.parametrize("sample_rate_hz", [44100, 48000, 192000])  # 192 kHz takes the 2× path
def test_true_peak_finds_the_peak_between_samples(sample_rate_hz):
    audio = quarter_rate_sine(sample_rate_hz)
    assert measure_peak_dbfs(audio) == pytest.approx(-3.01, abs=0.01)
    assert measure_true_peak_dbtp(audio, sample_rate_hz) == pytest.approx(0.0, abs=0.5)


def test_true_peak_of_a_1khz_sine_is_its_amplitude():
    audio = sine(1000.0, 2.0, 48000, amplitude=10 ** (-6 / 20), num_channels=2)
    assert measure_true_peak_dbtp(audio, 48000) == pytest.approx(-6.0, abs=0.1)


def test_true_peak_is_the_same_in_blocks_and_at_least_the_sample_peak(monkeypatch):
    noise = np.random.default_rng(0).uniform(-0.5, 0.5, (2, 50_000)).astype(np.float32)
    whole = measure_true_peak_dbtp(noise, 44100)
    monkeypatch.setattr(quality, "TRUE_PEAK_BLOCK_SAMPLES", 997)  # many blocks, none aligned to anything
    assert measure_true_peak_dbtp(noise, 44100) == pytest.approx(whole, abs=1e-9)
    assert whole > measure_peak_dbfs(noise)  # white noise overshoots between samples


def test_true_peak_of_silence_and_bad_input():
    assert measure_true_peak_dbtp(np.zeros((2, 1000), np.float32), 48000) == -math.inf
    assert measure_true_peak_dbtp(np.zeros((1, 0), np.float32), 48000) == -math.inf
    with pytest.raises(ValueError, match="channels, samples"):
        measure_true_peak_dbtp(np.zeros(1000, np.float32), 48000)
    with pytest.raises(ValueError, match="sample_rate_hz"):
        measure_true_peak_dbtp(np.zeros((1, 1000), np.float32), 0)


def test_dc_offset_is_the_worst_channel():
    audio = sine(100.0, 1.0, 8000, 0.5, num_channels=2)  # whole periods: mean 0
    audio[1] -= 0.1
    assert measure_dc_offset(audio) == pytest.approx(0.1, abs=1e-6)
    assert measure_dc_offset_dbfs(audio) == pytest.approx(-20.0, abs=1e-4)
    assert measure_dc_offset(np.zeros((2, 100), np.float32)) == 0.0
    assert measure_dc_offset_dbfs(np.zeros((2, 100), np.float32)) == -math.inf


def test_check_stems_reports_rates_lengths_and_channels():
    stereo, mono = np.zeros((2, 1000), np.float32), np.zeros((1, 1000), np.float32)
    assert check_stems([(stereo, 44100), (mono, 44100)]).ok  # mono broadcasts
    assert check_stems([]).ok and check_stems([]).detail == ""
    rates = check_stems([(stereo, 44100), (stereo, 48000)])
    assert not rates.ok and rates.sample_rates_hz == (44100, 48000) and "44100, 48000" in rates.detail
    lengths = check_stems([(stereo, 44100), (stereo[:, :998], 44100)])
    assert not lengths.ok and lengths.num_samples == (998, 1000) and "998, 1000" in lengths.detail
    assert check_stems([(stereo, 44100), (stereo[:, :998], 44100)], tolerance_samples=2).ok
    surround = check_stems([(stereo, 44100), (np.zeros((6, 1000), np.float32), 44100)])
    assert not surround.ok and "channel counts [2, 6]" in surround.detail
    assert check_stem_formats([44100, 44100], [1000, 1000], [2, 1]) == check_stems([(stereo, 44100), (mono, 44100)])
    with pytest.raises(ValueError, match="tolerance_samples"):
        check_stems([(stereo, 44100)], tolerance_samples=-1)


def test_stem_residual_of_an_exact_and_a_noisy_sum():
    rng = np.random.default_rng(1)
    stems = [rng.uniform(-0.3, 0.3, (2, 20_000)).astype(np.float32) for _ in range(3)]
    mixture = np.sum(stems, axis=0, dtype=np.float64)
    assert measure_stem_residual_db(mixture, stems) == -math.inf
    error = rng.standard_normal(mixture.shape)
    error *= math.sqrt(np.sum(mixture ** 2) / np.sum(error ** 2)) * 10 ** (-20 / 20)  # −20 dB below the sum
    expected_db = 10 * math.log10(np.sum(error ** 2) / np.sum((mixture + error) ** 2))  # relative to m + e
    assert measure_stem_residual_db(mixture + error, stems) == pytest.approx(expected_db, abs=1e-9)
    assert expected_db == pytest.approx(-20.0, abs=0.1)
    assert measure_stem_residual_db(mixture, stems[:1]) > -10  # a missing stem is a large residual


def test_stem_residual_broadcasts_mono_and_compares_the_shortest_span():
    mono = sine(440.0, 1.0, 8000, 0.25)
    stereo_mixture = np.concatenate([mono, mono]) * 2
    assert measure_stem_residual_db(stereo_mixture, [mono, mono]) == -math.inf
    longer_stem = np.concatenate([mono, np.ones((1, 500), np.float32)], axis=1)  # extra tail is ignored
    assert measure_stem_residual_db(stereo_mixture, [mono, longer_stem]) == -math.inf
    assert measure_stem_residual_db(np.zeros_like(stereo_mixture), [mono]) == math.inf
    with pytest.raises(ValueError, match="broadcast"):
        measure_stem_residual_db(stereo_mixture, [np.zeros((6, 8000), np.float32)])
    with pytest.raises(ValueError, match="at least one stem"):
        measure_stem_residual_db(stereo_mixture, [])


def test_musdb_stems_sum_to_the_mixture_within_31_db():
    """The corpus README: the MUSDB18 sample's stems sum to its mixture within ~31 dB SNR (real bleed)."""
    if not MUSDB.exists():
        pytest.fail(f"the MUSDB sample is not at {MUSDB}: this test needs ../shared/corpus beside the repo")
    mixture, rate = read_audio(MUSDB / "mixture.flac")
    stems = [read_audio(MUSDB / f"{name}.flac") for name in ("bass", "drums", "other", "vocals")]
    assert check_stems(stems).ok and {r for _, r in stems} == {rate}
    assert measure_stem_residual_db(mixture, [audio for audio, _ in stems]) == pytest.approx(-31.0, abs=3.0)


@pytest.mark.parametrize("sample_rate_hz", [44100, 192000])
@pytest.mark.parametrize("block_samples", [1 << 15, 4096, 1000])
@pytest.mark.parametrize("interleaved", [False, True])
def test_true_peak_equals_the_annex_filter_applied_directly(sample_rate_hz, block_samples, interleaved,
                                                            monkeypatch):
    """The compiled float32 polyphase kernel gives what convolving with each BS.1770-4 Annex 2 phase in
    float64 gives (the 192 kHz path uses phases 0 and 2 only), in either memory layout; with small blocks
    on a rising envelope most blocks are skipped by the L1 bound, and the result is still the same."""
    monkeypatch.setattr(quality, "TRUE_PEAK_BLOCK_SAMPLES", block_samples)
    rng = np.random.default_rng(3)
    audio = (rng.standard_normal((2, 30_011)) * np.linspace(0.01, 0.3, 30_011)).astype(np.float32)
    if interleaved:
        audio = np.ascontiguousarray(audio.T).T  # the transposed view of a decoded file's buffer
    phases = quality.BS1770_TRUE_PEAK_TAPS if sample_rate_hz <= 96000 else quality.BS1770_TRUE_PEAK_TAPS[[0, 2]]
    reference = max(np.max(np.abs(np.convolve(channel.astype(np.float64), taps)))
                    for channel in audio for taps in phases)
    assert measure_true_peak_dbtp(audio, sample_rate_hz) == pytest.approx(20 * math.log10(reference), abs=1e-4)


@pytest.mark.parametrize("num_channels", [1, 3])
@pytest.mark.parametrize("interleaved", [False, True])
def test_true_peak_of_any_channel_count_and_layout(num_channels, interleaved):
    """The interleaved kernel filters every channel in one pass over the buffer (tap k of channel c reads
    ``flat[(t − k) · channels + c]``): with 1 and 3 channels, either layout, odd lengths that leave partial
    blocks, it gives the float64 reference, and the loudest channel decides wherever it sits."""
    rng = np.random.default_rng(11)
    audio = (0.1 * rng.standard_normal((num_channels, 9_001))).astype(np.float32)
    audio[-1, 4_500] = 0.9  # the last channel holds the peak: a wrong stride would miss or misplace it
    if interleaved:
        audio = np.ascontiguousarray(audio.T).T
    reference = max(np.max(np.abs(np.convolve(channel.astype(np.float64), taps)))
                    for channel in audio for taps in quality.BS1770_TRUE_PEAK_TAPS)
    assert reference > 0.8  # the impulse, not the noise (≈ 0.45), is the peak
    assert measure_true_peak_dbtp(audio, 44100) == pytest.approx(20 * math.log10(reference), abs=1e-4)
