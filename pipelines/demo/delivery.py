"""Render a small, real catalog delivery offline: public-domain scores from music21's corpus, one stem per part.

The delivery has the form that DESIGN.md ("A catalog delivery") describes and that ../shared/corpus has:
``tracks.csv``, ``files.csv``, ``licenses.csv`` and a ``README.md`` at the root of ``out_dir``, and one mono
FLAC (PCM_16) per score part under ``audio/<track_id>/<part>.flac``. As for the Slakh2100 tracks of the real
corpus there is no mixture file: the pipeline builds a track's mixture as the sum of its stems.

Each part of a score becomes MIDI note events (pitch, onset and release in whole samples at a fixed tempo per
track), rendered with one General MIDI program through TinySoundFont and the TimGM6mb soundfont that ships in
the pretty_midi wheel. Rendering is single-threaded float arithmetic on a fresh synthesizer per stem, and the
stems are quantised to 16 bits here, so a re-run writes the same bytes.

The pieces (``DEMO_PIECES``, sorted by music21 corpus path; ``num_tracks`` takes the first ones):

=============================  ==============================  =====  ===============================================
corpus path                    track id                        bpm    parts → GM instruments (lowest part = ``bass``)
=============================  ==============================  =====  ===============================================
bach/bwv153.1                  demo-bach-bwv153-1              76     S Flute, A Oboe, T Clarinet, B Bassoon
bach/bwv66.6                   demo-bach-bwv66-6               84     S Violin, A Clarinet, T French Horn, B Cello
corelli/opus3no1/1grave        demo-corelli-op3no1-grave       56     Violin, Oboe, continuo Church Organ
haydn/opus74no1/movement3      demo-haydn-op74no1-menuetto     138    Trumpet, French Horn, Trombone, Tuba
joplin/maple_leaf_rag          demo-joplin-maple-leaf-rag      100    right hand Honky-tonk Piano, left Acoustic Grand
mozart/k80/movement1           demo-mozart-k80-adagio          66     Violin, Viola, Cello, Contrabass
=============================  ==============================  =====  ===============================================

Rights: the compositions are in the public domain (licence ``PDM-1.0/music21-corpus``: AI training allowed,
commercial use allowed). To exercise the rights policy, the rendering of ``demo-bach-bwv66-6`` is offered under
a second, non-commercial licence only (``CC-BY-NC-4.0/linernotes-demo``), so a commercial run rejects that track
and a non-commercial run admits it. The TimGM6mb soundfont is GPL-2 (from MuseScore, via pretty_midi); the
delivery's README says so.
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from pipelines.demo.render import (
    fade_out_curve,
    normalise_to_pcm16,
    note_events,
    parse_score,
    render_part,
    soundfont_path,
)

PUBLIC_DOMAIN_LICENSE_ID = "PDM-1.0/music21-corpus"
NON_COMMERCIAL_LICENSE_ID = "CC-BY-NC-4.0/linernotes-demo"

TRACKS_COLUMNS = ("track_id", "isrc", "title", "artist", "rights_holder", "license_id", "attribution", "genre",
                  "tags", "description", "bpm", "key")
FILES_COLUMNS = ("track_id", "role", "instrument", "path")
LICENSES_COLUMNS = ("license_id", "licensor", "license_name", "license_url", "territories", "valid_from",
                    "valid_until", "ai_training", "commercial_use", "attribution_required")

_RELEASE_TAIL_S = 1.0  # kept after the last note-off when a piece ends before max_duration_s

ProgressCallback = Callable[[str, int, int], None]


@dataclass(frozen=True)
class DemoPart:
    """One part of a score and how it is rendered.

    Attributes:
        name: stem name, the file name without ``.flac`` (lower case, ``[a-z0-9-]``).
        program: General MIDI program, 0-based (0 = Acoustic Grand Piano, 40 = Violin, ...).
    """

    name: str
    program: int


@dataclass(frozen=True)
class DemoPiece:
    """A public-domain score of music21's corpus and how the demo renders it.

    Attributes:
        corpus_path: music21 corpus path, e.g. ``"bach/bwv66.6"``.
        track_id: the delivery's track id.
        title: title used when the score's metadata has none (music21 often only has the file name).
        composer: composer used when the score's metadata has none.
        genre: the ``genre`` column.
        bpm: tempo of the rendering in quarter notes per minute (the score's own tempo marks are ignored).
        parts: one ``DemoPart`` per score part, in score order; the count must match the score.
        license_id: the rendering's licence.
    """

    corpus_path: str
    track_id: str
    title: str
    composer: str
    genre: str
    bpm: float
    parts: tuple[DemoPart, ...]
    license_id: str = PUBLIC_DOMAIN_LICENSE_ID


def _parts(*pairs: tuple[str, int]) -> tuple[DemoPart, ...]:
    return tuple(DemoPart(name, program) for name, program in pairs)


DEMO_PIECES: tuple[DemoPiece, ...] = (
    DemoPiece("bach/bwv153.1", "demo-bach-bwv153-1", "Chorale BWV 153.1", "J.S. Bach", "baroque chorale", 76.0,
              _parts(("soprano", 73), ("alto", 68), ("tenor", 71), ("bass", 70))),
    DemoPiece("bach/bwv66.6", "demo-bach-bwv66-6", "Chorale BWV 66.6", "J.S. Bach", "baroque chorale", 84.0,
              _parts(("soprano", 40), ("alto", 71), ("tenor", 60), ("bass", 42)),
              license_id=NON_COMMERCIAL_LICENSE_ID),
    DemoPiece("corelli/opus3no1/1grave", "demo-corelli-op3no1-grave", "Sonata da chiesa Op. 3 No. 1: I. Grave",
              "Arcangelo Corelli", "baroque", 56.0,
              _parts(("violino-i", 40), ("violino-ii", 68), ("continuo", 19))),
    DemoPiece("haydn/opus74no1/movement3", "demo-haydn-op74no1-menuetto",
              "String Quartet Op. 74 No. 1: III. Menuetto", "Joseph Haydn", "classical", 138.0,
              _parts(("violin-i", 56), ("violin-ii", 60), ("viola", 57), ("cello", 58))),
    DemoPiece("joplin/maple_leaf_rag", "demo-joplin-maple-leaf-rag", "Maple Leaf Rag", "Scott Joplin", "ragtime",
              100.0, _parts(("right-hand", 3), ("left-hand", 0))),
    DemoPiece("mozart/k80/movement1", "demo-mozart-k80-adagio", "String Quartet No. 1 K. 80: I. Adagio",
              "W.A. Mozart", "classical", 66.0,
              _parts(("violin-i", 40), ("violin-ii", 41), ("viola", 42), ("cello", 43))),
)

_LICENSES: tuple[dict[str, str], ...] = (
    {
        "license_id": PUBLIC_DOMAIN_LICENSE_ID,
        "licensor": "Public domain (scores from the music21 corpus)",
        "license_name": "Public Domain Mark 1.0",
        "license_url": "https://creativecommons.org/publicdomain/mark/1.0/",
        "territories": "Worldwide",
        "valid_from": "2010-01-01",
        "valid_until": "",
        "ai_training": "allowed",
        "commercial_use": "true",
        "attribution_required": "false",
    },
    {
        "license_id": NON_COMMERCIAL_LICENSE_ID,
        "licensor": "linernotes demo",
        "license_name": "Creative Commons Attribution-NonCommercial 4.0",
        "license_url": "https://creativecommons.org/licenses/by-nc/4.0/",
        "territories": "Worldwide",
        "valid_from": "2024-01-01",
        "valid_until": "",
        "ai_training": "allowed",
        "commercial_use": "false",
        "attribution_required": "true",
    },
)


@dataclass(frozen=True)
class DemoDelivery:
    """What ``build_demo_delivery`` wrote.

    Attributes:
        path: the delivery folder (``out_dir``), holding the three CSVs, README.md and ``audio/``.
        track_ids: the tracks, in ``DEMO_PIECES`` order.
        num_files: number of audio files (stems) listed in ``files.csv``.
        duration_s: total duration of the tracks in seconds (each track counted once, not once per stem).
    """

    path: Path
    track_ids: tuple[str, ...]
    num_files: int
    duration_s: float


def build_demo_delivery(
    out_dir: Path,
    num_tracks: int = 6,
    max_duration_s: float = 30.0,
    sample_rate_hz: int = 32000,
    progress: ProgressCallback | None = None,
) -> DemoDelivery:
    """Render the first ``num_tracks`` of ``DEMO_PIECES`` into a catalog delivery in ``out_dir``.

    Every part of a score becomes one mono stem (float rendering → one common gain per track so that the stems'
    sum and every stem peak at or below -1 dBFS → 16-bit FLAC). A track lasts until its last note-off plus
    ``_RELEASE_TAIL_S``, at most ``max_duration_s``; all its stems have that length and ``sample_rate_hz``.
    Existing files of the same names in ``out_dir`` are overwritten; every file is written atomically. The
    same arguments give the same bytes.

    Args:
        out_dir: delivery folder; created if missing.
        num_tracks: how many pieces to render, 1 to ``len(DEMO_PIECES)``. The non-commercial track is the
            second piece, so it is present from ``num_tracks=2`` on.
        max_duration_s: longest track duration in seconds (> 0).
        sample_rate_hz: sample rate of the stems in Hz (8000 to 96000).
        progress: called as ``progress(message, done, total)`` after each track and after the tables
            (``total = num_tracks + 1``).

    Returns:
        A ``DemoDelivery`` describing what was written.

    Raises:
        ValueError: an argument is out of range, or a stem renders silent in the first ``max_duration_s``
            (peak below -40 dBFS after the common gain; a longer duration helps).
        FileNotFoundError: a piece is missing from the installed music21 corpus, or the soundfont is missing.
    """
    if not 1 <= num_tracks <= len(DEMO_PIECES):
        raise ValueError(f"num_tracks={num_tracks}: must be 1 to {len(DEMO_PIECES)} (the pieces in DEMO_PIECES)")
    if not (math.isfinite(max_duration_s) and max_duration_s > 0):
        raise ValueError(f"max_duration_s={max_duration_s}: must be a positive number of seconds")
    if not 8000 <= sample_rate_hz <= 96000:
        raise ValueError(f"sample_rate_hz={sample_rate_hz}: must be 8000 to 96000 Hz")
    out_dir = Path(out_dir)
    sf2_path = soundfont_path()
    pieces = DEMO_PIECES[:num_tracks]
    total = num_tracks + 1

    track_rows: list[dict[str, str]] = []
    file_rows: list[dict[str, str]] = []
    duration_s = 0.0
    for done, piece in enumerate(pieces, start=1):
        track_row, stem_rows, num_samples = _build_track(piece, out_dir, max_duration_s, sample_rate_hz, sf2_path)
        track_rows.append(track_row)
        file_rows.extend(stem_rows)
        duration_s += num_samples / sample_rate_hz
        if progress is not None:
            progress(f"rendered {piece.track_id} ({len(stem_rows)} stems, {num_samples / sample_rate_hz:.1f} s)",
                     done, total)

    _write_csv(out_dir / "tracks.csv", TRACKS_COLUMNS, track_rows)
    _write_csv(out_dir / "files.csv", FILES_COLUMNS, file_rows)
    _write_csv(out_dir / "licenses.csv", LICENSES_COLUMNS, list(_LICENSES))
    _write_text(out_dir / "README.md", _readme_text(pieces, max_duration_s, sample_rate_hz))
    if progress is not None:
        progress("wrote tracks.csv, files.csv, licenses.csv, README.md", total, total)
    return DemoDelivery(path=out_dir, track_ids=tuple(p.track_id for p in pieces), num_files=len(file_rows),
                        duration_s=duration_s)


def _build_track(piece: DemoPiece, out_dir: Path, max_duration_s: float, sample_rate_hz: int,
                 sf2_path: Path) -> tuple[dict[str, str], list[dict[str, str]], int]:
    """Render one piece's stems and write them. Returns its tracks.csv row, files.csv rows and length."""
    import pretty_midi

    score = parse_score(piece.corpus_path)
    score_parts = list(score.parts)
    if len(score_parts) != len(piece.parts):
        raise ValueError(f"{piece.corpus_path} has {len(score_parts)} parts but DEMO_PIECES names "
                         f"{len(piece.parts)}: fix its parts")
    instruments = [pretty_midi.program_to_instrument_name(part.program) for part in piece.parts]
    if len(set(instruments)) != len(instruments):
        raise ValueError(f"{piece.track_id}: two parts share a GM program; (track, role, instrument) must be unique")
    samples_per_quarter = 60.0 / piece.bpm * sample_rate_hz
    max_samples = int(round(max_duration_s * sample_rate_hz))
    notes = [note_events(p, samples_per_quarter, max_samples) for p in score_parts]
    for part, part_notes in zip(piece.parts, notes, strict=True):
        if not part_notes:
            raise ValueError(f"{piece.corpus_path} part {part.name!r} has no note in the first {max_duration_s} s: "
                             "raise max_duration_s")
    last_release = max(release for part_notes in notes for _, release, _ in part_notes)
    num_samples = min(max_samples, last_release + int(round(_RELEASE_TAIL_S * sample_rate_hz)))

    stems = np.stack([render_part(part_notes, part.program, num_samples, sample_rate_hz, sf2_path)
                      for part, part_notes in zip(piece.parts, notes, strict=True)])
    stems *= fade_out_curve(num_samples, sample_rate_hz)[None, :]
    quantised = normalise_to_pcm16(stems, piece.track_id, [part.name for part in piece.parts])

    bass_index = min(range(len(notes)), key=lambda i: (np.mean([key for _, _, key in notes[i]]), -i))
    file_rows = []
    for index, part in enumerate(piece.parts):
        rel_path = f"audio/{piece.track_id}/{part.name}.flac"
        _write_flac_pcm16(out_dir / rel_path, quantised[index], sample_rate_hz)
        file_rows.append({"track_id": piece.track_id, "role": "bass" if index == bass_index else "other",
                          "instrument": instruments[index], "path": rel_path})

    return _track_row(piece, score, instruments), file_rows, num_samples


def _track_row(piece: DemoPiece, score, instruments: Sequence[str]) -> dict[str, str]:
    """The tracks.csv row of a rendered piece: title and composer from the score metadata (else from
    ``piece``), key from music21's key analysis (Krumhansl-Schmuckler, ``Score.analyze("key")``)."""
    title = _metadata_text(score.metadata.title) or _metadata_text(score.metadata.movementName) or piece.title
    composer = _metadata_text(score.metadata.composer) or piece.composer
    key = score.analyze("key")
    non_commercial = piece.license_id == NON_COMMERCIAL_LICENSE_ID
    tags = [*(name.lower() for name in instruments), *piece.genre.split(), "public domain", "rendered midi"]
    description = (f"{title} by {composer}, rendered from music21's corpus ({piece.corpus_path}) with the "
                   f"TimGM6mb General MIDI soundfont at {piece.bpm:g} bpm: {', '.join(instruments)}; "
                   "one stem per part, no mixture file.")
    if non_commercial:
        description += (" Demo of the rights policy: this rendering is licensed for non-commercial use only "
                        f"({NON_COMMERCIAL_LICENSE_ID}), so a commercial run rejects it.")
    licence_text = "rendering licensed CC BY-NC 4.0 by linernotes demo" if non_commercial else "public domain"
    return {
        "track_id": piece.track_id,
        "isrc": "",
        "title": title,
        "artist": composer,
        "rights_holder": f"Public domain ({composer}); rendering: linernotes demo",
        "license_id": piece.license_id,
        "attribution": f"{title} by {composer} ({licence_text}); score from the music21 corpus, "
                       "rendered with TimGM6mb (GPL-2) by linernotes demo",
        "genre": piece.genre,
        "tags": ";".join(dict.fromkeys(tags)),
        "description": description,
        "bpm": f"{piece.bpm:g}",
        "key": f"{key.tonic.name.replace('-', 'b')} {key.mode}",
    }


def _metadata_text(value: object) -> str:
    """A metadata string, or "" when music21 only knows the file name (``"bwv66.6.mxl"``)."""
    text = str(value).strip() if value else ""
    return "" if re.search(r"\.(mxl|xml|musicxml|krn|abc|md)$", text, flags=re.IGNORECASE) else text


def _write_flac_pcm16(path: Path, samples: np.ndarray, sample_rate_hz: int) -> None:
    """Write int16 ``(num_samples,)`` as mono FLAC PCM_16, atomically (temporary name, then rename).

    The int16 values are written as they are, so the bytes do not depend on libsndfile's float scaling.
    """
    buffer = io.BytesIO()
    sf.write(buffer, samples, sample_rate_hz, format="FLAC", subtype="PCM_16")
    _write_bytes(path, buffer.getvalue())


def _write_csv(path: Path, columns: Sequence[str], rows: Sequence[dict[str, str]]) -> None:
    """Write a CSV with a header of ``columns``, ``\\n`` line ends and minimal quoting, atomically."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(columns), lineterminator="\n", extrasaction="raise")
    writer.writeheader()
    writer.writerows(rows)
    _write_text(path, text.getvalue())


def _write_text(path: Path, text: str) -> None:
    _write_bytes(path, text.encode("utf-8"))


def _write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _readme_text(pieces: Sequence[DemoPiece], max_duration_s: float, sample_rate_hz: int) -> str:
    """The delivery's README.md: what it is, where each part comes from, and the licences."""
    import pretty_midi

    rows = "\n".join(
        f"| `{p.track_id}` | music21 `{p.corpus_path}` | {p.bpm:g} | "
        f"{', '.join(f'{part.name}: {pretty_midi.program_to_instrument_name(part.program)}' for part in p.parts)}"
        f" | `{p.license_id}` |"
        for p in pieces
    )
    composers = ", ".join(dict.fromkeys(p.composer for p in pieces))
    non_commercial = [p.track_id for p in pieces if p.license_id == NON_COMMERCIAL_LICENSE_ID]
    if non_commercial:
        policy = ("- **Rights-policy demo**: the rendering of\n"
                  f"  `{'`, `'.join(non_commercial)}` is licensed under `{NON_COMMERCIAL_LICENSE_ID}` only\n"
                  "  (Creative Commons Attribution-NonCommercial 4.0, `commercial_use` false), so a commercial run\n"
                  "  rejects it and a non-commercial run admits it. This licence is a fiction of the demo, stated\n"
                  "  in the track's description.\n")
    else:
        policy = ("- **Rights-policy demo**: the non-commercial licence\n"
                  f"  `{NON_COMMERCIAL_LICENSE_ID}` is listed in `licenses.csv`, but no track of this build uses\n"
                  "  it (build two tracks or more).\n")
    return f"""# linernotes demo delivery

A small catalog delivery rendered offline by `pipelines/demo/delivery.py`, in the form that DESIGN.md
("A catalog delivery") describes: `tracks.csv`, `files.csv` and `licenses.csv` here, audio paths relative to
this folder. Each score part is one mono 16-bit FLAC stem at {sample_rate_hz} Hz under
`audio/<track_id>/<part>.flac`, at most {max_duration_s:g} s long; the lowest part has role `bass`, the others
`other`, each with its General MIDI instrument. There is no mixture file: a track's mixture is the sum of its
stems (as for the Slakh2100 tracks of the real corpus). One gain per track keeps the sum of its stems, and
every stem, at or below -1 dBFS.

| track | score | bpm | part: GM instrument | licence |
|---|---|---|---|---|
{rows}

## Sources and licences

- **Compositions**: {composers}.
  All in the public domain (`{PUBLIC_DOMAIN_LICENSE_ID}`: Public Domain Mark 1.0, AI training and
  commercial use allowed). The digital scores are the encodings bundled with
  music21's corpus (music21 is BSD-3-Clause; see the music21 corpus documentation for each encoding's source).
  Titles and composers come from the score metadata where it has them, else from the list in
  `pipelines/demo/delivery.py`; `key` is music21's key analysis; `bpm` is the tempo of the rendering in quarter
  notes per minute (the score's own tempo marks are ignored).
- **Sound**: rendered with TinySoundFont (MIT) and the TimGM6mb General MIDI soundfont (Tim Brechbill,
  GPL-2.0; it comes from MuseScore and ships in the pretty_midi wheel). The soundfont's licence covers its
  instrument samples, not these recordings, so it is not a row of `licenses.csv`; mention it when you
  redistribute the audio.
{policy}
Rendering is deterministic: the same arguments give the same bytes.
"""
