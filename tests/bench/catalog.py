"""A synthetic label catalog written to disk as a delivery, made in code, for the catalog-scale ingest bench.

``write_catalog(root, num_tracks)`` writes ``tracks.csv``, ``files.csv``, ``licenses.csv`` and one audio file per
track: 10-second music-like recordings (``tests.cleaning.music.recording``) as 44.1 kHz 16-bit stereo FLAC, and a
planted ``PLANTED_FRACTION`` of near duplicates of other tracks in the catalog, each as a label re-delivers it
(``tests.cleaning.music.COPY_KINDS``: −6 dB, resampled to 32 kHz, Ogg Vorbis, MP3, 1.5 s later, all at once), written
in the codec it went through (``.ogg``, ``.mp3``) or as FLAC.
"""

from __future__ import annotations

import concurrent.futures as cf
import csv
from pathlib import Path

import numpy as np

PLANTED_FRACTION = 0.05
DURATION_S = 10.0
LICENSES_CSV = ("license_id,licensor,license_name,license_url,territories,valid_from,valid_until,ai_training,"
                "commercial_use,attribution_required\nL,Label,Catalog licence,,Worldwide,2020-01-01,,allowed,true,"
                "false\n")


def _write(task: tuple[str, int, str | None, str]) -> str:
    """Write one track's file: (track id, seed, copy kind or None, folder) → its path relative to the delivery."""
    import soundfile as sf
    from threadpoolctl import threadpool_limits

    from tests.cleaning.music import RATE, encode, planted_copy, recording

    track_id, seed, kind, folder = task
    with threadpool_limits(1):
        audio = recording(seed, DURATION_S)
        if kind in ("ogg", "mp3", "all"):
            base, rate = (audio, RATE) if kind != "all" else planted_copy(audio, "all")
            if kind == "all":  # planted_copy already went through Ogg: write those samples losslessly
                name = f"{track_id}.flac"
                sf.write(Path(folder) / name, base.T, rate, subtype="PCM_16")
            else:
                name = f"{track_id}.{kind}"
                (Path(folder) / name).write_bytes(encode(audio, RATE, kind))
            return f"audio/{name}"
        rate = RATE
        if kind is not None:
            audio, rate = planted_copy(audio, kind)
        name = f"{track_id}.flac"
        sf.write(Path(folder) / name, audio.T, rate, subtype="PCM_16")
        return f"audio/{name}"


def write_catalog(root: Path, num_tracks: int, workers: int = 2, seed: int = 3
                  ) -> dict[tuple[str, str], str]:
    """Write a delivery of ``num_tracks`` tracks under ``root``; returns the planted pairs {(copy id, original id):
    copy kind}. Copies take their originals from the whole catalog and their ids sort beside random originals."""
    from tests.cleaning.music import COPY_KINDS

    audio_dir = root / "audio"
    audio_dir.mkdir(parents=True, exist_ok=True)
    num_copies = int(round(PLANTED_FRACTION * num_tracks))
    num_originals = num_tracks - num_copies
    rng = np.random.default_rng(seed)
    sources = rng.choice(num_originals, num_copies, replace=False)
    tasks = [(f"t{i:05d}", i, None, str(audio_dir)) for i in range(num_originals)]
    planted = {}
    for k, source in enumerate(sources):
        kind = COPY_KINDS[k % len(COPY_KINDS)]
        copy_id = f"t{int(rng.integers(num_originals)):05d}-copy{k}"
        tasks.append((copy_id, int(source), kind, str(audio_dir)))
        planted[(copy_id, f"t{int(source):05d}")] = kind
    with cf.ProcessPoolExecutor(max_workers=workers) as pool:
        paths = list(pool.map(_write, tasks, chunksize=16))
    write_tables(root, [(track_id, path) for (track_id, *_), path in zip(tasks, paths)])
    return planted


def write_tables(root: Path, mixtures: list[tuple[str, str]]) -> None:
    """``tracks.csv``, ``files.csv`` and ``licenses.csv`` of a delivery whose tracks are ``mixtures`` ((track id,
    audio path relative to ``root``)), each one mixture under the one licence ``L``."""
    fields = ["track_id", "isrc", "title", "artist", "rights_holder", "license_id", "attribution", "genre", "tags",
              "description"]
    with open(root / "tracks.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for track_id, _ in mixtures:
            writer.writerow({"track_id": track_id, "isrc": "", "title": f"Song {track_id}", "artist": "Artist",
                             "rights_holder": "Label", "license_id": "L", "attribution": "", "genre": "",
                             "tags": "", "description": ""})
    with open(root / "files.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["track_id", "role", "instrument", "path"])
        writer.writeheader()
        for track_id, path in mixtures:
            writer.writerow({"track_id": track_id, "role": "mixture", "instrument": "", "path": path})
    (root / "licenses.csv").write_text(LICENSES_CSV)
