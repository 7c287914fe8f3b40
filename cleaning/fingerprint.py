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

import functools
from collections.abc import Mapping
from fractions import Fraction

import numpy as np
import scipy.fft

from cleaning.kernels import band_energies, decimate, pack_sub_fingerprints, windowed_frames
from cleaning.measure import measure_pcm_sha256

FINGERPRINT_SAMPLE_RATE_HZ = 5512.5  # Haitsma & Kalker's rate: 44.1 kHz / 8
FRAME_SAMPLES = 2048  # 0.372 s
HOP_SAMPLES = 64  # 11.6 ms: frame overlap 31/32
FRAME_HOP_S = HOP_SAMPLES / FINGERPRINT_SAMPLE_RATE_HZ  # 11.6 ms per sub-fingerprint
NUM_BANDS = 33  # → 32 bits per sub-fingerprint
BAND_LOW_HZ, BAND_HIGH_HZ = 300.0, 2000.0
SILENCE_FLOOR_DBFS = -70.0  # frames whose windowed RMS is below this carry no bits (sub-fingerprint 0)
NEAR_DUPLICATE_THRESHOLD = 0.8  # similarity, i.e. BER < 0.2 (Haitsma & Kalker match at BER < 0.35)
DEFAULT_MAX_SHIFT_S = 10.0
DEFAULT_MIN_OVERLAP_S = 5.0
_FRAMES_PER_CHUNK = 64  # STFT frames per chunk: 512 KB of windowed frames + 525 KB of spectrum stay in L2
_ANTIALIAS_STOP_HZ = FINGERPRINT_SAMPLE_RATE_HZ - BAND_HIGH_HZ  # lowest frequency that aliases into the bands

__all__ = ["FINGERPRINT_SAMPLE_RATE_HZ", "FRAME_HOP_S", "NEAR_DUPLICATE_THRESHOLD", "find_exact_duplicates",
           "find_near_duplicates", "fingerprint", "fingerprint_similarity", "measure_pcm_sha256"]


