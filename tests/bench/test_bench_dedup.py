"""Near-duplicate search at catalog scale (issue: ingest at a label's catalog scale): the sub-fingerprint index
against the pairwise method it replaced, per track, in the same run.

A synthetic catalog made in code (tests/cleaning/music.py): ``NUM_TRACKS`` 10-second music-like recordings, 5% of
them planted copies of others (−6 dB, 32 kHz, Ogg Vorbis, MP3, 1.5 s later, all at once), split into two
deliveries. ``index`` is what ingest's driver now does (``pipelines.stages.ingest.duplicates.link_duplicates``):
the first delivery against itself, its recordings added to the recording index on disk, then the second delivery
against itself and against the index. ``pairwise`` is the method before it: every track scored with
``fingerprint_similarity`` against every kept track before it (an exact hash check first). Pairwise on the whole
catalog would take hours, so it runs on a ``PAIRWISE_SAMPLE``-track subsample and is extrapolated by its
measured cost per comparison (``(n − 1) / 2`` comparisons per track on average); the subsample run checks the
extrapolation. CPU seconds (the machine may be shared), wall seconds beside them.

``LINERNOTES_BENCH_DEDUP_TRACKS`` sets the catalog size (default 1,000).
"""

from __future__ import annotations

import base64
import concurrent.futures as cf
import os
import time

import numpy as np
import pytest

pytestmark = pytest.mark.bench

NUM_TRACKS = int(os.environ.get("LINERNOTES_BENCH_DEDUP_TRACKS", "1000"))
PLANTED_FRACTION = 0.05
PAIRWISE_SAMPLE = 120
THRESHOLD = 0.8


def _make(task: tuple[str, int, str | None]) -> dict:
    """One mixture row as the Beam pipeline hands it to the driver: (track id, seed, copy kind or None)."""
    from threadpoolctl import threadpool_limits

    from cleaning.fingerprint import fingerprint
    from cleaning.measure import measure_pcm_sha256
    from tests.cleaning.music import RATE, planted_copy, recording

    track_id, seed, kind = task
    with threadpool_limits(1):
        audio, rate = recording(seed), RATE
        if kind is not None:
            audio, rate = planted_copy(audio, kind)
        prints = fingerprint(audio, rate).astype("<u4").tobytes()
        return {"track_id": track_id, "role": "mixture", "instrument": "", "sha256": measure_pcm_sha256(audio),
                "_fingerprint": base64.b64encode(prints).decode(), "_record_id": f"{track_id}/mixture"}


def _catalog(num_tracks: int) -> tuple[list[dict], dict[tuple[str, str], str]]:
    """Rows of ``num_tracks`` mixtures and the planted pairs {(copy, original): kind}; copies of originals from the
    whole catalog, so that about half of them meet their original in the other delivery."""
    from tests.cleaning.music import COPY_KINDS

    num_copies = int(round(PLANTED_FRACTION * num_tracks))
    num_originals = num_tracks - num_copies
    rng = np.random.default_rng(3)
    sources = rng.choice(num_originals, num_copies, replace=False)
    tasks = [(f"t{i:05d}", i, None) for i in range(num_originals)]
    planted = {}
    for k, source in enumerate(sources):
        kind = COPY_KINDS[k % len(COPY_KINDS)]
        copy_id = f"t{int(rng.integers(num_originals)):05d}-copy{k}"  # lands beside a random original by id
        tasks.append((copy_id, int(source), kind))
        planted[(copy_id, f"t{int(source):05d}")] = kind
    with cf.ProcessPoolExecutor(max_workers=2) as pool:
        rows = list(pool.map(_make, tasks, chunksize=8))
    return rows, planted


def _pairwise_link(rows: list[dict]) -> tuple[dict[str, str], int]:
    """The method before the index: each track, in id order, against every kept one before it. Returns
    ({duplicate: original}, comparisons)."""
    from cleaning.fingerprint import fingerprint_similarity

    prints = {r["track_id"]: np.frombuffer(base64.b64decode(r["_fingerprint"]), dtype="<u4") for r in rows}
    hashes = {r["track_id"]: r["sha256"] for r in rows}
    kept: list[str] = []
    found: dict[str, str] = {}
    comparisons = 0
    for track_id in sorted(prints):
        for earlier in kept:
            comparisons += 1
            if hashes[earlier] == hashes[track_id] or \
                    fingerprint_similarity(prints[earlier], prints[track_id]) >= THRESHOLD:
                found[track_id] = earlier
                break
        else:
            kept.append(track_id)
    return found, comparisons


