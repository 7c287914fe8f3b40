"""Cheap explicit checks on a stem, run before the blind methods: silence, clipping, and whether the stem
belongs to its mixture. Each check measures one number, compares it with a limit and says why it failed.

Pure functions of float32 ``(channels, samples)`` audio; they know nothing of Ray or the catalog.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from cleaning.measure import measure_clipped_fraction, measure_silent_fraction

# StemScore ``method`` names of the explicit checks and their reasons (the ``reason`` of a dropped stem).
SILENCE = "check_silence"
CLIPPING = "check_clipping"
MIXTURE = "check_mixture"
REASON_SILENT = "silent_stem"
REASON_CLIPPED = "clipped_stem"
REASON_NOT_IN_MIXTURE = "stem_not_in_mixture"


@dataclass(frozen=True)
class CheckLimits:
    """Limits of the explicit checks.

    Attributes:
        max_silent_fraction: drop a stem whose fraction of 100 ms windows under ``silence_floor_dbfs`` is
            at least this (1.0 keeps every stem that has any sound at all).
        silence_floor_dbfs: RMS floor of a silent window, dBFS.
        max_clipped_fraction: drop a stem with at least this fraction of samples at ≥ 0.999 full scale.
        min_mixture_gain: drop a stem whose least-squares gain in its mixture, ``<s, m> / <s, s>``, is
            under this. A stem that is in the mixture at unit gain scores ≈ 1 (the other stems are
            nearly orthogonal to it); a stem from another recording scores ≈ 0.
    """

    max_silent_fraction: float = 0.95
    silence_floor_dbfs: float = -60.0
    max_clipped_fraction: float = 1e-3
    min_mixture_gain: float = 0.5


@dataclass(frozen=True)
class CheckResult:
    """One check on one stem: the measured ``score``, whether it passed, and why not."""

    method: str
    score: float
    passed: bool
    reason: str  # "" when passed
    detail: str


def check_silence(audio: np.ndarray, sample_rate_hz: int, limits: CheckLimits = CheckLimits()) -> CheckResult:
    """Silence: the fraction of 100 ms windows whose RMS is under ``limits.silence_floor_dbfs``.

    Args:
        audio: float32 ``(channels, samples)``.
        sample_rate_hz: rate of ``audio``.

    Returns:
        ``CheckResult`` with ``score`` = silent fraction in [0, 1]; fails at ``≥ limits.max_silent_fraction``.
    """
    fraction = measure_silent_fraction(audio, sample_rate_hz, floor_dbfs=limits.silence_floor_dbfs)
    passed = fraction < limits.max_silent_fraction
    return CheckResult(SILENCE, fraction, passed, "" if passed else REASON_SILENT,
                       f"silent_fraction {fraction:.3f} {'<' if passed else '≥'} {limits.max_silent_fraction}")


def check_clipping(audio: np.ndarray, limits: CheckLimits = CheckLimits()) -> CheckResult:
    """Clipping: the fraction of samples at ≥ 0.999 full scale (``cleaning.measure``).

    Args:
        audio: float32 ``(channels, samples)``.

    Returns:
        ``CheckResult`` with ``score`` = clipped fraction; fails at ``≥ limits.max_clipped_fraction``.
    """
    fraction = measure_clipped_fraction(audio)
    passed = fraction < limits.max_clipped_fraction
    return CheckResult(CLIPPING, fraction, passed, "" if passed else REASON_CLIPPED,
                       f"clipped_fraction {fraction:.5f} {'<' if passed else '≥'} {limits.max_clipped_fraction}")


def measure_mixture_gain(stem: np.ndarray, mixture: np.ndarray) -> float:
    """Least-squares gain of ``stem`` in ``mixture``: ``<s, m> / <s, s>`` over all channels and samples.

    Channel counts are broadcast (a mono stem against a stereo mixture uses the mixture's mean); lengths
    are cut to the shorter. NaN for a silent stem (it has no gain).

    Args:
        stem, mixture: float32 ``(channels, samples)``.
    """
    stem = np.asarray(stem, dtype=np.float64)
    mixture = np.asarray(mixture, dtype=np.float64)
    if stem.shape[0] != mixture.shape[0]:
        stem, mixture = stem.mean(axis=0, keepdims=True), mixture.mean(axis=0, keepdims=True)
    length = min(stem.shape[1], mixture.shape[1])
    stem, mixture = stem[:, :length], mixture[:, :length]
    energy = float(np.sum(stem * stem))
    if energy <= 0.0:
        return math.nan
    return float(np.sum(stem * mixture)) / energy


def check_mixture(stem: np.ndarray, mixture: np.ndarray, limits: CheckLimits = CheckLimits()) -> CheckResult:
    """Does the stem belong to its mixture? Its least-squares gain in the mixture must reach
    ``limits.min_mixture_gain`` (see ``measure_mixture_gain``). A silent stem passes (silence is its own
    check).
    """
    gain = measure_mixture_gain(stem, mixture)
    passed = math.isnan(gain) or gain >= limits.min_mixture_gain
    return CheckResult(MIXTURE, gain, passed, "" if passed else REASON_NOT_IN_MIXTURE,
                       f"gain in mixture {gain:.3f} {'≥' if passed else '<'} {limits.min_mixture_gain}")


def run_checks(stem: np.ndarray, sample_rate_hz: int, mixture: np.ndarray | None,
               limits: CheckLimits = CheckLimits()) -> list[CheckResult]:
    """All explicit checks on one stem, in order: silence, clipping, mixture (only when a mixture is given)."""
    results = [check_silence(stem, sample_rate_hz, limits), check_clipping(stem, limits)]
    if mixture is not None:
        results.append(check_mixture(stem, mixture, limits))
    return results
