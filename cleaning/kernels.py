"""Compiled single-pass kernels behind ingest's measurements (numba, ``cache=True``).

``scan_levels`` reads a decoded file once and returns everything ``cleaning.measure`` and
``cleaning.quality.measure_dc_offset`` need: the K-weighted (ITU-R BS.1770-4) energy of every gating
segment, the sample peak, the clipped-sample count, the energy of every silence window, the per-channel
sums (DC offset) and, optionally, the channel mean at full rate (the fingerprint's input).
``true_peak`` is the BS.1770-4 Annex 2 4× polyphase interpolator with the exact block-skipping bound.

The first call in a process compiles the kernels (or loads them from numba's on-disk cache, next to this
file or under ``NUMBA_CACHE_DIR``): ``warm_kernels()`` does that once, e.g. in a Beam ``DoFn.setup``, so the
per-file cost is only the kernels' run time. Every kernel is a pure function of its arrays.
"""

from __future__ import annotations

import time

import numba
import numpy as np

__all__ = ["band_energies", "decimate", "scan_levels", "true_peak", "warm_kernels", "windowed_frames"]

TRUE_PEAK_TAPS_PER_PHASE = 12  # BS.1770-4 Annex 2: 48 taps, 4 phases


@numba.njit(cache=True, nogil=True)
def _scan_2(audio, sos, edges, window, threshold, mono, segment_energy, window_energy, channel_sum):
    """Stereo: both channels in one loop (their filters' recursions overlap in the CPU)."""
    b10, b11, b12, a11, a12 = sos[0, 0], sos[0, 1], sos[0, 2], sos[0, 4], sos[0, 5]
    b20, b21, b22, a21, a22 = sos[1, 0], sos[1, 1], sos[1, 2], sos[1, 4], sos[1, 5]
    s11l = s12l = s21l = s22l = 0.0
    s11r = s12r = s21r = s22r = 0.0
    peak = np.float32(0.0)
    clipped = 0
    sum_l = sum_r = 0.0
    want_mono = mono.shape[0] > 0
    num_windows = window_energy.shape[0]
    w, window_end, window_acc = 0, window, 0.0
    for seg in range(edges.shape[0] - 1):
        energy_l = energy_r = 0.0
        start = edges[seg]
        # slices indexed from 0: numba drops its negative-index checks
        block = audio[start:edges[seg + 1]]
        mono_block = mono[start:edges[seg + 1]] if want_mono else mono
        for i in range(block.shape[0]):
            if start + i == window_end:  # a whole silence window ends
                window_energy[w] = window_acc
                w, window_end, window_acc = w + 1, window_end + window, 0.0
            xl = block[i, 0]
            xr = block[i, 1]
            al, ar = abs(xl), abs(xr)
            peak = max(peak, max(al, ar))
            clipped += (al >= threshold) + (ar >= threshold)
            fl, fr = np.float64(xl), np.float64(xr)
            sum_l += fl
            sum_r += fr
            window_acc += np.float64(xl) * xl + np.float64(xr) * xr
            if want_mono:
                mono_block[i] = (xl + xr) * np.float32(0.5)
            # K-weighting, stage 1 (high shelf) then stage 2 (RLB high-pass), transposed direct form II
            yl = b10 * fl + s11l
            s11l = b11 * fl - a11 * yl + s12l
            s12l = b12 * fl - a12 * yl
            zl = b20 * yl + s21l
            s21l = b21 * yl - a21 * zl + s22l
            s22l = b22 * yl - a22 * zl
            energy_l += zl * zl
            yr = b10 * fr + s11r
            s11r = b11 * fr - a11 * yr + s12r
            s12r = b12 * fr - a12 * yr
            zr = b20 * yr + s21r
            s21r = b21 * yr - a21 * zr + s22r
            s22r = b22 * yr - a22 * zr
            energy_r += zr * zr
        segment_energy[seg, 0] = energy_l
        segment_energy[seg, 1] = energy_r
    if w < num_windows:  # the last window ends exactly at the last sample
        window_energy[w] = window_acc
    channel_sum[0] = sum_l
    channel_sum[1] = sum_r
    return peak, clipped


