"""Ingest on Apache Beam's DirectRunner over a small synthetic delivery with broken rows."""

import csv
import datetime as dt
import json
from collections import Counter

import numpy as np
import pytest
import soundfile as sf

from cleaning.audio import read_audio
from pipelines.stages.ingest.delivery import DeliveryError, read_delivery
from pipelines.stages.ingest.stage import IngestConfig, run_ingest
from provenance.records import AUDIO_FILE, REJECTION, TRACK, read_table
from provenance.store import LineageStore
from provenance.workspace import Workspace
from tests.conftest import sine

LICENSES = [
    {"license_id": "L-open", "licensor": "Open Label", "license_name": "Open", "license_url": "https://x/open",
     "territories": "Worldwide", "valid_from": "2020-01-01", "valid_until": "", "ai_training": "allowed",
     "commercial_use": "true", "attribution_required": "true"},
    {"license_id": "L-nc", "licensor": "NC Label", "license_name": "NC", "license_url": "https://x/nc",
     "territories": "Worldwide", "valid_from": "2020-01-01", "valid_until": "", "ai_training": "allowed",
     "commercial_use": "false", "attribution_required": "true"},
    {"license_id": "L-stream", "licensor": "Stream Label", "license_name": "Streaming only", "license_url": "",
     "territories": "Worldwide", "valid_from": "2020-01-01", "valid_until": "", "ai_training": "denied",
     "commercial_use": "true", "attribution_required": "false"},
    {"license_id": "L-baddate", "licensor": "X", "license_name": "X", "license_url": "", "territories": "US",
     "valid_from": "01/02/2020", "valid_until": "", "ai_training": "allowed", "commercial_use": "true",
     "attribution_required": "false"},
]


def track(track_id, license_id, rights_holder="Holder"):
    return {"track_id": track_id, "isrc": "", "title": track_id.title(), "artist": "Artist",
            "rights_holder": rights_holder, "license_id": license_id, "attribution": f"{track_id} by Artist",
            "genre": "test", "tags": "a;b", "description": ""}


def write_csv(path, rows, columns):
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture(scope="module")
def delivery(tmp_path_factory):
    root = tmp_path_factory.mktemp("delivery")
    audio = root / "audio"
    audio.mkdir()
    sr = 22050
    sf.write(audio / "open_mix.wav", sine(440, 2.0, sr, 0.5, 2).T, sr)
    sf.write(audio / "stem_a.flac", sine(220, 2.0, sr, 0.3).T, sr, subtype="PCM_24")
    sf.write(audio / "stem_b.flac", sine(330, 2.0, sr, 0.3).T, sr, subtype="PCM_24")
    sf.write(audio / "ragged_a.flac", sine(330, 2.0, sr, 0.3).T, sr, subtype="PCM_24")
    sf.write(audio / "ragged_b.flac", sine(330, 2.0, 16000, 0.3).T, 16000, subtype="PCM_24")  # another rate
    sf.write(audio / "nc_mix.wav", sine(550, 2.0, sr, 0.5).T, sr)
    sf.write(audio / "stream_mix.wav", sine(660, 2.0, sr, 0.5).T, sr)
    (audio / "corrupt.flac").write_bytes(b"fLaC" + bytes(range(256)) * 4)
    nan = sine(770, 1.0, sr).astype(np.float32)
    nan[0, 100] = np.nan
    sf.write(audio / "nan.wav", nan.T, sr, subtype="FLOAT")
    (tmp_path_factory.getbasetemp() / "outside.wav").write_bytes((audio / "nc_mix.wav").read_bytes())
    tracks = [track("open", "L-open"), track("stems", "L-open"), track("nc", "L-nc"), track("stream", "L-stream"),
              track("nolicence", "L-missing"), track("open", "L-nc"),  # duplicate id
              track("broken", "L-open"), track("baddate", "L-baddate"), track("noholder", "L-open", ""),
              track("ragged", "L-open")]
    files = [
        {"track_id": "open", "role": "mixture", "instrument": "", "path": "audio/open_mix.wav"},
        {"track_id": "stems", "role": "bass", "instrument": "", "path": "audio/stem_a.flac"},
        {"track_id": "stems", "role": "other", "instrument": "Flute", "path": "audio/stem_b.flac"},
        {"track_id": "nc", "role": "mixture", "instrument": "", "path": "audio/nc_mix.wav"},
        {"track_id": "stream", "role": "mixture", "instrument": "", "path": "audio/stream_mix.wav"},
        {"track_id": "broken", "role": "mixture", "instrument": "", "path": "audio/corrupt.flac"},
        {"track_id": "broken", "role": "vocals", "instrument": "", "path": "audio/nan.wav"},
        {"track_id": "broken", "role": "drums", "instrument": "", "path": "audio/missing.wav"},
        {"track_id": "broken", "role": "other", "instrument": "", "path": "../outside.wav"},
        {"track_id": "broken", "role": "guitar", "instrument": "", "path": "audio/nc_mix.wav"},
        {"track_id": "ghost", "role": "mixture", "instrument": "", "path": "audio/open_mix.wav"},
        {"track_id": "ragged", "role": "bass", "instrument": "", "path": "audio/ragged_a.flac"},
        {"track_id": "ragged", "role": "other", "instrument": "", "path": "audio/ragged_b.flac"},
    ]
    write_csv(root / "licenses.csv", LICENSES, list(LICENSES[0]))
    write_csv(root / "tracks.csv", tracks, list(tracks[0]))
    write_csv(root / "files.csv", files, ["track_id", "role", "instrument", "path"])
    return root


