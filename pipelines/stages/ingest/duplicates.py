"""Duplicate recordings, within a delivery and across the workspace's earlier deliveries: the last step of ingest, on
the driver, after the Beam pipeline has measured and fingerprinted every mixture.

Exact duplicates share the sha256 of their decoded PCM; near duplicates (another gain, sample rate, encoding or
start) have a fingerprint similarity ≥ the threshold (``cleaning.fingerprint.fingerprint_similarity``). Candidates
come from the sub-fingerprint index (``cleaning.fingerprint_index``): the delivery's own postings, built a batch of
tracks at a time (the earlier batches' spilled to disk), and each earlier delivery's segment of the recording index
(``pipelines.stages.ingest.recordings``), read a row group at a time. Only candidates are scored, so the cost per track does not grow with the catalog.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipelines.stages.ingest.delivery import INGEST as STAGE
from pipelines.stages.ingest.recordings import Recording, Segment, batches_by_size
from pipelines.stages.ingest.steps import load_fingerprint
from provenance.records import RejectionReason, Role, rejection

if TYPE_CHECKING:
    from cleaning.fingerprint_index import Postings

QUERY_CHUNK_POSTINGS = 262_144
"""Query postings matched at once (whole recordings): bounds the matched pairs, ~100 bytes each while voted."""

BATCH_FRAMES = 1_000_000
"""Sub-fingerprints (11.6 ms frames) of the mixtures ``link_duplicates`` holds at once: 16 bytes each with their
postings, ≈ 16 MB, about 3.2 hours of audio (1,160 ten-second tracks, 39 five-minute ones). A longer mixture is a
batch of its own."""


@dataclass(frozen=True)
class _Match:
    duplicate_of: str
    kind: str  # exact | near
    similarity: float
    delivery_id: str
    sequence: int = 0  # the earlier delivery's place in the recording index (0: this delivery)


def link_duplicates(tracks: list[dict[str, Any]], audio_files: list[dict[str, Any]], threshold: float, run_id: str,
                    *, delivery_id: str = "", earlier: Sequence[Segment] = (), on_duplicate: str = "reject",
                    spill_dir: Path | None = None, batch_frames: int = BATCH_FRAMES
                    ) -> tuple[list[dict], list[dict], list[dict], list[dict]]:
    """Find tracks whose mixture duplicates another's: the same decoded PCM (``exact``) or a fingerprint
    similarity ≥ ``threshold`` (``near``).

    Tracks are taken in id order. Within the delivery, a track that duplicates an earlier-by-id track still kept
    is rejected ``duplicate_recording``, naming the first such track by id among those of the same PCM and the
    ``MAX_CANDIDATES`` kept ones the index ranks first. Otherwise it is
    compared with the recordings of ``earlier`` deliveries: an exact match first, else the candidate with the
    highest similarity (ties: the latest delivery), never one of the same track id (that track delivered again);
    with ``on_duplicate`` ``reject`` it is rejected naming that track and its delivery, with ``replace`` it is kept
    and only linked. A rejected track's delivered files are rejected ``track_rejected``, and a
    ``records.DUPLICATE`` row says which track (of which delivery) it duplicates and what was done.

    Memory does not grow with the delivery's audio: the tracks are taken in batches of about ``batch_frames``
    sub-fingerprints, their fingerprints read (``steps.load_fingerprint``) and their postings built for that batch
    only; each batch queries its own postings and those of the batches before it, which are spilled to ``spill_dir`` (memory-mapped ``.npy``
    files; kept in memory without one) and read back one batch at a time. Sub-fingerprints with more than
    ``MAX_POSTINGS`` postings in one batch are stop words.

    Args:
        tracks: accepted tracks, rows with at least ``track_id`` (TRACK rows, or the small rows ingest keeps,
            ``pipelines.stages.ingest.tables``); audio_files: their files, rows with at least ``track_id``, ``role``
            and ``sha256``, mixtures with ``_fingerprint_file`` (or ``_fingerprint``, base64 of little-endian uint32
            sub-fingerprints), delivered files with ``_record_id``.
        threshold: smallest fingerprint similarity of a near duplicate.
        delivery_id: this delivery's id (in the duplicate rows of within-delivery duplicates).
        earlier: the recording index's segments of the deliveries before this one.
        on_duplicate: ``reject`` or ``replace`` (duplicates of earlier deliveries only).
        spill_dir: an empty folder for the earlier batches' postings (removed by the caller).
        batch_frames: sub-fingerprints per batch (≥ 1; ``BATCH_FRAMES``).

    Returns:
        (kept tracks, kept audio files, new rejections, duplicate rows).

    Raises:
        ValueError: ``on_duplicate`` is neither ``reject`` nor ``replace``, or ``batch_frames`` < 1.
        FileNotFoundError: a mixture's fingerprint file is gone.
    """
    from cleaning.fingerprint import fingerprint_similarity
    from cleaning.fingerprint_index import MAX_CANDIDATES, build_postings

    if on_duplicate not in ("reject", "replace"):
        raise ValueError(f"on_duplicate must be 'reject' or 'replace', got {on_duplicate!r}")
    if batch_frames < 1:
        raise ValueError(f"batch_frames must be ≥ 1, got {batch_frames}")
    mixtures = {row["track_id"]: row for row in audio_files if row["role"] == Role.MIXTURE}
    ids = sorted(mixtures)
    hashes = [mixtures[t]["sha256"] for t in ids]
    by_hash: dict[str, list[int]] = {}
    for j, sha in enumerate(hashes):
        by_hash.setdefault(sha, []).append(j)
    kept: set[int] = set()
    duplicates: list[dict[str, Any]] = []
    spilled: list[_Spilled] = []  # the postings of the batches before, track numbers global (j)
    batches = batches_by_size([_num_frames(mixtures[t]) for t in ids], batch_frames)
    for number, block in enumerate(batches):
        first = block[0]
        prints = {j: load_fingerprint(mixtures[ids[j]]) for j in block}
        postings = _renumbered(build_postings([prints[j] for j in block]), first)
        within = _within_candidates(postings, spilled)
        across = _earlier_matches([ids[j] for j in block], [prints[j] for j in block], [hashes[j] for j in block],
                                  earlier, threshold)
        for j in block:
            match = None
            same_pcm = {i for i in by_hash[hashes[j]] if i < j} & kept
            near = [i for i in within.get(j, []) if i in kept][:MAX_CANDIDATES]  # the most votes first
            for i in sorted(same_pcm | set(near)):  # the first kept track by id that it duplicates
                if hashes[i] == hashes[j]:
                    match = _Match(ids[i], "exact", 1.0, delivery_id)
                    break
                candidate = prints[i] if i in prints else load_fingerprint(mixtures[ids[i]])
                similarity = fingerprint_similarity(candidate, prints[j])
                if similarity >= threshold:
                    match = _Match(ids[i], "near", similarity, delivery_id)
                    break
            action = "rejected"
            if match is None:
                match = across.get(j - first)
                action = "replaced" if match is not None and on_duplicate == "replace" else action
            if match is None or action == "replaced":
                kept.add(j)
            if match is not None:
                duplicates.append({"track_id": ids[j], "duplicate_of": match.duplicate_of, "kind": match.kind,
                                   "similarity": float(match.similarity), "run_id": run_id,
                                   "duplicate_of_delivery_id": match.delivery_id, "action": action})
        if number + 1 < len(batches):
            spilled.append(_spill(postings, spill_dir, number))
    dropped = {d["track_id"]: d for d in duplicates if d["action"] == "rejected"}
    rejections = []
    for dup in duplicates:
        if dup["action"] != "rejected":
            continue
        where = "" if dup["duplicate_of_delivery_id"] == delivery_id else \
            f" of the earlier delivery {dup['duplicate_of_delivery_id']}"
        rejections.append(rejection("track", dup["track_id"], STAGE, RejectionReason.DUPLICATE_RECORDING,
                                    f"{dup['kind']} duplicate of track {dup['duplicate_of']}{where} "
                                    f"(fingerprint similarity {dup['similarity']:.3f})", run_id))
    for row in audio_files:
        if row["track_id"] in dropped and row.get("_record_id"):
            rejections.append(rejection("audio_file", row["_record_id"], STAGE, RejectionReason.TRACK_REJECTED,
                                        f"its track was rejected: duplicate_recording of "
                                        f"{dropped[row['track_id']]['duplicate_of']}", run_id))
    return ([t for t in tracks if t["track_id"] not in dropped],
            [f for f in audio_files if f["track_id"] not in dropped], rejections, duplicates)


def recordings_to_index(tracks: list[dict[str, Any]], audio_files: list[dict[str, Any]]) -> list[Recording]:
    """The kept tracks' mixtures, as the recording index stores them (call before ``_fingerprint_file`` or
    ``_fingerprint`` is dropped): each Recording names its fingerprint's file, or holds it when the row did."""
    kept = {t["track_id"] for t in tracks}
    return [Recording(row["track_id"], row["sha256"], row.get("_fingerprint_file") or load_fingerprint(row))
            for row in audio_files if row["role"] == Role.MIXTURE and row["track_id"] in kept]


