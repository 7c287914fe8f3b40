"""Synthetic music-like recordings and planted near-duplicate copies, made in code, for duplicate detection.

A recording is a few bars at a random tempo and key: a melody (harmonic notes with an attack and decay, a timbre
of its own), chords, a bass line and noise drums (kick, snare, hi-hat), panned across two channels. Different
seeds give different music, not different noise: which is what makes near-duplicate detection hard (shared
timbres, held notes, repeated patterns). The copies are what a label re-delivers: another gain, another sample
rate, a lossy codec, a different start.
"""

from __future__ import annotations

import io

import numpy as np
import soundfile as sf

from cleaning.audio import read_audio, resample

RATE = 44100
SHIFT_S = 1.5
_TABLE_SIZE = 4096  # samples in one period of a note's wavetable
COPY_KINDS = ("gain", "resample_32k", "ogg", "mp3", "shift", "all")
"""How a planted copy differs from its original: gain −6 dB; resampled to 32 kHz; Ogg Vorbis; MP3; starting
``SHIFT_S`` into the recording; and all of −6 dB, 32 kHz, the shift and Ogg Vorbis at once."""


def recording(seed: int, duration_s: float = 10.0, sample_rate_hz: int = RATE) -> np.ndarray:
    """float32 ``(2, round(duration_s · sample_rate_hz))``, peak 0.5 full scale: a music-like recording that
    depends only on ``seed``."""
    rng = np.random.default_rng([seed, 20260719])
    num_samples = int(round(duration_s * sample_rate_hz))
    out = np.zeros((2, num_samples), dtype=np.float64)
    beat_s = 60.0 / rng.uniform(80, 160)
    root = rng.integers(45, 58)  # MIDI note of the key's root
    scale = np.array([0, 2, 4, 5, 7, 9, 11] if rng.random() < 0.5 else [0, 2, 3, 5, 7, 8, 10])
    offset_s = rng.uniform(0.0, beat_s)  # where the first beat falls

    def midi_hz(note: float) -> float:
        return 440.0 * 2.0 ** ((note - 69) / 12)

    def add(start_s: float, sound: np.ndarray, pan: float) -> None:
        start = int(round(start_s * sample_rate_hz))
        if start >= num_samples:
            return
        sound = sound[: num_samples - start]
        out[0, start:start + sound.size] += np.cos(pan * np.pi / 2) * sound
        out[1, start:start + sound.size] += np.sin(pan * np.pi / 2) * sound

    envelopes: dict[tuple[int, float, float], np.ndarray] = {}

    def tone(frequency_hz: float, length_s: float, harmonics: np.ndarray, attack_s: float, decay_per_s: float
             ) -> np.ndarray:
        """A note: one period of the harmonics' sum (a wavetable) read at ``frequency_hz``, times an envelope."""
        n = int(length_s * sample_rate_hz)
        envelope = envelopes.get((n, attack_s, decay_per_s))
        if envelope is None:
            t = np.arange(n, dtype=np.float32) / np.float32(sample_rate_hz)
            envelope = np.minimum(1.0, t / np.float32(attack_s)) * np.exp(np.float32(-decay_per_s) * t)
            envelope[-64:] *= np.linspace(1.0, 0.0, min(64, n), dtype=np.float32)
            envelopes[(n, attack_s, decay_per_s)] = envelope
        partials = np.arange(1, harmonics.size + 1)
        keep = partials * frequency_hz < sample_rate_hz / 2
        phase = np.arange(_TABLE_SIZE) / _TABLE_SIZE
        table = (harmonics[keep, None] * np.sin(2 * np.pi * partials[keep, None] * phase)).sum(0).astype(np.float32)
        step = frequency_hz * _TABLE_SIZE / sample_rate_hz  # table samples per audio sample
        index = (np.arange(n) * step).astype(np.int64) & (_TABLE_SIZE - 1)
        return envelope * table[index]

    # melody: eighth or sixteenth notes, some rests, a timbre of its own
    step_s = beat_s / rng.choice([2, 4])
    lead = rng.uniform(0.1, 1.0, 6) / np.arange(1, 7)
    lead_pan, attack_s, decay = rng.uniform(0.2, 0.8), rng.uniform(0.003, 0.03), rng.uniform(2.0, 8.0)
    degree = int(rng.integers(0, 7))
    for k in range(int((duration_s - offset_s) / step_s) + 1):
        degree = int(np.clip(degree + rng.integers(-3, 4), 0, 13))
        if rng.random() < 0.15:
            continue
        note = root + 12 + scale[degree % 7] + 12 * (degree // 7)
        add(offset_s + k * step_s, 0.25 * tone(midi_hz(note), step_s * rng.choice([1, 1, 2]), lead, attack_s,
                                               decay), lead_pan)
    # chords, one a bar, and a bass note every beat
    pad = rng.uniform(0.2, 1.0, 4) / np.arange(1, 5) ** 1.5
    for bar in range(int(duration_s / (4 * beat_s)) + 1):
        chord_root = int(rng.choice([0, 3, 4, 5]))
        for third in (0, 2, 4):
            degree_ = chord_root + third
            note = root + scale[degree_ % 7] + 12 * (degree_ // 7)
            add(offset_s + bar * 4 * beat_s, 0.12 * tone(midi_hz(note), 4 * beat_s, pad, 0.08, 0.6),
                0.5 + 0.3 * (third - 2) / 2)
        for beat in range(4):
            add(offset_s + (bar * 4 + beat) * beat_s,
                0.3 * tone(midi_hz(root - 12 + scale[chord_root]), beat_s, np.array([1.0, 0.4, 0.2]), 0.01, 4.0),
                0.5)
    # drums: kick on 1 and 3, snare on 2 and 4, hi-hat on every eighth (some dropped)
    kick_t = np.arange(int(0.25 * sample_rate_hz)) / sample_rate_hz
    kick = np.sin(2 * np.pi * (50 * kick_t + 100 / 30 * (1 - np.exp(-30 * kick_t)))) * np.exp(-12 * kick_t)
    noise = rng.standard_normal(int(0.2 * sample_rate_hz))
    snare = (0.6 * noise + np.sin(2 * np.pi * 190 * kick_t[: noise.size])) * np.exp(-20 * kick_t[: noise.size])
    hat = np.diff(rng.standard_normal(int(0.05 * sample_rate_hz) + 1)) * np.exp(-80 * kick_t[: int(0.05 * sample_rate_hz)])
    for beat in range(int((duration_s - offset_s) / beat_s) + 1):
        start_s = offset_s + beat * beat_s
        add(start_s, 0.5 * (kick if beat % 2 == 0 else snare), 0.5)
        for half in (0, 1):
            if rng.random() < 0.8:
                add(start_s + half * beat_s / 2, 0.08 * hat, rng.uniform(0.3, 0.7))
    out *= 0.5 / max(np.max(np.abs(out)), 1e-9)
    return out.astype(np.float32)


def planted_copy(audio: np.ndarray, kind: str, sample_rate_hz: int = RATE) -> tuple[np.ndarray, int]:
    """A copy of ``audio`` (float32 ``(2, samples)`` at ``sample_rate_hz``) as a label might re-deliver it.

    Args:
        kind: one of ``COPY_KINDS``.

    Returns:
        (float32 ``(2, samples')``, its sample rate in Hz).
    """
    if kind == "gain":
        return (audio * np.float32(10 ** (-6 / 20))).astype(np.float32), sample_rate_hz
    if kind == "resample_32k":
        return resample(audio, sample_rate_hz, 32000), 32000
    if kind in ("ogg", "mp3"):
        return codec_round_trip(audio, sample_rate_hz, kind)
    if kind == "shift":
        return np.ascontiguousarray(audio[:, int(SHIFT_S * sample_rate_hz):]), sample_rate_hz
    if kind == "all":
        quieter = audio[:, int(SHIFT_S * sample_rate_hz):] * np.float32(10 ** (-6 / 20))
        return codec_round_trip(resample(quieter, sample_rate_hz, 32000), 32000, "ogg")
    raise ValueError(f"unknown copy kind {kind!r}; one of {COPY_KINDS}")


def encode(audio: np.ndarray, sample_rate_hz: int, codec: str) -> bytes:
    """Encode float32 ``(channels, samples)`` as an Ogg Vorbis (``ogg``) or MP3 (``mp3``) file's bytes
    (libsndfile's default quality)."""
    formats = {"ogg": ("OGG", "VORBIS"), "mp3": ("MP3", "MPEG_LAYER_III")}
    buffer = io.BytesIO()
    sf.write(buffer, audio.T, sample_rate_hz, format=formats[codec][0], subtype=formats[codec][1])
    return buffer.getvalue()


def codec_round_trip(audio: np.ndarray, sample_rate_hz: int, codec: str) -> tuple[np.ndarray, int]:
    """``audio`` encoded (``encode``) and decoded again: (float32 ``(channels, samples')``, rate in Hz)."""
    return read_audio(io.BytesIO(encode(audio, sample_rate_hz, codec)))