def fingerprint(audio: np.ndarray, sample_rate_hz: int, *, mono: np.ndarray | None = None) -> np.ndarray:
    """Haitsma–Kalker fingerprint of a recording: one 32-bit sub-fingerprint per 11.6 ms frame.

    Channels are averaged and the result brought to 5512.5 Hz by a polyphase FIR (``scipy.signal.
    resample_poly`` with a Kaiser-windowed low-pass that passes the 300–2000 Hz bands and stops everything
    that would alias into them: 44.1 kHz is a plain decimation by 8). It is cut into 2048-sample Hann frames
    every 64 samples, and each frame's power spectrum (float32 real FFT) summed into 33 bands with
    log-spaced edges from 300 to 2000 Hz. Bit ``m`` (value ``1 << m``) of frame ``n`` is
    ``(E[n,m] − E[n,m+1]) − (E[n−1,m] − E[n−1,m+1]) > 0``. Frames whose windowed RMS is below
    ``SILENCE_FLOOR_DBFS`` are 0, meaning "no information": ``fingerprint_similarity`` skips them, so shared
    digital silence or leading silence of different lengths neither makes nor breaks a match.

    The FFTs are ``scipy.fft``'s (pocketfft, float32, one thread): about 14 CPU ms per 30 s of 44.1 kHz audio,
    a quarter more than torch's MKL FFT, but no ~3 s torch import in every process that fingerprints (a
    one-track ingest). The energies are differenced and the bits packed in one compiled pass
    (``cleaning.kernels.pack_sub_fingerprints``).

    Args:
        audio: float32 ``(channels, samples)``, any memory layout.
        sample_rate_hz: sample rate of ``audio``.
        mono: float32 ``(samples,)``, the channel mean of ``audio`` when the caller already has it
            (``cleaning.measure.measure_levels(..., with_mono=True)``); computed here otherwise.

    Returns:
        uint32 ``(frames,)`` with ``frames = max(0, (n − 2048) // 64)`` for ``n = ceil(samples · 5512.5 /
        sample_rate_hz)`` samples at 5512.5 Hz (one fewer than the STFT frames: the first has no
        predecessor). Empty for audio under ~0.38 s.

    Raises:
        ValueError: ``audio`` is not 2-D or ``sample_rate_hz`` is not positive.
    """
    audio = np.asarray(audio)
    if audio.ndim != 2:
        raise ValueError(f"audio must be (channels, samples), got shape {audio.shape}")
    if sample_rate_hz <= 0:
        raise ValueError(f"sample_rate_hz must be positive, got {sample_rate_hz}")
    mono = _fingerprint_rate(audio, int(sample_rate_hz), mono)
    if mono.shape[0] < FRAME_SAMPLES + HOP_SAMPLES:
        return np.zeros(0, dtype=np.uint32)
    num_frames = (mono.shape[0] - FRAME_SAMPLES) // HOP_SAMPLES + 1  # STFT frames, before differencing
    window = _hann()
    band_edges = _band_edges()
    energies = np.empty((num_frames, NUM_BANDS), dtype=np.float64)  # band energies E[n, m]
    mean_square = np.empty(num_frames)  # windowed Σ (w·x)² per frame, for the silence floor
    chunk = min(_FRAMES_PER_CHUNK, num_frames)
    windowed = np.empty((chunk, FRAME_SAMPLES), dtype=np.float32)
    for first in range(0, num_frames, _FRAMES_PER_CHUNK):  # chunks keep the windowed frames in cache
        count = min(_FRAMES_PER_CHUNK, num_frames - first)
        windowed_frames(mono, window, first, HOP_SAMPLES, windowed[:count], mean_square)
        # float32 FFT; rounding can flip only bits whose differences are near zero, as a codec does
        spectrum = scipy.fft.rfft(windowed[:count], axis=1, workers=1)
        band_energies(spectrum, band_edges, first, energies)
    mean_square /= float(np.sum(window.astype(np.float64) ** 2))
    packed = np.empty(num_frames - 1, dtype=np.uint32)
    return pack_sub_fingerprints(energies, mean_square, 10.0 ** (SILENCE_FLOOR_DBFS / 10.0), packed)


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
    two 3-minute recordings), which suits a few hundred files. For a whole catalog, find candidate pairs in
    the sub-fingerprint index (``cleaning.fingerprint_index``, Haitsma & Kalker's lookup table) and score only
    those with ``fingerprint_similarity``, as ingest does (``pipelines.stages.ingest.duplicates``).

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


def _fingerprint_rate(audio: np.ndarray, sample_rate_hz: int, mono: np.ndarray | None = None) -> np.ndarray:
    """Mono float32 ``(n,)`` at ``FINGERPRINT_SAMPLE_RATE_HZ``, ``n = ceil(samples · 5512.5 / rate)``.

    The low-pass (at the up-sampled rate ``rate · up``) passes 0–2000 Hz and stops from 3512.5 Hz, the
    lowest frequency that folds into the 300–2000 Hz bands at 5512.5 Hz; what folds elsewhere is never
    looked at, so this filter is far shorter than a general resampler's.
    """
    if mono is None:
        mono = audio[0].astype(np.float32)  # a copy; summed channel by channel (fast in any memory layout)
        for channel in audio[1:]:
            mono += channel
        mono /= np.float32(audio.shape[0])
    elif mono.shape != (audio.shape[1],):
        raise ValueError(f"mono must be ({audio.shape[1]},) for audio {audio.shape}, got {mono.shape}")
    ratio = Fraction(FINGERPRINT_SAMPLE_RATE_HZ).limit_denominator(1000) / sample_rate_hz
    up, down = ratio.numerator, ratio.denominator
    taps = _antialias_filter(sample_rate_hz, up)
    if up == 1:  # 44.1 kHz, 88.2 kHz, 22.05 kHz: a plain decimation, as one matrix product per block
        return _decimate(mono, taps, down)
    import scipy.signal  # only for rates that are not 5512.5 Hz times a whole number: its import costs ~1 s

    return scipy.signal.resample_poly(mono, up, down, window=taps).astype(np.float32, copy=False)


def _decimate(signal: np.ndarray, taps: np.ndarray, down: int) -> np.ndarray:
    """``scipy.signal.resample_poly(signal, 1, down, window=taps)`` for an odd number of taps, computed only
    at the kept samples by a compiled kernel (``cleaning.kernels.decimate``):
    ``y[k] = Σ_j taps[j] · x[k·down + j − (len(taps) − 1) / 2]`` (zero outside).

    Args:
        signal: float32 ``(n,)``; taps: float32 ``(L,)``, L odd; down: decimation factor.

    Returns:
        float32 ``(ceil(n / down),)``.
    """
    half = (taps.shape[0] - 1) // 2
    num_out = -(-signal.shape[0] // down)
    return decimate(np.ascontiguousarray(signal, dtype=np.float32), np.ascontiguousarray(taps, dtype=np.float32),
                    down, half, np.empty(num_out, dtype=np.float32))


@functools.cache
def _hann() -> np.ndarray:
    """float32 periodic Hann window of ``FRAME_SAMPLES``: ``scipy.signal.get_window("hann", FRAME_SAMPLES)``,
    computed as scipy does (``general_cosine`` over ``FRAME_SAMPLES + 1`` points, the last dropped) so that the
    values are the same to the bit, without importing ``scipy.signal`` (tests/cleaning/test_fingerprint.py checks)."""
    phase = np.linspace(-np.pi, np.pi, FRAME_SAMPLES + 1)
    window = np.zeros(FRAME_SAMPLES + 1)
    window += 0.5 * np.cos(0 * phase)
    window += 0.5 * np.cos(1 * phase)
    return window[:-1].astype(np.float32)


@functools.cache
def _band_edges() -> np.ndarray:
    """int64 ``(NUM_BANDS + 1,)`` rFFT bin indices: band ``m`` is bins ``[edges[m], edges[m + 1])``
    (``_band_matrix``'s rows, which are contiguous runs of bins)."""
    first_bin, matrix = _band_matrix()
    starts = [first_bin + int(np.flatnonzero(row)[0]) for row in matrix]
    edges = np.array(starts + [first_bin + matrix.shape[1]], dtype=np.int64)
    for m, row in enumerate(matrix):  # every band is exactly the run of bins between its edges
        assert np.array_equal(np.flatnonzero(row) + first_bin, np.arange(edges[m], edges[m + 1]))
    return edges


@functools.lru_cache(maxsize=16)
def _antialias_filter(sample_rate_hz: int, up: int) -> np.ndarray:
    """float32 FIR taps at ``sample_rate_hz · up``: Kaiser window for 60 dB over the 2000–3512.5 Hz
    transition, gain ``up`` (the zero-stuffing's loss), at least one tap per phase."""
    rate = sample_rate_hz * up
    cutoff = (BAND_HIGH_HZ + _ANTIALIAS_STOP_HZ) / 2.0
    num_taps, beta = _kaiserord(60.0, (_ANTIALIAS_STOP_HZ - BAND_HIGH_HZ) / (rate / 2.0))
    num_taps = max(num_taps, 2 * up + 1) | 1
    taps = _firwin_kaiser(num_taps, cutoff / (rate / 2.0), beta) * up
    return taps.astype(np.float32)


def _kaiserord(ripple_db: float, width: float) -> tuple[int, float]:
    """``scipy.signal.kaiserord`` (Kaiser's formulas, Oppenheim & Schafer §7.6): taps and β for ``ripple_db`` of
    attenuation over a transition of ``width`` (a fraction of Nyquist)."""
    a = abs(ripple_db)
    beta = 0.1102 * (a - 8.7) if a > 50 else (0.5842 * (a - 21) ** 0.4 + 0.07886 * (a - 21) if a > 21 else 0.0)
    return int(np.ceil((a - 7.95) / 2.285 / (np.pi * width) + 1)), beta


def _firwin_kaiser(num_taps: int, cutoff: float, beta: float) -> np.ndarray:
    """``scipy.signal.firwin(num_taps, cutoff, window=("kaiser", beta))`` for a low-pass (``cutoff`` a fraction of
    Nyquist), computed as scipy does: the ideal low-pass's sinc, times the symmetric Kaiser window, scaled to unit
    gain at 0 Hz. Without importing ``scipy.signal``; ``scipy.special.i0`` as scipy's window uses."""
    import scipy.special

    m = np.arange(0, num_taps) - 0.5 * (num_taps - 1)
    h = cutoff * np.sinc(cutoff * m)
    n = np.arange(0, num_taps)
    alpha = (num_taps - 1) / 2.0
    h = h * (scipy.special.i0(beta * np.sqrt(1 - ((n - alpha) / alpha) ** 2.0)) / scipy.special.i0(beta))
    return h / np.sum(h)