def _num_frames(row: dict[str, Any]) -> int:
    """A measured mixture row's number of sub-fingerprints, without reading them."""
    path = row.get("_fingerprint_file")
    if path:
        return os.path.getsize(path) // 4
    return len(row.get("_fingerprint") or "") * 3 // 16


@dataclass(frozen=True)
class _Spilled:
    """One earlier batch's postings: on disk (``.npy`` files read memory-mapped) or in memory."""

    paths: tuple[Path, Path, Path] | None
    postings: Postings | None = None

    def load(self) -> Postings:
        from cleaning.fingerprint_index import Postings

        if self.postings is not None:
            return self.postings
        return Postings(*(np.load(path, mmap_mode="r") for path in self.paths))


def _spill(postings: Postings, spill_dir: Path | None, number: int) -> _Spilled:
    if spill_dir is None:
        return _Spilled(None, postings)
    spill_dir.mkdir(parents=True, exist_ok=True)
    paths = tuple(spill_dir / f"batch-{number:05d}-{name}.npy" for name in ("keys", "tracks", "offsets"))
    for path, column in zip(paths, (postings.keys, postings.tracks, postings.offsets)):
        np.save(path, column)
    return _Spilled(paths)


def _renumbered(postings: Postings, first: int) -> Postings:
    """``postings`` of a batch whose recording 0 is recording ``first`` of the delivery."""
    from cleaning.fingerprint_index import Postings

    return Postings(postings.keys, postings.tracks + np.int32(first), postings.offsets)


