"""Hostile and broken input: each case is a Rejection with its reason, the run completes, counts reconcile."""

import os

import numpy as np
import soundfile as sf

from pipelines.stages.ingest.stage import IngestConfig, run_ingest
from provenance.workspace import Workspace
from tests.conftest import sine
from tests.pipelines.test_ingest import LICENSES, write_csv

HEADER = "track_id,isrc,title,artist,rights_holder,license_id,attribution,genre,tags,description"


def test_hostile_delivery(tmp_path):
    root = tmp_path / "delivery"
    audio = root / "audio"
    audio.mkdir(parents=True)
    sr = 16000
    sf.write(audio / "good.wav", sine(440, 1.0, sr).T, sr)
    (audio / "zero.wav").write_bytes(b"")
    sf.write(tmp_path / "full.flac", (0.3 * np.random.default_rng(0).standard_normal(3 * sr)).astype(np.float32), sr)
    full = (tmp_path / "full.flac").read_bytes()
    (audio / "truncated.flac").write_bytes(full[: len(full) // 2])
    sf.write(audio / "liar.flac", sine(440, 1.0, sr).T, sr, format="WAV", subtype="PCM_16")  # WAV bytes
    sf.write(audio / "surround.wav", sine(440, 1.0, sr, 0.2, num_channels=6).T, sr)
    sf.write(audio / "inf.wav", np.where(np.arange(sr) == 5, np.inf, 0.1).astype(np.float32), sr, subtype="FLOAT")
    sf.write(audio / "stem_long.wav", sine(220, 1.0, sr).T, sr)
    sf.write(audio / "stem_short.wav", sine(330, 0.9, sr).T, sr)
    os.symlink(tmp_path / "full.flac", audio / "escape.flac")  # a symlink pointing outside the delivery
    cases = {  # track id → (file path, the file's expected reason, the track's expected reason)
        "good": ("audio/good.wav", None, None),
        "zero": ("audio/zero.wav", "empty_audio", "no_audio"),
        "truncated": ("audio/truncated.flac", "decode_error", "no_audio"),
        "liar": ("audio/liar.flac", "format_mismatch", "no_audio"),
        "surround": ("audio/surround.wav", "too_many_channels", "no_audio"),
        "inf": ("audio/inf.wav", "non_finite_samples", "no_audio"),
        "absolute": (str(audio / "good.wav"), "path_outside_delivery", "no_audio"),
        "dotdot": ("audio/../../full.flac", "path_outside_delivery", "no_audio"),
        "symlink": ("audio/escape.flac", "path_outside_delivery", "no_audio"),
        "missing": ("audio/nope.wav", "missing_file", "no_audio"),
    }
    lines = [HEADER] + [f"{t},,{t.title()},A,Holder,L-open,x,,," for t in cases]
    lines.append("ragged,,Ragged,A,Holder,L-open,x,,,")
    body = ("\ufeff" + "\r\n".join(lines) + "\r\n").encode("utf-8")
    body += b"latin1,,Caf\xe9,A,Holder,L-open,x,,,\r\n"  # not UTF-8
    (root / "tracks.csv").write_bytes(body)
    files = [{"track_id": t, "role": "mixture", "instrument": "", "path": path} for t, (path, _, _) in cases.items()]
    files += [{"track_id": "ragged", "role": "bass", "instrument": "", "path": "audio/stem_long.wav"},
              {"track_id": "ragged", "role": "other", "instrument": "", "path": "audio/stem_short.wav"},
              {"track_id": "latin1", "role": "mixture", "instrument": "", "path": "audio/good.wav"}]
    write_csv(root / "files.csv", files, ["track_id", "role", "instrument", "path"])
    write_csv(root / "licenses.csv", LICENSES[:1], list(LICENSES[0]))

    result = run_ingest(root, Workspace.at(tmp_path / "w"), IngestConfig(as_of="2026-11-21"))
    tracks = {r["record_id"]: r for r in result.rejections if r["record_kind"] == "track"}
    files_by_track = {}
    for r in result.rejections:
        if r["record_kind"] == "audio_file":
            files_by_track.setdefault(r["record_id"].split("/")[0], []).append(r)
    for track_id, (_, file_reason, track_reason) in cases.items():
        if track_reason is None:
            assert track_id not in tracks
            continue
        assert tracks[track_id]["reason"] == track_reason, track_id
        assert [r["reason"] for r in files_by_track[track_id]] == [file_reason], track_id
    assert tracks["ragged"]["reason"] == "stem_mismatch"
    assert "[15360, 16000]" in tracks["ragged"]["detail"] or "lengths" in tracks["ragged"]["detail"]
    latin1 = tracks["latin1"]
    assert latin1["reason"] == "invalid_encoding" and "\\xe9" in latin1["detail"]
    assert [r["reason"] for r in files_by_track["latin1"]] == ["track_rejected"]
    counts = result.counts
    assert counts["tracks"] == {"input": 12, "accepted": 1, "rejected": 11,
                                "rejected_by_reason": {"invalid_encoding": 1, "no_audio": 9, "stem_mismatch": 1}}
    for table in ("tracks", "files", "licenses"):
        assert counts[table]["accepted"] + counts[table]["rejected"] == counts[table]["input"]
    assert all(r["detail"] for r in result.rejections)
