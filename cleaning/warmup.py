"""Warm-up of ingest's compiled measurement kernels (``cleaning.kernels``), once per worker process.

The first call of a numba kernel in a process compiles it (or loads it from numba's on-disk cache, next to
``cleaning/kernels.py`` or under ``NUMBA_CACHE_DIR``). ``warm_kernels`` runs every measurement that calls a
kernel (``cleaning.measure``, ``cleaning.quality``, ``cleaning.fingerprint``) on tiny inputs in the layouts
ingest uses, so that no file pays for compilation. It lives above those modules, which all import
``cleaning.kernels``.
"""

from __future__ import annotations

import time

import numpy as np

from cleaning.fingerprint import fingerprint
from cleaning.kernels import scan_levels, true_peak
from cleaning.measure import CLIP_THRESHOLD, k_weighting_sos
from cleaning.quality import BS1770_TRUE_PEAK_TAPS

__all__ = ["warm_kernels"]


def warm_kernels() -> float:
    """Compile (or load from numba's cache) every kernel for the float32 layouts ingest uses: interleaved
    stereo and mono files, channel-major arrays. Returns the seconds it took; idempotent and cheap after the
    first call. Call it once per worker process before timing or measuring files."""
    start = time.perf_counter()
    sos = k_weighting_sos(48000)
    for channels in (1, 2):
        interleaved = np.zeros((64, channels), dtype=np.float32)
        for audio in (interleaved.T, np.ascontiguousarray(interleaved.T)):
            for with_mono in (False, True):
                scan_levels(audio, sos, np.array([0, 32, 64]), 16, CLIP_THRESHOLD, with_mono)
            true_peak(audio, BS1770_TRUE_PEAK_TAPS)
    for channels in (1, 2):  # one second: long enough for whole fingerprint frames
        fingerprint(np.zeros((channels, 44100), np.float32), 44100)
    return time.perf_counter() - start
