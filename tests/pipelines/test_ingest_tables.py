"""Ingest's tables streamed to Parquet (``pipelines.stages.ingest.tables``): written in batches, the catalog tables are
exactly the rows Python would have sorted and written in one piece, the driver keeps only the small rows."""

import json
import random

import pyarrow.parquet as pq

from pipelines.stages.ingest.tables import finish_table, finish_tables, stage_rows
from provenance.records import AUDIO_FILE, REJECTION, TRACK, RejectionReason, rejection, to_table


def _rows(num_tracks: int, seed: int = 5):
    rng = random.Random(seed)
    tracks, audio_files, rejections = [], [], []
    for i in rng.sample(range(num_tracks), num_tracks):  # the pipeline writes in no particular order
        track_id = f"t{i:03d}-é" if i % 7 == 0 else f"t{i:03d}"  # non-ASCII ids sort by code point
        tracks.append({"track_id": track_id, "title": f"Song {i}", "tags": ["a", "b"][: i % 3], "bpm": 60.0 + i,
                       "run_id": "r"})
        for role, instrument in (("mixture", ""), ("stem", "vocals"), ("stem", "drums")):
            audio_files.append({"track_id": track_id, "role": role, "instrument": instrument,
                                "uri": f"/a/{track_id}-{instrument}.flac", "derived_from": "",
                                "sha256": f"{i:064x}", "sample_rate_hz": 44100, "num_channels": 2,
                                "num_samples": 441000 + i, "duration_s": 10.0, "peak_dbfs": -float("inf") if i == 3
                                else -1.0, "loudness_lufs": -14.0, "run_id": "r", "_cached": i % 2 == 0,
                                "_fingerprint_file": f"/f/{i}.u32" if role == "mixture" else None,
                                "_record_id": f"files.csv row {i}"})
        if i % 5 == 0:
            rejections.append({**rejection("audio_file", f"x{i}", "ingest", RejectionReason.DECODE_ERROR,
                                           "cannot decode", "r"), "_cached": False})
    return tracks, audio_files, rejections


def _lines(tracks, audio_files, rejections):
    lines = [f"{table}\t{json.dumps(row)}\n" for table, rows in (("tracks", tracks), ("audio_files", audio_files),
                                                                  ("rejections", rejections)) for row in rows]
    random.Random(2).shuffle(lines)
    return lines


def test_batched_tables_equal_the_rows_sorted_and_written_in_one_piece(tmp_path):
    tracks, audio_files, rejections = _rows(40)
    staged = stage_rows(_lines(tracks, audio_files, rejections), tmp_path / "staged", batch_rows=7)

    # the driver keeps small rows: what duplicate linking and the counts read
    assert sorted(row["track_id"] for row in staged.tracks) == sorted(t["track_id"] for t in tracks)
    mixture = next(row for row in staged.audio_files if row["role"] == "mixture" and row["track_id"] == "t001")
    assert mixture == {"track_id": "t001", "role": "mixture", "sha256": f"{1:064x}", "derived_from": "",
                       "_fingerprint_file": "/f/1.u32", "_record_id": "files.csv row 1"}
    assert sorted(staged.rejections, key=str) == sorted(
        ({"record_kind": r["record_kind"], "reason": r["reason"]} for r in rejections), key=str)
    assert staged.decoded == {True: 60 + 0, False: 60 + len(rejections)}
    assert pq.ParquetFile(staged.path("audio_files")).metadata.num_row_groups > 1  # written in batches
    assert "_fingerprint_file" not in pq.read_schema(staged.path("audio_files")).names

    dropped = {"t004", "t007-é"}
    extra = [rejection("track", "t004", "ingest", RejectionReason.DUPLICATE_RECORDING, "exact duplicate", "r")]
    got = finish_tables(staged, tmp_path, drop_track_ids=dropped, extra_rejections=extra)
    # what ingest wrote before: Python dicts, sorted by Python, through the record's schema in one piece
    want = {
        "tracks": to_table(sorted((t for t in tracks if t["track_id"] not in dropped),
                                  key=lambda r: r["track_id"]), TRACK),
        "audio_files": to_table(sorted((f for f in audio_files if f["track_id"] not in dropped),
                                       key=lambda r: (r["track_id"], r["role"], r["instrument"])), AUDIO_FILE),
        "rejections": to_table(sorted(rejections + extra, key=lambda r: (r["record_kind"], r["record_id"],
                                                                          r["reason"])), REJECTION),
    }
    for name, path in got.items():
        table = pq.read_table(path)
        assert table.schema.equals(want[name].schema), name
        assert table.to_pylist() == want[name].to_pylist(), name
    assert pq.read_table(got["tracks"]).num_rows == 38


def test_a_table_no_row_names_gets_an_empty_file_with_its_schema(tmp_path):
    tracks, audio_files, _ = _rows(3)
    staged = stage_rows(_lines(tracks, audio_files, []), tmp_path / "staged")

    empty = pq.read_table(staged.path("rejections"))
    assert empty.num_rows == 0 and empty.schema.names == REJECTION.names
    path = finish_table(staged.path("rejections"), REJECTION, tmp_path / "rejections.parquet",
                        sort_keys=("record_kind", "record_id", "reason"))
    assert pq.read_table(path).num_rows == 0
