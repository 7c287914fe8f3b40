"""MelStatsEmbedder on synthetic instruments: shape, determinism, invariances, timbre separation."""

from __future__ import annotations

import numpy as np
import pytest

from cleaning.audio import resample
from cleaning.embed import MelStatsEmbedder, embed_clip, load_embedder
from provenance.attribution import Embedder

SAMPLE_RATE_HZ = 16000


def instrument_clip(kind: str, notes_hz: list[float], seed: int, note_s: float = 0.5,
                    sample_rate_hz: int = SAMPLE_RATE_HZ, noise: float = 0.005) -> np.ndarray:
    """float32 ``(1, samples)``: ``notes_hz`` played one after another by a synthetic instrument.

    ``organ``: sustained odd harmonics (1/k); ``pluck``: all harmonics (0.6^k), fast exponential decay;
    ``bell``: inharmonic FM partials, slow decay; ``snare``: noise bursts with a short tone.
    """
    rng = np.random.default_rng(seed)
    t = np.arange(int(note_s * sample_rate_hz)) / sample_rate_hz
    parts = []
    for f0 in notes_hz:
        if kind == "organ":
            x = sum(np.sin(2 * np.pi * k * f0 * t) / k for k in range(1, 16, 2) if k * f0 < sample_rate_hz / 2)
            x = x * np.minimum(1.0, t / 0.03)
        elif kind == "pluck":
            x = sum(0.6 ** k * np.sin(2 * np.pi * (k + 1) * f0 * t) for k in range(10)) * np.exp(-8 * t)
        elif kind == "bell":
            x = np.sin(2 * np.pi * f0 * t + 2.5 * np.exp(-2 * t) * np.sin(2 * np.pi * 3.5 * f0 * t)) * np.exp(-3 * t)
        elif kind == "snare":
            x = (rng.standard_normal(t.size) + 0.5 * np.sin(2 * np.pi * f0 * t)) * np.exp(-25 * t)
        else:
            raise ValueError(kind)
        parts.append(x / np.max(np.abs(x)))
    audio = 0.3 * np.concatenate(parts) + noise * rng.standard_normal(len(parts) * t.size)
    return audio[None].astype(np.float32)


@pytest.fixture(scope="module")
def embedder() -> MelStatsEmbedder:
    return MelStatsEmbedder()


def test_shape_dtype_and_unit_norm(embedder):
    audio = instrument_clip("organ", [220, 247, 262, 294, 330, 349], seed=0)  # 3 s
    windows = embedder.embed(audio, SAMPLE_RATE_HZ)
    assert embedder.dim == 3 * 64 == 192
    assert windows.shape == (1 + (3 * SAMPLE_RATE_HZ - SAMPLE_RATE_HZ) // (SAMPLE_RATE_HZ // 2), 192) == (5, 192)
    assert windows.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(windows, axis=1), 1.0, atol=1e-5)
    clip = embed_clip(embedder, audio, SAMPLE_RATE_HZ)
    assert clip.shape == (192,) and clip.dtype == np.float32
    assert np.linalg.norm(clip) == pytest.approx(1.0, abs=1e-5)


def test_deterministic_across_calls_and_instances(embedder):
    audio = instrument_clip("bell", [523, 587, 659, 698], seed=1)
    first = embedder.embed(audio, SAMPLE_RATE_HZ)
    np.testing.assert_array_equal(first, embedder.embed(audio, SAMPLE_RATE_HZ))
    np.testing.assert_array_equal(first, MelStatsEmbedder().embed(audio.copy(), SAMPLE_RATE_HZ))


def test_satisfies_the_embedder_protocol_and_names_its_parameters(embedder):
    assert isinstance(embedder, Embedder)
    assert embedder.name == "mel-stats-v1_sr16000_mels64_win1000ms_hop500ms_fft512"
    assert MelStatsEmbedder(window_s=2.0).name != embedder.name
    assert all(ch.isalnum() or ch in "-_." for ch in embedder.name)  # names an index folder


def test_same_instrument_is_closer_than_different_instruments(embedder):
    notes = {"organ": [196, 220, 247, 262], "pluck": [147, 165, 175, 196],
             "bell": [523, 587, 659, 698], "snare": [180, 200, 180, 200]}
    # take 0 plays the notes; take 1 plays them a whole tone higher, backwards, with other noise
    takes = {0: lambda hz: hz, 1: lambda hz: [f * 2 ** (2 / 12) for f in reversed(hz)]}
    clips = {(kind, take): embed_clip(embedder, instrument_clip(kind, shift(hz), seed=10 + take), SAMPLE_RATE_HZ)
             for kind, hz in notes.items() for take, shift in takes.items()}
    for kind in notes:
        same = float(clips[(kind, 0)] @ clips[(kind, 1)])
        different = max(float(clips[(kind, 0)] @ clips[(other, take)])
                        for other in notes if other != kind for take in (0, 1))
        assert same > different + 0.05, (kind, same, different)


def test_gain_changes_barely_move_the_embedding(embedder):
    audio = instrument_clip("pluck", [147, 165, 175, 196], seed=2, noise=0.0)
    reference = embed_clip(embedder, audio, SAMPLE_RATE_HZ)
    quieter = embed_clip(embedder, audio * 10 ** (-6 / 20), SAMPLE_RATE_HZ)
    other = embed_clip(embedder, instrument_clip("organ", [147, 165, 175, 196], seed=2), SAMPLE_RATE_HZ)
    assert float(reference @ quieter) > 0.99
    assert float(reference @ quieter) > float(reference @ other) + 0.1


def test_other_rates_and_stereo_are_resampled_and_mixed(embedder):
    audio = instrument_clip("organ", [220, 262, 330, 392], seed=3)
    at_44k = resample(audio, SAMPLE_RATE_HZ, 44100)
    stereo = np.repeat(at_44k, 2, axis=0)
    reference = embed_clip(embedder, audio, SAMPLE_RATE_HZ)
    assert float(reference @ embed_clip(embedder, stereo, 44100)) > 0.99


def test_short_clip_gives_one_window_and_silence_gives_zeros(embedder):
    short = instrument_clip("bell", [523], seed=4, note_s=0.3)
    assert embedder.embed(short, SAMPLE_RATE_HZ).shape == (1, 192)
    silence = np.zeros((1, SAMPLE_RATE_HZ * 2), dtype=np.float32)
    assert not np.any(embedder.embed(silence, SAMPLE_RATE_HZ))
    assert not np.any(embed_clip(embedder, silence, SAMPLE_RATE_HZ))


@pytest.mark.parametrize("audio", [np.zeros((1, 0), np.float32), np.full((1, 100), np.nan, np.float32),
                                   np.zeros((1, 1, 100), np.float32)])
def test_rejects_empty_non_finite_or_misshapen_audio(embedder, audio):
    with pytest.raises(ValueError):
        embedder.embed(audio, SAMPLE_RATE_HZ)


def test_load_embedder_knows_mel_stats_and_names_the_known_ones_otherwise():
    embedder = load_embedder("mel-stats")
    assert isinstance(embedder, MelStatsEmbedder)
    assert load_embedder(embedder.name).name == embedder.name  # the name an index's meta.json records
    with pytest.raises(ValueError, match="unknown embedder .clap.*known: mel-stats, clap:PATH, panns:PATH"):
        load_embedder("clap")


def test_rejects_bad_parameters():
    with pytest.raises(ValueError, match="> 0"):
        MelStatsEmbedder(hop_s=0)
    with pytest.raises(ValueError, match="3 frames"):
        MelStatsEmbedder(window_s=0.02)
