"""The shard stage on a synthetic catalog: determinism, splits, segment arithmetic, rejections, the index."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pydantic
import pytest
import soundfile as sf

from cleaning.audio import read_audio, resample, to_mono, write_audio
from cleaning.measure import measure_pcm_sha256
from pipelines.engines import Engine, EngineConfig
from pipelines.stages.shard.stage import (
    ShardConfig,
    ShardInputError,
    num_target_samples,
    plan_shards,
    run_shard,
    segment_starts,
    split_for_track,
)
from provenance import records
from provenance.records import RejectionReason
from provenance.store import LineageStore
from provenance.workspace import Workspace
from tests.conftest import sine

SOURCE_RATE_HZ = 44100
# 1 s segments at 16 kHz keep the test fast; validation_fraction 0.5 puts tracks in both splits.
CONFIG = ShardConfig(segment_s=1.0, sample_rate_hz=16000, n_mels=32, n_fft=512, hop_length=160,
                     validation_fraction=0.5, samples_per_shard=4)
SEGMENT = CONFIG.segment_samples  # 16000

# track_id → (duration in segments, channels, kind, container)
TRACKS = {
    "t-half-tone": (2.5, 2, "sine", "wav"),  # exactly 2.5 segments → 2 whole segments
    "t-exact-three": (3.0, 1, "sine", "flac"),  # exactly 3 segments, boundary case
    "t-noise-a": (4.2, 1, "noise", "wav"),
    "t-noise-b": (2.1, 2, "noise", "flac"),
    "t-tone-c": (3.7, 1, "sine", "wav"),
    "t-tone-d": (1.4, 2, "sine", "wav"),
    "t-tone-e": (2.9, 1, "sine", "wav"),
    "t-short": (0.5, 1, "sine", "wav"),  # shorter than one segment → rejected
}
UNLICENSED, NO_AUDIO, MISSING = "t-unlicensed", "t-no-audio", "t-missing-file"


def _track_row(track_id: str, license_id: str = "lic-1") -> dict:
    return {"track_id": track_id, "isrc": "", "title": f"Title {track_id}", "artist": "The Testers",
            "rights_holder": f"Holder of {track_id}", "license_id": license_id, "attribution": "",
            "genre": "ambient", "tags": ["calm", "synthetic"], "description": "a test", "delivery_id": "d-1"}


def _audio_row(track_id: str, path: Path) -> dict:
    audio, rate = read_audio(path)
    return {"track_id": track_id, "role": "mixture", "instrument": "", "uri": str(path), "derived_from": "",
            "sha256": measure_pcm_sha256(audio), "sample_rate_hz": rate, "num_channels": audio.shape[0],
            "num_samples": audio.shape[1], "duration_s": audio.shape[1] / rate}


def make_catalog(root: Path, audio_dir: Path) -> Workspace:
    """A workspace whose curated catalog holds TRACKS plus three tracks that are rejected before decoding."""
    workspace = Workspace.at(root).ensure()
    rng = np.random.default_rng(0)
    tracks, audio_files = [], []
    for i, (track_id, (segments, channels, kind, container)) in enumerate(TRACKS.items()):
        duration_s = segments * SEGMENT / CONFIG.sample_rate_hz
        if kind == "sine":
            audio = sine(220.0 * (i + 1), duration_s, SOURCE_RATE_HZ, num_channels=channels)
        else:
            audio = (0.2 * rng.standard_normal((channels, round(duration_s * SOURCE_RATE_HZ)))).astype(np.float32)
        path = audio_dir / f"{track_id}.{container}"
        if not path.exists():
            write_audio(path, audio, SOURCE_RATE_HZ)
        tracks.append(_track_row(track_id))
        audio_files.append(_audio_row(track_id, path))
    tracks += [_track_row(UNLICENSED, license_id="lic-unknown"), _track_row(NO_AUDIO), _track_row(MISSING)]
    audio_files.append({**audio_files[0], "track_id": UNLICENSED})
    audio_files.append({**audio_files[0], "track_id": MISSING, "uri": str(audio_dir / "nowhere.wav")})
    audio_files.append({**audio_files[0], "track_id": NO_AUDIO, "role": "vocals"})  # a stem, no mixture
    records.write_table(records.to_table(tracks, records.TRACK), workspace.catalog_table("tracks"))
    records.write_table(records.to_table(audio_files, records.AUDIO_FILE), workspace.catalog_table("audio_files"))
    records.write_table(records.to_table([{"license_id": "lic-1", "ai_training": "allowed"}], records.LICENSE),
                        workspace.catalog_table("licenses"))
    return workspace


@pytest.fixture(scope="module")
def audio_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("audio")


@pytest.fixture(scope="module")
def sharded(ray_local, tmp_path_factory, audio_dir):
    workspace = make_catalog(tmp_path_factory.mktemp("ws-a"), audio_dir)
    calls = []
    result = run_shard(workspace, CONFIG, progress=lambda phase, done, total: calls.append((phase, done, total)))
    return workspace, result, calls


def _file_digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _index(result) -> list[dict]:
    return pq.read_table(result.dataset_dir / "index.parquet").to_pylist()


def _tar_members(path: Path) -> dict[str, tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(path) as tar:
        return {m.name: (m, tar.extractfile(m).read()) for m in tar.getmembers()}


# --- determinism and reuse -----------------------------------------------------------------------------------
def test_rerun_reuses_and_a_fresh_run_gives_identical_bytes(sharded, tmp_path, audio_dir):
    workspace, first, _ = sharded
    before = _file_digests(first.dataset_dir)
    assert first.reused is False and first.dataset_id.startswith("ds-")
    assert {".tar", ".parquet", ".json"} == {Path(n).suffix for n in before}

    again = run_shard(workspace, CONFIG)  # the same inputs and config: cached, the first run's result, no new Run
    assert again.status == "cached" and first.status == "ran"
    assert again.reused is True and again.dataset_id == first.dataset_id and again.run_id == first.run_id
    with LineageStore(workspace.store_url) as store:
        assert [r["run_id"] for r in store.list_runs("shard")] == [first.run_id]
    assert _file_digests(again.dataset_dir) == before

    # A second workspace with the same catalog runs Ray again from scratch: same bytes, same id.
    other = make_catalog(tmp_path / "ws-b", audio_dir)
    fresh = run_shard(other, CONFIG)
    assert fresh.reused is False
    assert fresh.dataset_id == first.dataset_id
    assert _file_digests(fresh.dataset_dir) == before
    assert [p.name for p in other.datasets_dir.iterdir()] == [first.dataset_id]  # no temporary folder left


def test_dataset_id_is_the_hash_of_the_index_and_shards(sharded):
    _, result, _ = sharded
    manifest = json.loads((result.dataset_dir / "dataset.json").read_text())
    shard_sha256 = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                    for p in sorted(result.dataset_dir.glob("*.tar"))}
    assert manifest["shard_sha256"] == shard_sha256
    expected = "ds-" + records.sha256_hex(records.canonical_json(
        {"index": _index(result), "shard_sha256": shard_sha256}))[:16]
    assert result.dataset_id == manifest["dataset_id"] == expected == result.dataset_dir.name
    assert manifest["config_sha256"] == CONFIG.sha256()
    assert manifest["config"]["mel"]["n_mels"] == CONFIG.n_mels


def test_a_changed_rights_holder_gives_a_new_dataset(ray_local, tmp_path, audio_dir, sharded):
    _, first, _ = sharded
    workspace = make_catalog(tmp_path / "ws-c", audio_dir)
    tracks = records.read_table(workspace.catalog_table("tracks")).to_pylist()
    tracks[0]["rights_holder"] = "Someone Else"
    records.write_table(records.to_table(tracks, records.TRACK), workspace.catalog_table("tracks"))
    changed = run_shard(workspace, CONFIG)
    assert changed.dataset_id != first.dataset_id
    assert changed.num_segments == first.num_segments


# --- splits ---------------------------------------------------------------------------------------------------
def test_no_track_straddles_splits_and_split_is_the_hash_rule(sharded):
    _, result, _ = sharded
    splits_by_track: dict[str, set[str]] = {}
    for row in _index(result):
        splits_by_track.setdefault(row["track_id"], set()).add(row["split"])
        assert row["shard"].startswith(row["split"] + "-")
    assert all(len(splits) == 1 for splits in splits_by_track.values())
    for track_id, splits in splits_by_track.items():
        assert splits == {split_for_track(track_id, CONFIG.validation_fraction).value}
    assert set().union(*splits_by_track.values()) == {"train", "validation"}  # the fixture covers both
    assert result.counts["train"] + result.counts["validation"] == result.num_segments


def test_split_for_track_is_stable_and_follows_the_fraction():
    ids = [f"track-{i}" for i in range(4000)]
    first = [split_for_track(t, 0.1) for t in ids]
    assert first == [split_for_track(t, 0.1) for t in ids]
    fraction = sum(s == "validation" for s in first) / len(ids)
    assert 0.08 < fraction < 0.12
    assert all(split_for_track(t, 0.0) == "train" for t in ids[:200])
    # monotone: a track in validation at 0.1 stays there at 0.3
    assert all(split_for_track(t, 0.3) == "validation" for t, s in zip(ids, first) if s == "validation")


# --- segment arithmetic ---------------------------------------------------------------------------------------
def test_segment_starts_are_whole_segments_at_the_dataset_rate():
    assert num_target_samples(110250, 44100, 16000) == 40000
    assert num_target_samples(44099, 44100, 16000) == 15999  # floor, not round
    assert segment_starts(110250, 44100, CONFIG) == [0, 16000]
    assert segment_starts(132300, 44100, CONFIG) == [0, 16000, 32000]  # exactly three segments
    assert segment_starts(132299, 44100, CONFIG) == [0, 16000]  # one sample short of the third
    assert segment_starts(44099, 44100, CONFIG) == []
    capped = CONFIG.model_copy(update={"max_segments_per_track": 1})
    assert segment_starts(132300, 44100, capped) == [0]


def test_two_and_a_half_segments_give_two_segments_with_exact_members(sharded, audio_dir):
    _, result, _ = sharded
    rows = sorted((r for r in _index(result) if r["track_id"] == "t-half-tone"), key=lambda r: r["start_sample"])
    assert [r["start_sample"] for r in rows] == [0, SEGMENT]
    assert [r["segment_id"] for r in rows] == ["t-half-tone@0", f"t-half-tone@{SEGMENT}"]
    assert all(r["num_samples"] == SEGMENT and r["duration_s"] == 1.0 for r in rows)
    assert rows[1]["start_s"] == 1.0

    source, rate = read_audio(audio_dir / "t-half-tone.wav")
    expected = resample(to_mono(source), rate, CONFIG.sample_rate_hz)[0]
    for row in rows:
        members = _tar_members(result.dataset_dir / row["shard"])
        audio, rate_hz = sf.read(io.BytesIO(members[f"{row['key']}.flac"][1]), dtype="float32")
        assert rate_hz == CONFIG.sample_rate_hz and audio.shape == (SEGMENT,)
        start = row["start_sample"]
        np.testing.assert_allclose(audio, expected[start:start + SEGMENT], atol=1.0 / 2**15 + 1e-6)
        mel = np.load(io.BytesIO(members[f"{row['key']}.mel.npy"][1]), allow_pickle=False)
        assert mel.dtype == np.float16
        assert mel.shape == (CONFIG.n_mels, SEGMENT // CONFIG.hop_length + 1)
        assert np.isfinite(mel).all() and mel.max() > np.log(1e-5) + 1  # not all floor: there is a tone


def test_exact_multiple_uses_every_segment(sharded):
    _, result, _ = sharded
    starts = sorted(r["start_sample"] for r in _index(result) if r["track_id"] == "t-exact-three")
    assert starts == [0, SEGMENT, 2 * SEGMENT]
    manifest = json.loads((result.dataset_dir / "dataset.json").read_text())
    assert manifest["tracks"]["t-noise-a"] == 4 and manifest["tracks"]["t-tone-d"] == 1


# --- rejections and lineage -----------------------------------------------------------------------------------
def test_rejections_have_reasons_and_counts_reconcile(sharded):
    workspace, result, _ = sharded
    reasons = {r["record_id"]: r["reason"] for r in result.rejections}
    assert reasons == {"t-short": RejectionReason.SHORTER_THAN_SEGMENT, UNLICENSED: RejectionReason.UNKNOWN_LICENSE,
                       NO_AUDIO: RejectionReason.NO_AUDIO, MISSING: RejectionReason.MISSING_FILE}
    short = next(r for r in result.rejections if r["record_id"] == "t-short")
    assert "0.500 s" in short["detail"] and short["stage"] == "shard" and short["run_id"] == result.run_id
    assert result.num_tracks_in == len(TRACKS) + 3 == result.num_tracks + len(result.rejections)
    expected_segments = {t: int(n) for t, (n, *_rest) in TRACKS.items() if t != "t-short"}
    assert result.num_segments == sum(expected_segments.values()) == len(_index(result))
    assert result.num_shards == len(list(result.dataset_dir.glob("*.tar")))

    run_dir = workspace.run_dir(result.run_id)
    saved = records.read_table(run_dir / "rejections.parquet", records.REJECTION).to_pylist()
    assert sorted(r["record_id"] for r in saved) == sorted(reasons)
    assert json.loads((run_dir / "config.json").read_text())["config_sha256"] == CONFIG.sha256()
    assert json.loads((run_dir / "summary.json").read_text())["dataset_id"] == result.dataset_id

    store = LineageStore(workspace.store_url)
    run = store.get_run(result.run_id)
    dataset = store.get_dataset(result.dataset_id)
    tracks_in_dataset = store.datasets_with_track("t-noise-a")
    store.close()
    assert run["status"] == "succeeded" and run["counts"]["rejected"]["shorter_than_segment"] == 1
    assert run["counts"]["tracks_in"] == run["counts"]["accepted"] + sum(run["counts"]["rejected"].values())
    assert dataset["num_segments"] == result.num_segments and dataset["run_id"] == result.run_id
    assert tracks_in_dataset == [result.dataset_id]


def test_stale_catalog_fails_the_run_and_leaves_no_dataset(ray_local, tmp_path, audio_dir):
    workspace = make_catalog(tmp_path / "ws-stale", audio_dir)
    audio_files = records.read_table(workspace.catalog_table("audio_files")).to_pylist()
    for row in audio_files:
        row["num_samples"] += 441  # the catalog no longer matches the files
    records.write_table(records.to_table(audio_files, records.AUDIO_FILE), workspace.catalog_table("audio_files"))
    with pytest.raises(ShardInputError, match="t-.*samples at 44100 Hz, the catalog says .* the catalog is stale"):
        run_shard(workspace, CONFIG)
    store = LineageStore(workspace.store_url)
    runs = store.list_runs("shard")
    store.close()
    assert [r["status"] for r in runs] == ["failed"] and "stale" in runs[0]["error"]
    assert list(workspace.datasets_dir.iterdir()) == []


def test_missing_catalog_names_the_table_and_the_fix(tmp_path):
    workspace = Workspace.at(tmp_path / "empty").ensure()
    with pytest.raises(FileNotFoundError, match=r"tracks\.parquet.*linernotes ingest"):
        run_shard(workspace, CONFIG)


# --- members, index and tar layout ----------------------------------------------------------------------------
def test_json_member_carries_rights_and_conditioning(sharded):
    _, result, _ = sharded
    row = next(r for r in _index(result) if r["track_id"] == "t-noise-b")
    sample = json.loads(_tar_members(result.dataset_dir / row["shard"])[f"{row['key']}.json"][1])
    track = _track_row("t-noise-b")
    assert sample["rights_holder"] == "Holder of t-noise-b" and sample["license_id"] == "lic-1"
    assert sample["text"] == records.conditioning_text(track) and sample["tags"] == ["calm", "synthetic"]
    assert sample["segment_id"] == row["segment_id"] and sample["split"] == row["split"]
    assert sample["sample_rate_hz"] == CONFIG.sample_rate_hz and sample["num_samples"] == SEGMENT


def test_index_matches_the_tars(sharded):
    _, result, _ = sharded
    index = _index(result)
    assert [(r["split"], r["shard"], r["key"]) for r in index] == sorted((r["split"], r["shard"], r["key"])
                                                                         for r in index)
    assert len({r["segment_id"] for r in index}) == len(index)
    manifest = json.loads((result.dataset_dir / "dataset.json").read_text())
    for split, names in manifest["shards"].items():
        assert names == [f"{split}-{i:06d}.tar" for i in range(len(names))]
    for tar_path in sorted(result.dataset_dir.glob("*.tar")):
        rows = [r for r in index if r["shard"] == tar_path.name]
        assert 0 < len(rows) <= CONFIG.samples_per_shard
        members = _tar_members(tar_path)
        assert list(members) == sorted(members)
        assert set(members) == {m for r in rows for m in r["members"]}
        for r in rows:
            assert r["members"] == [f"{r['key']}.flac", f"{r['key']}.json", f"{r['key']}.mel.npy"]
            assert hashlib.sha256(members[f"{r['key']}.flac"][1]).hexdigest() == r["sha256"]
        for info, _data in members.values():
            assert (info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname) == (0, 0o444, 0, 0, "", "")
    # segments sorted by id fill shards in order within each split
    for split in ("train", "validation"):
        in_split = [r for r in index if r["split"] == split]
        by_id = sorted(in_split, key=lambda r: r["segment_id"])
        shards = [r["shard"] for r in by_id]
        assert shards == sorted(shards) and shards.count(shards[0]) == min(len(by_id), CONFIG.samples_per_shard)


def test_progress_reports_every_segment_and_shard(sharded):
    _, result, calls = sharded
    segments = [c for c in calls if c[0] == "segments"]
    shards = [c for c in calls if c[0] == "shards"]
    assert len(segments) == result.num_segments
    assert segments[-1] == ("segments", result.num_segments, result.num_segments)
    assert shards[-1] == ("shards", result.num_shards, result.num_shards)


# --- config and planning --------------------------------------------------------------------------------------
def test_config_rejects_bad_values_and_hashes_its_content():
    with pytest.raises(pydantic.ValidationError, match="extra"):
        ShardConfig(segmant_s=1.0)
    with pytest.raises(pydantic.ValidationError, match="hop_length"):
        ShardConfig(n_fft=256, hop_length=256)
    with pytest.raises(pydantic.ValidationError, match="validation_fraction"):
        ShardConfig(validation_fraction=1.0)
    with pytest.raises(pydantic.ValidationError, match="samples_per_shard"):
        ShardConfig(samples_per_shard=0)
    with pytest.raises(pydantic.ValidationError):
        CONFIG.segment_s = 2.0  # frozen
    assert CONFIG.sha256() == ShardConfig(**CONFIG.model_dump()).sha256()
    assert CONFIG.sha256() != CONFIG.model_copy(update={"n_mels": 16}).sha256()
    assert CONFIG.mel_config().hop_length == 160 and CONFIG.mel_config().sample_rate_hz == 16000


def test_plan_is_pure_and_order_independent(tmp_path):
    tracks = [_track_row(f"p-{i}") for i in range(10)]
    audio = [{"track_id": f"p-{i}", "role": "mixture", "uri": f"/x/p-{i}.wav", "sha256": "", "sample_rate_hz": 44100,
              "num_channels": 1, "num_samples": 44100 * (i + 1)} for i in range(10)]
    plan = plan_shards(tracks, audio, {"lic-1"}, CONFIG)
    reversed_plan = plan_shards(tracks[::-1], audio[::-1], {"lic-1"}, CONFIG)
    assert plan == reversed_plan
    assert sum(plan.shard_sizes.values()) == sum(range(1, 11)) and plan.rejections == []
    duplicated = plan_shards(tracks + tracks[:1], audio, {"lic-1"}, CONFIG)
    assert [r["reason"] for r in duplicated.rejections] == ["duplicate_id"]


# --- ray runtime ----------------------------------------------------------------------------------------------
def test_engine_leaves_a_running_ray_alone(ray_local):
    with Engine(EngineConfig(num_cpus=1)) as engine:
        engine.ray()
        assert ray_local.is_initialized()
    assert ray_local.is_initialized()  # the engine did not start it, so it did not shut it down
    assert ray_local.cluster_resources()["CPU"] == 2