def _within_candidates(postings: Postings, spilled: Sequence[_Spilled], chunk_postings: int = QUERY_CHUNK_POSTINGS
                       ) -> dict[int, list[int]]:
    """Recording ``j`` of this batch → the recordings ``i < j`` of the same delivery (this batch's and the earlier
    batches') that share at least ``MIN_VOTES`` sub-fingerprints with it at one offset, the most votes first (all
    of them: which are still kept is decided in order, and the best ``MAX_CANDIDATES`` kept ones are scored).
    Every recording is in one batch, so the votes of a pair come whole from one of them; the batch queries in
    chunks of whole recordings of about ``chunk_postings`` postings, so that the matched pairs (a posting matches
    itself and every other of its key) never exist for the whole batch at once."""
    from cleaning.fingerprint_index import Postings, match_postings, max_shift_frames, top_candidates, vote

    shift = max_shift_frames()
    found: list[tuple[int, int, int]] = []  # (j, −votes, i)
    for index in [postings, *spilled]:
        index = index if index is postings else index.load()
        for low, high in _track_chunks(postings.tracks, chunk_postings):
            mine = (postings.tracks >= low) & (postings.tracks < high)
            query = Postings(postings.keys[mine], postings.tracks[mine], postings.offsets[mine])
            query_tracks, index_tracks, shifts = match_postings(query, index, shift)
            earlier = index_tracks < query_tracks
            top = top_candidates(vote(query_tracks[earlier], index_tracks[earlier], shifts[earlier], shift),
                                 max_candidates=1 << 30)
            found.extend(zip(top.query_tracks.tolist(), (-top.votes).tolist(), top.index_tracks.tolist()))
            del query_tracks, index_tracks, shifts, earlier
        del index
    out: dict[int, list[int]] = {}
    for j, _, i in sorted(found):
        out.setdefault(j, []).append(i)
    return out