def run(delivery, tmp_path, purpose):
    config = IngestConfig(purpose=purpose, territory="Worldwide", as_of=dt.date(2026, 11, 21))
    workspace = Workspace.at(tmp_path / purpose)
    return workspace, run_ingest(delivery, workspace, config)


def test_ingest_runs_on_the_engines_beam_runner_the_direct_runner_by_default(delivery, tmp_path, monkeypatch):
    from apache_beam.options.pipeline_options import StandardOptions

    from pipelines.engines import Engine

    runners = []
    beam_pipeline = Engine.beam_pipeline

    def recording(self):
        pipeline = beam_pipeline(self)
        runners.append(pipeline.options.view_as(StandardOptions).runner)
        return pipeline

    monkeypatch.setattr(Engine, "beam_pipeline", recording)
    workspace, result = run(delivery, tmp_path, "commercial")
    assert runners == ["DirectRunner"]
    recorded = json.loads((workspace.run_dir(result.run_id) / "config.json").read_text())
    assert recorded["engine"]["beam_runner"] == "DirectRunner" and recorded["engine"]["beam_options"] == []
    assert "beam_runner" not in recorded["config"]  # engine settings stay out of the stage's config


def test_near_duplicate_threshold_default_is_the_fingerprints():
    from cleaning.fingerprint import NEAR_DUPLICATE_THRESHOLD

    assert IngestConfig().near_duplicate_threshold == NEAR_DUPLICATE_THRESHOLD


def test_commercial_run_accepts_rejects_and_reconciles(delivery, tmp_path):
    workspace, result = run(delivery, tmp_path, "commercial")
    tracks = read_table(workspace.catalog_table("tracks"), TRACK).to_pylist()
    rejections = read_table(workspace.catalog_table("rejections"), REJECTION).to_pylist()
    assert sorted(t["track_id"] for t in tracks) == ["open", "stems"]
    by_track = {r["record_id"]: r["reason"] for r in rejections if r["record_kind"] == "track"}
    assert by_track == {"nc": "license_not_commercial", "stream": "license_denies_ai_training",
                        "nolicence": "unknown_license", "broken": "no_audio", "baddate": "unknown_license",
                        "noholder": "missing_field", "open": "duplicate_id", "ragged": "stem_mismatch"}
    file_reasons = Counter(r["reason"] for r in rejections if r["record_kind"] == "audio_file")
    assert file_reasons == Counter({"track_rejected": 4, "decode_error": 1, "non_finite_samples": 1,
                                    "missing_file": 1, "path_outside_delivery": 1, "invalid_role": 1,
                                    "unknown_track": 1})
    license_reasons = [r["reason"] for r in rejections if r["record_kind"] == "license"]
    assert license_reasons == ["invalid_field"]
    assert all(r["detail"] for r in rejections), "every rejection says why"
    counts = result.counts
    for table, n in (("tracks", 10), ("files", 13), ("licenses", 4)):
        assert counts[table]["input"] == n
        assert counts[table]["accepted"] + counts[table]["rejected"] == n
    assert counts["mixtures_built"] == 1
    run_record = LineageStore(workspace.store_url).get_run(result.run_id)
    assert run_record["status"] == "succeeded" and run_record["counts"] == counts


