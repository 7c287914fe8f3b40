"""Duplicate detection: exact duplicates by the hash of the decoded PCM, near duplicates (the same recording
at another gain, resampled, or through a lossy codec) by an audio fingerprint.

The fingerprint follows Haitsma & Kalker, "A Highly Robust Audio Fingerprinting System", ISMIR 2002:
mono audio at a low rate, 0.37 s Hann frames every 11.6 ms, energies in 33 logarithmically spaced bands
from 300 to 2000 Hz, and one 32-bit sub-fingerprint per frame whose bit ``m`` is the sign of the
band-energy difference ``E(n, m) − E(n, m+1)`` minus the same difference one frame earlier. Gain cancels in
every bit, and a codec or resampler moves only the bits whose differences were near zero, so copies of a
recording differ in few bits (bit error rate, BER, ≲ 0.1) while different recordings differ in about half.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import scipy.fft
import torch

from cleaning.audio import resample, to_mono
from cleaning.measure import measure_pcm_sha256

FINGERPRINT_SAMPLE_RATE_HZ = 11025
FRAME_SAMPLES = 4096  # 0.372 s at 11025 Hz (Haitsma & Kalker: 2048 at 5512.5 Hz)
HOP_SAMPLES = 128  # 11.6 ms at 11025 Hz: frame overlap 31/32
FRAME_HOP_S = HOP_SAMPLES / FINGERPRINT_SAMPLE_RATE_HZ  # 11.6 ms per sub-fingerprint
NUM_BANDS = 33  # → 32 bits per sub-fingerprint
BAND_LOW_HZ, BAND_HIGH_HZ = 300.0, 2000.0
SILENCE_FLOOR_DBFS = -70.0  # frames whose windowed RMS is below this carry no bits (sub-fingerprint 0)
NEAR_DUPLICATE_THRESHOLD = 0.8  # similarity, i.e. BER < 0.2 (Haitsma & Kalker match at BER < 0.35)
DEFAULT_MAX_SHIFT_S = 10.0
DEFAULT_MIN_OVERLAP_S = 5.0
_FRAMES_PER_CHUNK = 2048  # STFT frames per chunk: a (2049, 2048) float32 power spectrogram, 17 MB

__all__ = ["FINGERPRINT_SAMPLE_RATE_HZ", "FRAME_HOP_S", "NEAR_DUPLICATE_THRESHOLD", "find_exact_duplicates",
           "find_near_duplicates", "fingerprint", "fingerprint_similarity", "measure_pcm_sha256"]


def fingerprint(audio: np.ndarray, sample_rate_hz: int) -> np.ndarray:
    """Haitsma–Kalker fingerprint of a recording: one 32-bit sub-fingerprint per 11.6 ms frame.

    Channels are averaged, the result resampled to 11025 Hz (torchaudio sinc), cut into 4096-sample Hann
    frames every 128 samples, and the power spectrum summed into 33 bands with log-spaced edges from 300 to
    2000 Hz. Bit ``m`` (value ``1 << m``) of frame ``n`` is
    ``(E[n,m] − E[n,m+1]) − (E[n−1,m] − E[n−1,m+1]) > 0``. Frames whose windowed RMS is below
    ``SILENCE_FLOOR_DBFS`` are 0, meaning "no information": ``fingerprint_similarity`` skips them, so shared
    digital silence or leading silence of different lengths neither makes nor breaks a match.

    Args:
        audio: float32 ``(channels, samples)``.
        sample_rate_hz: sample rate of ``audio``.

    Returns:
        uint32 ``(frames,)`` with ``frames = max(0, (n − 4096) // 128)`` for ``n`` samples at 11025 Hz
        (one fewer than the STFT frames: the first has no predecessor). Empty for audio under ~0.38 s.

    Raises:
        ValueError: ``audio`` is not 2-D or ``sample_rate_hz`` is not positive.
    """
    audio = np.asarray(audio)
    if audio.ndim != 2:
        raise ValueError(f"audio must be (channels, samples), got shape {audio.shape}")
    if sample_rate_hz <= 0:
        raise ValueError(f"sample_rate_hz must be positive, got {sample_rate_hz}")
    mono = resample(to_mono(audio), int(sample_rate_hz), FINGERPRINT_SAMPLE_RATE_HZ)[0]
    if mono.shape[0] < FRAME_SAMPLES + HOP_SAMPLES:
        return np.zeros(0, dtype=np.uint32)
    num_frames = 1 + (mono.shape[0] - FRAME_SAMPLES) // HOP_SAMPLES  # STFT frames, before differencing
    energies = np.empty((NUM_BANDS, num_frames))  # band energies E[m, n]
    mean_square = np.empty(num_frames)  # windowed mean square per frame, for the silence floor
    window = torch.hann_window(FRAME_SAMPLES, periodic=True, dtype=torch.float32)
    # Parseval: Σ_k |X_k|² = N · Σ_t (w·x)², so the windowed mean square is Σ_k |X_k|² / (N · Σ w²)
    power_to_mean_square = 1.0 / (FRAME_SAMPLES * float(np.sum(window.numpy().astype(np.float64) ** 2)))
    first_bin, bands = _band_matrix()
    band_bins = slice(first_bin, first_bin + bands.shape[1])
    # float32 FFT (half the time of float64): rounding can flip only bits whose differences are near zero
    signal = torch.from_numpy(np.ascontiguousarray(mono, dtype=np.float32))
    for first in range(0, num_frames, _FRAMES_PER_CHUNK):  # chunks bound the spectrogram's memory
        count = min(_FRAMES_PER_CHUNK, num_frames - first)
        segment = signal[first * HOP_SAMPLES:(first + count - 1) * HOP_SAMPLES + FRAME_SAMPLES]
        with torch.no_grad():
            spectrum = torch.stft(segment, n_fft=FRAME_SAMPLES, hop_length=HOP_SAMPLES, window=window,
                                  center=False, return_complex=True)
        power = (spectrum.real ** 2 + spectrum.imag ** 2).numpy()  # float32 (bins, count)
        energies[:, first:first + count] = bands @ power[band_bins].astype(np.float64)
        mean_square[first:first + count] = power.sum(axis=0, dtype=np.float64) * power_to_mean_square
    difference = energies[:-1] - energies[1:]  # (32, frames): E[m] − E[m+1]
    bits = (difference[:, 1:] - difference[:, :-1]) > 0  # (32, frames − 1)
    weights = np.left_shift(np.uint32(1), np.arange(NUM_BANDS - 1, dtype=np.uint32))
    packed = (bits.astype(np.uint32) * weights[:, None]).sum(axis=0, dtype=np.uint32)
    floor = 10.0 ** (SILENCE_FLOOR_DBFS / 10.0)
    packed[(mean_square[1:] < floor) | (mean_square[:-1] < floor)] = 0
    return packed


def fingerprint_similarity(a: np.ndarray, b: np.ndarray, max_shift_s: float = DEFAULT_MAX_SHIFT_S,
                           min_overlap_s: float = DEFAULT_MIN_OVERLAP_S) -> float:
    """``1 − BER`` between two fingerprints at their best alignment: 1.0 identical, ≈ 0.5 unrelated.

    Every offset of ``b`` against ``a`` within ``±max_shift_s`` is tried (all at once, as 32 bit-plane
    cross-correlations by FFT); at each, the bit error rate is counted over the frames where both
    sub-fingerprints are non-zero (non-silent). Fingerprints of different lengths are compared over their
    overlap, so an excerpt matches the recording it was cut from. An offset counts only if that overlap
    spans at least ``min_overlap_s`` — or all non-silent frames of the shorter fingerprint, if fewer —
    which keeps a few chance agreements at the edges from scoring.

    Args:
        a: uint32 ``(frames_a,)`` from ``fingerprint``.
        b: uint32 ``(frames_b,)`` from ``fingerprint``.
        max_shift_s: largest offset tried, in seconds (one frame is ``FRAME_HOP_S`` = 11.6 ms).
        min_overlap_s: smallest compared span, in seconds.

    Returns:
        Similarity in [0, 1]; 0.0 when either fingerprint has no non-silent frame.

    Raises:
        ValueError: an input is not 1-D, or ``max_shift_s`` or ``min_overlap_s`` is negative.
    """
    a, b = np.asarray(a, dtype=np.uint32), np.asarray(b, dtype=np.uint32)
    if a.ndim != 1 or b.ndim != 1:
        raise ValueError(f"fingerprints must be 1-D uint32, got shapes {a.shape} and {b.shape}")
    if max_shift_s < 0 or min_overlap_s < 0:
        raise ValueError("max_shift_s and min_overlap_s must be ≥ 0")
    valid_a, valid_b = a != 0, b != 0
    if not valid_a.any() or not valid_b.any():
        return 0.0
    # ±1 per bit on valid frames, 0 on silent ones: Σ over bits of the product is agreements − disagreements
    signs_a = _bit_signs(a) * valid_a
    signs_b = _bit_signs(b) * valid_b
    size = scipy.fft.next_fast_len(a.shape[0] + b.shape[0] - 1, real=True)
    agreement = _cross_correlate(signs_a, signs_b, size).sum(axis=0)  # (lags,)
    overlap = _cross_correlate(valid_a[None].astype(np.float64), valid_b[None].astype(np.float64), size)[0]
    lags = np.arange(-(b.shape[0] - 1), a.shape[0])  # lag L: a[i] against b[i − L]
    max_shift = int(round(max_shift_s / FRAME_HOP_S))
    min_overlap = max(1, min(int(round(min_overlap_s / FRAME_HOP_S)), int(valid_a.sum()), int(valid_b.sum())))
    overlap = np.round(overlap)
    usable = (np.abs(lags) <= max_shift) & (overlap >= min_overlap)
    if not usable.any():
        return 0.0
    bits = 32.0 * overlap[usable]
    errors = (bits - np.round(agreement[usable])) / 2.0
    return float(np.clip(1.0 - np.min(errors / bits), 0.0, 1.0))


def find_near_duplicates(fingerprints: Mapping[str, np.ndarray], threshold: float = NEAR_DUPLICATE_THRESHOLD,
                         max_shift_s: float = DEFAULT_MAX_SHIFT_S, min_overlap_s: float = DEFAULT_MIN_OVERLAP_S
                         ) -> list[tuple[str, str, float]]:
    """All pairs of recordings whose ``fingerprint_similarity`` is at least ``threshold``.

    Pairwise: ``K·(K−1)/2`` comparisons for ``K`` fingerprints, each an FFT over both lengths (a few ms for
    two 3-minute recordings), which suits one catalog delivery (hundreds of files). For a whole catalog,
    index the sub-fingerprints (Haitsma & Kalker's lookup table, or LSH over bit bands) to find candidate
    pairs and score only those with this function.

    Args:
        fingerprints: id → uint32 ``(frames,)`` from ``fingerprint``.
        threshold: smallest similarity reported (``1 − BER``); default ``NEAR_DUPLICATE_THRESHOLD``.
        max_shift_s: passed to ``fingerprint_similarity``.
        min_overlap_s: passed to ``fingerprint_similarity``.

    Returns:
        ``(id_a, id_b, similarity)`` with ``id_a < id_b``, sorted by ``(id_a, id_b)``; deterministic
        whatever the mapping's order.

    Raises:
        ValueError: ``threshold`` outside [0, 1].
    """
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    ids = sorted(fingerprints)
    pairs = []
    for i, id_a in enumerate(ids):
        for id_b in ids[i + 1:]:
            similarity = fingerprint_similarity(fingerprints[id_a], fingerprints[id_b], max_shift_s, min_overlap_s)
            if similarity >= threshold:
                pairs.append((id_a, id_b, similarity))
    return pairs


def find_exact_duplicates(pcm_sha256: Mapping[str, str]) -> list[tuple[str, ...]]:
    """Groups of ids whose decoded PCM is identical, from ``measure_pcm_sha256`` (AUDIO_FILE ``sha256``).

    Identical PCM means the same samples at the same channel count, whatever the container (WAV, FLAC).
    The sample rate is not in the hash: compare ``sample_rate_hz`` too if that matters.

    Args:
        pcm_sha256: id → hex sha256 of the decoded PCM.

    Returns:
        Tuples of ≥ 2 ids sharing a hash, each sorted, the list sorted by its first id.
    """
    groups: dict[str, list[str]] = {}
    for record_id in sorted(pcm_sha256):
        groups.setdefault(pcm_sha256[record_id], []).append(record_id)
    return sorted(tuple(ids) for ids in groups.values() if len(ids) > 1)


def _band_matrix() -> tuple[int, np.ndarray]:
    """The rFFT bins that fall in the 33 bands: ``(first_bin, matrix)``, matrix float64 ``(33, num_bins)``
    with 1 where bin ``first_bin + j``'s centre frequency lies in band ``m`` (edges log-spaced), else 0."""
    edges = np.geomspace(BAND_LOW_HZ, BAND_HIGH_HZ, NUM_BANDS + 1)
    bin_hz = np.fft.rfftfreq(FRAME_SAMPLES, d=1.0 / FINGERPRINT_SAMPLE_RATE_HZ)
    matrix = (bin_hz[None] >= edges[:-1, None]) & (bin_hz[None] < edges[1:, None])
    used = np.flatnonzero(matrix.any(axis=0))
    return int(used[0]), matrix[:, used[0]:used[-1] + 1].astype(np.float64)


def _bit_signs(fingerprint_: np.ndarray) -> np.ndarray:
    """uint32 ``(frames,)`` → float64 ``(32, frames)`` of +1 (bit set) or −1 (bit clear)."""
    bits = (fingerprint_[None] >> np.arange(32, dtype=np.uint32)[:, None]) & np.uint32(1)
    return bits.astype(np.float64) * 2.0 - 1.0


def _cross_correlate(x: np.ndarray, y: np.ndarray, size: int) -> np.ndarray:
    """Row-wise ``c[L] = Σ_i x[i] · y[i − L]`` for lags ``L = −(len_y − 1) … len_x − 1``, by FFT.

    Args:
        x: float64 ``(rows, len_x)``; y: float64 ``(rows, len_y)``; size: FFT length ≥ len_x + len_y − 1.

    Returns:
        float64 ``(rows, len_x + len_y − 1)``.
    """
    spectrum = scipy.fft.rfft(x, size, axis=1) * np.conj(scipy.fft.rfft(y, size, axis=1))
    circular = scipy.fft.irfft(spectrum, size, axis=1)
    len_x, len_y = x.shape[1], y.shape[1]
    return np.concatenate([circular[:, size - (len_y - 1):], circular[:, :len_x]], axis=1)
