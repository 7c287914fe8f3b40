import pyarrow as pa
import pytest

from provenance import records
from provenance.records import (AUDIO_FILE, REJECTION, SCHEMAS, RejectionReason, conditioning_text, read_table,
                                rejection, sample_key, segment_id, to_table, write_table)


def test_every_schema_carries_its_name_and_version():
    for name, schema in SCHEMAS.items():
        assert schema.metadata[b"linernotes.record"].decode() == name
        assert schema.metadata[b"linernotes.schema_version"].decode() == records.SCHEMA_VERSION


def test_units_are_in_field_names():
    names = set(AUDIO_FILE.names)
    assert {"sample_rate_hz", "duration_s", "peak_dbfs", "loudness_lufs", "num_samples"} <= names
    assert not names & {"sr", "dur", "len", "rate", "loudness", "peak"}


def test_parquet_round_trip_keeps_values_and_schema(tmp_path):
    row = {"track_id": "t1", "role": "mixture", "instrument": "", "uri": "/a.wav", "derived_from": "",
           "sha256": "0" * 64, "sample_rate_hz": 44100, "num_channels": 2, "num_samples": 441000,
           "duration_s": 10.0, "peak_dbfs": -1.5, "loudness_lufs": float("-inf"), "clipped_fraction": 0.0,
           "silent_fraction": 0.25, "true_peak_dbtp": -1.2, "dc_offset": 0.0, "stem_residual_db": None,
           "run_id": "r"}
    path = write_table(to_table([row], AUDIO_FILE), tmp_path / "a.parquet")
    table = read_table(path, AUDIO_FILE)
    assert table.schema.equals(AUDIO_FILE, check_metadata=False)
    back = table.to_pylist()[0]
    assert back == row
    assert not list(tmp_path.glob(".*tmp"))  # atomic write leaves no temporary file


def test_to_table_rejects_missing_key_field():
    with pytest.raises(KeyError):
        to_table([{"record_id": "x", "stage": "ingest", "reason": "missing_file"}], REJECTION)


def test_to_table_rejects_wrong_type():
    with pytest.raises((pa.ArrowInvalid, pa.ArrowTypeError)):
        to_table([{"track_id": "t", "role": "mixture", "instrument": "", "sample_rate_hz": "fast"}], AUDIO_FILE)


def test_rejection_requires_a_known_reason():
    row = rejection("track", "t1", "ingest", RejectionReason.UNKNOWN_LICENSE, "no licence L9")
    assert row["reason"] == "unknown_license"
    with pytest.raises(ValueError):
        rejection("track", "t1", "ingest", "because", "")


def test_segment_id_and_sample_key():
    sid = segment_id("fma-Vibe.Ace", 320000)
    assert sid == "fma-Vibe.Ace@320000"
    key = sample_key(sid)
    assert "." not in key and "@" not in key  # WebDataset splits member names at the first dot
    assert key.startswith("fma-Vibe_Ace-0000320000-")
    assert sample_key(segment_id("fma-Vibe_Ace", 320000)) != key  # same sanitised name, different id


def test_conditioning_text_uses_metadata_and_tags():
    text = conditioning_text({"title": "Vibe Ace", "artist": "Kevin MacLeod", "genre": "Jazz",
                              "tags": "funk;brass", "description": ""})
    assert text == "vibe ace kevin macleod jazz funk brass"
    assert conditioning_text({"title": "X", "tags": ["a", "b"]}) == "x a b"
