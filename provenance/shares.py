"""Aggregation of attribution scores into shares: the share rule, when no shares may be made, and the result.

The shared tail of every attribution method (``embedding``, ``dtrak``, ``unlearning``): whatever scores a method
gives training segments, ``aggregate`` turns the top-ranked ones into segment, track and rights-holder shares that
each sum to 1 (``share_weights`` is the rule), and carries every track's licence and attribution text so a rights
team can act on the result (``AttributionResult``).

Shares are money: a rights team pays out by them. So ``aggregate`` never makes shares from scores that say
nothing — all zero (the cosines of digital silence), all equal (no segment told from another), or undefined
(NaN/inf) — and returns an ``AttributionResult`` with no segments and a ``NoAttribution`` saying why instead
(``no_shares_reason``). The ``attribute`` stage adds the one reason it can see before scoring: a query whose
peak is below the silence floor (``silent_query``).

Pure: numpy and the records. ``provenance.attribution`` re-exports every public name here.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from provenance import records


@dataclass(frozen=True)
class ScoredSegment:
    """A training segment with its attribution score, its 1-based rank, and its share of the query."""

    segment_id: str
    track_id: str
    score: float
    rank: int = 0
    share: float = 0.0


@dataclass(frozen=True)
class TrackShare:
    """A training recording's share of a query, with what a rights team needs to credit it."""

    track_id: str
    title: str
    artist: str
    rights_holder: str
    license_id: str
    license_name: str
    license_url: str
    attribution: str
    share: float


@dataclass(frozen=True)
class RightsHolderShare:
    """A rights holder's share of a query: the sum of its tracks' shares."""

    rights_holder: str
    share: float
    track_ids: tuple[str, ...]


NO_ATTRIBUTION_REASONS = ("silent_query", "scores_undefined", "scores_all_zero", "scores_all_equal")
"""Why a query gets no ranking and no shares: its peak is below the silence floor (the ``attribute`` stage);
a retrieved score is NaN or inf; every retrieved score is 0; two or more retrieved scores, all equal."""


@dataclass(frozen=True)
class NoAttribution:
    """Why a query has nothing to attribute: ``reason`` is one of ``NO_ATTRIBUTION_REASONS``; ``detail`` says
    it for a person (e.g. ``"peak -inf dBFS is below the floor of -60 dBFS"``)."""

    reason: str
    detail: str

    def __post_init__(self) -> None:
        if self.reason not in NO_ATTRIBUTION_REASONS:
            raise ValueError(f"unknown no-attribution reason {self.reason!r}; "
                             f"one of {', '.join(NO_ATTRIBUTION_REASONS)}")

    def to_dict(self) -> dict[str, str]:
        return {"reason": self.reason, "detail": self.detail}


@dataclass(frozen=True)
class AttributionResult:
    """One query's attribution by one method. ``segments``, ``tracks`` and ``rights_holders`` are each
    ordered by share (then score / id) and their shares each sum to 1 — or, when ``no_attribution`` is set,
    all three are empty: the query had nothing to attribute, and ``no_attribution`` says why."""

    method: str
    query_id: str
    dataset_id: str
    segments: tuple[ScoredSegment, ...]
    tracks: tuple[TrackShare, ...]
    rights_holders: tuple[RightsHolderShare, ...]
    no_attribution: NoAttribution | None = None

    @classmethod
    def unattributed(cls, method: str, query_id: str, dataset_id: str,
                     why: NoAttribution) -> "AttributionResult":
        """A result with no ranking and no shares, and the reason."""
        return cls(method, query_id, dataset_id, (), (), (), why)

    def rows(self) -> list[dict[str, Any]]:
        """One dict per segment with exactly the fields of ``records.ATTRIBUTION`` (``generation_id`` is
        the query id); fits ``LineageStore.add_attributions(generation_id, method, run_id, dataset_id, rows)``
        and ``records.to_table(rows, records.ATTRIBUTION)``."""
        rights_holder = {t.track_id: t.rights_holder for t in self.tracks}
        return [
            {"generation_id": self.query_id, "method": self.method, "segment_id": s.segment_id,
             "rank": s.rank, "score": s.score, "track_id": s.track_id,
             "rights_holder": rights_holder[s.track_id], "share": s.share}
            for s in self.segments
        ]

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method, "query_id": self.query_id, "dataset_id": self.dataset_id,
            "segments": [dataclasses.asdict(s) for s in self.segments],
            "tracks": [dataclasses.asdict(t) for t in self.tracks],
            "rights_holders": [{**dataclasses.asdict(r), "track_ids": list(r.track_ids)}
                               for r in self.rights_holders],
            "no_attribution": self.no_attribution.to_dict() if self.no_attribution is not None else None,
        }

    def to_json(self, indent: int | None = 2) -> str:
        """The result as JSON (keys sorted; the same result gives the same text)."""
        return json.dumps(self.to_dict(), sort_keys=True, indent=indent, ensure_ascii=False)


