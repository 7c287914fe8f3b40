"""Measurements of decoded audio. ``measure_*`` functions return numbers and know nothing of engines."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np

SILENCE_FLOOR_DBFS = -60.0
SILENCE_WINDOW_S = 0.1
CLIP_THRESHOLD = 0.999


def measure_peak_dbfs(audio: np.ndarray) -> float:
    """Sample peak in dBFS (0 dBFS = full scale 1.0) of float32 ``(channels, samples)``; -inf for silence."""
    peak = max(float(audio.max()), -float(audio.min())) if audio.size else 0.0
    return 20.0 * math.log10(peak) if peak > 0 else -math.inf


BS1770_CHANNEL_WEIGHTS = (1.0, 1.0, 1.0, 1.41, 1.41)  # L, R, C, Ls, Rs (ITU-R BS.1770-4 Table 3)
LOUDNESS_BLOCK_S = 0.4  # gating block (BS.1770-4 §2.8)
LOUDNESS_BLOCK_OVERLAP = 0.75
ABSOLUTE_GATE_LUFS = -70.0
RELATIVE_GATE_LU = -10.0


def k_weighting_sos(sample_rate_hz: int) -> np.ndarray:
    """The BS.1770-4 K-weighting filter at ``sample_rate_hz`` as float64 second-order sections ``(2, 6)``.

    Stage 1 is the high shelf (+4 dB above ~1.5 kHz, Q = 1/√2), stage 2 the RLB high-pass (38 Hz, Q = 0.5),
    both designed by the bilinear transform of the RBJ Audio EQ Cookbook exactly as pyloudnorm designs them,
    so any sample rate gets the filter the Recommendation tabulates for 48 kHz.

    Raises:
        ValueError: ``sample_rate_hz`` is not positive.
    """
    if sample_rate_hz <= 0:
        raise ValueError(f"sample_rate_hz must be positive, got {sample_rate_hz}")
    # high shelf, G = 4 dB
    gain = 10.0 ** (4.0 / 40.0)
    w0 = 2.0 * math.pi * 1500.0 / sample_rate_hz
    alpha = math.sin(w0) / (2.0 * (1.0 / math.sqrt(2.0)))
    cos_w0, root = math.cos(w0), 2.0 * math.sqrt(gain) * alpha
    shelf_b = [gain * ((gain + 1) + (gain - 1) * cos_w0 + root), -2 * gain * ((gain - 1) + (gain + 1) * cos_w0),
               gain * ((gain + 1) + (gain - 1) * cos_w0 - root)]
    shelf_a = [(gain + 1) - (gain - 1) * cos_w0 + root, 2 * ((gain - 1) - (gain + 1) * cos_w0),
               (gain + 1) - (gain - 1) * cos_w0 - root]
    # high pass, 38 Hz
    w0 = 2.0 * math.pi * 38.0 / sample_rate_hz
    alpha, cos_w0 = math.sin(w0) / (2.0 * 0.5), math.cos(w0)
    pass_b = [(1 + cos_w0) / 2, -(1 + cos_w0), (1 + cos_w0) / 2]
    pass_a = [1 + alpha, -2 * cos_w0, 1 - alpha]
    return np.array([[*(np.array(shelf_b) / shelf_a[0]), *(np.array(shelf_a) / shelf_a[0])],
                     [*(np.array(pass_b) / pass_a[0]), *(np.array(pass_a) / pass_a[0])]])


def measure_loudness_lufs(audio: np.ndarray, sample_rate_hz: int) -> float:
    """Integrated loudness in LUFS per ITU-R BS.1770-4: K-weighting, mean square in 400 ms blocks every
    100 ms, weighted sum over channels, absolute gate at −70 LUFS and relative gate at −10 LU.

    The K-weighting (``k_weighting_sos``) runs in float64 inside one compiled pass over the samples
    (``cleaning.kernels.scan_levels``), which also sums the squared output over every 100 ms segment; the
    blocks, their boundaries and the gating are pyloudnorm's (``Meter.integrated_loudness``), which the tests
    keep as the reference: the two agree within 0.005 LU.

    Args:
        audio: float32 ``(channels, samples)``; up to 5 channels (BS.1770 channel weights L, R, C, Ls, Rs).
            Any memory layout (e.g. the transposed view of an interleaved file, ``read_audio_interleaved``).
        sample_rate_hz: sample rate of ``audio``.

    Returns:
        Loudness in LUFS; ``-inf`` when the audio is shorter than one 400 ms block or fully gated (silence).

    Raises:
        ValueError: ``audio`` is not 2-D, has more than 5 channels, or ``sample_rate_hz`` is not positive.
    """
    audio = np.asarray(audio)
    if audio.ndim != 2:
        raise ValueError(f"audio must be (channels, samples), got shape {audio.shape}")
    if sample_rate_hz <= 0:
        raise ValueError(f"sample_rate_hz must be positive, got {sample_rate_hz}")
    return measure_levels(audio, sample_rate_hz).loudness_lufs


def _loudness_blocks(num_samples: int, sample_rate_hz: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """pyloudnorm's gating blocks as ``(edges, lower, upper)``: ``edges`` the ascending segment boundaries
    (block starts and ends, 0 and ``num_samples``), ``lower``/``upper`` each block's bounds as indices into
    ``edges``. No blocks when the audio is shorter than one 400 ms block."""
    if num_samples < int(LOUDNESS_BLOCK_S * sample_rate_hz):
        return np.array([0, num_samples], dtype=np.int64), np.zeros(0, int), np.zeros(0, int)
    # numBlocks = round((T − T_g) / (T_g · step)) + 1, block j = [l_j, u_j) samples
    step = 1.0 - LOUDNESS_BLOCK_OVERLAP
    duration_s = num_samples / sample_rate_hz
    num_blocks = int(np.round((duration_s - LOUDNESS_BLOCK_S) / (LOUDNESS_BLOCK_S * step))) + 1
    blocks = range(num_blocks)
    lower = np.array([int(LOUDNESS_BLOCK_S * (j * step) * sample_rate_hz) for j in blocks])
    upper = np.minimum([int(LOUDNESS_BLOCK_S * (j * step + 1) * sample_rate_hz) for j in blocks], num_samples)
    edges = np.unique(np.concatenate([lower, upper, [0, num_samples]])).astype(np.int64)
    return edges, np.searchsorted(edges, lower), np.searchsorted(edges, upper)


def _gated_loudness(segment_energy: np.ndarray, lower: np.ndarray, upper: np.ndarray,
                    sample_rate_hz: int) -> float:
    """BS.1770-4 gating of the blocks ``[edges[lower[j]], edges[upper[j]])`` from the K-weighted energy of
    every segment, float64 ``(segments, channels)``."""
    if lower.size == 0:
        return -math.inf
    num_channels = segment_energy.shape[1]
    cumulative = np.concatenate([np.zeros((1, num_channels)), np.cumsum(segment_energy, axis=0)])
    mean_squares = (cumulative[upper] - cumulative[lower]) / (LOUDNESS_BLOCK_S * sample_rate_hz)  # z[j, c]
    weights = np.array(BS1770_CHANNEL_WEIGHTS[:num_channels])
    with np.errstate(divide="ignore"):
        block_lufs = -0.691 + 10.0 * np.log10(mean_squares @ weights)
        above_absolute = block_lufs >= ABSOLUTE_GATE_LUFS
        if not above_absolute.any():
            return -math.inf
        relative_gate = (-0.691 + 10.0 * np.log10(mean_squares[above_absolute].mean(axis=0) @ weights)
                         + RELATIVE_GATE_LU)
        gated = (block_lufs > relative_gate) & (block_lufs > ABSOLUTE_GATE_LUFS)
        if not gated.any():
            return -math.inf
        return float(-0.691 + 10.0 * np.log10(mean_squares[gated].mean(axis=0) @ weights))


@dataclass(frozen=True)
class Levels:
    """What one pass over a file measures (``measure_levels``).

    Attributes:
        peak_dbfs: as ``measure_peak_dbfs``.
        loudness_lufs: as ``measure_loudness_lufs``.
        clipped_fraction: as ``measure_clipped_fraction`` (threshold ``CLIP_THRESHOLD``).
        silent_fraction: as ``measure_silent_fraction`` (−60 dBFS, 100 ms windows).
        dc_offset: as ``cleaning.quality.measure_dc_offset`` (full-scale units).
        mono: float32 ``(samples,)`` channel mean when asked for (the fingerprint's input), else ``None``.
    """

    peak_dbfs: float
    loudness_lufs: float
    clipped_fraction: float
    silent_fraction: float
    dc_offset: float
    mono: np.ndarray | None = None


def measure_levels(audio: np.ndarray, sample_rate_hz: int, with_mono: bool = False,
                   mono_out: np.ndarray | None = None) -> Levels:
    """Sample peak, integrated loudness, clipped and silent fractions and DC offset of float32
    ``(channels, samples)`` audio in one compiled pass over its samples (``cleaning.kernels.scan_levels``);
    each equals its ``measure_*`` function (the tests hold them to it).

    Args:
        audio: float32 ``(channels, samples)``, ≤ 5 channels, any memory layout (an interleaved file's
            transposed view is read in place).
        sample_rate_hz: sample rate of ``audio``.
        with_mono: also return the channel mean at full rate (``Levels.mono``).
        mono_out: a float32 buffer to write that mean into (``cleaning.kernels.scan_levels``).

    Raises:
        ValueError: ``audio`` is not 2-D, has more than 5 channels, or ``sample_rate_hz`` is not positive.
    """
    audio = np.asarray(audio)
    if audio.ndim != 2:
        raise ValueError(f"audio must be (channels, samples), got shape {audio.shape}")
    num_channels, num_samples = audio.shape
    if num_channels > len(BS1770_CHANNEL_WEIGHTS):
        raise ValueError(f"BS.1770 weights up to {len(BS1770_CHANNEL_WEIGHTS)} channels, got {num_channels}")
    if sample_rate_hz <= 0:
        raise ValueError(f"sample_rate_hz must be positive, got {sample_rate_hz}")
    if num_samples == 0:
        return Levels(-math.inf, -math.inf, 0.0, 1.0, 0.0, np.zeros(0, np.float32) if with_mono else None)
    edges, lower, upper = _loudness_blocks(num_samples, sample_rate_hz)
    window = max(1, int(SILENCE_WINDOW_S * sample_rate_hz))
    from cleaning.kernels import scan_levels  # numba, loaded on the first measurement (not by importing this module)

    scan = scan_levels(audio, k_weighting_sos(sample_rate_hz), edges, window, CLIP_THRESHOLD, with_mono, mono_out)
    peak = scan["peak"]
    window_energy = scan["window_energy"]
    if window_energy.size:
        rms = np.sqrt(window_energy / (num_channels * window))
        silent = float(np.mean(rms < 10.0 ** (SILENCE_FLOOR_DBFS / 20.0)))
    else:
        silent = 1.0 if peak == 0 else 0.0
    return Levels(peak_dbfs=20.0 * math.log10(peak) if peak > 0 else -math.inf,
                  loudness_lufs=_gated_loudness(scan["segment_energy"], lower, upper, sample_rate_hz),
                  clipped_fraction=scan["clipped"] / audio.size,
                  silent_fraction=silent,
                  dc_offset=float(np.max(np.abs(scan["channel_sum"]))) / num_samples,
                  mono=scan["mono"])


def measure_clipped_fraction(audio: np.ndarray, threshold: float = CLIP_THRESHOLD) -> float:
    """Fraction of samples (over all channels) whose magnitude is ≥ ``threshold`` of full scale."""
    if not audio.size or max(float(audio.max()), -float(audio.min())) < threshold:
        return 0.0  # the common case, without a boolean array the size of the audio
    return float(np.mean(np.abs(audio) >= threshold))


def measure_silent_fraction(audio: np.ndarray, sample_rate_hz: int, floor_dbfs: float = SILENCE_FLOOR_DBFS,
                            window_s: float = SILENCE_WINDOW_S) -> float:
    """Fraction of ``window_s`` windows whose RMS (over channels) is below ``floor_dbfs``."""
    window = max(1, int(window_s * sample_rate_hz))
    num_windows = audio.shape[-1] // window
    if num_windows == 0:
        return 1.0 if not np.any(audio) else 0.0
    energy = np.zeros(num_windows)
    for channel in np.asarray(audio):  # channel by channel: no copy of an interleaved file's transposed view
        frames = channel[: num_windows * window].reshape(num_windows, window)
        energy += np.einsum("ij,ij->i", frames, frames)  # float32 sums of squares per window
    rms = np.sqrt(energy / (audio.shape[0] * window))
    floor = 10.0 ** (floor_dbfs / 20.0)
    return float(np.mean(rms < floor))


def measure_pcm_sha256(audio: np.ndarray) -> str:
    """sha256 of the decoded PCM as float32 little-endian, interleaved ``(samples, channels)``.

    Identical for the same decoded audio whatever the container (WAV vs FLAC of the same PCM).
    """
    interleaved = np.ascontiguousarray(np.asarray(audio, dtype="<f4").T)  # no copy for an interleaved view
    return hashlib.sha256(memoryview(interleaved).cast("B")).hexdigest()


def measure_audio(audio: np.ndarray, sample_rate_hz: int, levels: Levels | None = None
                  ) -> dict[str, float | int | str]:
    """All AudioFile measurements of float32 ``(channels, samples)`` audio, keyed by AudioFile field.

    ``levels``: ``measure_levels(audio, sample_rate_hz)`` when the caller already has it (one pass, not two).
    """
    num_channels, num_samples = audio.shape
    levels = levels if levels is not None else measure_levels(audio, sample_rate_hz)
    return {
        "sha256": measure_pcm_sha256(audio),
        "sample_rate_hz": int(sample_rate_hz),
        "num_channels": int(num_channels),
        "num_samples": int(num_samples),
        "duration_s": num_samples / float(sample_rate_hz),
        "peak_dbfs": levels.peak_dbfs,
        "loudness_lufs": levels.loudness_lufs,
        "clipped_fraction": levels.clipped_fraction,
        "silent_fraction": levels.silent_fraction,
    }
