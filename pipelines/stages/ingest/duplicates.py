"""Duplicate recordings, within a delivery and across the workspace's earlier deliveries: the last step of ingest, on
the driver, after the Beam pipeline has measured and fingerprinted every mixture.

Exact duplicates share the sha256 of their decoded PCM; near duplicates (another gain, sample rate, encoding or
start) have a fingerprint similarity ≥ the threshold (``cleaning.fingerprint.fingerprint_similarity``). Candidates
come from the sub-fingerprint index (``cleaning.fingerprint_index``): the delivery's own postings, built in memory,
and each earlier delivery's segment of the recording index (``pipelines.stages.ingest.recordings``), read a row
group at a time. Only candidates are scored, so the cost per track does not grow with the catalog.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipelines.stages.ingest.delivery import INGEST as STAGE
from pipelines.stages.ingest.recordings import Recording, Segment
from provenance.records import RejectionReason, Role, rejection


@dataclass(frozen=True)
class _Match:
    duplicate_of: str
    kind: str  # exact | near
    similarity: float
    delivery_id: str
    sequence: int = 0  # the earlier delivery's place in the recording index (0: this delivery)


def link_duplicates(tracks: list[dict[str, Any]], audio_files: list[dict[str, Any]], threshold: float, run_id: str,
                    *, delivery_id: str = "", earlier: Sequence[Segment] = (), on_duplicate: str = "reject"
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

    Args:
        tracks: accepted TRACK rows; audio_files: their AUDIO_FILE rows, mixtures with ``_fingerprint`` (base64 of
            little-endian uint32 sub-fingerprints) and ``_record_id`` (delivered files).
        threshold: smallest fingerprint similarity of a near duplicate.
        delivery_id: this delivery's id (in the duplicate rows of within-delivery duplicates).
        earlier: the recording index's segments of the deliveries before this one.
        on_duplicate: ``reject`` or ``replace`` (duplicates of earlier deliveries only).

    Returns:
        (kept tracks, kept audio files, new rejections, duplicate rows).

    Raises:
        ValueError: ``on_duplicate`` is neither ``reject`` nor ``replace``.
    """
    from cleaning.fingerprint import fingerprint_similarity
    from cleaning.fingerprint_index import MAX_CANDIDATES

    if on_duplicate not in ("reject", "replace"):
        raise ValueError(f"on_duplicate must be 'reject' or 'replace', got {on_duplicate!r}")
    mixtures = {row["track_id"]: row for row in audio_files if row["role"] == Role.MIXTURE}
    ids = sorted(mixtures)
    prints = [_decode_print(mixtures[t].get("_fingerprint") or "") for t in ids]
    hashes = [mixtures[t]["sha256"] for t in ids]
    by_hash: dict[str, list[int]] = {}
    for j, sha in enumerate(hashes):
        by_hash.setdefault(sha, []).append(j)
    within = _within_candidates(prints)
    across = _earlier_matches(ids, prints, hashes, earlier, threshold)
    kept: set[int] = set()
    duplicates: list[dict[str, Any]] = []
    for j, track_id in enumerate(ids):
        match = None
        same_pcm = {i for i in by_hash[hashes[j]] if i < j} & kept
        near = [i for i in within.get(j, []) if i in kept][:MAX_CANDIDATES]  # the most votes first
        for i in sorted(same_pcm | set(near)):  # the first kept track by id that it duplicates
            if hashes[i] == hashes[j]:
                match = _Match(ids[i], "exact", 1.0, delivery_id)
                break
            similarity = fingerprint_similarity(prints[i], prints[j])
            if similarity >= threshold:
                match = _Match(ids[i], "near", similarity, delivery_id)
                break
        action = "rejected"
        if match is None:
            match = across.get(j)
            action = "replaced" if match is not None and on_duplicate == "replace" else action
        if match is None or action == "replaced":
            kept.add(j)
        if match is not None:
            duplicates.append({"track_id": track_id, "duplicate_of": match.duplicate_of, "kind": match.kind,
                               "similarity": float(match.similarity), "run_id": run_id,
                               "duplicate_of_delivery_id": match.delivery_id, "action": action})
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
    """The kept tracks' mixtures, as the recording index stores them (call before ``_fingerprint`` is dropped)."""
    kept = {t["track_id"] for t in tracks}
    return [Recording(row["track_id"], row["sha256"], _decode_print(row.get("_fingerprint") or ""))
            for row in audio_files if row["role"] == Role.MIXTURE and row["track_id"] in kept]


def _within_candidates(prints: list[np.ndarray]) -> dict[int, list[int]]:
    """Recording ``j`` → the recordings ``i < j`` of the same delivery that share at least ``MIN_VOTES``
    sub-fingerprints with it at one offset, the most votes first (all of them: which are still kept is decided in
    order, and the best ``MAX_CANDIDATES`` kept ones are scored)."""
    from cleaning.fingerprint_index import build_postings, match_postings, max_shift_frames, top_candidates, vote

    postings = build_postings(prints)
    shift = max_shift_frames()
    query_tracks, index_tracks, shifts = match_postings(postings, postings, shift)
    earlier = index_tracks < query_tracks
    found = top_candidates(vote(query_tracks[earlier], index_tracks[earlier], shifts[earlier], shift),
                           max_candidates=len(prints))
    out: dict[int, list[int]] = {}
    for j, i in zip(found.query_tracks.tolist(), found.index_tracks.tolist()):
        out.setdefault(j, []).append(i)
    return out


def _earlier_matches(ids: list[str], prints: list[np.ndarray], hashes: list[str], earlier: Sequence[Segment],
                     threshold: float, query_block: int = 1024, verify_block: int = 256) -> dict[int, _Match]:
    """Recording ``j`` (of track ``ids[j]``) → its match among the earlier deliveries' recordings, if any: the same
    PCM (the latest delivery's), else the candidate with the highest fingerprint similarity ≥ ``threshold`` (ties:
    the latest). A recording of the same track id is not a duplicate: it is that track delivered again (a
    corrected delivery, an update), not another record of its recording.

    Memory stays bounded whatever the catalog: each segment's postings are read a row group at a time, the delivery
    queries them ``query_block`` recordings at a time (each block reads the segments once), and the candidates'
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
    for first in range(0, len(prints), query_block):
        rows = [j for j in range(first, min(first + query_block, len(prints))) if j not in matches]
        if not rows:
            continue
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
    return np.frombuffer(base64.b64decode(encoded), dtype="<u4").astype(np.uint32)
