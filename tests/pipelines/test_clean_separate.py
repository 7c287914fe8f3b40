"""The separate stage with a tiny demucs the test builds and saves: stems for stem-less mixtures, with the
separator's name and checksum in their lineage; a re-run does no new work."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from cleaning.audio import read_audio, write_audio
from cleaning.measure import measure_pcm_sha256
from cleaning.separate import load_separator, separate_audio
from cleaning.separator import SeparatorSpec, build_separator, save_separator
from cleaning.synthetic_stems import render_song
from pipelines.stages.separate import SeparateConfig, run_separate
from provenance import records
from provenance.records import file_sha256
from provenance.store import LineageStore
from provenance.workspace import Workspace

SR = 16000


def _checkpoint(tmp_path: Path) -> Path:
    model = build_separator(SeparatorSpec(sources=("drums", "bass", "other", "vocals"), sample_rate_hz=SR,
                                          channels=4, depth=2), seed=1)
    path = tmp_path / "tiny-demucs.th"
    save_separator(model, path)
    return path


def test_separate_audio_chunks_with_overlap_and_keeps_shape(tmp_path):
    separator = load_separator(str(_checkpoint(tmp_path)))
    assert separator.sources == ("drums", "bass", "other", "vocals") and separator.sample_rate_hz == SR
    stereo = np.repeat(sum(s.audio for s in render_song("a", 3, duration_s=2.5)), 2, axis=0) * 0.5
    whole = separate_audio(separator, stereo, 22050 if False else SR, segment_s=3.0)
    chunked = separate_audio(separator, stereo, SR, segment_s=0.5, overlap=0.25)
    for source in separator.sources:
        assert chunked[source].shape == stereo.shape and chunked[source].dtype == np.float32
        # overlap-add of 0.5 s chunks approximates the one-pass output of this (receptive-field-limited) model
        err = np.linalg.norm(chunked[source] - whole[source]) / max(np.linalg.norm(whole[source]), 1e-9)
        assert err < 0.5
    with pytest.raises(FileNotFoundError):
        load_separator(str(tmp_path / "missing.th"))


def test_separate_stage_writes_stems_with_separator_lineage(tmp_path, ray_local):
    checkpoint = _checkpoint(tmp_path)
    workspace = Workspace.at(tmp_path / "work").ensure()
    rows = []
    for i in range(2):
        mixture = sum(s.audio for s in render_song(f"song-{i}", 10 + i, duration_s=2.0))
        path = write_audio(tmp_path / f"song-{i}.wav", mixture, SR)
        rows.append({"track_id": f"song-{i}", "role": "mixture", "instrument": "", "uri": str(path),
                     "sha256": measure_pcm_sha256(mixture), "sample_rate_hz": SR, "num_channels": 1})
    records.write_table(records.to_table(rows, records.AUDIO_FILE), workspace.catalog_table("audio_files"))
    config = SeparateConfig(model=str(checkpoint), segment_s=1.0, num_cpus=2, num_actors=2)
    result = run_separate(workspace, config)
    digest = file_sha256(checkpoint)
    assert result.separator_sha256 == digest and result.num_tracks == 2 and result.num_stems == 8
    catalog = pq.read_table(workspace.catalog_table("audio_files")).to_pylist()
    stems = [r for r in catalog if r["role"] != "mixture"]
    assert sorted({r["role"] for r in stems}) == ["bass", "drums", "other", "vocals"] and len(stems) == 8
    for row in stems:
        assert row["derived_from"] == f"separated:{checkpoint.name}@{digest}"
        audio, rate = read_audio(row["uri"])
        assert rate == SR and audio.shape == (1, 2 * SR) and row["sha256"] == measure_pcm_sha256(audio)
    run = LineageStore(workspace.store_url).get_run(result.run_id)
    assert run["counts"]["separator_sha256"] == digest and run["status"] == "succeeded"
    again = run_separate(workspace, config)
    assert again.num_tracks == 0 and again.skipped_tracks == 2
    assert len(pq.read_table(workspace.catalog_table("audio_files"))) == 10
