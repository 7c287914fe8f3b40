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
from pipelines.catalog import commit_catalog, resolve_catalog
from pipelines.stage import get_stage, run_stage
from pipelines.stages.separate import SeparateConfig, run_separate, separator_key
from provenance import records
from provenance.records import file_sha256
from provenance.store import LineageStore
from provenance.workspace import Workspace

SR = 16000


def _checkpoint(tmp_path: Path, seed: int = 1) -> Path:
    model = build_separator(SeparatorSpec(sources=("drums", "bass", "other", "vocals"), sample_rate_hz=SR,
                                          channels=4, depth=2), seed=seed)
    path = tmp_path / ("tiny-demucs.th" if seed == 1 else f"tiny-demucs-{seed}.th")
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


def _mixtures_catalog(workspace: Workspace, tmp_path: Path, seeds: dict[str, int], run_id: str) -> str:
    """Commit a catalog version of one mixture per track (track id → song seed); its id."""
    rows = []
    for track_id, seed in seeds.items():
        mixture = sum(s.audio for s in render_song(track_id, seed, duration_s=1.5))
        path = write_audio(tmp_path / "delivered" / f"{track_id}-{seed}.wav", mixture, SR)
        rows.append({"track_id": track_id, "role": "mixture", "instrument": "", "uri": str(path),
                     "sha256": measure_pcm_sha256(mixture), "sample_rate_hz": SR, "num_channels": 1})
    return commit_catalog(workspace, {"audio_files": records.to_table(rows, records.AUDIO_FILE)}, parent=None,
                          stage="ingest", run_id=run_id).catalog_id


def _stems_on_disk(catalog_id: str, workspace: Workspace) -> dict[tuple[str, str], tuple[str, str, int]]:
    """(track, role) → (uri, file sha256, mtime ns) of a catalog version's separated stems, each checked against
    the decoded-PCM sha256 its row records."""
    rows = pq.read_table(resolve_catalog(workspace, catalog_id).table("audio_files")).to_pylist()
    out = {}
    for row in rows:
        if row["role"] == "mixture":
            continue
        assert measure_pcm_sha256(read_audio(row["uri"])[0]) == row["sha256"], row["uri"]
        out[(row["track_id"], row["role"])] = (row["uri"], file_sha256(row["uri"]), Path(row["uri"]).stat().st_mtime_ns)
    return out


def test_stems_of_two_separators_and_two_mixtures_never_overwrite_each_other(tmp_path, ray_local):
    """Issue 17: stems are written under the separator's key and the mixture's sha256, never over other stems, so
    every catalog version's audio stays as it was written."""
    workspace = Workspace.at(tmp_path / "work").ensure()
    base = _mixtures_catalog(workspace, tmp_path, {"song-0": 10, "song-1": 11}, "ingest-a")
    first, second = _checkpoint(tmp_path, seed=1), _checkpoint(tmp_path, seed=2)
    assert file_sha256(first) != file_sha256(second)
    config_a = SeparateConfig(model=str(first), segment_s=1.0, num_cpus=2, num_actors=1)
    config_b = SeparateConfig(model=str(second), segment_s=1.0, num_cpus=2, num_actors=1)
    separate = get_stage("separate")

    by_a = run_stage(separate, workspace, config_a, select={"catalog": base})
    stems_a = _stems_on_disk(by_a.output_ids["catalog"], workspace)
    assert len(stems_a) == 8
    by_b = run_stage(separate, workspace, config_b, select={"catalog": base})
    stems_b = _stems_on_disk(by_b.output_ids["catalog"], workspace)
    assert by_b.output_ids["catalog"] != by_a.output_ids["catalog"]
    assert not {uri for uri, _, _ in stems_a.values()} & {uri for uri, _, _ in stems_b.values()}
    assert {k: v[1] for k, v in stems_a.items()} != {k: v[1] for k, v in stems_b.items()}  # other weights
    assert _stems_on_disk(by_a.output_ids["catalog"], workspace) == stems_a, "A's stems changed under its catalog"
    key_a = separator_key(by_a.inputs["separator"], config_a)
    assert all(Path(uri).parent.parent == workspace.separated_dir / key_a for uri, _, _ in stems_a.values())
    assert by_a.details["separator_key"] == key_a != by_b.details["separator_key"]

    # another mixture for song-0 (a re-delivery), the same separator: song-0's stems go to another folder
    redelivered = _mixtures_catalog(workspace, tmp_path, {"song-0": 20, "song-1": 11}, "ingest-b")
    by_a_new = run_stage(separate, workspace, config_a, select={"catalog": redelivered})
    stems_new = _stems_on_disk(by_a_new.output_ids["catalog"], workspace)
    assert stems_new[("song-0", "drums")][0] != stems_a[("song-0", "drums")][0]
    assert stems_new[("song-1", "drums")] == stems_a[("song-1", "drums")]  # the same mixture: the same file, kept
    assert _stems_on_disk(by_a.output_ids["catalog"], workspace) == stems_a

    # the same separator and settings again (forced): the files there are taken as they are, not rewritten
    again = run_stage(separate, workspace, config_a, select={"catalog": base}, force=True)
    assert again.status == "ran" and again.run_id != by_a.run_id
    assert _stems_on_disk(again.output_ids["catalog"], workspace) == stems_a
    # settings that change the separator's output change its key (and so the folder); the track list does not
    assert separator_key("m@1", config_a) != separator_key("m@1", config_a.model_copy(update={"overlap": 0.5}))
    assert separator_key("m@1", config_a) == separator_key("m@1", config_a.model_copy(update={"tracks": ["song-0"]}))
