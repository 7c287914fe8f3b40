"""The sub-fingerprint index's pieces on fingerprints with known answers (random sub-fingerprints: the offsets and
votes are then exact). Recall and precision on music-like recordings: tests/pipelines/test_ingest_duplicates.py."""

import numpy as np
import pytest

from cleaning.fingerprint_index import (MIN_VOTES, Postings, build_postings, drop_frequent, match_postings,
                                        max_shift_frames, top_candidates, vote)

RNG = np.random.default_rng(7)


def random_print(frames: int) -> np.ndarray:
    return RNG.integers(1, 2**32, frames, dtype=np.uint64).astype(np.uint32)


def query_index(query_prints, index_prints, shift=200, exclude_self=False):
    query, index = build_postings(query_prints), build_postings(index_prints)
    return vote(*match_postings(query, index, shift), shift, exclude_self=exclude_self)


def test_postings_are_sorted_skip_silence_and_say_where_each_frame_is():
    a = np.array([5, 0, 3, 5], dtype=np.uint32)
    b = np.array([3, 9], dtype=np.uint32)
    postings = build_postings([a, b])
    assert postings.keys.tolist() == [3, 3, 5, 5, 9]  # the silent frame (0) is not indexed
    assert postings.tracks.tolist() == [0, 1, 0, 0, 1]
    assert postings.offsets.tolist() == [2, 0, 0, 3, 1]
    assert len(build_postings([])) == 0 and len(build_postings([np.zeros(0, np.uint32)])) == 0
    # a key with more postings than the limit is a stop word: all its postings go, the others stay
    assert drop_frequent(postings, 1).keys.tolist() == [9]
    assert build_postings([a, b], max_postings=2).keys.tolist() == [3, 3, 5, 5, 9]


def test_a_shifted_copy_with_bit_errors_votes_for_its_offset():
    original = random_print(800)
    copy = original[37:].copy()  # starts 37 frames later
    flipped = RNG.random(copy.shape[0]) < 0.3
    copy[flipped] ^= np.uint32(1) << RNG.integers(0, 32, flipped.sum()).astype(np.uint32)
    other = random_print(800)
    found = query_index([copy], [other, original])
    best = found.index_tracks[found.votes == found.votes.max()]
    assert best.tolist() == [1] and found.offsets[found.index_tracks == 1].tolist() == [37]
    assert found.votes[found.index_tracks == 1][0] == (~flipped).sum()  # every frame without an error
    assert found.votes[found.index_tracks == 0].sum() < MIN_VOTES  # random frames rarely meet, never in line
    top = top_candidates(found)
    assert top.index_tracks.tolist() == [1]


def test_votes_at_neighbouring_offsets_add_up():
    """A shift that is not a whole number of hops matches some frames at d and others at d + 1."""
    original = random_print(400)
    copy = original[10:310].copy()
    copy[::2] = original[11:311:2]  # even frames one hop further on
    found = query_index([copy], [original])
    assert found.votes.tolist() == [300]
    assert found.offsets.tolist()[0] in (10, 11)


def test_offsets_beyond_the_shift_searched_do_not_vote():
    original = random_print(600)
    copy = original[300:].copy()
    assert len(query_index([copy], [original], shift=200)) == 0
    assert query_index([copy], [original], shift=300).offsets.tolist() == [300]
    assert max_shift_frames(10.0) == 861  # 10 s of 11.6 ms hops


def test_a_delivery_against_itself_finds_its_copies_not_itself():
    a, b = random_print(500), random_print(500)
    found = query_index([a, b, a.copy()], [a, b, a.copy()], exclude_self=True)
    pairs = {(q, i) for q, i, v in zip(found.query_tracks, found.index_tracks, found.votes) if v >= MIN_VOTES}
    assert pairs == {(0, 2), (2, 0)}


def test_top_candidates_keep_the_most_voted_per_query():
    found = vote(np.array([0] * 50 + [0] * 30 + [0] * 5 + [1] * 40), np.array([3] * 50 + [4] * 30 + [5] * 5 + [3] * 40),
                 np.array([2] * 125), 10)
    assert list(zip(found.query_tracks.tolist(), found.index_tracks.tolist(), found.votes.tolist())) == [
        (0, 3, 50), (0, 4, 30), (0, 5, 5), (1, 3, 40)]
    top = top_candidates(found, min_votes=10, max_candidates=1)
    assert list(zip(top.query_tracks.tolist(), top.index_tracks.tolist())) == [(0, 3), (1, 3)]
    assert len(top_candidates(found, min_votes=60)) == 0


def test_track_numbers_out_of_range_are_refused():
    with pytest.raises(ValueError, match="track numbers"):
        vote(np.array([1 << 24]), np.array([0]), np.array([0]), 10)
    empty = Postings(np.zeros(0, np.uint32), np.zeros(0, np.int64), np.zeros(0, np.int64))
    assert all(part.shape == (0,) for part in match_postings(empty, build_postings([random_print(10)]), 5))
