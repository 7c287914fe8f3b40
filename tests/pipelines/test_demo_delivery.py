"""The demo delivery: a real render of music21 scores through TimGM6mb, in the form of ../shared/corpus."""

from __future__ import annotations

import csv
import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from pipelines.demo import delivery as demo_delivery
from pipelines.demo.delivery import DemoDelivery, DemoPart, DemoPiece, build_demo_delivery

NUM_TRACKS = 2
MAX_DURATION_S = 8.0
SAMPLE_RATE_HZ = 16000

# The columns of DESIGN.md "A catalog delivery" (tracks.csv with its optional bpm and key), in order.
TRACKS_COLUMNS = ["track_id", "isrc", "title", "artist", "rights_holder", "license_id", "attribution", "genre",
                  "tags", "description", "bpm", "key"]
FILES_COLUMNS = ["track_id", "role", "instrument", "path"]
LICENSES_COLUMNS = ["license_id", "licensor", "license_name", "license_url", "territories", "valid_from",
                    "valid_until", "ai_training", "commercial_use", "attribution_required"]


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


def _dbfs(value: float) -> float:
    return 20.0 * math.log10(value) if value > 0 else -math.inf


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[DemoDelivery, list[tuple[str, int, int]]]:
    calls: list[tuple[str, int, int]] = []
    delivery = build_demo_delivery(tmp_path_factory.mktemp("demo") / "delivery", num_tracks=NUM_TRACKS,
                                   max_duration_s=MAX_DURATION_S, sample_rate_hz=SAMPLE_RATE_HZ,
                                   progress=lambda message, done, total: calls.append((message, done, total)))
    return delivery, calls


@pytest.fixture(scope="module")
def stems(built) -> dict[str, list[tuple[dict[str, str], np.ndarray, int]]]:
    """track_id → [(files.csv row, float64 (samples,) audio, sample_rate_hz)]."""
    delivery, _ = built
    _, rows = _read_csv(delivery.path / "files.csv")
    by_track: dict[str, list[tuple[dict[str, str], np.ndarray, int]]] = {}
    for row in rows:
        audio, sample_rate_hz = sf.read(delivery.path / row["path"], dtype="float64", always_2d=True)
        assert audio.shape[1] == 1, f"{row['path']} is not mono"
        by_track.setdefault(row["track_id"], []).append((row, audio[:, 0], sample_rate_hz))
    return by_track


def test_tables_have_exactly_the_design_columns(built):
    delivery, _ = built
    assert _read_csv(delivery.path / "tracks.csv")[0] == TRACKS_COLUMNS
    assert _read_csv(delivery.path / "files.csv")[0] == FILES_COLUMNS
    assert _read_csv(delivery.path / "licenses.csv")[0] == LICENSES_COLUMNS
    assert (delivery.path / "README.md").read_text(encoding="utf-8").startswith("# ")


def test_every_file_exists_decodes_and_is_a_mono_pcm16_flac_stem(built):
    delivery, _ = built
    _, rows = _read_csv(delivery.path / "files.csv")
    assert len(rows) == delivery.num_files > 0
    for row in rows:
        path = delivery.path / row["path"]
        assert not Path(row["path"]).is_absolute() and path.is_file(), row["path"]
        info = sf.info(path)
        assert (info.format, info.subtype, info.channels) == ("FLAC", "PCM_16", 1)
        assert info.samplerate == SAMPLE_RATE_HZ
        assert row["role"] in {"bass", "other"} and row["instrument"], row  # no mixture file
    assert not any(row["role"] == "mixture" for row in rows)


def test_tracks_match_the_returned_delivery(built, stems):
    delivery, calls = built
    _, tracks = _read_csv(delivery.path / "tracks.csv")
    assert tuple(t["track_id"] for t in tracks) == delivery.track_ids
    assert delivery.track_ids == tuple(p.track_id for p in demo_delivery.DEMO_PIECES[:NUM_TRACKS])
    assert set(stems) == set(delivery.track_ids)
    track_seconds = sum(entries[0][1].size / SAMPLE_RATE_HZ for entries in stems.values())
    assert delivery.duration_s == pytest.approx(track_seconds)
    for track in tracks:
        assert track["isrc"] == ""
        assert track["title"] and track["artist"] and "Public domain" in track["rights_holder"]
        assert 40 <= float(track["bpm"]) <= 200
        tonic, mode = track["key"].split(" ")
        assert tonic[0] in "ABCDEFG" and mode in {"major", "minor"}
        assert "music21" in track["description"] and "TimGM6mb" in track["description"]
        assert "chorale" in track["tags"].split(";")
    assert [done for _, done, _ in calls] == list(range(1, NUM_TRACKS + 2))
    assert all(total == NUM_TRACKS + 1 for _, _, total in calls)


