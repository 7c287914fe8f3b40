"""Duplicate recordings through the sub-fingerprint index: within a delivery and across the workspace's deliveries.

The recall and precision test plants copies (−6 dB, 32 kHz, Ogg Vorbis, MP3, 1.5 s later, all at once) among
200 music-like 10-second recordings made in code (tests/cleaning/music.py), split over two deliveries, and runs
the driver step and the recording index on them; the ingest tests run the whole stage on two small deliveries.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from threadpoolctl import threadpool_limits

from cleaning.fingerprint import fingerprint
from cleaning.measure import measure_pcm_sha256
from pipelines.stages.ingest.duplicates import link_duplicates, recordings_to_index
from pipelines.stages.ingest.recordings import RecordingIndex
from pipelines.stages.ingest.stage import IngestConfig, run_ingest
from provenance.workspace import Workspace
from tests.cleaning.music import COPY_KINDS, RATE, encode, planted_copy, recording
from tests.pipelines.test_ingest import LICENSES, track, write_csv
from tests.pipelines.test_stage import linernotes

AS_OF = dt.date(2026, 11, 21)
NUM_ORIGINALS = 176
COPIES_PER_KIND = 4  # 24 planted pairs: half within the first delivery, half in the second of a recording of the first


def mixture_row(track_id: str, audio: np.ndarray, sample_rate_hz: int) -> dict:
    """The AUDIO_FILE row of a mixture as the Beam pipeline hands it to the driver."""
    prints = fingerprint(audio, sample_rate_hz).astype("<u4").tobytes()
    return {"track_id": track_id, "role": "mixture", "instrument": "", "sha256": measure_pcm_sha256(audio),
            "_fingerprint": base64.b64encode(prints).decode(), "_record_id": f"{track_id}/mixture"}


@pytest.fixture(scope="module")
def catalog():
    """Two deliveries of rows: ``(first, second, planted)`` with planted {(copy, original): kind}.

    Copies of originals 0–11 are in the first delivery with them (ids ``r…``, after ``o…``: the original is kept);
    copies of originals 12–23 are in the second, whose own originals are 100–175."""
    start = time.perf_counter()
    with threadpool_limits(1):
        originals = {f"o{i:03d}": recording(i) for i in range(NUM_ORIGINALS)}
        first = [mixture_row(t, a, RATE) for t, a in list(originals.items())[:100]]
        second = [mixture_row(t, a, RATE) for t, a in list(originals.items())[100:]]
        planted = {}
        for k, kind in enumerate(COPY_KINDS):
            for r in range(COPIES_PER_KIND):
                i = k * COPIES_PER_KIND + r
                original = f"o{i:03d}"
                copy = f"r{i:03d}-{kind}"  # a re-delivery: after its original by id
                (first if r % 2 == 0 else second).append(mixture_row(copy, *planted_copy(originals[original], kind)))
                planted[(copy, original)] = kind
    print(f"made {len(first) + len(second)} recordings in {time.perf_counter() - start:.1f} s")
    return first, second, planted


def test_recall_and_precision_on_planted_copies(catalog, tmp_path):
    first, second, planted = catalog
    index = RecordingIndex(tmp_path / "recordings")
    start = time.perf_counter()
    tracks = [{"track_id": row["track_id"]} for row in first]
    kept, kept_files, rejections, duplicates = link_duplicates(tracks, first, 0.8, "run-1", delivery_id="first")
    index.put("first", "run-1", recordings_to_index(kept, kept_files))
    tracks = [{"track_id": row["track_id"]} for row in second]
    _, _, rejections_2, duplicates_2 = link_duplicates(tracks, second, 0.8, "run-2", delivery_id="second",
                                                       earlier=index.earlier("second"))
    seconds = time.perf_counter() - start
    found = {(d["track_id"], d["duplicate_of"]): d for d in duplicates + duplicates_2}
    hits = set(found) & set(planted)
    recall, precision = len(hits) / len(planted), len(hits) / max(len(found), 1)
    by_kind = {kind: sum(1 for pair, k in planted.items() if k == kind and pair in hits) for kind in COPY_KINDS}
    print(f"recall {recall:.3f}, precision {precision:.3f} over {len(planted)} planted pairs; found by kind "
          f"{by_kind} (of {COPIES_PER_KIND} each); {seconds:.1f} s for both deliveries")
    assert recall >= 0.95 and precision >= 0.99
    # within the first delivery the original (first by id) is kept; the second links to the first delivery
    kept_ids = {t["track_id"] for t in kept}
    for (copy, original), row in found.items():
        assert row["duplicate_of_delivery_id"] == "first" and row["action"] == "rejected"
        assert copy not in kept_ids and (original in kept_ids)
    # blocks bound memory; they change nothing
    from pipelines.stages.ingest.duplicates import _decode_print, _earlier_matches

    ids = [row["track_id"] for row in sorted(second, key=lambda r: r["track_id"])]
    rows = {row["track_id"]: row for row in second}
    args = (ids, [_decode_print(rows[t]["_fingerprint"]) for t in ids], [rows[t]["sha256"] for t in ids],
            index.earlier("second"), 0.8)
    assert _earlier_matches(*args, query_block=7, verify_block=3) == _earlier_matches(*args)
    details = {r["record_id"]: r["detail"] for r in rejections_2 if r["record_kind"] == "track"}
    assert all("of the earlier delivery first" in detail for detail in details.values())
    assert {r["record_id"] for r in rejections + rejections_2 if r["record_kind"] == "audio_file"} == {
        f"{copy}/mixture" for copy, _ in found}


def test_within_a_delivery_the_index_links_what_the_pairwise_method_linked(catalog):
    """The method before the index (every track against every kept one before it, by id) as the reference: on the
    first delivery (112 recordings, 12 planted copies) the index gives the same duplicate rows."""
    from cleaning.fingerprint import fingerprint_similarity

    first, _, _ = catalog
    rows = {row["track_id"]: row for row in first}
    prints = {t: np.frombuffer(base64.b64decode(row["_fingerprint"]), dtype="<u4") for t, row in rows.items()}
    kept, expected = [], {}
    for track_id in sorted(rows):
        for earlier in kept:
            if rows[earlier]["sha256"] == rows[track_id]["sha256"]:
                expected[track_id] = (earlier, "exact")
                break
            if fingerprint_similarity(prints[earlier], prints[track_id]) >= 0.8:
                expected[track_id] = (earlier, "near")
                break
        else:
            kept.append(track_id)
    _, _, _, duplicates = link_duplicates([{"track_id": t} for t in rows], first, 0.8, "run-1", delivery_id="first")
    assert {d["track_id"]: (d["duplicate_of"], d["kind"]) for d in duplicates} == expected
    assert len(expected) == len(first) - 100


def test_same_track_again_is_not_a_duplicate_and_replace_keeps_one_copy(tmp_path):
    """A track id delivered again (a corrected delivery) is that track, not a duplicate of it; with ``replace`` the
    first copy (by id) of an earlier recording is accepted and a second copy in the same delivery is rejected as a
    duplicate of the first."""
    a, b = recording(2001, duration_s=6.0), recording(2002, duration_s=6.0)
    index = RecordingIndex(tmp_path / "recordings")
    index.put("old", "run-0", recordings_to_index([{"track_id": "a"}, {"track_id": "b"}],
                                                  [mixture_row("a", a, RATE), mixture_row("b", b, RATE)]))
    rows = [mixture_row("a", a, RATE), mixture_row("x", b, RATE), mixture_row("y", *planted_copy(b, "ogg"))]
    tracks = [{"track_id": row["track_id"]} for row in rows]
    kept, _, rejections, duplicates = link_duplicates(tracks, rows, 0.8, "run-1", delivery_id="new",
                                                      earlier=index.earlier("new"))
    assert [t["track_id"] for t in kept] == ["a"]
    assert [(d["track_id"], d["duplicate_of"], d["duplicate_of_delivery_id"], d["kind"]) for d in duplicates] == [
        ("x", "b", "old", "exact"), ("y", "b", "old", "near")]
    kept, _, rejections, duplicates = link_duplicates(tracks, rows, 0.8, "run-1", delivery_id="new",
                                                      earlier=index.earlier("new"), on_duplicate="replace")
    assert [t["track_id"] for t in kept] == ["a", "x"]
    assert [(d["track_id"], d["duplicate_of"], d["duplicate_of_delivery_id"], d["action"]) for d in duplicates] == [
        ("x", "b", "old", "replaced"), ("y", "x", "new", "rejected")]
    assert [r["record_id"] for r in rejections if r["record_kind"] == "track"] == ["y"]
    with pytest.raises(ValueError, match="on_duplicate"):
        link_duplicates(tracks, rows, 0.8, "run-1", on_duplicate="keep")


def test_many_copies_in_one_delivery_all_link_to_the_first_by_id():
    """Each later copy has its earlier (rejected) copies among its best candidates; it is still linked to the one
    kept track, the first by id, as the pairwise method did."""
    a, b = recording(3001, duration_s=6.0), recording(3002, duration_s=6.0)
    copies = [(a, RATE), (a, RATE)] + [planted_copy(a, kind) for kind in ("gain", "resample_32k", "shift", "gain")]
    rows = [mixture_row("a", a, RATE), mixture_row("b", b, RATE)] + [
        mixture_row(f"copy{k}", audio, rate) for k, (audio, rate) in enumerate(copies)]
    kept, _, _, duplicates = link_duplicates([{"track_id": r["track_id"]} for r in rows], rows, 0.8, "run-1",
                                             delivery_id="d")
    assert [t["track_id"] for t in kept] == ["a", "b"]
    assert {d["track_id"]: d["duplicate_of"] for d in duplicates} == {f"copy{k}": "a" for k in range(6)}
    assert [d["kind"] for d in duplicates] == ["exact", "exact", "near", "near", "near", "near"]  # copy5 = copy2's PCM


# the whole stage on two deliveries ---------------------------------------------------------------------------------

def _write_delivery(root, recordings: dict[str, tuple[np.ndarray, int, str, str]]):
    """``recordings``: track id → (audio, rate, file extension, licence)."""
    (root / "audio").mkdir(parents=True)
    tracks, files = [], []
    for track_id, (audio, rate, extension, license_id) in recordings.items():
        path = root / "audio" / f"{track_id}.{extension}"
        if extension == "ogg":
            path.write_bytes(encode(audio, rate, "ogg"))
        else:
            sf.write(path, audio.T, rate, subtype="PCM_16")
        tracks.append(track(track_id, license_id))
        files.append({"track_id": track_id, "role": "mixture", "instrument": "", "path": f"audio/{path.name}"})
    write_csv(root / "licenses.csv", LICENSES[:2], list(LICENSES[0]))
    write_csv(root / "tracks.csv", tracks, list(tracks[0]))
    write_csv(root / "files.csv", files, ["track_id", "role", "instrument", "path"])
    return root


@pytest.fixture(scope="module")
def deliveries(tmp_path_factory):
    """The label's 2025 delivery (``a``, ``b`` commercial; ``n`` licensed for non-commercial training only) and its
    2026 one: ``a-remaster``, a copy of ``a`` at −6 dB, resampled to 32 kHz, 1.5 s later, in Ogg Vorbis;
    ``n-reissue``, ``n`` at −6 dB under a commercial licence; and a new recording ``c``."""
    root = tmp_path_factory.mktemp("label")
    a, b, n, c = (recording(seed, duration_s=8.0) for seed in (1001, 1002, 1003, 1004))
    first = _write_delivery(root / "label-2025", {"a": (a, RATE, "flac", "L-open"), "b": (b, RATE, "flac", "L-open"),
                                                  "n": (n, RATE, "flac", "L-nc")})
    remaster, rate = planted_copy(a, "all")
    second = _write_delivery(root / "label-2026", {"a-remaster": (remaster, rate, "ogg", "L-open"),
                                                   "n-reissue": (*planted_copy(n, "gain"), "flac", "L-open"),
                                                   "c": (c, RATE, "flac", "L-open")})
    return first, second


def _table(result, name):
    return pq.read_table(result.outputs[name]).to_pylist()


def test_a_copy_of_an_earlier_deliverys_recording_is_linked_and_rejected(deliveries, tmp_path):
    from pipelines.engines import Engine
    from pipelines.stage import plan_stage
    from pipelines.stages.ingest.stage import INGEST_STAGE
    from provenance.store import LineageStore

    first, second = deliveries
    workspace = Workspace.at(tmp_path / "w")
    commercial = IngestConfig(as_of=AS_OF)
    one = run_ingest(first, workspace, commercial)
    assert sorted(t["track_id"] for t in _table(one, "tracks")) == ["a", "b"]  # n: not for commercial training
    assert one.to_json()["inputs"]["recordings"] == "rec-none"

    two = run_ingest(second, workspace, commercial)
    track_rejections = {r["record_id"]: r for r in _table(two, "rejections") if r["record_kind"] == "track"}
    assert set(track_rejections) == {"a-remaster"}
    rejected = track_rejections["a-remaster"]
    assert rejected["reason"] == "duplicate_recording"
    assert "duplicate of track a of the earlier delivery " + one.delivery_id in rejected["detail"]
    [link] = _table(two, "duplicates")
    assert (link["track_id"], link["duplicate_of"], link["duplicate_of_delivery_id"], link["action"]) == (
        "a-remaster", "a", one.delivery_id, "rejected")
    assert link["kind"] == "near" and 0.8 <= link["similarity"] < 1.0
    assert sorted(t["track_id"] for t in _table(two, "tracks")) == ["c", "n-reissue"]  # n was not accepted before
    assert two.counts["recording_index"] == {"earlier_deliveries": 1, "earlier_recordings": 2,
                                             "duplicates_of_earlier": {"rejected": 1}}
    file_rejections = [(r["record_id"], r["reason"]) for r in _table(two, "rejections") if r["record_kind"] == "audio_file"]
    assert file_rejections == [("a-remaster/mixture/:audio/a-remaster.ogg", "track_rejected")]

    # the first delivery, run for non-commercial training, also accepts n: that is the non-commercial index, a
    # commercial run never rejects a recording as a copy of one only a non-commercial catalog holds
    non_commercial = IngestConfig(as_of=AS_OF, purpose="non-commercial")
    run_ingest(first, workspace, non_commercial)
    with LineageStore(workspace.store_url) as store, Engine() as engine:
        plan_second = plan_stage(INGEST_STAGE, workspace, commercial, store=store, engine=engine,
                                 select={"delivery": str(second)})
        plan_first = plan_stage(INGEST_STAGE, workspace, commercial, store=store, engine=engine,
                                select={"delivery": str(first)})
    was = two.to_json()["inputs"]
    assert plan_second.status == "cached" and plan_second.inputs == was  # the commercial index did not change
    assert plan_first.status == "cached"  # nor was the first delivery's commercial segment replaced
    assert plan_first.inputs["recordings"] == "rec-none"  # a later delivery is never an input of an earlier one

    # for non-commercial training, n-reissue is a copy of n, which the first delivery's non-commercial run accepted
    again = run_ingest(second, workspace, non_commercial)
    assert again.status == "ran" and again.to_json()["inputs"]["recordings"] != was["recordings"]
    assert sorted(t["track_id"] for t in _table(again, "tracks")) == ["c"]
    links = {d["track_id"]: (d["duplicate_of"], d["duplicate_of_delivery_id"]) for d in _table(again, "duplicates")}
    assert links == {"a-remaster": ("a", one.delivery_id), "n-reissue": ("n", one.delivery_id)}
    # one index per purpose and territory; each delivery's segment holds what its latest run for it accepted
    indexes = {path.name: [(s.delivery_id, s.info["recordings"]) for s in RecordingIndex(path).segments()]
               for path in sorted(workspace.recordings_dir.iterdir())}
    assert indexes == {"commercial-Worldwide": [(one.delivery_id, 2), (two.delivery_id, 2)],
                       "non-commercial-Worldwide": [(one.delivery_id, 3), (two.delivery_id, 1)]}
    # runs for the two purposes on one workspace keep each other's cache
    assert run_ingest(first, workspace, commercial).status == "cached"
    assert run_ingest(second, workspace, non_commercial).status == "cached"


def test_on_duplicate_replace_accepts_the_copy_and_links_it(deliveries, tmp_path):
    """As a user runs it: ``linernotes ingest DELIVERY --set on_duplicate=replace``; a bad value is a one-line error."""
    first, second = deliveries
    workdir = tmp_path / "w"
    one = run_ingest(first, Workspace.at(workdir), IngestConfig(as_of=AS_OF))
    done = linernotes("ingest", str(second), "--as-of", AS_OF.isoformat(), "--set", "on_duplicate=replace", "--json",
                      workdir=workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    payload = json.loads(done.stdout.strip().splitlines()[-1])
    tracks = pq.read_table(payload["outputs"]["tracks"]).to_pylist()
    assert sorted(t["track_id"] for t in tracks) == ["a-remaster", "c", "n-reissue"]
    [link] = pq.read_table(payload["outputs"]["duplicates"]).to_pylist()
    assert (link["track_id"], link["duplicate_of"], link["duplicate_of_delivery_id"], link["action"]) == (
        "a-remaster", "a", one.delivery_id, "replaced")
    assert payload["counts"]["recording_index"]["duplicates_of_earlier"] == {"replaced": 1}
    bad = linernotes("ingest", str(second), "--set", "on_duplicate=keep", workdir=workdir)
    assert bad.returncode != 0
    message = bad.stderr.strip().splitlines()
    assert len(message) == 1 and "on_duplicate" in message[0] and "'reject' or 'replace'" in message[0]


def test_batched_linking_and_a_streamed_segment_give_what_one_batch_gives(catalog, tmp_path, monkeypatch):
    """Memory that does not grow with the delivery: the driver links a few tracks at a time (the earlier batches'
    postings spilled to disk) and the recording index writes a segment a few tracks and one key range at a time.
    Batches of about 5 tracks give the same duplicates, rejections and kept rows as one batch, and the segment's
    files hold the same rows as one written in one piece, with fingerprints read from files."""
    import pipelines.stages.ingest.recordings as recordings_module
    from pipelines.stages.ingest.steps import write_fingerprint

    first, second, _ = catalog
    rows = [dict(row) for row in first]
    for row in rows:  # as ingest hands them over: the fingerprint in a file, the row naming it
        prints = np.frombuffer(base64.b64decode(row.pop("_fingerprint")), dtype="<u4")
        row["_fingerprint_file"] = str(write_fingerprint(tmp_path / "prints", row["sha256"], RATE, prints))
    tracks = [{"track_id": row["track_id"]} for row in rows]
    whole = link_duplicates(tracks, rows, 0.8, "run-1", delivery_id="first")
    frames = int(np.median([Path(row["_fingerprint_file"]).stat().st_size // 4 for row in rows]))
    spill = tmp_path / "spill"
    batched = link_duplicates(tracks, rows, 0.8, "run-1", delivery_id="first", spill_dir=spill,
                              batch_frames=5 * frames)
    assert len(list(spill.glob("batch-*-keys.npy"))) >= len(rows) // 6  # it did spill, in many batches
    assert batched == whole
    assert any(d["kind"] == "near" for d in whole[3])  # the case batching could break: candidates across batches

    recordings = recordings_to_index(whole[0], whole[1])
    assert all(isinstance(rec.fingerprint, str) for rec in recordings)  # paths: read only when written
    one = RecordingIndex(tmp_path / "one").put("first", "run-1", recordings)
    monkeypatch.setattr(recordings_module, "BATCH_FRAMES", 7 * frames)  # ~15 batches, 16 key ranges
    streamed = RecordingIndex(tmp_path / "streamed").put("first", "run-1", recordings)
    assert streamed.content_id == one.content_id and streamed.info["num_postings"] == one.info["num_postings"]
    for path in ("tracks_path", "postings_path"):
        assert pq.read_table(getattr(streamed, path)).equals(pq.read_table(getattr(one, path)))
    assert pq.ParquetFile(streamed.postings_path).num_row_groups > pq.ParquetFile(one.postings_path).num_row_groups
    # and a delivery of the second's rows meets the first through either the same way
    later = [{"track_id": row["track_id"]} for row in second]
    assert (link_duplicates(later, second, 0.8, "run-2", delivery_id="second", earlier=[streamed])
            == link_duplicates(later, second, 0.8, "run-2", delivery_id="second", earlier=[one]))


def test_a_measured_mixture_keeps_its_fingerprint_in_a_file_and_a_lost_file_is_measured_again(tmp_path):
    """The rows Beam moves carry the fingerprint's path (content-addressed by decoded-PCM sha256 and rate), not the
    fingerprint; the measurement cache is used only while that file is there."""
    from pipelines.stages.ingest.steps import fingerprint_file, load_fingerprint, measure_file

    audio = recording(5, 3.0)
    path = tmp_path / "mix.flac"
    sf.write(path, audio.T, RATE, subtype="PCM_16")
    task = {"record_id": "t1/mixture", "role": "mixture", "instrument": "", "path": str(path)}
    cache, prints = tmp_path / "cache", tmp_path / "prints"
    status, row = measure_file("t1", task, "run-1", cache, prints)
    assert status == "accepted" and not row["_cached"] and "_fingerprint" not in row
    stored = Path(row["_fingerprint_file"])
    assert stored == fingerprint_file(prints, row["sha256"], RATE) and stored.is_file()
    decoded, _ = sf.read(path, dtype="float32", always_2d=True)
    np.testing.assert_array_equal(load_fingerprint(row), fingerprint(decoded.T, RATE))
    assert measure_file("t1", task, "run-2", cache, prints)[1]["_cached"]
    stored.unlink()
    again = measure_file("t1", task, "run-3", cache, prints)[1]
    assert not again["_cached"] and stored.is_file()
    assert {k: v for k, v in again.items() if k not in ("_cached", "run_id")} == \
        {k: v for k, v in row.items() if k not in ("_cached", "run_id")}
