"""Compiled single-pass kernels behind ingest's measurements (numba, ``cache=True``).

``scan_levels`` reads a decoded file once and returns everything ``cleaning.measure`` and
``cleaning.quality.measure_dc_offset`` need: the K-weighted (ITU-R BS.1770-4) energy of every gating
segment, the sample peak, the clipped-sample count, the energy of every silence window, the per-channel
sums (DC offset) and, optionally, the channel mean at full rate (the fingerprint's input).
``true_peak`` is the BS.1770-4 Annex 2 4× polyphase interpolator with the exact block-skipping bound.

The first call in a process compiles the kernels (or loads them from numba's on-disk cache, next to this
file or under ``NUMBA_CACHE_DIR``): ``cleaning.warmup.warm_kernels()`` does that once, e.g. in a Beam
``DoFn.setup``, so the per-file cost is only the kernels' run time. Every kernel is a pure function of its
arrays.
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["band_energies", "decimate", "pack_sub_fingerprints", "scan_levels", "true_peak", "windowed_frames"]

TRUE_PEAK_TAPS_PER_PHASE = 12  # BS.1770-4 Annex 2: 48 taps, 4 phases


# reassociation and fused multiply-adds, without the no-NaN/no-infinity assumptions of ``fastmath=True``:
# the compiler may shorten the biquads' dependency chains, and a NaN sample still reaches the sums
_RECURSION_FASTMATH = {"contract", "reassoc", "nsz", "arcp"}


@numba.njit(cache=True, nogil=True, fastmath=_RECURSION_FASTMATH)
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
                with_mono: bool = False, mono_out: np.ndarray | None = None) -> dict[str, object]:
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
        mono_out: float32 ``(≥ samples,)`` to write the channel mean into (its first ``samples``; a buffer the
            caller reuses, which spares the page faults of a fresh array); a new array when None or too short.

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
    if with_mono and mono_out is not None and mono_out.dtype == np.float32 and mono_out.ndim == 1 \
            and mono_out.shape[0] >= num_samples:
        mono = mono_out[:num_samples]
    else:
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
def _four_phase_peak(window, taps, stride, count, out):
    """``max |y_p[t]|`` over the 4 phases and ``t < count``, ``y_p[t] = Σ_k taps[p, k] · window[t + stride ·
    (11 − k)]``: one loop over ``t`` computes all four phases from the same 12 loads (48 multiply-adds,
    float32, in SIMD lanes across ``t``); ``out`` (float32, ≥ ``count``) receives each ``t``'s maximum so
    that the loop has no reduction in it, the maximum over ``out`` is a second, vectorised loop. ``window``
    is an interleaved buffer read with stride ``stride`` (the channel count), so every channel of an
    interleaved file is filtered in the same pass."""
    h = taps
    a0, a1, a2, a3, a4, a5 = h[0, 0], h[0, 1], h[0, 2], h[0, 3], h[0, 4], h[0, 5]
    a6, a7, a8, a9, a10, a11 = h[0, 6], h[0, 7], h[0, 8], h[0, 9], h[0, 10], h[0, 11]
    b0, b1, b2, b3, b4, b5 = h[1, 0], h[1, 1], h[1, 2], h[1, 3], h[1, 4], h[1, 5]
    b6, b7, b8, b9, b10, b11 = h[1, 6], h[1, 7], h[1, 8], h[1, 9], h[1, 10], h[1, 11]
    c0, c1, c2, c3, c4, c5 = h[2, 0], h[2, 1], h[2, 2], h[2, 3], h[2, 4], h[2, 5]
    c6, c7, c8, c9, c10, c11 = h[2, 6], h[2, 7], h[2, 8], h[2, 9], h[2, 10], h[2, 11]
    d0, d1, d2, d3, d4, d5 = h[3, 0], h[3, 1], h[3, 2], h[3, 3], h[3, 4], h[3, 5]
    d6, d7, d8, d9, d10, d11 = h[3, 6], h[3, 7], h[3, 8], h[3, 9], h[3, 10], h[3, 11]
    s = stride
    # one slice per tap, indexed from 0: numba drops its negative-index checks and the loop vectorises
    w0, w1, w2 = window[11 * s:11 * s + count], window[10 * s:10 * s + count], window[9 * s:9 * s + count]
    w3, w4, w5 = window[8 * s:8 * s + count], window[7 * s:7 * s + count], window[6 * s:6 * s + count]
    w6, w7, w8 = window[5 * s:5 * s + count], window[4 * s:4 * s + count], window[3 * s:3 * s + count]
    w9, w10, w11 = window[2 * s:2 * s + count], window[s:s + count], window[0:count]
    for t in range(count):
        x0, x1, x2, x3, x4, x5 = w0[t], w1[t], w2[t], w3[t], w4[t], w5[t]
        x6, x7, x8, x9, x10, x11 = w6[t], w7[t], w8[t], w9[t], w10[t], w11[t]
        y0 = (a0 * x0 + a1 * x1 + a2 * x2 + a3 * x3 + a4 * x4 + a5 * x5
              + a6 * x6 + a7 * x7 + a8 * x8 + a9 * x9 + a10 * x10 + a11 * x11)
        y1 = (b0 * x0 + b1 * x1 + b2 * x2 + b3 * x3 + b4 * x4 + b5 * x5
              + b6 * x6 + b7 * x7 + b8 * x8 + b9 * x9 + b10 * x10 + b11 * x11)
        y2 = (c0 * x0 + c1 * x1 + c2 * x2 + c3 * x3 + c4 * x4 + c5 * x5
              + c6 * x6 + c7 * x7 + c8 * x8 + c9 * x9 + c10 * x10 + c11 * x11)
        y3 = (d0 * x0 + d1 * x1 + d2 * x2 + d3 * x3 + d4 * x4 + d5 * x5
              + d6 * x6 + d7 * x7 + d8 * x8 + d9 * x9 + d10 * x10 + d11 * x11)
        out[t] = max(max(abs(y0), abs(y1)), max(abs(y2), abs(y3)))
    best = np.float32(0.0)
    for t in range(count):
        best = max(best, out[t])
    return best


@numba.njit(cache=True, nogil=True, fastmath=True)
def _abs_max(x):
    m = np.float32(0.0)
    for i in range(x.shape[0]):
        m = max(m, abs(x[i]))
    return m


@numba.njit(cache=True, nogil=True)
def _true_peak(flat, stride, taps, block, gain, peak):
    """True peak of an interleaved buffer ``flat`` of ``stride`` channels, starting from ``peak``; ``block``
    outputs of the flat buffer (all channels) at a time."""
    n = flat.shape[0]
    span = stride * (TRUE_PEAK_TAPS_PER_PHASE - 1)  # the inputs before an output that feed it
    total = n + span  # full convolution: the filter's tail after the last sample
    num_blocks = (total + block - 1) // block
    # each block's input peak: inputs [start − span, min(start + block, n)) feed its outputs
    input_peak = np.zeros(num_blocks, dtype=np.float32)
    for b in range(num_blocks):
        input_peak[b] = _abs_max(flat[max(b * block - span, 0):min(b * block + block, n)])
    order = np.argsort(-input_peak, kind="mergesort")
    scratch = np.zeros(block + span, dtype=np.float32)
    out = np.empty(block, dtype=np.float32)
    for b in order:
        # |y_p[t]| ≤ ‖h_p‖₁ · max_k |x[t − k]|: a block whose inputs peak at P yields at most gain · P
        if input_peak[b] * gain <= peak:
            break
        start = b * block
        count = min(block, total - start)
        lo = start - span  # the window is x[lo … lo + count + span), zero outside the signal
        if lo >= 0 and lo + count + span <= n:  # inside the signal: read in place
            peak = max(peak, _four_phase_peak(flat[lo:lo + count + span], taps, stride, count, out))
            continue
        head = max(-lo, 0)
        inputs = flat[max(lo, 0):min(lo + count + span, n)]
        scratch[:head] = 0.0
        scratch[head:head + inputs.shape[0]] = inputs
        scratch[head + inputs.shape[0]:count + span] = 0.0
        peak = max(peak, _four_phase_peak(scratch, taps, stride, count, out))
    return peak


def true_peak(audio: np.ndarray, taps: np.ndarray, block: int = 4096) -> float:
    """max over channels, phases and output samples of ``|Σ_k taps[p, k] · x[t − k]|`` (zero outside the
    signal, the filter's tail included), float32 arithmetic; blocks of ``block`` outputs per channel whose
    inputs cannot reach the peak found so far are skipped (exact: ``|y| ≤ max_p ‖taps_p‖₁ · max|x|``).

    An interleaved buffer (a decoded file's transposed view) is filtered in place, all channels in one pass
    (tap ``k`` of channel ``c`` reads ``flat[(t − k) · channels + c]``); channel-major audio one channel at
    a time.

    Args:
        audio: float32 ``(channels, samples)``, any layout; taps: ``(phases, 12)``, at most 4 phases (the
            Annex 2 filter's phases; fewer are padded with zero phases, which add nothing); block: outputs
            per channel per block (≥ 1).

    Returns:
        The peak as a linear amplitude (0.0 for silence).

    Raises:
        ValueError: ``taps`` is not ``(≤ 4, 12)`` or ``block`` < 1.
    """
    if taps.ndim != 2 or taps.shape[1] != TRUE_PEAK_TAPS_PER_PHASE or not 1 <= taps.shape[0] <= 4:
        raise ValueError(f"true_peak takes (≤ 4, {TRUE_PEAK_TAPS_PER_PHASE}) taps, got {taps.shape}")
    if block < 1:
        raise ValueError(f"block must be ≥ 1, got {block}")
    taps32 = np.zeros((4, TRUE_PEAK_TAPS_PER_PHASE), dtype=np.float32)
    taps32[:taps.shape[0]] = taps
    # the bound in float32 arithmetic: ‖h‖₁ rounded up a little, so rounding can never make it inexact
    gain = np.float32(float(np.abs(taps.astype(np.float64)).sum(axis=1).max()) * (1.0 + 1e-5))
    audio = np.asarray(audio)
    if audio.shape[1] == 0:
        return 0.0
    if audio.dtype != np.float32:
        audio = audio.astype(np.float32)
    frames = audio.T
    if frames.flags.c_contiguous:  # interleaved: every channel in one pass over the buffer
        channels = frames.shape[1]
        return float(_true_peak(frames.reshape(-1), channels, taps32, int(block) * channels, gain,
                                np.float32(0.0)))
    peak = np.float32(0.0)
    for channel in audio:  # channel-major, or any other layout: one contiguous channel at a time
        peak = _true_peak(np.ascontiguousarray(channel), 1, taps32, int(block), gain, peak)
    return float(peak)


@numba.njit(cache=True, nogil=True, fastmath=True)
def decimate(signal, taps, down, offset, out):
    """``out[k] = Σ_j taps[j] · signal[k · down + j − offset]`` (float32, zero outside ``signal``): an FIR
    low-pass evaluated only at the kept samples, read in place (no zero-padded copy of the signal)."""
    num_samples = signal.shape[0]
    num_taps = taps.shape[0]
    for k in range(out.shape[0]):
        lo = k * down - offset
        acc = np.float32(0.0)
        if lo >= 0 and lo + num_taps <= num_samples:
            # a slice indexed from 0: numba drops its negative-index checks and the loop runs in SIMD lanes
            segment = signal[lo:lo + num_taps]
            for j in range(num_taps):
                acc += taps[j] * segment[j]
        else:  # the first and last few outputs: their taps reach past an end of the signal
            for j in range(max(0, -lo), min(num_taps, num_samples - lo)):
                acc += taps[j] * signal[lo + j]
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


@numba.njit(cache=True, nogil=True, fastmath=True)
def band_energies(spectrum, band_edges, first_frame, out):
    """``out[first_frame + i, m] = Σ |spectrum[i, b]|²`` over the bins ``band_edges[m] ≤ b <
    band_edges[m + 1]`` (complex64 spectrum ``(count, bins)``; float32 sums of at most ~60 bins, in SIMD
    lanes, stored into float64 ``out``)."""
    for i in range(spectrum.shape[0]):
        row = spectrum[i]
        for m in range(band_edges.shape[0] - 1):
            band = row[band_edges[m]:band_edges[m + 1]]
            acc = np.float32(0.0)
            for b in range(band.shape[0]):
                v = band[b]
                acc += v.real * v.real + v.imag * v.imag
            out[first_frame + i, m] = acc
    return out


@numba.njit(cache=True, nogil=True)
def pack_sub_fingerprints(energies, mean_square, floor, out):
    """Haitsma & Kalker's sub-fingerprints from band energies: bit ``m`` of ``out[n]`` is
    ``(E[n+1,m] − E[n+1,m+1]) − (E[n,m] − E[n,m+1]) > 0`` (float64, in that order: the numpy expression it
    replaces gives the same bits), and ``out[n]`` is 0 when frame ``n`` or ``n + 1`` has ``mean_square`` below
    ``floor``. ``energies`` float64 ``(frames, bands)``, ``mean_square`` float64 ``(frames,)``, ``out`` uint32
    ``(frames − 1,)``; at most 33 bands (32 bits)."""
    bits = energies.shape[1] - 1
    for n in range(out.shape[0]):
        if mean_square[n + 1] < floor or mean_square[n] < floor:
            out[n] = 0
            continue
        value = np.uint32(0)
        for m in range(bits):
            if (energies[n + 1, m] - energies[n + 1, m + 1]) - (energies[n, m] - energies[n, m + 1]) > 0:
                value |= np.uint32(1) << np.uint32(m)
        out[n] = value
    return out
