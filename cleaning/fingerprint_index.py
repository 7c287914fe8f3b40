"""Candidate near duplicates from an inverted index of sub-fingerprints, so that only candidates are compared.

Haitsma & Kalker, "A Highly Robust Audio Fingerprinting System" (ISMIR 2002), §4.3: a copy of a recording shares
many of its 32-bit sub-fingerprints *exactly* (a codec or resampler flips only the few bits whose band-energy
differences were near zero, so most frames keep all 32), and at one consistent frame offset. The index maps each
sub-fingerprint to its postings (track, frame offset); a query looks up every sub-fingerprint of a new
recording, and each hit votes for ``(track, offset difference)``. A track whose votes at one offset (± one frame,
for a shift that is not a whole number of 11.6 ms hops) reach ``MIN_VOTES`` is a candidate; only the best
``MAX_CANDIDATES`` are then scored with ``cleaning.fingerprint.fingerprint_similarity``, which decides.

Measured on synthetic 10-second music (tests/cleaning/music.py, 208 recordings, 48 planted copies): the copies
(−6 dB, 32 kHz, Ogg Vorbis, MP3, 1.5 s later, all at once) get 171–1,350 votes, unrelated pairs at most 36 (7 of
21,500 reach 16: shared drum hits at one offset; ``fingerprint_similarity`` ≈ 0.55 rejects them). With added noise
the votes fall with the similarity: at 10 dB SNR (similarity 0.79–0.91) 32–216 votes; at 5 dB, where similarity
is 0.74–0.88, a copy at 0.83 got 4 votes and is missed (the index's recall limit: near the threshold with heavy
noise). Probing bit flips of the least reliable bits (Haitsma & Kalker §4.3) is the remedy, not done here. The cost
of a query grows with its hits, not with the catalog.

Everything here is pure numpy over in-memory arrays; ``pipelines.stages.ingest.recordings`` persists postings in the
workspace and feeds them here a row group at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cleaning.fingerprint import DEFAULT_MAX_SHIFT_S, FRAME_HOP_S

MIN_VOTES = 16
"""Smallest number of query frames whose sub-fingerprint is found exactly at one offset (± 1 frame) for a track to
be a candidate: ~4% of a 5-second overlap (the smallest ``fingerprint_similarity`` scores)."""
MAX_CANDIDATES = 4
"""Candidates scored per query recording, the most votes first."""
MAX_POSTINGS = 1024
"""A sub-fingerprint with more postings than this in one index (a frame shared by many recordings: a stock drum
hit, a test tone) is a stop word: it is not indexed, as it says nothing about which recording a copy is of."""
_MAX_TRACKS = 1 << 24  # tracks per side of one query (the vote key packs both track numbers and the offset in 64 bits)


@dataclass(frozen=True)
class Postings:
    """Sub-fingerprints with where they occur, sorted by ``keys`` (then track, then offset).

    Attributes:
        keys: uint32 ``(n,)``, the sub-fingerprints (never 0: silent frames are not indexed).
        tracks: int32 ``(n,)``, the recording's number (its position in the sequence the postings were built from).
        offsets: int32 ``(n,)``, the frame (11.6 ms hop) the sub-fingerprint is at.
    """

    keys: np.ndarray
    tracks: np.ndarray
    offsets: np.ndarray

    def __len__(self) -> int:
        return int(self.keys.shape[0])


@dataclass(frozen=True)
class Candidates:
    """Pairs (query recording, indexed recording) that share sub-fingerprints at one offset, one row per pair.

    Attributes:
        query_tracks: int64 ``(m,)``, the query recording's number.
        index_tracks: int64 ``(m,)``, the indexed recording's number.
        votes: int64 ``(m,)``, query frames found exactly at ``offsets`` ± 1 frame.
        offsets: int64 ``(m,)``, the offset in frames: query frame ``i`` is indexed frame ``i + offsets``.
    """

    query_tracks: np.ndarray
    index_tracks: np.ndarray
    votes: np.ndarray
    offsets: np.ndarray

    def __len__(self) -> int:
        return int(self.query_tracks.shape[0])


def build_postings(fingerprints: Sequence[np.ndarray], max_postings: int | None = MAX_POSTINGS) -> Postings:
    """The postings of ``fingerprints``: recording ``j`` is track ``j``; silent (0) sub-fingerprints are left out.

    Args:
        fingerprints: uint32 ``(frames_j,)`` each, from ``cleaning.fingerprint.fingerprint``.
        max_postings: drop the sub-fingerprints with more postings than this (``MAX_POSTINGS``); None keeps all.

    Returns:
        Postings sorted by (key, track, offset): 12 bytes per non-silent frame in memory (≈ 1 KB per second of
        audio).
    """
    sizes = np.array([len(p) for p in fingerprints], dtype=np.int64)
    if not len(fingerprints) or sizes.sum() == 0:
        return _empty_postings()
    keys = np.concatenate([np.asarray(p, dtype=np.uint32) for p in fingerprints])
    tracks = np.repeat(np.arange(len(fingerprints), dtype=np.int32), sizes)
    offsets = (np.arange(keys.shape[0], dtype=np.int64) - np.repeat(np.cumsum(sizes) - sizes, sizes)).astype(np.int32)
    voiced = keys != 0
    keys, tracks, offsets = keys[voiced], tracks[voiced], offsets[voiced]
    order = np.lexsort((offsets, tracks, keys))
    postings = Postings(keys[order], tracks[order], offsets[order])
    return drop_frequent(postings, max_postings) if max_postings is not None else postings


def drop_frequent(postings: Postings, max_postings: int) -> Postings:
    """``postings`` without the keys that have more than ``max_postings`` postings (stop words)."""
    if not len(postings):
        return postings
    starts = np.flatnonzero(np.r_[True, postings.keys[1:] != postings.keys[:-1]])
    counts = np.diff(np.r_[starts, len(postings)])
    keep = np.repeat(counts <= max_postings, counts)
    if keep.all():
        return postings
    return Postings(postings.keys[keep], postings.tracks[keep], postings.offsets[keep])


def match_postings(query: Postings, index: Postings, max_shift_frames: int) -> tuple[np.ndarray, ...]:
    """Every (query posting, index posting) pair with the same key whose offsets differ by at most
    ``max_shift_frames`` + 1.

    Returns:
        (query tracks, index tracks, offset differences ``index offset − query offset``), int32 ``(pairs,)`` each
        (int64 when the postings' are).
    """
    if not len(query) or not len(index):
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    low = np.searchsorted(index.keys, query.keys, side="left")
    high = np.searchsorted(index.keys, query.keys, side="right")
    counts = high - low
    hit = np.flatnonzero(counts)
    counts = counts[hit]
    total = int(counts.sum())
    query_rows = np.repeat(hit, counts)
    # the positions low[hit[k]] … high[hit[k]] − 1 of each hit, concatenated
    starts = np.repeat(low[hit] - (np.cumsum(counts) - counts), counts)
    index_rows = starts + np.arange(total, dtype=np.int64)
    shift = index.offsets[index_rows] - query.offsets[query_rows]
    near = np.abs(shift) <= max_shift_frames + 1
    return query.tracks[query_rows[near]], index.tracks[index_rows[near]], shift[near]


def vote(query_tracks: np.ndarray, index_tracks: np.ndarray, shifts: np.ndarray, max_shift_frames: int,
         exclude_self: bool = False) -> Candidates:
    """Vote the matched pairs of ``match_postings`` (several calls' results concatenated) into candidates.

    Each (query track, index track) pair scores the number of matches at its best offset ``d`` plus those at
    ``d − 1`` and ``d + 1`` (a copy shifted by a fraction of a hop matches at two neighbouring offsets).

    Args:
        exclude_self: drop pairs of a track with itself (a delivery queried against its own postings).

    Returns:
        One row per pair of tracks, sorted by (query track, votes descending, index track).

    Raises:
        ValueError: a track number is negative or ≥ 2^24.
    """
    if exclude_self:
        other = query_tracks != index_tracks
        query_tracks, index_tracks, shifts = query_tracks[other], index_tracks[other], shifts[other]
    if not query_tracks.shape[0]:
        empty = np.zeros(0, dtype=np.int64)
        return Candidates(empty, empty, empty, empty)
    for tracks in (query_tracks, index_tracks):
        if tracks.min() < 0 or tracks.max() >= _MAX_TRACKS:
            raise ValueError(f"track numbers must be in [0, {_MAX_TRACKS}), got {tracks.min()}…{tracks.max()}")
    span = 2 * max_shift_frames + 7  # offsets −(max + 3) … max + 3: ± 1 of every kept shift stays inside a pair
    pair = query_tracks.astype(np.int64) * _MAX_TRACKS + index_tracks
    keys, counts = np.unique(pair * span + (shifts + max_shift_frames + 3), return_counts=True)
    smoothed = counts.copy()
    for step in (-1, 1):
        position = np.searchsorted(keys, keys + step)
        position = np.minimum(position, keys.shape[0] - 1)
        smoothed += np.where(keys[position] == keys + step, counts[position], 0)
    pairs, offsets = keys // span, keys % span - (max_shift_frames + 3)
    order = np.lexsort((np.abs(offsets), -smoothed, pairs))  # per pair: most votes, then the smallest shift
    first = order[np.r_[True, pairs[order][1:] != pairs[order][:-1]]]
    best_pairs, best_votes, best_offsets = pairs[first], smoothed[first], offsets[first]
    query_of, index_of = best_pairs // _MAX_TRACKS, best_pairs % _MAX_TRACKS
    order = np.lexsort((index_of, -best_votes, query_of))
    return Candidates(query_of[order], index_of[order], best_votes[order], best_offsets[order])


def top_candidates(candidates: Candidates, min_votes: int = MIN_VOTES, max_candidates: int = MAX_CANDIDATES
                   ) -> Candidates:
    """The candidates with at least ``min_votes``, at most ``max_candidates`` per query track (most votes first;
    ``candidates`` as ``vote`` sorts them)."""
    keep = candidates.votes >= min_votes
    query = candidates.query_tracks[keep]
    starts = np.r_[0, np.flatnonzero(query[1:] != query[:-1]) + 1] if query.shape[0] else np.zeros(0, np.int64)
    rank = np.arange(query.shape[0]) - np.repeat(starts, np.diff(np.r_[starts, query.shape[0]]))
    chosen = np.flatnonzero(keep)[rank < max_candidates]
    return Candidates(candidates.query_tracks[chosen], candidates.index_tracks[chosen], candidates.votes[chosen],
                      candidates.offsets[chosen])


def max_shift_frames(max_shift_s: float = DEFAULT_MAX_SHIFT_S) -> int:
    """``max_shift_s`` in sub-fingerprint frames, as ``fingerprint_similarity`` rounds it."""
    return int(round(max_shift_s / FRAME_HOP_S))


def _empty_postings() -> Postings:
    return Postings(np.zeros(0, dtype=np.uint32), np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.int32))
