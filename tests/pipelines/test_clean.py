"""The clean stage on Ray over a catalog of synthetic multitracks: checks with reasons, blind scores,
StemScore tables, nothing deleted, and a later run that restores dropped stems by changing the rule."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from cleaning.audio import write_audio
from cleaning.contamination import clip_hard
from cleaning.measure import measure_pcm_sha256
from cleaning.synthetic_stems import render_songs
from pipelines.stages.clean import CleanConfig, read_decisions, run_clean
from pipelines.config import ConfigError, load_config
from provenance import records
from provenance.store import LineageStore
from provenance.workspace import Workspace

SR = 16000


def _catalog(root: Path) -> Workspace:
    """6 candidate songs + 3 reference songs; one silent stem, one clipped stem, one stem from another song."""
    workspace = Workspace.at(root / "work").ensure()
    stems = render_songs(6, seed=5, duration_s=3.0) + render_songs(3, seed=6, duration_s=3.0, prefix="ref")
    foreign = render_songs(1, seed=7, duration_s=3.0, prefix="x")[2].audio
    rows = []
    for i, item in enumerate(stems):
        audio = item.audio
        if (item.track_id, item.role) == ("synth-000", "vocals"):
            audio = np.zeros_like(audio)
        if (item.track_id, item.role) == ("synth-001", "drums"):
            audio = clip_hard(audio, 18.0)
        path = write_audio(root / "audio" / item.track_id / f"{item.role}.wav", audio, SR)
        rows.append({"track_id": item.track_id, "role": item.role, "instrument": "", "uri": str(path),
                     "sha256": measure_pcm_sha256(audio), "sample_rate_hz": SR, "num_channels": 1})
    for track_id in sorted({r["track_id"] for r in rows}):
        mixture = sum(records_audio(r["uri"]) for r in rows if r["track_id"] == track_id)
        if track_id == "synth-002":  # its "other" stem is replaced by one that is not in the mixture
            other = next(r for r in rows if r["track_id"] == track_id and r["role"] == "other")
            write_audio(other["uri"], foreign, SR)
            other["sha256"] = measure_pcm_sha256(foreign)
        path = write_audio(root / "audio" / track_id / "mixture.wav", mixture, SR)
        rows.append({"track_id": track_id, "role": "mixture", "instrument": "", "uri": str(path),
                     "sha256": measure_pcm_sha256(mixture), "sample_rate_hz": SR, "num_channels": 1})
    records.write_table(records.to_table(rows, records.AUDIO_FILE), workspace.catalog_table("audio_files"))
    return workspace


def records_audio(uri: str) -> np.ndarray:
    from cleaning.audio import read_audio

    return read_audio(uri)[0]


def test_clean_checks_blind_scores_and_restore_by_threshold(tmp_path, ray_local):
    workspace = _catalog(tmp_path)
    refs = ["ref-000", "ref-001", "ref-002"]
    config = CleanConfig(reference_tracks=refs, methods=["fad", "unlearning"], fad_drop_ratio=0.2,
                         unlearning_drop_ratio=0.2, train_steps=20, max_windows_per_stem=2, num_cpus=2)
    first = run_clean(workspace, config)
    assert first.num_stems == 36 and first.num_reference == 12
    assert first.num_kept + first.num_dropped == first.num_stems
    table = pq.read_table(first.outputs["stem_scores"]).to_pylist()
    final = {(r["track_id"], r["role"]): r for r in table if r["method"] == "final"}
    assert "silent_stem" in final[("synth-000", "vocals")]["reason"]
    assert "clipped_stem" in final[("synth-001", "drums")]["reason"]
    assert "stem_not_in_mixture" in final[("synth-002", "other")]["reason"]
    assert all(r["decision"] == "keep" for r in table if r["method"] == "reference")
    # blind methods score the 21 candidates that passed the checks; each drops floor(0.2 * 21) = 4
    assert first.scored == {"fad": 21, "unlearning": 21}
    for method in ("fad", "unlearning"):
        rows = [r for r in table if r["method"] == method]
        assert len(rows) == 21 and sum(r["decision"] == "drop" for r in rows) == 4
        assert all(np.isfinite(r["score"]) for r in rows)
    blind_dropped = {(r["track_id"], r["role"]) for r in table if r["method"] in ("fad", "unlearning")
                     and r["decision"] == "drop"}
    assert blind_dropped and all(final[k]["decision"] == "drop" for k in blind_dropped)
    assert first.reused_scores == []

    # nothing deleted: the catalog still lists every stem, and the files are there
    audio_files = pq.read_table(workspace.catalog_table("audio_files")).to_pylist()
    assert len(audio_files) == 45 and all(Path(r["uri"]).is_file() for r in audio_files)

    # a later run with permissive thresholds re-decides from cached scores and restores the blind drops
    relaxed = config.model_copy(update={"fad_threshold": 1e9, "unlearning_threshold": -1e9})
    second = run_clean(workspace, relaxed)
    assert sorted(second.reused_scores) == ["fad", "unlearning"]
    decisions = {(r["track_id"], r["role"]): r for r in read_decisions(workspace)}
    assert all(decisions[k]["decision"] == "keep" for k in blind_dropped - {("synth-000", "vocals")})
    assert second.num_dropped == 3 and set(second.dropped_by_reason) == {"silent_stem", "clipped_stem",
                                                                            "stem_not_in_mixture"}
    again = {(r["track_id"], r["role"], r["method"]): r["score"] for r in
             pq.read_table(second.outputs["stem_scores"]).to_pylist()}
    for r in table:
        if r["method"] in ("fad", "unlearning"):
            assert again[(r["track_id"], r["role"], r["method"])] == pytest.approx(r["score"])
    runs = LineageStore(workspace.store_url).list_runs("clean")
    assert len(runs) == 2 and all(r["status"] == "succeeded" for r in runs)


def test_clean_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="reference_tracks"):
        load_config(CleanConfig, None, {"methods": ["fad"]})
    with pytest.raises(ConfigError, match="methods"):
        load_config(CleanConfig, None, {"methods": ["magic"], "reference_tracks": ["a"]})
    with pytest.raises(ConfigError, match="fad_drop_ratio"):
        load_config(CleanConfig, None, {"fad_drop_ratio": 1.5, "reference_tracks": ["a"]})
    with pytest.raises(ConfigError, match="contrast_weight"):
        load_config(CleanConfig, None, {"contrast_weight": -1, "reference_tracks": ["a"]})
    config = load_config(CleanConfig, None, {"contrast_weight": 0.5, "reference_tracks": ["a"]})
    assert config.unlearning_settings().contrast_weight == 0.5  # reaches the method
    with pytest.raises(FileNotFoundError, match="ingest"):
        run_clean(Workspace.at(tmp_path), CleanConfig(methods=[]))
