"""The ``embedding`` attribution method end to end on a tiny synthetic dataset and catalog.

Four tracks, each a different synthetic instrument in its own register, three 2 s segments each at
16 kHz, in WebDataset tars laid out as the shard stage writes them (three train tracks, one validation).
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from cleaning.audio import AudioDecodeError, encode_flac, read_audio, write_audio
from cleaning.embed import MelStatsEmbedder
from cleaning.measure import measure_pcm_sha256
from cleaning.mel import MelConfig, log_mel
from pipelines.attribution.index import (
    EmbeddingAttributor,
    attribute_audio,
    attribute_file,
    build_embedding_index,
    index_dir,
)
from provenance import records
from provenance.workspace import Workspace
from tests.cleaning.test_embed import instrument_clip

SAMPLE_RATE_HZ = 16000
SEGMENT_SAMPLES = 2 * SAMPLE_RATE_HZ
DATASET_ID = "ds-test-0001"
ALL_SPLITS = ("train", "validation")
MTIME = 1_700_000_000

LICENSES = [
    {"license_id": "cc-by-4.0", "licensor": "various", "license_name": "CC BY 4.0",
     "license_url": "https://creativecommons.org/licenses/by/4.0/", "ai_training": "allowed",
     "commercial_use": True, "attribution_required": True},
    {"license_id": "direct-7", "licensor": "South Music", "license_name": "South Music AI training licence",
     "license_url": "https://south.example/licences/7", "ai_training": "allowed", "commercial_use": True,
     "attribution_required": False},
]
TRACKS = [  # (track_id, instrument, notes, rights_holder, license_id, split)
    ("trk-organ", "organ", [196, 220, 247, 262], "North Label", "cc-by-4.0", "train"),
    ("trk-pluck", "pluck", [147, 165, 175, 196], "North Label", "cc-by-4.0", "train"),
    ("trk-bell", "bell", [523, 587, 659, 698], "South Music", "direct-7", "train"),
    ("trk-snare", "snare", [180, 200], "East Rights", "cc-by-4.0", "validation"),
]


def track_row(track_id: str, rights_holder: str, license_id: str) -> dict:
    title = track_id.removeprefix("trk-").title()
    return {"track_id": track_id, "title": title, "artist": f"{title} Player", "rights_holder": rights_holder,
            "license_id": license_id, "attribution": f"{title} by {title} Player, courtesy of {rights_holder}"}


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), MTIME, 0o644
    tar.addfile(info, io.BytesIO(data))


def write_dataset(workspace: Workspace) -> dict[str, tuple[str, np.ndarray]]:
    """Write the dataset and catalog; returns segment_id → (track_id, decoded segment audio)."""
    folder = workspace.dataset_dir(DATASET_ID)
    folder.mkdir(parents=True)
    mel_config = MelConfig(sample_rate_hz=SAMPLE_RATE_HZ, n_fft=512, hop_length=160)
    samples: dict[str, list[tuple[str, bytes]]] = {"train": [], "validation": []}
    entries, segments = [], {}
    for n, (track_id, instrument, notes, holder, license_id, split) in enumerate(TRACKS):
        rng = np.random.default_rng(100 + n)
        audio = instrument_clip(instrument, list(rng.choice(notes, 12)), seed=200 + n, noise=0.01)
        for i in range(3):
            start = i * SEGMENT_SAMPLES
            segment_id = records.segment_id(track_id, start)
            key = records.sample_key(segment_id)
            piece = audio[:, start:start + SEGMENT_SAMPLES]
            flac = encode_flac(piece, SAMPLE_RATE_HZ)
            mel = io.BytesIO()
            np.save(mel, log_mel(piece, mel_config).astype(np.float16))
            meta = {"segment_id": segment_id, **track_row(track_id, holder, license_id),
                    "text": f"{instrument} solo"}
            members = [(f"{key}.flac", flac), (f"{key}.json", json.dumps(meta).encode()),
                       (f"{key}.mel.npy", mel.getvalue())]
            samples[split].extend(members)
            entries.append({"segment_id": segment_id, "track_id": track_id, "split": split,
                            "start_sample": start, "num_samples": SEGMENT_SAMPLES,
                            "start_s": start / SAMPLE_RATE_HZ, "duration_s": 2.0,
                            "shard": f"{split}-000000.tar", "key": key,
                            "members": sorted(name for name, _ in members), "sha256": records.sha256_hex(flac)})
            segments[segment_id] = (track_id, read_audio(io.BytesIO(flac))[0])
    for split, members in samples.items():
        with tarfile.open(folder / f"{split}-000000.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            for name, data in sorted(members):
                add_member(tar, name, data)
    records.write_table(records.to_table(entries, records.SHARD_ENTRY), folder / "index.parquet")
    (folder / "dataset.json").write_text(json.dumps({
        "dataset_id": DATASET_ID,
        "config": {"sample_rate_hz": SAMPLE_RATE_HZ, "segment_s": 2.0, "mel": mel_config.to_dict()},
        "shards": {split: [f"{split}-000000.tar"] for split in samples}}))
    records.write_table(records.to_table([track_row(t, h, lic) for t, _, _, h, lic, _ in TRACKS], records.TRACK),
                        workspace.catalog_table("tracks"))
    records.write_table(records.to_table(LICENSES, records.LICENSE), workspace.catalog_table("licenses"))
    return segments


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Workspace:
    return Workspace.at(tmp_path_factory.mktemp("ws")).ensure()


@pytest.fixture(scope="module")
def segments(workspace) -> dict[str, tuple[str, np.ndarray]]:
    return write_dataset(workspace)


@pytest.fixture(scope="module")
def attributor_all(workspace, segments) -> EmbeddingAttributor:
    return EmbeddingAttributor.from_workspace(workspace, DATASET_ID, splits=ALL_SPLITS)


def test_every_segment_retrieves_itself_first_and_its_track_on_top(attributor_all, segments):
    assert len(attributor_all.index) == 12
    for segment_id, (track_id, audio) in segments.items():
        result = attributor_all.attribute(audio, SAMPLE_RATE_HZ, query_id=segment_id, top_k=5)
        assert result.segments[0].segment_id == segment_id
        assert result.segments[0].score == pytest.approx(1.0, abs=1e-5)
        assert result.tracks[0].track_id == track_id


def test_quieter_noisy_copy_still_ranks_its_track_first(attributor_all, segments):
    rng = np.random.default_rng(7)
    for segment_id, (track_id, audio) in segments.items():
        query = audio * 10 ** (-6 / 20) + 0.003 * rng.standard_normal(audio.shape).astype(np.float32)
        result = attributor_all.attribute(query, SAMPLE_RATE_HZ, query_id="q", top_k=5)
        assert result.tracks[0].track_id == track_id, segment_id
        assert result.segments[0].track_id == track_id, segment_id


def test_shares_sum_to_one_and_tracks_carry_licence_and_attribution(workspace, segments):
    _, audio = segments["trk-organ@32000"]
    mixture = audio + segments["trk-bell@0"][1]  # credit should go to both the organ and the bell
    result = attribute_audio(workspace, mixture, SAMPLE_RATE_HZ, DATASET_ID, query_id="gen-1", top_k=6)
    assert (result.method, result.query_id, result.dataset_id) == ("embedding", "gen-1", DATASET_ID)
    assert len(result.segments) == 6
    for parts in (result.segments, result.tracks, result.rights_holders):
        assert abs(math.fsum(p.share for p in parts) - 1.0) < 1e-9
    assert [s.rank for s in result.segments] == [1, 2, 3, 4, 5, 6]
    licenses = {row["license_id"]: row for row in LICENSES}
    for track in result.tracks:
        expected = track_row(track.track_id, track.rights_holder, track.license_id)
        assert track.attribution == expected["attribution"]
        assert track.title == expected["title"]
        assert track.license_name == licenses[track.license_id]["license_name"]
        assert track.license_url == licenses[track.license_id]["license_url"]
    holders = {r.rights_holder: r for r in result.rights_holders}
    for holder in holders.values():
        assert holder.share == pytest.approx(sum(t.share for t in result.tracks if t.rights_holder == holder.rights_holder))
    rows = result.rows()
    assert [r["segment_id"] for r in rows] == [s.segment_id for s in result.segments]
    assert all(r["rights_holder"] for r in rows)


def test_default_index_holds_the_train_split_only(workspace, segments):
    result = attribute_audio(workspace, segments["trk-snare@0"][1], SAMPLE_RATE_HZ, DATASET_ID, "q", top_k=20)
    assert len(result.segments) == 9
    assert "trk-snare" not in {s.track_id for s in result.segments}


def test_index_is_cached_and_reused(workspace, segments):
    embedder = MelStatsEmbedder()
    calls = []
    first = build_embedding_index(workspace, DATASET_ID, embedder, progress=lambda m, d, t: calls.append((d, t)),
                                  splits=ALL_SPLITS)
    directory = index_dir(workspace, DATASET_ID, embedder.name, ALL_SPLITS)
    assert directory.parent == workspace.indexes_dir / DATASET_ID
    assert index_dir(workspace, DATASET_ID, embedder.name) == workspace.indexes_dir / DATASET_ID / embedder.name
    stamp = (directory / "vectors.npy").stat().st_mtime_ns
    again = build_embedding_index(workspace, DATASET_ID, embedder, progress=lambda m, d, t: calls.append((d, t)),
                                  splits=ALL_SPLITS)
    assert calls == []  # built by the module fixture; nothing re-embedded
    assert (directory / "vectors.npy").stat().st_mtime_ns == stamp
    assert again.segment_ids == first.segment_ids == sorted(first.segment_ids)
    np.testing.assert_array_equal(again.vectors, first.vectors)

    rebuilt = build_embedding_index(workspace, DATASET_ID, embedder, progress=lambda m, d, t: calls.append((d, t)),
                                    splits=ALL_SPLITS, rebuild=True)
    assert calls[-1] == (12, 12) and len(calls) == 12
    np.testing.assert_array_equal(rebuilt.vectors, first.vectors)  # same bytes from the same inputs


def test_incomplete_cache_is_rebuilt(workspace, segments):
    embedder = MelStatsEmbedder(n_mels=32)
    build_embedding_index(workspace, DATASET_ID, embedder)
    directory = index_dir(workspace, DATASET_ID, embedder.name)
    (directory / "segment_ids.json").unlink()
    calls = []
    index = build_embedding_index(workspace, DATASET_ID, embedder, progress=lambda m, d, t: calls.append(d))
    assert len(calls) == 9 and len(index) == 9 and index.dim == 96
    assert (directory / "segment_ids.json").is_file()


def test_tracks_missing_from_the_catalog_fall_back_to_the_segment_json(attributor_all, segments):
    without_catalog = dataclasses.replace(attributor_all, catalog_tracks={})
    _, audio = segments["trk-bell@64000"]
    expected = attributor_all.attribute(audio, SAMPLE_RATE_HZ, "q", top_k=4)
    fallback = without_catalog.attribute(audio, SAMPLE_RATE_HZ, "q", top_k=4)
    assert fallback == expected
    assert fallback.tracks[0].license_name == "South Music AI training licence"


def test_attribute_file_uses_the_pcm_sha256_as_query_id(workspace, segments, tmp_path):
    _, audio = segments["trk-pluck@32000"]
    path = write_audio(tmp_path / "query.wav", audio, SAMPLE_RATE_HZ)
    result = attribute_file(workspace, path, DATASET_ID, top_k=3)
    assert result.query_id == measure_pcm_sha256(read_audio(path)[0])
    assert result.segments[0].segment_id == "trk-pluck@32000"
    assert len(result.segments) == 3


def test_attribute_file_errors_are_clear(workspace, segments, tmp_path):
    with pytest.raises(FileNotFoundError):
        attribute_file(workspace, tmp_path / "missing.wav", DATASET_ID)
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"not audio at all" * 100)
    with pytest.raises(AudioDecodeError):
        attribute_file(workspace, garbage, DATASET_ID)


def test_unknown_dataset_and_split_raise(workspace, segments):
    with pytest.raises(FileNotFoundError, match="no shard index"):
        build_embedding_index(workspace, "ds-nope", MelStatsEmbedder())
    with pytest.raises(ValueError, match="splits"):
        build_embedding_index(workspace, DATASET_ID, MelStatsEmbedder(), splits=("test",))


def test_corrupt_shard_is_reported(workspace, segments):
    corrupt_id = "ds-corrupt"
    folder = workspace.dataset_dir(corrupt_id)
    shutil.copytree(workspace.dataset_dir(DATASET_ID), folder)
    table = records.read_table(folder / "index.parquet", records.SHARD_ENTRY).to_pylist()
    table[0]["sha256"] = "0" * 64
    records.write_table(records.to_table(table, records.SHARD_ENTRY), folder / "index.parquet")
    with pytest.raises(ValueError, match="sha256"):
        build_embedding_index(workspace, corrupt_id, MelStatsEmbedder(), splits=ALL_SPLITS)
    assert not index_dir(workspace, corrupt_id, MelStatsEmbedder().name, ALL_SPLITS).exists()


def test_fixture_shards_are_decodable_mono_pcm16(workspace, segments):
    with tarfile.open(workspace.dataset_dir(DATASET_ID) / "train-000000.tar") as tar:
        flac = next(m for m in tar.getmembers() if m.name.endswith(".flac"))
        info = sf.info(io.BytesIO(tar.extractfile(flac).read()))
    assert (info.samplerate, info.channels, info.subtype, info.frames) == (SAMPLE_RATE_HZ, 1, "PCM_16", SEGMENT_SAMPLES)
    assert isinstance(workspace.dataset_dir(DATASET_ID), Path)