def test_stems_of_a_track_share_length_and_rate_and_one_part_is_the_bass(stems):
    for track_id, entries in stems.items():
        assert len({audio.size for _, audio, _ in entries}) == 1, track_id
        assert {rate for _, _, rate in entries} == {SAMPLE_RATE_HZ}
        assert 0 < entries[0][1].size <= MAX_DURATION_S * SAMPLE_RATE_HZ
        roles = [row["role"] for row, _, _ in entries]
        assert roles.count("bass") == 1 and len(entries) >= 2, track_id
        keys = [(row["role"], row["instrument"]) for row, _, _ in entries]
        assert len(set(keys)) == len(keys), f"{track_id}: (role, instrument) repeats"


def test_stems_are_not_silent_and_neither_they_nor_their_sum_clip(stems):
    for track_id, entries in stems.items():
        for row, audio, _ in entries:
            peak_dbfs = _dbfs(float(np.max(np.abs(audio))))
            assert -40.0 < peak_dbfs <= -1.0 + 1e-6, (row["path"], peak_dbfs)
        mixture = np.sum([audio for _, audio, _ in entries], axis=0)
        assert _dbfs(float(np.max(np.abs(mixture)))) <= 0.0, track_id


def test_parts_of_a_track_are_different_signals(stems):
    for track_id, entries in stems.items():
        for (row_a, a, _), (row_b, b, _) in itertools.combinations(entries, 2):
            correlation = float(np.corrcoef(a, b)[0, 1])
            assert abs(correlation) < 0.5, (track_id, row_a["path"], row_b["path"], correlation)


def test_licences_exist_and_exactly_one_track_is_non_commercial(built):
    delivery, _ = built
    _, tracks = _read_csv(delivery.path / "tracks.csv")
    _, licences = _read_csv(delivery.path / "licenses.csv")
    by_id = {row["license_id"]: row for row in licences}
    assert len(by_id) == len(licences)
    assert all(track["license_id"] in by_id for track in tracks)
    assert all(row["ai_training"] == "allowed" for row in licences)
    non_commercial = [t for t in tracks if by_id[t["license_id"]]["commercial_use"] == "false"]
    assert len(non_commercial) == 1
    assert "non-commercial" in non_commercial[0]["description"]
    for track in tracks:
        if track not in non_commercial:
            assert by_id[track["license_id"]]["commercial_use"] == "true"
            assert by_id[track["license_id"]]["license_name"] == "Public Domain Mark 1.0"


def test_rebuilding_gives_identical_bytes(built, tmp_path):
    delivery, _ = built
    again = build_demo_delivery(tmp_path / "again", num_tracks=NUM_TRACKS, max_duration_s=MAX_DURATION_S,
                                sample_rate_hz=SAMPLE_RATE_HZ)
    first = sorted(p.relative_to(delivery.path) for p in delivery.path.rglob("*") if p.is_file())
    second = sorted(p.relative_to(again.path) for p in again.path.rglob("*") if p.is_file())
    assert first == second and any(p.suffix == ".flac" for p in first)
    for relative in first:
        assert (delivery.path / relative).read_bytes() == (again.path / relative).read_bytes(), relative


def test_pieces_are_sorted_with_one_non_commercial_rendering():
    pieces = demo_delivery.DEMO_PIECES
    assert [p.corpus_path for p in pieces] == sorted(p.corpus_path for p in pieces)
    assert len({p.track_id for p in pieces}) == len(pieces)
    assert [p.license_id for p in pieces].count(demo_delivery.NON_COMMERCIAL_LICENSE_ID) == 1


def test_a_missing_piece_or_a_bad_argument_fails_clearly(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="num_tracks"):
        build_demo_delivery(tmp_path, num_tracks=0)
    with pytest.raises(ValueError, match="max_duration_s"):
        build_demo_delivery(tmp_path, num_tracks=1, max_duration_s=0.0)
    missing = DemoPiece("bach/bwv9999.9", "demo-missing", "Missing", "Nobody", "test", 80.0,
                        (DemoPart("soprano", 0),))
    monkeypatch.setattr(demo_delivery, "DEMO_PIECES", (missing,))
    with pytest.raises(FileNotFoundError, match="bach/bwv9999.9"):
        build_demo_delivery(tmp_path, num_tracks=1)
