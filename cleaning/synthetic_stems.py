"""Synthetic multitracks for tests and quick evaluation runs: four stems per song with the MUSDB roles and
distinct, music-like timbres, rendered in code from a seed (no files, nothing downloaded).

Per song (tempo 80–140 BPM, a random key): ``bass`` — plucked low notes (41–110 Hz, 6 harmonics, fast
decay); ``drums`` — kick (pitch-swept sine), snare (band-passed noise) and hi-hat (high-passed noise
ticks) on a 16th-note grid; ``vocals`` — a legato line (196–523 Hz) with vibrato and two formant-like
harmonic peaks; ``other`` — three-note chords (262–1047 Hz, piano-like decays), one per beat. The stems
sum to the mixture exactly. Real recordings (the Slakh tracks of ../shared/corpus) are what ``clean
evaluate`` uses by default; these exist so that unit tests have known, fast, varied material.
"""

from __future__ import annotations

import numpy as np

from cleaning.contamination import StemItem

ROLES = ("bass", "drums", "other", "vocals")


def render_song(track_id: str, seed: int, duration_s: float = 4.0, sample_rate_hz: int = 16000) -> list[StemItem]:
    """Four mono stems of one synthetic song: ``StemItem`` with float32 ``(1, samples)`` audio, peak ≤ 0.5."""
    rng = np.random.default_rng(seed)
    n = round(duration_s * sample_rate_hz)
    t = np.arange(n) / sample_rate_hz
    beat_s = 60.0 / rng.uniform(80, 140)
    root_midi = int(rng.integers(0, 12))
    scale = np.array([0, 2, 4, 5, 7, 9, 11])

    def midi_hz(m: np.ndarray | float) -> np.ndarray:
        return 440.0 * 2.0 ** ((np.asarray(m, dtype=np.float64) - 69) / 12)

    def note(freq: float, start: float, length: float, harmonics: int, decay: float, rolloff: float) -> np.ndarray:
        out = np.zeros(n)
        i0, i1 = int(start * sample_rate_hz), min(n, int((start + length) * sample_rate_hz))
        if i1 <= i0:
            return out
        tt = t[i0:i1] - start
        env = np.exp(-tt * decay) * np.minimum(1.0, tt * 200)
        wave = sum((rolloff ** k) * np.sin(2 * np.pi * freq * (k + 1) * tt + rng.uniform(0, 6.28))
                   for k in range(harmonics))
        out[i0:i1] = env * wave
        return out

    bass = np.zeros(n)
    start = 0.0
    while start < duration_s:
        length = beat_s * rng.choice([0.5, 1.0])
        degree = scale[int(rng.integers(0, 7))]
        bass += note(float(midi_hz(28 + root_midi + degree)), start, length, 6, 6.0, 0.6)
        start += length
    drums = np.zeros(n)
    step = beat_s / 4
    for k in range(int(duration_s / step)):
        i0 = int(k * step * sample_rate_hz)
        seg = min(n - i0, int(0.15 * sample_rate_hz))
        tt = np.arange(seg) / sample_rate_hz
        if k % 8 == 0 or (k % 8 == 6 and rng.random() < 0.5):  # kick
            drums[i0:i0 + seg] += np.sin(2 * np.pi * (50 + 120 * np.exp(-tt * 40)) * tt) * np.exp(-tt * 25)
        if k % 8 == 4:  # snare
            noise = np.diff(rng.standard_normal(seg + 1))
            drums[i0:i0 + seg] += 0.5 * noise * np.exp(-tt * 30)
        if k % 2 == 0:  # hi-hat
            tick = np.diff(np.diff(rng.standard_normal(seg + 2)))
            drums[i0:i0 + seg] += 0.12 * tick * np.exp(-tt * 120)
    vocals = np.zeros(n)
    start = 0.0
    while start < duration_s:
        length = beat_s * rng.choice([1.0, 2.0])
        freq = float(midi_hz(55 + root_midi + scale[int(rng.integers(0, 7))]))
        i0, i1 = int(start * sample_rate_hz), min(n, int((start + length) * sample_rate_hz))
        tt = t[i0:i1] - start
        phase = 2 * np.pi * freq * tt + 0.3 * np.sin(2 * np.pi * 5.5 * tt) * freq / 5.5 * 0.02
        env = np.minimum(1.0, tt * 20) * np.minimum(1.0, (length - tt) * 20)
        formants = sum(np.exp(-((freq * (k + 1) - f0) / 300.0) ** 2) * np.sin((k + 1) * phase)
                       for k in range(12) for f0 in (700.0, 1200.0)) + 0.5 * np.sin(phase)
        vocals[i0:i1] += env * formants
        start += length
    other = np.zeros(n)
    start = 0.0
    while start < duration_s:
        degree = int(rng.integers(0, 7))
        chord = [scale[(degree + d) % 7] + 12 * ((degree + d) // 7) for d in (0, 2, 4)]
        for m in chord:
            other += note(float(midi_hz(60 + root_midi + m)), start, beat_s, 4, 3.0, 0.35)
        start += beat_s
    stems = {"bass": bass, "drums": drums, "other": other, "vocals": vocals}
    out = []
    for role in ROLES:
        audio = stems[role]
        audio = audio / max(np.max(np.abs(audio)), 1e-9) * 0.5 * rng.uniform(0.6, 1.0)
        out.append(StemItem(track_id, role, "", audio.astype(np.float32)[None], sample_rate_hz))
    return out


def render_songs(num_songs: int, seed: int, duration_s: float = 4.0, sample_rate_hz: int = 16000,
                 prefix: str = "synth") -> list[StemItem]:
    """``num_songs`` songs (``render_song`` with seeds ``seed * 100_003 + i``), stems in song order."""
    return [item for i in range(num_songs)
            for item in render_song(f"{prefix}-{i:03d}", seed * 100_003 + i, duration_s, sample_rate_hz)]