def test_index_against_pairwise(tmp_path):
    from threadpoolctl import threadpool_limits

    import cleaning.fingerprint  # noqa: F401  (imported before timing: ingest's driver has it loaded already)
    from pipelines.stages.ingest.duplicates import link_duplicates, recordings_to_index
    from pipelines.stages.ingest.recordings import RecordingIndex
    from tests.cleaning.music import COPY_KINDS

    start = time.perf_counter()
    rows, planted = _catalog(NUM_TRACKS)
    made_s = time.perf_counter() - start
    rows.sort(key=lambda r: r["track_id"])
    n, half = len(rows), len(rows) // 2
    deliveries = {"first": rows[:half], "second": rows[half:]}
    index = RecordingIndex(tmp_path / "recordings")
    found: dict[frozenset[str], dict] = {}
    per_track_cpu: dict[str, float] = {}
    with threadpool_limits(1):
        warm = RecordingIndex(tmp_path / "warm-up")  # first calls (FFT plans, Parquet) outside the timing
        for delivery_id, delivery in {"a": rows[:10], "b": rows[10:20]}.items():
            kept, kept_files, _, _ = link_duplicates([{"track_id": r["track_id"]} for r in delivery], delivery,
                                                     THRESHOLD, "warm", delivery_id=delivery_id,
                                                     earlier=warm.earlier(delivery_id))
            warm.put(delivery_id, "warm", recordings_to_index(kept, kept_files))
        cpu, wall = time.process_time(), time.perf_counter()
        for delivery_id, delivery in deliveries.items():
            delivery_cpu = time.process_time()
            tracks = [{"track_id": r["track_id"]} for r in delivery]
            kept, kept_files, _, duplicates = link_duplicates(tracks, delivery, THRESHOLD, "bench",
                                                              delivery_id=delivery_id,
                                                              earlier=index.earlier(delivery_id))
            index.put(delivery_id, "bench", recordings_to_index(kept, kept_files))
            # a pair either way round: a copy that sorts (or was delivered) first is kept, its original linked to it
            found.update({frozenset((d["track_id"], d["duplicate_of"])): d for d in duplicates})
            per_track_cpu[delivery_id] = (time.process_time() - delivery_cpu) / len(delivery)
        index_cpu, index_wall = time.process_time() - cpu, time.perf_counter() - wall

        copies = {copy for copy, _ in planted}
        sample = [r for r in rows if r["track_id"] not in copies][:PAIRWISE_SAMPLE]
        pairwise_cpu = {}
        for size in (len(sample) // 2, len(sample)):  # the smaller one first also warms the FFT plans
            cpu, wall = time.process_time(), time.perf_counter()
            _, comparisons = _pairwise_link(sample[:size])
            pairwise_cpu[size] = (time.process_time() - cpu, time.perf_counter() - wall, comparisons)
    sample_cpu, sample_wall, comparisons = pairwise_cpu[len(sample)]
    per_comparison_cpu, per_comparison_wall = sample_cpu / comparisons, sample_wall / comparisons
    pairwise_per_track_cpu = (n - 1) / 2 * per_comparison_cpu  # no duplicates: every kept track is compared
    pairwise_per_track_wall = (n - 1) / 2 * per_comparison_wall
    index_per_track_cpu, index_per_track_wall = index_cpu / n, index_wall / n
    planted_pairs = {frozenset(pair): kind for pair, kind in planted.items()}
    hits = set(found) & set(planted_pairs)
    recall, precision = len(hits) / len(planted), len(hits) / max(len(found), 1)
    by_kind = {kind: f"{sum(1 for p, k in planted_pairs.items() if k == kind and p in hits)}/"
                     f"{sum(1 for k in planted.values() if k == kind)}" for kind in COPY_KINDS}
    segments = index.segments()
    disk_bytes = sum(p.stat().st_size for s in segments for p in s.root.iterdir())
    postings = sum(int(s.info["num_postings"]) for s in segments)

    print(f"\n{n} × 10 s tracks ({len(planted)} planted copies), two deliveries; made in {made_s:.0f} s")
    print(f"{'method':<44}{'CPU ms/track':>14}{'wall ms/track':>15}{'÷ index':>10}")
    print(f"{'index (both deliveries, index written)':<44}{index_per_track_cpu * 1e3:>14.2f}"
          f"{index_per_track_wall * 1e3:>15.2f}{1.0:>10.1f}")
    print(f"{'pairwise, extrapolated to ' + str(n) + ' tracks':<44}{pairwise_per_track_cpu * 1e3:>14.1f}"
          f"{pairwise_per_track_wall * 1e3:>15.1f}{pairwise_per_track_cpu / index_per_track_cpu:>10.1f}")
    print(f"index per delivery, CPU ms per track: the first ({half} tracks, against itself) "
          f"{per_track_cpu['first'] * 1e3:.2f}, the second ({n - half}, against itself and the first's index on "
          f"disk) {per_track_cpu['second'] * 1e3:.2f}")
    print("pairwise measured, CPU ms per track: " + ", ".join(
        f"{size} tracks {cpu_s / size * 1e3:.1f} ({count} comparisons)" for size, (cpu_s, _, count)
        in pairwise_cpu.items()) + f"; {per_comparison_cpu * 1e3:.2f} ms a comparison, extrapolated linearly")
    print(f"index: recall {recall:.3f}, precision {precision:.3f} ({len(hits)} of {len(planted)} planted pairs, "
          f"{len(found) - len(hits)} other pairs); by kind {by_kind}")
    print(f"index on disk: {disk_bytes / n / 1024:.1f} KiB per track ({postings} postings, "
          f"{disk_bytes / max(postings, 1):.1f} bytes each with the fingerprints)")
    assert recall >= 0.95 and precision >= 0.99