@numba.njit(cache=True, nogil=True)
def _scan_any(audio, sos, edges, window, threshold, mono, segment_energy, window_energy, channel_sum):
    """Any channel count: one channel at a time (a strided pass per channel)."""
    num_channels = audio.shape[1]
    num_windows = window_energy.shape[0]
    want_mono = mono.shape[0] > 0
    scale = np.float32(1.0) / np.float32(num_channels)
    peak = np.float32(0.0)
    clipped = 0
    b10, b11, b12, a11, a12 = sos[0, 0], sos[0, 1], sos[0, 2], sos[0, 4], sos[0, 5]
    b20, b21, b22, a21, a22 = sos[1, 0], sos[1, 1], sos[1, 2], sos[1, 4], sos[1, 5]
    for c in range(num_channels):
        s11 = s12 = s21 = s22 = 0.0
        total = 0.0
        w, window_end, window_acc = 0, window, 0.0
        for seg in range(edges.shape[0] - 1):
            energy = 0.0
            start = edges[seg]
            block = audio[start:edges[seg + 1], c]
            mono_block = mono[start:edges[seg + 1]] if want_mono else mono
            for i in range(block.shape[0]):
                if start + i == window_end:  # a whole silence window ends
                    window_energy[w] += window_acc
                    w, window_end, window_acc = w + 1, window_end + window, 0.0
                x = block[i]
                a = abs(x)
                peak = max(peak, a)
                clipped += a >= threshold
                f = np.float64(x)
                total += f
                window_acc += np.float64(x) * x
                if want_mono:
                    if c == 0:
                        mono_block[i] = x * scale
                    else:
                        mono_block[i] += x * scale
                y = b10 * f + s11
                s11 = b11 * f - a11 * y + s12
                s12 = b12 * f - a12 * y
                z = b20 * y + s21
                s21 = b21 * y - a21 * z + s22
                s22 = b22 * y - a22 * z
                energy += z * z
            segment_energy[seg, c] = energy
        if w < num_windows:  # the last window ends exactly at the last sample
            window_energy[w] += window_acc
        channel_sum[c] = total
    return peak, clipped