COSINE_TEMPERATURE = 0.05
"""Softmax temperature the ``embedding`` method shares cosine similarities with. Cosines of one query
against a catalog crowd together (0.6–0.9 is typical of unrelated material for a hand-built embedder), so
the linear rule would spread credit almost evenly over the top k and a track with many mediocre matches
would outrank the one that was copied; at τ = 0.05 a cosine 0.05 higher weighs e ≈ 2.7 times more, and
one 0.2 higher about 55 times more."""

TRACK_META_FIELDS = ("title", "artist", "rights_holder", "license_id", "license_name", "license_url",
                     "attribution")


def share_weights(scores: Sequence[float], temperature: float | None = None) -> np.ndarray:
    """Non-negative weights of ranked scores that sum to 1 (float64 ``(n,)``).

    The rule:
    - ``temperature is None`` (default, parameter-free): ``w_i = max(score_i, 0) / Σ_j max(score_j, 0)``.
      A segment's share is proportional to its positive score; a segment scored ≤ 0 (for cosine:
      orthogonal or opposed to the query) gets no share. If no score is positive, every segment gets
      ``1 / n`` (the ranking is then all there is to report).
    - ``temperature = τ > 0``: softmax, ``w_i ∝ exp((score_i - max_j score_j) / τ)``. Sharper than the
      linear rule when scores crowd together; τ is in the score's own units. The ``embedding`` method
      uses this rule at ``COSINE_TEMPERATURE``.

    Shares are relative to the segments passed in (the retrieved top k), so they depend on k. This is the
    rule alone: ``aggregate`` first asks ``no_shares_reason`` whether the scores may be shared out at all
    (all-zero, all-equal or undefined scores are not), so the uniform fallback only ever applies to
    scores that differ and are not all zero.

    Raises:
        ValueError: no scores, a non-finite score, or ``temperature <= 0``.
    """
    values = np.asarray(scores, dtype=np.float64)
    if values.size == 0:
        raise ValueError("cannot share out an empty ranking")
    if not np.all(np.isfinite(values)):
        raise ValueError(f"scores must be finite; got {values.tolist()}")
    if temperature is not None:
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0; got {temperature}")
        weights = np.exp((values - values.max()) / temperature)
    else:
        weights = np.maximum(values, 0.0)
        if not np.any(weights > 0):
            weights = np.ones_like(values)
    return weights / weights.sum()


def no_shares_reason(scores: Sequence[float]) -> NoAttribution | None:
    """Why these ranked scores must not be turned into shares, or None when they may be.

    Shares are money, so none are made from scores that carry no information about whom to credit:
    - ``scores_undefined``: a score is NaN or ±inf (a degenerate query or a failed method; the ranking
      itself is then meaningless);
    - ``scores_all_zero``: every score is exactly 0 (e.g. the cosines of a silent query, whose embedding is
      the zero vector);
    - ``scores_all_equal``: two or more scores, all exactly equal (no segment is told from another; any rule
      would split the credit by how many segments each holder happens to have in the top k).

    One non-zero score alone is a ranking of one and may be shared (it takes everything). Scores that differ
    but are all ≤ 0 may be shared by the rule of ``share_weights``.

    Args:
        scores: the retrieved segments' scores, float ``(n,)``, n ≥ 1.
    """
    values = np.asarray(scores, dtype=np.float64)
    if not np.all(np.isfinite(values)):
        bad = int(np.count_nonzero(~np.isfinite(values)))
        return NoAttribution("scores_undefined", f"{bad} of {values.size} retrieved scores are NaN or inf")
    if np.all(values == 0.0):
        return NoAttribution("scores_all_zero", f"all {values.size} retrieved scores are 0")
    if values.size > 1 and np.all(values == values[0]):
        return NoAttribution("scores_all_equal", f"all {values.size} retrieved scores equal {values[0]:.6g}")
    return None


