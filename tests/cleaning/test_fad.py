"""Fréchet Audio Distance: closed forms and behaviour on real embeddings."""

from __future__ import annotations

import numpy as np
import pytest

from cleaning import fad
from cleaning.embed import load_embedder


def test_frechet_distance_matches_the_closed_form_for_diagonal_gaussians() -> None:
    mean_a, mean_b = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.5, 0.0])
    std_a, std_b = np.array([1.0, 2.0, 0.5]), np.array([2.0, 1.0, 0.5])
    a = fad.GaussianStats(mean_a, np.diag(std_a ** 2), 100)
    b = fad.GaussianStats(mean_b, np.diag(std_b ** 2), 100)
    expected = float(((mean_a - mean_b) ** 2).sum() + ((std_a - std_b) ** 2).sum())
    assert fad.frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    assert fad.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    assert fad.frechet_distance(a, b) == pytest.approx(fad.frechet_distance(b, a), rel=1e-9)


def test_gaussian_stats_and_errors() -> None:
    x = np.random.default_rng(0).normal(size=(500, 4))
    stats = fad.gaussian_stats(x)
    np.testing.assert_allclose(stats.mean, x.mean(axis=0))
    np.testing.assert_allclose(stats.cov, np.cov(x, rowvar=False))
    assert stats.count == 500
    with pytest.raises(ValueError, match="NaN"):
        fad.gaussian_stats(np.array([[np.nan, 1.0]]))
    with pytest.raises(ValueError, match="shape"):
        fad.gaussian_stats(np.zeros(3))
    with pytest.raises(ValueError, match="dimensions differ"):
        fad.frechet_distance(stats, fad.gaussian_stats(np.zeros((3, 2))))


def _tone(freq: float, seed: int, rate: int = 16000, seconds: float = 3.0) -> tuple[np.ndarray, int]:
    rng = np.random.default_rng(seed)
    t = np.arange(int(rate * seconds)) / rate
    audio = 0.4 * np.sin(2 * np.pi * freq * (1 + 0.01 * rng.standard_normal()) * t) + 0.01 * rng.standard_normal(t.size)
    return audio[None, :].astype(np.float32), rate


def _noise(seed: int, rate: int = 16000, seconds: float = 3.0) -> tuple[np.ndarray, int]:
    return (0.3 * np.random.default_rng(seed).standard_normal((1, int(rate * seconds)))).astype(np.float32), rate


def test_fad_separates_tones_from_noise_with_the_default_embedder() -> None:
    embedder = load_embedder("mel-stats")
    tones_a = [_tone(f, i) for i, f in enumerate([220, 330, 440, 550, 660, 770])]
    tones_b = [_tone(f, 10 + i) for i, f in enumerate([220, 330, 440, 550, 660, 770])]
    noise = [_noise(20 + i) for i in range(6)]
    same = fad.fad(embedder, tones_a, tones_b)
    different = fad.fad(embedder, tones_a, noise)
    assert different > 5 * same

    reference = fad.embed_stats(embedder, tones_a + tones_b)
    clean_item = fad.per_item_fad(fad.embed_windows(embedder, [_tone(440, 99)]), reference)
    noisy_item = fad.per_item_fad(fad.embed_windows(embedder, [_noise(99)]), reference)
    assert noisy_item > clean_item
    with pytest.raises(ValueError, match="shrinkage"):
        fad.per_item_fad(fad.embed_windows(embedder, [_noise(1)]), reference, shrinkage=1.5)