def test_non_commercial_run_admits_the_nc_track(delivery, tmp_path):
    workspace, result = run(delivery, tmp_path, "non-commercial")
    accepted = {t["track_id"] for t in read_table(workspace.catalog_table("tracks"), TRACK).to_pylist()}
    assert accepted == {"open", "stems", "nc"}
    assert result.counts["tracks"]["accepted"] == 3


def test_measurements_and_built_mixture(delivery, tmp_path):
    workspace, _ = run(delivery, tmp_path, "commercial")
    files = {(f["track_id"], f["role"]): f for f in read_table(workspace.catalog_table("audio_files"),
                                                               AUDIO_FILE).to_pylist()}
    open_mix = files[("open", "mixture")]
    assert (open_mix["num_channels"], open_mix["sample_rate_hz"], open_mix["duration_s"]) == (2, 22050, 2.0)
    assert open_mix["peak_dbfs"] == pytest.approx(-6.02, abs=0.05)
    assert open_mix["true_peak_dbtp"] == pytest.approx(-6.02, abs=0.1) and open_mix["dc_offset"] < 1e-3
    # stereo 0.5-amplitude 440 Hz sine: −9.03 dB mean square per channel, +3.01 for two channels, −0.691
    # (BS.1770 offset), K-weighting ≈ 0 dB at 440 Hz → ≈ −6.7 LUFS
    assert open_mix["loudness_lufs"] == pytest.approx(-6.72, abs=0.3)
    mixture = files[("stems", "mixture")]
    assert mixture["derived_from"] == "sum_of_stems"
    built, sr = read_audio(mixture["uri"])
    a, _ = read_audio(delivery / "audio" / "stem_a.flac")
    b, _ = read_audio(delivery / "audio" / "stem_b.flac")
    expected = a + b
    assert sr == 22050 and built.shape == expected.shape
    np.testing.assert_allclose(built, expected, atol=1e-6)


def test_table_level_problems_stop_before_any_audio(tmp_path):
    (tmp_path / "tracks.csv").write_text("track_id,title\nx,y\n")
    (tmp_path / "files.csv").write_text("track_id,role,instrument,path\n")
    (tmp_path / "licenses.csv").write_text(",".join(LICENSES[0]) + "\n")
    with pytest.raises(DeliveryError, match="tracks.csv lacks column.*isrc"):
        read_delivery(tmp_path)
    (tmp_path / "files.csv").unlink()
    with pytest.raises(DeliveryError, match="no files.csv"):
        read_delivery(tmp_path)


def test_bom_and_crlf_and_quoted_newlines_are_read(tmp_path):
    header = "track_id,isrc,title,artist,rights_holder,license_id,attribution,genre,tags,description"
    body = 't1,,"Two\nLines",A,H,L,x,,,\r\n'
    (tmp_path / "tracks.csv").write_bytes(("\ufeff" + header + "\r\n" + body).encode("utf-8"))
    (tmp_path / "files.csv").write_text("track_id,role,instrument,path\n")
    (tmp_path / "licenses.csv").write_text(",".join(LICENSES[0]) + "\n")
    delivery = read_delivery(tmp_path)
    assert delivery.tracks[0]["track_id"] == "t1" and delivery.tracks[0]["title"] == "Two\nLines"
