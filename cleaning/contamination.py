"""Contamination simulation, for evaluating blind cleaning: plant known damage into clean stems and remember
which items were planted, so that a cleaning method's scores can be judged (AUROC, precision at the
planted count).

Kinds, after Gui et al., "Towards Blind Data Cleaning: A Case Study in Music Source Separation"
(ICASSP 2026):

- ``bleeding``: another stem of the same song mixed in at a gain drawn uniformly in ``bleed_db_range``
  (−24 to −6 dB relative to its own level);
- ``label_noise``: the stem's audio replaced by a stem of *another role* of the same song (the label stays,
  so a "bass" stem holds, say, a guitar) — it still belongs to the mixture, so no explicit check sees it;
- ``noise``: white Gaussian noise at an SNR drawn in ``snr_db_range`` (dB, against the stem's own power);
- ``band_limit``: an 8th-order Butterworth low-pass at a cut-off drawn in ``cutoff_hz_range`` (codec or
  bandwidth damage), applied forward and backward (zero phase);
- ``silence`` and ``clipping``: the two that the explicit checks must catch (digital silence; the stem
  driven 12–24 dB into a hard clip at full scale).

Everything is deterministic given ``seed``: the same items, kinds and parameters, the same audio.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

BLEEDING = "bleeding"
LABEL_NOISE = "label_noise"
NOISE = "noise"
BAND_LIMIT = "band_limit"
SILENCE = "silence"
CLIPPING = "clipping"
KINDS = (BLEEDING, LABEL_NOISE, NOISE, BAND_LIMIT, SILENCE, CLIPPING)


@dataclass(frozen=True)
class StemItem:
    """One stem of one song (or song excerpt) with its audio: float32 ``(channels, samples)``."""

    track_id: str
    role: str
    instrument: str
    audio: np.ndarray
    sample_rate_hz: int

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.track_id, self.role, self.instrument)


@dataclass(frozen=True)
class Planted:
    """What was planted into item ``index``: its kind and the parameters (``detail``, readable)."""

    index: int
    kind: str
    detail: str


@dataclass(frozen=True)
class ContaminationRanges:
    bleed_db_range: tuple[float, float] = (-24.0, -6.0)
    snr_db_range: tuple[float, float] = (0.0, 10.0)
    cutoff_hz_range: tuple[float, float] = (1000.0, 3000.0)


def bleed(stem: np.ndarray, other: np.ndarray, gain_db: float) -> np.ndarray:
    """``stem`` plus ``other`` scaled so that its RMS is ``gain_db`` relative to ``stem``'s RMS.

    Args:
        stem, other: float32 ``(channels, samples)`` of the same shape.
        gain_db: level of the bleed relative to the stem, dB (e.g. −12).

    Raises:
        ValueError: shapes differ.
    """
    if stem.shape != other.shape:
        raise ValueError(f"bleed needs equal shapes, got {stem.shape} and {other.shape}")
    scale = _rms(stem) / max(_rms(other), 1e-12) * 10.0 ** (gain_db / 20.0)
    return (stem + scale * other).astype(np.float32)


def add_noise(stem: np.ndarray, snr_db: float, rng: np.random.Generator) -> np.ndarray:
    """``stem`` plus white Gaussian noise at ``snr_db`` (stem power / noise power, dB)."""
    noise = rng.standard_normal(stem.shape)
    noise *= _rms(stem) / max(_rms(noise), 1e-12) * 10.0 ** (-snr_db / 20.0)
    return (stem + noise).astype(np.float32)


def band_limit(stem: np.ndarray, sample_rate_hz: int, cutoff_hz: float) -> np.ndarray:
    """Zero-phase 8th-order Butterworth low-pass of ``stem`` at ``cutoff_hz`` (scipy ``sosfiltfilt``).

    Raises:
        ValueError: ``cutoff_hz`` is not below the Nyquist frequency.
    """
    if not 0 < cutoff_hz < sample_rate_hz / 2:
        raise ValueError(f"cutoff_hz {cutoff_hz} must be in (0, {sample_rate_hz / 2})")
    from scipy.signal import butter, sosfiltfilt  # scipy.signal takes ~1 s to import: only where it filters

    sos = butter(8, cutoff_hz, btype="low", fs=sample_rate_hz, output="sos")
    return sosfiltfilt(sos, stem.astype(np.float64), axis=-1).astype(np.float32)


def clip_hard(stem: np.ndarray, drive_db: float) -> np.ndarray:
    """``stem`` normalised to full-scale peak, amplified by ``drive_db`` and hard-clipped to [−1, 1]."""
    peak = max(float(np.max(np.abs(stem))), 1e-12)
    return np.clip(stem / peak * 10.0 ** (drive_db / 20.0), -1.0, 1.0).astype(np.float32)


def plant_contamination(items: Sequence[StemItem], fractions: Mapping[str, float], seed: int,
                        ranges: ContaminationRanges = ContaminationRanges()) -> tuple[list[StemItem], list[Planted]]:
    """Plant contamination into a copy of ``items``; each item gets at most one kind.

    For each kind in ``fractions`` (in ``KINDS`` order), ``round(fraction * len(items))`` items not yet
    planted are drawn among those that can take that kind (bleeding and label noise need another stem of
    the same track, label noise one of another role).

    Args:
        items: clean stems; items of one track must share shape and rate.
        fractions: kind → fraction of all items, e.g. ``{"bleeding": 0.1, "label_noise": 0.1}``.
        seed: the only source of randomness.

    Returns:
        (the items, contaminated where planted; the list of ``Planted`` sorted by index).

    Raises:
        ValueError: an unknown kind, a negative fraction, or fractions that sum above 1.
    """
    unknown = set(fractions) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown contamination kind(s) {sorted(unknown)}; known: {', '.join(KINDS)}")
    if any(f < 0 for f in fractions.values()) or sum(fractions.values()) > 1.0 + 1e-9:
        raise ValueError(f"contamination fractions must be ≥ 0 and sum to ≤ 1, got {dict(fractions)}")
    rng = np.random.default_rng(seed)
    out = list(items)
    planted: dict[int, Planted] = {}
    by_track: dict[str, list[int]] = {}
    for index, item in enumerate(items):
        by_track.setdefault(item.track_id, []).append(index)
    for kind in KINDS:
        count = int(round(fractions.get(kind, 0.0) * len(items)))
        if count == 0:
            continue
        eligible = [i for i in range(len(items)) if i not in planted and _partners(items, by_track, i, kind)]
        chosen = rng.permutation(eligible)[:count]
        for index in sorted(int(i) for i in chosen):
            item = items[index]
            partners = _partners(items, by_track, index, kind)
            if kind == BLEEDING:
                other = items[partners[int(rng.integers(len(partners)))]]
                gain_db = float(rng.uniform(*ranges.bleed_db_range))
                audio = bleed(item.audio, other.audio, gain_db)
                detail = f"bleed of {other.role}/{other.instrument or '-'} at {gain_db:.1f} dB"
            elif kind == LABEL_NOISE:
                other = items[partners[int(rng.integers(len(partners)))]]
                audio = other.audio.copy()
                detail = f"holds {other.role}/{other.instrument or '-'} under the label {item.role}"
            elif kind == NOISE:
                snr_db = float(rng.uniform(*ranges.snr_db_range))
                audio = add_noise(item.audio, snr_db, rng)
                detail = f"white noise at {snr_db:.1f} dB SNR"
            elif kind == BAND_LIMIT:
                cutoff_hz = float(rng.uniform(*ranges.cutoff_hz_range))
                audio = band_limit(item.audio, item.sample_rate_hz, cutoff_hz)
                detail = f"low-pass at {cutoff_hz:.0f} Hz"
            elif kind == SILENCE:
                audio = np.zeros_like(item.audio)
                detail = "digital silence"
            else:  # CLIPPING
                drive_db = float(rng.uniform(12.0, 24.0))
                audio = clip_hard(item.audio, drive_db)
                detail = f"driven {drive_db:.1f} dB into a hard clip"
            out[index] = replace(item, audio=audio)
            planted[index] = Planted(index, kind, detail)
    return out, [planted[i] for i in sorted(planted)]


def _partners(items: Sequence[StemItem], by_track: Mapping[str, list[int]], index: int, kind: str) -> list[int]:
    """Items that ``kind`` may take audio from for item ``index``; ``[index]`` for kinds that need none."""
    if kind not in (BLEEDING, LABEL_NOISE):
        return [index] if _rms(items[index].audio) > 0 else []
    same_track = [j for j in by_track[items[index].track_id] if j != index and _rms(items[j].audio) > 0]
    if kind == LABEL_NOISE:
        return [j for j in same_track if items[j].role != items[index].role]
    return same_track


def _rms(audio: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(audio, dtype=np.float64)))) if audio.size else 0.0
