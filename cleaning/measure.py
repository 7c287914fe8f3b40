"""Measurements of decoded audio. ``measure_*`` functions return numbers and know nothing of engines."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pyloudnorm

SILENCE_FLOOR_DBFS = -60.0
CLIP_THRESHOLD = 0.999


def measure_peak_dbfs(audio: np.ndarray) -> float:
    """Sample peak in dBFS (0 dBFS = full scale 1.0) of float32 ``(channels, samples)``; -inf for silence."""
    peak = float(np.max(np.abs(audio))) if audio.size else 0.0
    return 20.0 * math.log10(peak) if peak > 0 else -math.inf


def measure_loudness_lufs(audio: np.ndarray, sample_rate_hz: int) -> float:
    """Integrated loudness in LUFS per ITU-R BS.1770-4 (K-weighting, 400 ms blocks, absolute -70 LUFS and
    relative -10 LU gates), computed with pyloudnorm.

    Args:
        audio: float32 ``(channels, samples)``; up to 5 channels (BS.1770 channel weights).
        sample_rate_hz: sample rate of ``audio``.

    Returns:
        Loudness in LUFS; ``-inf`` when the audio is shorter than one 400 ms block or fully gated (silence).
    """
    num_samples = audio.shape[-1]
    if num_samples < int(0.4 * sample_rate_hz):
        return -math.inf
    meter = pyloudnorm.Meter(sample_rate_hz)  # BS.1770-4
    loudness = float(meter.integrated_loudness(np.asarray(audio, dtype=np.float64).T))
    return loudness


def measure_clipped_fraction(audio: np.ndarray, threshold: float = CLIP_THRESHOLD) -> float:
    """Fraction of samples (over all channels) whose magnitude is ≥ ``threshold`` of full scale."""
    return float(np.mean(np.abs(audio) >= threshold)) if audio.size else 0.0


def measure_silent_fraction(audio: np.ndarray, sample_rate_hz: int, floor_dbfs: float = SILENCE_FLOOR_DBFS,
                            window_s: float = 0.1) -> float:
    """Fraction of ``window_s`` windows whose RMS (over channels) is below ``floor_dbfs``."""
    window = max(1, int(window_s * sample_rate_hz))
    num_windows = audio.shape[-1] // window
    if num_windows == 0:
        return 1.0 if not np.any(audio) else 0.0
    frames = audio[:, : num_windows * window].reshape(audio.shape[0], num_windows, window)
    rms = np.sqrt(np.mean(frames.astype(np.float64) ** 2, axis=(0, 2)))
    floor = 10.0 ** (floor_dbfs / 20.0)
    return float(np.mean(rms < floor))


def measure_pcm_sha256(audio: np.ndarray) -> str:
    """sha256 of the decoded PCM as float32 little-endian, interleaved ``(samples, channels)``.

    Identical for the same decoded audio whatever the container (WAV vs FLAC of the same PCM).
    """
    interleaved = np.ascontiguousarray(np.asarray(audio, dtype="<f4").T)
    return hashlib.sha256(interleaved.tobytes()).hexdigest()


def measure_audio(audio: np.ndarray, sample_rate_hz: int) -> dict[str, float | int | str]:
    """All AudioFile measurements of float32 ``(channels, samples)`` audio, keyed by AudioFile field."""
    num_channels, num_samples = audio.shape
    return {
        "sha256": measure_pcm_sha256(audio),
        "sample_rate_hz": int(sample_rate_hz),
        "num_channels": int(num_channels),
        "num_samples": int(num_samples),
        "duration_s": num_samples / float(sample_rate_hz),
        "peak_dbfs": measure_peak_dbfs(audio),
        "loudness_lufs": measure_loudness_lufs(audio, sample_rate_hz),
        "clipped_fraction": measure_clipped_fraction(audio),
        "silent_fraction": measure_silent_fraction(audio, sample_rate_hz),
    }