def aggregate(ranked: Sequence[ScoredSegment], track_meta: Mapping[str, Mapping[str, Any]], *,
              method: str, query_id: str, dataset_id: str,
              temperature: float | None = None) -> AttributionResult:
    """Turn a method's scored segments into segment, track and rights-holder shares.

    Segments are re-ranked by score (descending, ties by segment id; ranks start at 1) and given shares
    by ``share_weights`` (default: proportional to ``max(score, 0)``, uniform if none is positive). A
    track's share is the sum of its segments' shares; a rights holder's, the sum of its tracks'. Each sum
    is 1 up to float rounding (< 1e-12).

    Shares are money: scores that are all zero, all equal or undefined (NaN/inf) give no shares, whatever
    the method. The result then has no segments, tracks or rights holders, and its ``no_attribution``
    names the reason (``no_shares_reason``: ``scores_all_zero``, ``scores_all_equal``,
    ``scores_undefined``); its ``rows()`` are empty, so nothing is stored as Attribution.

    Args:
        ranked: the retrieved segments (``rank`` and ``share`` are ignored and recomputed); unique ids.
        track_meta: ``track_id`` → mapping with ``TRACK_META_FIELDS`` (title, artist, rights_holder,
            license_id, license_name, license_url, attribution); a missing or None field becomes ``""``.
        method: ``"embedding"``, ``"dtrak"`` or ``"unlearning"``.
        query_id: the generation id, or the sha256 of a query file's decoded PCM.
        dataset_id: the dataset the segments come from.
        temperature: see ``share_weights``.

    Raises:
        ValueError: ``ranked`` is empty, repeats a segment, or names a track that ``track_meta`` does not
            describe.
    """
    if not ranked:
        raise ValueError("cannot share out an empty ranking")
    if len({s.segment_id for s in ranked}) != len(ranked):
        raise ValueError("ranked segments repeat a segment id")
    missing = sorted({s.track_id for s in ranked} - set(track_meta))
    if missing:
        raise ValueError(f"no track metadata for {missing}; pass them in track_meta")
    why = no_shares_reason([float(s.score) for s in ranked])
    if why is not None:
        return AttributionResult.unattributed(method, query_id, dataset_id, why)
    ordered = sorted(ranked, key=lambda s: (-float(s.score), s.segment_id))
    weights = share_weights([s.score for s in ordered], temperature)
    segments = tuple(
        ScoredSegment(s.segment_id, s.track_id, float(s.score), rank, float(w))
        for rank, (s, w) in enumerate(zip(ordered, weights), start=1)
    )

    track_share: dict[str, float] = {}
    for s in segments:
        track_share[s.track_id] = track_share.get(s.track_id, 0.0) + s.share
    tracks = tuple(sorted(
        (TrackShare(track_id=t, share=share, **{f: _text(track_meta[t].get(f)) for f in TRACK_META_FIELDS})
         for t, share in track_share.items()),
        key=lambda t: (-t.share, t.track_id),
    ))

    holder_share: dict[str, float] = {}
    holder_tracks: dict[str, list[str]] = {}
    for t in tracks:
        holder_share[t.rights_holder] = holder_share.get(t.rights_holder, 0.0) + t.share
        holder_tracks.setdefault(t.rights_holder, []).append(t.track_id)
    rights_holders = tuple(sorted(
        (RightsHolderShare(h, share, tuple(sorted(holder_tracks[h]))) for h, share in holder_share.items()),
        key=lambda r: (-r.share, r.rights_holder),
    ))
    for name, parts in (("segment", segments), ("track", tracks), ("rights-holder", rights_holders)):
        total = math.fsum(p.share for p in parts)
        if abs(total - 1.0) > 1e-9:  # cannot happen with finite weights; guards future edits
            raise ArithmeticError(f"{name} shares sum to {total!r}, not 1")
    return AttributionResult(method, query_id, dataset_id, segments, tracks, rights_holders)


def attribution_table(result: AttributionResult) -> Any:
    """``result.rows()`` as a ``pa.Table`` with the ``records.ATTRIBUTION`` schema."""
    return records.to_table(result.rows(), records.ATTRIBUTION)


def _text(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)
