"""Rendering the demo's scores to 16-bit stems: MIDI note events from a music21 score part, synthesis with one
General MIDI program through TinySoundFont and the TimGM6mb soundfont, and one common gain per track.

Times are whole samples; rendering is single-threaded float arithmetic on a fresh synthesizer per stem and the
stems are quantised to int16 here, so the same notes give the same samples. ``pipelines.demo.delivery`` picks
the pieces and writes the delivery.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

SOUNDFONT_NAME = "TimGM6mb.sf2"

_PEAK_TARGET_DBFS = -1.0  # peak of a track's stem sum (and of every stem) after the common gain
_SILENT_STEM_DBFS = -40.0  # a stem whose peak stays below this after the common gain is an error
_FADE_OUT_S = 0.05  # linear fade at the end of every track, so a truncated note does not click
_NOTE_VELOCITY = 90  # MIDI velocity (0-127) of every note
_MIDI_CHANNEL = 0  # any melodic channel; channel 9 would be drums
_PCM16_FULL_SCALE = 32768  # int16 sample value of 1.0 full scale (libsndfile's read convention)


def soundfont_path() -> Path:
    """Path of ``TimGM6mb.sf2``, the General MIDI soundfont shipped next to ``pretty_midi/__init__.py``.

    Raises:
        FileNotFoundError: the installed pretty_midi does not carry the soundfont.
    """
    import pretty_midi

    path = Path(pretty_midi.__file__).with_name(SOUNDFONT_NAME)
    if not path.is_file():
        raise FileNotFoundError(f"{SOUNDFONT_NAME} is not next to {pretty_midi.__file__}: reinstall pretty_midi "
                                "from its wheel (it ships the soundfont)")
    return path


def parse_score(corpus_path: str):
    """The music21 ``Score`` at ``corpus_path``. Raises FileNotFoundError when the corpus lacks it."""
    from music21 import corpus, exceptions21, stream

    try:
        score = corpus.parse(corpus_path)
    except exceptions21.CorpusException as err:
        raise FileNotFoundError(f"music21 corpus piece {corpus_path!r} is not installed (music21 ships its "
                                "corpus in the wheel: check the music21 install or edit DEMO_PIECES)") from err
    if not isinstance(score, stream.Score):
        raise ValueError(f"music21 corpus piece {corpus_path!r} is a {type(score).__name__}, not one Score")
    found = str(score.metadata.corpusFilePath or "")
    if not found.startswith(f"{corpus_path}."):
        raise FileNotFoundError(f"music21 corpus piece {corpus_path!r} resolved to {found!r}, another file")
    return score



def note_events(part, samples_per_quarter: float, max_samples: int) -> list[tuple[int, int, int]]:
    """MIDI note events of a score part: ``(onset_sample, release_sample, midi_key)``, sorted.

    Ties are merged, chords give one event per pitch, grace notes (zero length) are skipped; notes starting at
    or after ``max_samples`` are dropped. Times are whole samples at ``samples_per_quarter``.
    """
    events = []
    for element in part.stripTies().flatten().notes:
        length_quarters = float(element.quarterLength)
        if length_quarters <= 0:
            continue
        onset = int(round(float(element.offset) * samples_per_quarter))
        release = int(round((float(element.offset) + length_quarters) * samples_per_quarter))
        if onset >= max_samples or release <= onset:
            continue
        for pitch in element.pitches:
            if 0 <= pitch.midi <= 127:
                events.append((onset, release, int(pitch.midi)))
    return sorted(events)


def render_part(notes: Sequence[tuple[int, int, int]], program: int, num_samples: int, sample_rate_hz: int,
                 sf2_path: Path) -> np.ndarray:
    """Render note events with one GM program through TinySoundFont, offline.

    A fresh synthesizer per stem; the buffer is generated between events, so every note starts and stops on its
    exact sample. TinySoundFont renders stereo; the two channels are averaged.

    Returns:
        float32 ``(num_samples,)``, unnormalised.
    """
    import tinysoundfont

    synth = tinysoundfont.Synth(samplerate=sample_rate_hz)
    sfid = synth.sfload(str(sf2_path))
    synth.program_select(_MIDI_CHANNEL, sfid, 0, program)
    # Releases sort before onsets at the same sample, so a repeated pitch is re-struck.
    events = sorted([(release, 0, key) for _, release, key in notes] + [(onset, 1, key) for onset, _, key in notes])
    frame_bytes = 2 * 4  # stereo float32
    buffer = memoryview(bytearray(num_samples * frame_bytes))
    cursor = 0
    for sample, is_onset, key in events:
        sample = min(sample, num_samples)
        if sample > cursor:
            synth.generate_simple(sample - cursor, buffer=buffer[cursor * frame_bytes: sample * frame_bytes])
            cursor = sample
        if cursor >= num_samples:
            break
        if is_onset:
            synth.noteon(_MIDI_CHANNEL, key, _NOTE_VELOCITY)
        else:
            synth.noteoff(_MIDI_CHANNEL, key)
    if cursor < num_samples:
        synth.generate_simple(num_samples - cursor, buffer=buffer[cursor * frame_bytes:])
    stereo = np.frombuffer(buffer, dtype=np.float32).reshape(num_samples, 2)
    return stereo.mean(axis=1, dtype=np.float32)


def fade_out_curve(num_samples: int, sample_rate_hz: int) -> np.ndarray:
    """Gain curve float32 ``(num_samples,)``: 1, then a linear ramp to 0 over the last ``_FADE_OUT_S``."""
    fade_samples = min(num_samples, int(round(_FADE_OUT_S * sample_rate_hz)))
    curve = np.ones(num_samples, dtype=np.float32)
    curve[num_samples - fade_samples:] = np.linspace(1.0, 0.0, fade_samples, dtype=np.float32)
    return curve


def normalise_to_pcm16(stems: np.ndarray, track_id: str, part_names: Sequence[str]) -> np.ndarray:
    """Apply one gain to all stems of a track and quantise to int16.

    The gain puts the larger of the stems' sum peak and every stem's peak at ``_PEAK_TARGET_DBFS``, less one
    LSB per stem, so that the sum of the rounded stems cannot exceed the target either.

    Args:
        stems: float32 ``(num_stems, num_samples)``.
        track_id, part_names: the track and its stems' names, in ``stems`` order, for error messages.

    Returns:
        int16 ``(num_stems, num_samples)``; full scale is ``_PCM16_FULL_SCALE``.

    Raises:
        ValueError: the render is silent, or a stem peaks below ``_SILENT_STEM_DBFS`` after the gain.
    """
    stems64 = stems.astype(np.float64)
    peak = max(float(np.max(np.abs(stems64.sum(axis=0)))), float(np.max(np.abs(stems64))))
    if peak == 0.0:
        raise ValueError(f"{track_id}: the render is silent")
    target = 10.0 ** (_PEAK_TARGET_DBFS / 20.0) * _PCM16_FULL_SCALE - stems.shape[0]
    quantised = np.round(stems64 * (target / peak))
    stem_peaks_dbfs = 20.0 * np.log10(np.maximum(np.max(np.abs(quantised), axis=1), 1e-9) / _PCM16_FULL_SCALE)
    for part_name, peak_dbfs in zip(part_names, stem_peaks_dbfs, strict=True):
        if peak_dbfs < _SILENT_STEM_DBFS:
            raise ValueError(f"{track_id} part {part_name!r} peaks at {peak_dbfs:.1f} dBFS, below "
                             f"{_SILENT_STEM_DBFS} dBFS: raise max_duration_s or change its program")
    return quantised.astype(np.int16)