def scan_levels(audio: np.ndarray, sos: np.ndarray, edges: np.ndarray, window: int, threshold: float,
                with_mono: bool = False) -> dict[str, object]:
    """One pass over float32 ``(channels, samples)`` audio (any layout; an interleaved file's transposed view
    is read in place).

    Args:
        audio: float32 ``(channels, samples)``, at least one sample.
        sos: float64 ``(2, 6)`` K-weighting second-order sections (``cleaning.measure.k_weighting_sos``),
            normalised so that ``a0 = 1``; run in float64, transposed direct form II.
        edges: int64 ``(segments + 1,)`` ascending sample indices from 0 to ``samples``: the K-weighted
            energy (Σ y²) of every ``[edges[i], edges[i+1])`` is returned per channel.
        window: silence window in samples (> 0); the energy Σ over channels of x² of every whole window.
        threshold: a sample is clipped when ``|x| ≥ threshold``.
        with_mono: also return the channel mean, float32 ``(samples,)``.

    Returns:
        ``{"peak": float (max |x|), "clipped": int (count over all channels), "channel_sum": float64
        (channels,), "window_energy": float64 (samples // window,), "segment_energy": float64
        (segments, channels), "mono": float32 (samples,) or None}``.
    """
    frames = audio.T  # (samples, channels): C-contiguous for an interleaved file
    num_samples, num_channels = frames.shape
    edges = np.ascontiguousarray(edges, dtype=np.int64)
    if edges[0] != 0 or edges[-1] != num_samples or np.any(np.diff(edges) < 0):
        raise ValueError("edges must ascend from 0 to the number of samples")
    mono = np.empty(num_samples if with_mono else 0, dtype=np.float32)
    segment_energy = np.zeros((edges.shape[0] - 1, num_channels))
    window_energy = np.zeros(num_samples // window)
    channel_sum = np.zeros(num_channels)
    kernel = _scan_2 if num_channels == 2 else _scan_any
    if frames.dtype != np.float32:
        frames = frames.astype(np.float32)
    peak, clipped = kernel(frames, np.ascontiguousarray(sos, dtype=np.float64), edges, int(window),
                           np.float32(threshold), mono, segment_energy, window_energy, channel_sum)
    return {"peak": float(peak), "clipped": int(clipped), "channel_sum": channel_sum,
            "window_energy": window_energy, "segment_energy": segment_energy,
            "mono": mono if with_mono else None}


@numba.njit(cache=True, nogil=True, fastmath=True)
def _phase_peak(scratch, taps, p, count, out):
    """max |y_p[t]| for t < count, y_p[t] = Σ_k taps[p, k] · scratch[t + 11 − k]: the 12 taps unrolled so
    that the loop over t runs in SIMD lanes (float32)."""
    h = taps[p]
    h0, h1, h2, h3, h4, h5 = h[0], h[1], h[2], h[3], h[4], h[5]
    h6, h7, h8, h9, h10, h11 = h[6], h[7], h[8], h[9], h[10], h[11]
    for t in range(count):
        out[t] = (h0 * scratch[t + 11] + h1 * scratch[t + 10] + h2 * scratch[t + 9] + h3 * scratch[t + 8]
                  + h4 * scratch[t + 7] + h5 * scratch[t + 6] + h6 * scratch[t + 5] + h7 * scratch[t + 4]
                  + h8 * scratch[t + 3] + h9 * scratch[t + 2] + h10 * scratch[t + 1] + h11 * scratch[t])
    best = np.float32(0.0)
    for t in range(count):
        v = out[t]
        best = max(best, max(v, -v))
    return best


@numba.njit(cache=True, nogil=True)
def _true_peak(frames, taps, block, gain):
    num_samples, num_channels = frames.shape
    num_taps = taps.shape[1]
    total = num_samples + num_taps - 1  # full convolution: the filter's tail after the last sample
    num_blocks = (total + block - 1) // block
    # each block's input peak: inputs [start − K + 1, min(start + block, n)) feed its outputs
    input_peak = np.zeros(num_blocks * num_channels, dtype=np.float32)
    for c in range(num_channels):
        for b in range(num_blocks):
            inputs = frames[max(b * block - num_taps + 1, 0):min(b * block + block, num_samples), c]
            m = np.float32(0.0)
            for i in range(inputs.shape[0]):
                m = max(m, abs(inputs[i]))
            input_peak[b * num_channels + c] = m
    order = np.argsort(-input_peak, kind="mergesort")
    scratch = np.zeros(block + num_taps - 1, dtype=np.float32)
    out = np.empty(block, dtype=np.float32)
    peak = np.float32(0.0)
    for index in order:
        # |y_p[t]| ≤ ‖h_p‖₁ · max_k |x[t − k]|: a block whose inputs peak at P yields at most gain · P
        if input_peak[index] * gain <= peak:
            break
        b, c = index // num_channels, index % num_channels
        start = b * block
        count = min(block, total - start)
        lo = start - (num_taps - 1)  # scratch[j] = x[lo + j], zero outside the signal
        head = max(-lo, 0)
        inputs = frames[max(lo, 0):min(lo + count + num_taps - 1, num_samples), c]
        scratch[:head] = 0.0
        for j in range(inputs.shape[0]):
            scratch[head + j] = inputs[j]
        scratch[head + inputs.shape[0]:count + num_taps - 1] = 0.0
        for p in range(taps.shape[0]):
            peak = max(peak, _phase_peak(scratch, taps, p, count, out))
    return peak


def true_peak(audio: np.ndarray, taps: np.ndarray, block: int = 4096) -> float:
    """max over channels, phases and output samples of ``|Σ_k taps[p, k] · x[t − k]|`` (zero outside the
    signal, the filter's tail included), float32 arithmetic; blocks of ``block`` outputs whose inputs
    cannot reach the peak found so far are skipped (exact: ``|y| ≤ max_p ‖taps_p‖₁ · max|x|``).

    Args:
        audio: float32 ``(channels, samples)``, any layout; taps: ``(phases, 12)`` (the Annex 2 filter's
            phases); block: outputs per block.

    Returns:
        The peak as a linear amplitude (0.0 for silence).
    """
    if taps.shape[1] != TRUE_PEAK_TAPS_PER_PHASE:
        raise ValueError(f"true_peak takes {TRUE_PEAK_TAPS_PER_PHASE} taps per phase, got {taps.shape[1]}")
    frames = audio.T
    if frames.dtype != np.float32:
        frames = frames.astype(np.float32)
    taps32 = np.ascontiguousarray(taps, dtype=np.float32)
    # the bound in float32 arithmetic: ‖h‖₁ rounded up a little, so rounding can never make it inexact
    gain = np.float32(float(np.abs(taps.astype(np.float64)).sum(axis=1).max()) * (1.0 + 1e-5))
    if frames.shape[0] == 0:
        return 0.0
    return float(_true_peak(frames, taps32, int(block), gain))


@numba.njit(cache=True, nogil=True, fastmath=True)
def decimate(padded, taps, down, out):
    """``out[k] = Σ_j taps[j] · padded[k · down + j]`` (float32; the caller zero-pads ``padded`` so that
    every read is inside it): an FIR low-pass evaluated only at the kept samples."""
    num_taps = taps.shape[0]
    for k in range(out.shape[0]):
        # a slice indexed from 0: numba drops its negative-index checks and the loop runs in SIMD lanes
        segment = padded[k * down:k * down + num_taps]
        acc = np.float32(0.0)
        for j in range(num_taps):
            acc += taps[j] * segment[j]
        out[k] = acc
    return out


@numba.njit(cache=True, nogil=True, fastmath=True)
def windowed_frames(signal, window, first_frame, hop, out, mean_square):
    """Frames ``first_frame … first_frame + len(out) − 1`` of ``signal`` (``hop`` apart, ``len(window)``
    long) times ``window`` into ``out`` (float32 ``(count, len(window))``), and each windowed frame's
    ``Σ (w·x)²`` into ``mean_square[first_frame + i]`` (float64; the caller divides by ``Σ w²``)."""
    size = window.shape[0]
    for i in range(out.shape[0]):
        base = (first_frame + i) * hop
        frame = signal[base:base + size]
        row = out[i]
        acc = np.float32(0.0)
        for j in range(size):
            v = frame[j] * window[j]
            row[j] = v
            acc += v * v
        mean_square[first_frame + i] = acc
    return out


@numba.njit(cache=True, nogil=True)
def band_energies(spectrum, band_edges, first_frame, out):
    """``out[first_frame + i, m] = Σ |spectrum[i, b]|²`` over the bins ``band_edges[m] ≤ b <
    band_edges[m + 1]`` (complex64 spectrum ``(count, bins)``, float64 sums)."""
    for i in range(spectrum.shape[0]):
        row = spectrum[i]
        for m in range(band_edges.shape[0] - 1):
            band = row[band_edges[m]:band_edges[m + 1]]
            acc = 0.0
            for b in range(band.shape[0]):
                v = band[b]
                acc += np.float64(v.real) * v.real + np.float64(v.imag) * v.imag
            out[first_frame + i, m] = acc
    return out


def warm_kernels() -> float:
    """Compile (or load from numba's cache) every kernel for the float32 layouts ingest uses: interleaved
    stereo and mono files, channel-major arrays. Returns the seconds it took; idempotent and cheap after the
    first call. Call it once per worker process before timing or measuring files."""
    from cleaning.measure import CLIP_THRESHOLD, k_weighting_sos
    from cleaning.quality import BS1770_TRUE_PEAK_TAPS

    start = time.perf_counter()
    sos = k_weighting_sos(48000)
    for channels in (1, 2):
        interleaved = np.zeros((64, channels), dtype=np.float32)
        for audio in (interleaved.T, np.ascontiguousarray(interleaved.T)):
            for with_mono in (False, True):
                scan_levels(audio, sos, np.array([0, 32, 64]), 16, CLIP_THRESHOLD, with_mono)
            true_peak(audio, BS1770_TRUE_PEAK_TAPS)
    from cleaning.fingerprint import fingerprint

    for channels in (1, 2):  # one second: long enough for whole fingerprint frames
        fingerprint(np.zeros((channels, 44100), np.float32), 44100)
    return time.perf_counter() - start