def _track_chunks(tracks: np.ndarray, chunk_postings: int) -> list[tuple[int, int]]:
    """``[low, high)`` ranges of track numbers, each holding about ``chunk_postings`` of ``tracks`` (whole tracks)."""
    if not tracks.shape[0]:
        return []
    numbers, counts = np.unique(tracks, return_counts=True)
    chunks, low, total = [], int(numbers[0]), 0
    for number, count in zip(numbers.tolist(), counts.tolist()):
        if total and total + count > chunk_postings:
            chunks.append((low, number))
            low, total = number, 0
        total += count
    chunks.append((low, int(numbers[-1]) + 1))
    return chunks


def _earlier_matches(ids: list[str], prints: list[np.ndarray], hashes: list[str], earlier: Sequence[Segment],
                     threshold: float, query_block: int = QUERY_CHUNK_POSTINGS, verify_block: int = 256
                     ) -> dict[int, _Match]:
    """Recording ``j`` (of track ``ids[j]``) → its match among the earlier deliveries' recordings, if any: the same
    PCM (the latest delivery's), else the candidate with the highest fingerprint similarity ≥ ``threshold`` (ties:
    the latest). A recording of the same track id is not a duplicate: it is that track delivered again (a
    corrected delivery, an update), not another record of its recording.

    Memory stays bounded whatever the catalog: each segment's postings are read a row group at a time, the delivery
    queries them in blocks of whole recordings of about ``query_block`` sub-fingerprints (each block reads the
    segments once), and the candidates'
    fingerprints are read and scored ``verify_block`` recordings at a time.
    """
    from cleaning.fingerprint import fingerprint_similarity
    from cleaning.fingerprint_index import MAX_CANDIDATES, build_postings, max_shift_frames, top_candidates

    if not earlier or not prints:
        return {}
    matches: dict[int, _Match] = {}
    by_hash: dict[str, list[int]] = {}
    for j, sha in enumerate(hashes):
        by_hash.setdefault(sha, []).append(j)
    for segment in earlier:  # later segments overwrite: the latest delivery's exact copy wins
        for track_id, sha in segment.read_hashes():
            for j in (j for j in by_hash.get(sha, ()) if ids[j] != track_id):
                matches[j] = _Match(track_id, "exact", 1.0, segment.delivery_id, segment.sequence)
    shift = max_shift_frames()
    by_sequence = {segment.sequence: segment for segment in earlier}
    pending = [j for j in range(len(prints)) if j not in matches]
    for block in batches_by_size([len(prints[j]) for j in pending], query_block):
        rows = [pending[k] for k in block]
        query = build_postings([prints[j] for j in rows], max_postings=None)
        found: dict[int, list[tuple[int, int, int]]] = {}  # recording → (votes, segment sequence, segment row)
        for segment in earlier:
            top = top_candidates(segment.query(query, shift))
            for q, i, votes in zip(top.query_tracks.tolist(), top.index_tracks.tolist(), top.votes.tolist()):
                found.setdefault(rows[q], []).append((votes, segment.sequence, i))
        chosen = sorted((j, sorted(c, key=lambda c_: (-c_[0], -c_[1]))[:MAX_CANDIDATES]) for j, c in found.items())
        for part in range(0, len(chosen), verify_block):
            needed: dict[int, set[int]] = {}
            for _, candidates in chosen[part:part + verify_block]:
                for _, seq, i in candidates:
                    needed.setdefault(seq, set()).add(i)
            read = {seq: by_sequence[seq].read_fingerprints(ix) for seq, ix in needed.items()}
            for j, candidates in chosen[part:part + verify_block]:
                best = None
                for _, seq, i in candidates:
                    track_id, earlier_print = read[seq][i]
                    if track_id == ids[j]:
                        continue
                    similarity = fingerprint_similarity(earlier_print, prints[j])
                    if similarity >= threshold and (best is None or (similarity, seq) > (best.similarity,
                                                                                          best.sequence)):
                        best = _Match(track_id, "near", similarity, by_sequence[seq].delivery_id, seq)
                if best is not None:
                    matches[j] = best
    return matches


def _decode_print(encoded: str) -> np.ndarray:
    return load_fingerprint({"_fingerprint": encoded})
