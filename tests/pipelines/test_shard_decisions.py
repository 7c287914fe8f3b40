"""Shard reads clean's decisions (a dropped stem never reaches a dataset, new decisions give a new dataset id), carries
kept stems as members with ``stems: true``, and rejects silent segments (issue 17, items 3 and 6)."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from cleaning.audio import read_audio, write_audio
from cleaning.synthetic_stems import render_songs
from pipelines.catalog import derive_catalog, latest_catalog
from pipelines.lineage.walk import lineage
from pipelines.stages.clean import CleanConfig, run_clean
from pipelines.stages.shard.config import ShardPlan
from pipelines.stages.shard.stage import ShardConfig, plan_shards, run_shard
from pipelines.stages.shard.write import _ShardFiller
from provenance import records
from provenance.records import RejectionReason
from provenance.store import LineageStore
from provenance.workspace import Workspace
from tests.conftest import sine
from tests.pipelines.shard_support import read_samples, stems_by_track
from tests.pipelines.test_shard import _audio_row, _track_row

SR = 16000
MIX = ShardConfig(segment_s=1.0, sample_rate_hz=SR, n_mels=32, n_fft=512, hop_length=160, validation_fraction=0.0,
                  samples_per_shard=4)
STEMS = MIX.model_copy(update={"stems": True})
SONGS = ("synth-000", "synth-001", "synth-002")
CONTAMINATED = ("synth-001", "other")  # a stem of another song: clean's check_mixture drops it


def _write_catalog(root: Path, tracks: dict[str, dict[str, np.ndarray]]) -> Workspace:
    """A workspace whose curated catalog holds ``tracks``: track id → role → float32 (1, n) audio at SR."""
    workspace = Workspace.at(root / "work").ensure()
    audio_files = []
    for track_id, roles in tracks.items():
        for role, audio in roles.items():
            row = _audio_row(track_id, write_audio(root / "audio" / track_id / f"{role}.wav", audio, SR))
            audio_files.append({**row, "role": role})
    records.write_table(records.to_table([_track_row(t) for t in tracks], records.TRACK),
                        workspace.catalog_table("tracks"))
    records.write_table(records.to_table(audio_files, records.AUDIO_FILE), workspace.catalog_table("audio_files"))
    records.write_table(records.to_table([{"license_id": "lic-1", "ai_training": "allowed"}], records.LICENSE),
                        workspace.catalog_table("licenses"))
    return workspace


def _songs_catalog(root: Path) -> Workspace:
    """Three 3-second songs with four stems each; the mixtures sum the true stems, and synth-001's ``other`` file
    is then replaced by a stem of another song."""
    tracks: dict[str, dict[str, np.ndarray]] = {}
    for item in render_songs(len(SONGS), seed=5, duration_s=3.0):
        tracks.setdefault(item.track_id, {})[item.role] = item.audio
    for roles in tracks.values():
        roles["mixture"] = sum(roles.values())
    tracks[CONTAMINATED[0]][CONTAMINATED[1]] = render_songs(1, seed=7, duration_s=3.0, prefix="x")[2].audio
    return _write_catalog(root, tracks)


@pytest.fixture(scope="module")
def story(ray_local, tmp_path_factory):
    """shard (stems and mixture only) → clean drops the contaminated stem → shard → clean with a permissive rule
    → shard."""
    workspace = _songs_catalog(tmp_path_factory.mktemp("songs"))
    out = {"workspace": workspace, "before": run_shard(workspace, STEMS), "mix_before": run_shard(workspace, MIX)}
    out["mix_manifest"] = (out["mix_before"].dataset_dir / "dataset.json").read_bytes()
    out["clean_drop"] = run_clean(workspace, CleanConfig(methods=[], num_cpus=2))
    out["dropped"] = run_shard(workspace, STEMS)
    out["dropped_again"] = run_shard(workspace, STEMS)
    out["mix_dropped"] = run_shard(workspace, MIX)
    out["clean_keep"] = run_clean(workspace, CleanConfig(methods=[], min_mixture_gain=-1000.0, num_cpus=2))
    out["kept"] = run_shard(workspace, STEMS)
    return out


def test_a_stem_clean_dropped_is_in_no_member_and_no_json(story):
    clean, dropped = story["clean_drop"], story["dropped"]
    assert clean.num_dropped == 1 and clean.dropped_by_reason == {"stem_not_in_mixture": 1}
    assert dropped.dataset_id != story["before"].dataset_id and dropped.status == "ran"
    stems = stems_by_track(dropped.dataset_dir)
    assert stems == {"synth-000": {"bass.flac", "drums.flac", "other.flac", "vocals.flac"},
                     "synth-001": {"bass.flac", "drums.flac", "vocals.flac"},
                     "synth-002": {"bass.flac", "drums.flac", "other.flac", "vocals.flac"}}
    assert stems_by_track(story["before"].dataset_dir)["synth-001"] == stems["synth-000"]
    index = pq.read_table(dropped.dataset_dir / "index.parquet").to_pylist()
    assert not [m for row in index if row["track_id"] == "synth-001" for m in row["members"] if ".other." in m]
    manifest = json.loads((dropped.dataset_dir / "dataset.json").read_text())
    assert manifest["clean_run_id"] == clean.run_id
    assert manifest["catalog_id"] == dropped.stage_result.inputs["catalog"] == clean.outputs["catalog_stem_scores"
                                                                                             ].split("/")[-2]
    assert manifest["stems"]["synth-001"] == ["bass.flac", "drums.flac", "vocals.flac"]
    before = json.loads((story["before"].dataset_dir / "dataset.json").read_text())
    assert before["clean_run_id"] is None and story["before"].stage_result.inputs["decisions"] == "none"


def test_stem_members_are_the_stem_windows_at_the_dataset_rate(story):
    dropped = story["dropped"]
    row = next(r for r in pq.read_table(dropped.dataset_dir / "index.parquet").to_pylist()
               if r["segment_id"] == f"synth-002@{SR}")
    members = read_samples(dropped.dataset_dir)[row["key"]]
    assert row["members"] == sorted(f"{row['key']}.{m}" for m in members)
    audio_files = records.read_table(latest_catalog(story["workspace"]).table("audio_files")).to_pylist()
    uri = next(r["uri"] for r in audio_files if (r["track_id"], r["role"]) == ("synth-002", "drums"))
    expected = read_audio(uri)[0][0, SR:2 * SR]
    audio, rate_hz = sf.read(io.BytesIO(members["drums.flac"]), dtype="float32")
    assert rate_hz == SR and audio.shape == (SR,)
    np.testing.assert_allclose(audio, expected, atol=1.0 / 2**15 + 1e-6)
    assert sf.info(io.BytesIO(members["drums.flac"])).subtype == sf.info(io.BytesIO(members["flac"])).subtype
    sample = json.loads(members["json"])
    assert sample["stems"] == [{"role": role, "instrument": "", "member": f"{role}.flac"}
                               for role in ("bass", "drums", "other", "vocals")]


def test_unchanged_decisions_are_cached_and_keeping_the_stem_brings_it_back(story, ray_local):
    dropped, again, kept = story["dropped"], story["dropped_again"], story["kept"]
    assert again.status == "cached" and again.run_id == dropped.run_id and again.dataset_id == dropped.dataset_id
    assert story["clean_keep"].num_dropped == 0
    assert kept.status == "ran" and kept.dataset_id != dropped.dataset_id
    assert "other.flac" in stems_by_track(kept.dataset_dir)["synth-001"]
    # the same stems kept as before any clean run: the same bytes, the same id
    assert kept.dataset_id == story["before"].dataset_id
    with LineageStore(story["workspace"].store_url) as store:
        keys = {r["run_id"]: r["cache_key"] for r in store.list_runs("shard")}
    assert len(set(keys.values())) == len(keys)  # every shard Run above had new inputs


def test_without_stems_decisions_change_no_dataset(story):
    mix_before, mix_dropped = story["mix_before"], story["mix_dropped"]
    assert mix_dropped.status == "ran"  # the decisions are an input: a new Run ...
    assert mix_dropped.dataset_id == mix_before.dataset_id and mix_dropped.reused  # ... and the same dataset
    assert mix_dropped.stage_result.inputs["decisions"].startswith("decisions-")
    assert all(set(m) == {"flac", "json", "mel.npy"} and "stems" not in json.loads(m["json"])
               for m in read_samples(mix_dropped.dataset_dir).values())


def test_a_dataset_found_again_keeps_its_manifest_and_lineage_lists_every_run(story, monkeypatch):
    """Issue 17: the mixture-only dataset comes again from the catalog version with clean's decisions: the same id,
    dataset.json as the first build wrote it, the second Run reports what it read, and lineage lists both Runs."""
    first, again = story["mix_before"], story["mix_dropped"]
    assert again.dataset_id == first.dataset_id and again.run_id != first.run_id and again.reused
    assert (again.dataset_dir / "dataset.json").read_bytes() == story["mix_manifest"]
    manifest = json.loads(story["mix_manifest"])
    first_catalog, second_catalog = first.stage_result.inputs["catalog"], again.stage_result.inputs["catalog"]
    assert first_catalog != second_catalog and manifest["catalog_id"] == first_catalog
    assert manifest["clean_run_id"] is None
    clean_run = story["clean_drop"].run_id
    assert again.stage_result.details["catalog_id"] == second_catalog
    assert again.stage_result.details["clean_run_id"] == clean_run
    assert first.stage_result.details["catalog_id"] == first_catalog and first.stage_result.details["clean_run_id"] is None

    walked = lineage(story["workspace"], first.dataset_id, kind="dataset")
    assert [(r["run_id"], r["catalog_id"], r["clean_run_id"], r["reused"]) for r in walked["runs"]] == [
        (first.run_id, first_catalog, None, False), (again.run_id, second_catalog, clean_run, True)]
    from tests.pipelines.test_stage import linernotes

    done = linernotes("lineage", first.dataset_id, "--json", workdir=story["workspace"].root)
    assert done.returncode == 0, done.stderr[-2000:]
    assert [r["catalog_id"] for r in json.loads(done.stdout)["runs"]] == [first_catalog, second_catalog]
    monkeypatch.setenv("COLUMNS", "240")  # rich wraps the tree to the terminal's width
    shown = linernotes("lineage", first.dataset_id, workdir=story["workspace"].root)
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert f"built by shard run {first.run_id} from catalog {first_catalog}\n" in shown.stdout
    assert (f"found built by shard run {again.run_id} from catalog {second_catalog}, decisions of clean run "
            f"{clean_run}\n") in shown.stdout


def test_lineage_walks_stem_decision_dataset(story):
    workspace, dropped, kept = story["workspace"], story["dropped"], story["kept"]
    track = lineage(workspace, "synth-001", kind="track")
    decisions = {(s["role"], s["instrument"]): s for s in track["stems"]}
    assert decisions[("other", "")]["decision"] == "keep"  # the latest decisions: the permissive run
    assert decisions[("other", "")]["run_id"] == story["clean_keep"].run_id
    held = {d["dataset_id"]: d.get("stems") for d in track["datasets"]}
    assert held[dropped.dataset_id] == ["bass.flac", "drums.flac", "vocals.flac"]
    assert held[kept.dataset_id] == ["bass.flac", "drums.flac", "other.flac", "vocals.flac"]
    dataset = lineage(workspace, dropped.dataset_id, kind="dataset")
    assert dataset["decisions"]["clean_run_id"] == story["clean_drop"].run_id
    assert dataset["decisions"]["dropped"] == [{"track_id": "synth-001", "role": "other", "instrument": "",
                                                "reason": "stem_not_in_mixture"}]
    from pipelines.cli.lineage import render_lineage
    from rich.console import Console

    console = Console(record=True, width=200)
    console.print(render_lineage(track))
    console.print(render_lineage(dataset))
    text = console.export_text()
    assert f"clean run {story['clean_drop'].run_id}" in text and "dropped other" in text


# --- a dropped mixture, stems required, member names (the plan, no Ray) ----------------------------------------
def _plan_rows(track_ids, roles=("mixture", "vocals", "other")):
    rows = []
    for track_id in track_ids:
        for role in roles:
            rows.append({"track_id": track_id, "role": role, "instrument": "", "uri": f"/x/{track_id}/{role}.wav",
                         "sha256": f"{track_id}-{role}", "sample_rate_hz": SR, "num_channels": 1,
                         "num_samples": 3 * SR})
    return rows


def _decision(track_id, role, decision, instrument=""):
    return {"track_id": track_id, "role": role, "instrument": instrument, "method": "final", "score": 1.0,
            "decision": decision, "reason": "planted" if decision == "drop" else "", "run_id": "clean-planted"}


def test_a_dropped_mixture_and_a_track_without_kept_stems_are_rejections():
    tracks = [_track_row(t) for t in ("a", "b", "c")]
    decisions = [_decision("a", "mixture", "drop"), _decision("b", "vocals", "drop"), _decision("b", "other", "drop"),
                 _decision("c", "vocals", "drop")]
    plan = plan_shards(tracks, _plan_rows(["a", "b", "c"]), {"lic-1"}, STEMS, decisions=decisions)
    reasons = {r["record_id"]: r["reason"] for r in plan.rejections}
    assert reasons == {"a": RejectionReason.MIXTURE_DROPPED, "b": RejectionReason.NO_KEPT_STEMS}
    assert "clean-planted" in next(r["detail"] for r in plan.rejections if r["record_id"] == "a")
    assert [(w["track_id"], [s["member"] for s in w["stems"]]) for w in plan.work] == [("c", ["other.flac"])]
    mixture_only = plan_shards(tracks, _plan_rows(["a", "b", "c"]), {"lic-1"}, MIX, decisions=decisions)
    assert {r["record_id"]: r["reason"] for r in mixture_only.rejections} == {"a": RejectionReason.MIXTURE_DROPPED}
    assert all("stems" not in w for w in mixture_only.work)  # stems: false plans what it planned before
    assert plan_shards(tracks, _plan_rows(["a", "b", "c"]), {"lic-1"}, MIX) == plan_shards(
        tracks, _plan_rows(["a", "b", "c"]), {"lic-1"}, MIX, decisions=[_decision("b", "vocals", "drop")])


def test_several_stems_of_a_role_are_named_by_instrument():
    rows = _plan_rows(["a"], roles=("mixture", "bass"))
    for instrument in ("Distortion Guitar", "Electric Guitar (jazz)", "Distortion Guitar", "", "Distortion Guitar #2"):
        rows.append({**rows[-1], "role": "other", "instrument": instrument, "uri": f"/x/a/{instrument}.wav"})
    plan = plan_shards([_track_row("a")], rows, {"lic-1"}, STEMS)
    members = [(s["role"], s["instrument"], s["member"]) for s in plan.work[0]["stems"]]
    assert members == [("bass", "", "bass.flac"),  # sorted by member
                       ("other", "Distortion Guitar #2", "other.distortion-guitar-2-2.flac"),  # "-2" was taken
                       ("other", "Distortion Guitar", "other.distortion-guitar-2.flac"),
                       ("other", "Distortion Guitar", "other.distortion-guitar.flac"),
                       ("other", "Electric Guitar (jazz)", "other.electric-guitar-jazz.flac"),
                       ("other", "", "other.stem.flac")]
    assert all(m.count(".") == 2 for _r, _i, m in members if _r == "other")


# --- silence ----------------------------------------------------------------------------------------------------
def _quiet(duration_s: float, peak_dbfs: float) -> np.ndarray:
    return sine(330.0, duration_s, SR, amplitude=10 ** (peak_dbfs / 20))


@pytest.fixture(scope="module")
def silent(ray_local, tmp_path_factory):
    tone = sine(220.0, 3.0, SR)
    tracks = {
        "t-tone": {"mixture": tone},
        # a silent stretch: 1 s at -70 dBFS (below the -60 floor), 1 s at -50 dBFS (above it), 1 s of tone
        "t-stretch": {"mixture": np.concatenate([_quiet(1.0, -70.0), _quiet(1.0, -50.0), tone[:, :SR]], axis=1)},
        "t-zeros": {"mixture": np.zeros((1, 3 * SR), np.float32)},  # digital silence throughout
    }
    workspace = _write_catalog(tmp_path_factory.mktemp("silent"), tracks)
    config = MIX.model_copy(update={"samples_per_shard": 2})
    return workspace, run_shard(workspace, config), config


def test_a_silent_stretch_is_a_counted_rejection_never_a_sample(silent):
    workspace, result, config = silent
    index = pq.read_table(result.dataset_dir / "index.parquet").to_pylist()
    assert sorted(r["segment_id"] for r in index) == ["t-stretch@16000", "t-stretch@32000",
                                                       "t-tone@0", "t-tone@16000", "t-tone@32000"]
    segments = {r["record_id"]: r for r in result.rejections if r["record_kind"] == "segment"}
    assert sorted(segments) == ["t-stretch@0", "t-zeros@0", "t-zeros@16000", "t-zeros@32000"]
    assert all(r["reason"] == "silent_segment" and r["run_id"] == result.run_id for r in segments.values())
    assert "-70.0 dBFS" in segments["t-stretch@0"]["detail"]
    tracks = [r for r in result.rejections if r["record_kind"] == "track"]
    assert [(r["record_id"], r["reason"]) for r in tracks] == [("t-zeros", "silent_segment")]
    counts = result.stage_result.counts
    assert counts["segments_planned"] == 9 and counts["segments"] == 5 == result.num_segments
    assert counts["segments_rejected"] == {"silent_segment": 4} and counts["rejected"] == {"silent_segment": 1}
    assert counts["tracks_in"] == 3 == counts["accepted"] + sum(counts["rejected"].values())
    saved = records.read_table(workspace.run_dir(result.run_id) / "rejections.parquet", records.REJECTION)
    assert sorted(saved.column("record_id").to_pylist()) == sorted([*segments, "t-zeros"])
    # the kept segments fill the shards in order, none short but the last
    assert [(r["shard"], r["segment_id"]) for r in index] == [
        ("train-000000.tar", "t-stretch@16000"), ("train-000000.tar", "t-stretch@32000"),
        ("train-000001.tar", "t-tone@0"), ("train-000001.tar", "t-tone@16000"), ("train-000002.tar", "t-tone@32000")]
    for key, members in read_samples(result.dataset_dir).items():
        audio, _ = sf.read(io.BytesIO(members["flac"]), dtype="float32")
        assert 20 * np.log10(np.abs(audio).max()) >= config.silence_floor_dbfs, key
    again = run_shard(workspace, config)
    assert again.status == "cached" and again.rejections == result.rejections


def test_the_floor_is_a_config_key(silent):
    workspace, result, config = silent
    lower = run_shard(workspace, config.model_copy(update={"silence_floor_dbfs": -80.0}))
    assert lower.num_segments == 6 and lower.dataset_id != result.dataset_id
    assert sorted(r["record_id"] for r in lower.rejections if r["record_kind"] == "segment") == [
        "t-zeros@0", "t-zeros@16000", "t-zeros@32000"]
    with pytest.raises(ValueError, match="silence_floor_dbfs"):
        ShardConfig(silence_floor_dbfs=3.0)


def test_shards_fill_in_plan_order_whatever_order_rows_arrive():
    ids = [f"t{i}@0" for i in range(7)]
    work = [{"track_id": i, "segments": [{"segment_id": i, "split": "train"}]} for i in ids]
    plan = ShardPlan(work=work, shard_sizes={}, rejections=[], num_tracks_in=7)
    rejected = {"t2@0", "t5@0"}
    arrival = ids[:]
    random.Random(3).shuffle(arrival)
    filler, placed = _ShardFiller(plan, 2), []
    for segment_id in arrival:
        placed += filler.add({"segment_id": segment_id, "split": "train",
                              "rejection": "silent_segment" if segment_id in rejected else ""})
    assert [(s["segment_id"], s["shard"]) for s in placed] == [
        ("t0@0", "train-000000.tar"), ("t1@0", "train-000000.tar"), ("t3@0", "train-000001.tar"),
        ("t4@0", "train-000001.tar"), ("t6@0", "train-000002.tar")]
    assert filler.num_shards() == 3 and filler.is_full("train-000002.tar", 1)


def test_a_planted_mixture_drop_in_the_catalog_rejects_the_track(story, ray_local, tmp_path):
    workspace = _songs_catalog(tmp_path)
    version = latest_catalog(workspace)  # the plain catalog folder, migrated to a version
    table = records.to_table([_decision("synth-000", "mixture", "drop")], records.STEM_SCORE)
    derive_catalog(workspace, version, {"stem_scores": table}, stage="clean", run_id="clean-planted")
    result = run_shard(workspace, MIX)
    assert [(r["record_id"], r["reason"]) for r in result.rejections] == [("synth-000", "mixture_dropped")]
    assert result.num_tracks == 2
    assert json.loads((result.dataset_dir / "dataset.json").read_text())["clean_run_id"] == "clean-planted"
