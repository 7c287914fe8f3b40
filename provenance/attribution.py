"""Attribution: the embedder interface, the embedding index, and aggregation of scores into shares.

The ground floor of the ``embedding`` attribution method (and the shared tail of ``dtrak`` and
``unlearning``): whatever scores a method gives training segments, ``aggregate`` turns the top-ranked ones
into segment, track and rights-holder shares that each sum to 1, and carries every track's licence and
attribution text so a rights team can act on the result.

Shares are money: a rights team pays out by them. So ``aggregate`` never makes shares from scores that say
nothing — all zero (the cosines of digital silence), all equal (no segment told from another), or undefined
(NaN/inf) — and returns an ``AttributionResult`` with no segments and a ``NoAttribution`` saying why instead
(``no_shares_reason``). The ``attribute`` stage adds the one reason it can see before scoring: a query whose
peak is below the silence floor (``silent_query``).

Pure: numpy, faiss, the records. Embedders live upstairs (``cleaning.embed``) and reach this module
through the ``Embedder`` protocol; ``pipelines.attribution.index`` wires them together.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import secrets
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import faiss
import numpy as np

from provenance import records

INDEX_FORMAT = "linernotes.embedding_index"
INDEX_FORMAT_VERSION = 1
_VECTORS_FILE = "vectors.npy"
_IDS_FILE = "segment_ids.json"
_META_FILE = "meta.json"
_IVF_FILE = "ivf.faiss"


@runtime_checkable
class Embedder(Protocol):
    """Audio windows → vectors. The one embedder interface, used three times: Fréchet Audio Distance in
    blind cleaning (``cleaning``), FAD in training evaluation (``training``), and the ``embedding``
    attribution method (``pipelines.attribution.index``).

    Attributes:
        name: identifies the embedder *and its parameters and version* (e.g.
            ``"mel-stats-v1_sr16000_mels64_win1000ms_hop500ms_fft512"``). It is written into lineage and
            names index folders, so it must be filesystem-safe and change whenever the vectors would.
        sample_rate_hz: the rate the embedder works at; ``embed`` resamples other rates to it.
        dim: length of one vector.
    """

    name: str
    sample_rate_hz: int
    dim: int

    def embed(self, audio: np.ndarray, sample_rate_hz: int) -> np.ndarray:
        """Embed audio window by window.

        Args:
            audio: float32 ``(channels, samples)`` in [-1, 1] full scale, at ``sample_rate_hz``.
            sample_rate_hz: rate of ``audio``.

        Returns:
            float32 ``(num_windows, dim)``, ``num_windows >= 1``.
        """
        ...


class EmbeddingIndex:
    """Cosine-similarity search over training-segment embeddings (FAISS inner product on L2-normalised
    vectors, so inner product = cosine similarity in [-1, 1]): exact (``IndexFlatIP``) below
    ``IVF_MIN_SEGMENTS`` segments, an inverted-file index (``IndexIVFFlat``, approximate) from there on
    (``ann="auto"``; force one with ``ann="flat"`` or ``"ivf"``).

    Args:
        segment_ids: one unique id per row of ``vectors``.
        vectors: float ``(n, dim)``, finite; rows are L2-normalised here (an all-zero row, e.g. the
            embedding of digital silence, stays zero and scores 0 against every query).
        embedder_name: ``Embedder.name`` of the embedder that made the vectors (lineage).
        dataset_id: the dataset the segments belong to (lineage).

    Raises:
        ValueError: shapes disagree, ids repeat, there are no rows, or a value is not finite.
    """

    def __init__(self, segment_ids: Sequence[str], vectors: np.ndarray, embedder_name: str = "",
                 dataset_id: str = "", ann: str = "auto", trained_ivf: Any = None) -> None:
        vectors = np.asarray(vectors)
        if vectors.ndim != 2 or vectors.shape[0] == 0 or vectors.shape[1] == 0:
            raise ValueError(f"vectors must be (n, dim) with n, dim > 0; got shape {vectors.shape}")
        if len(segment_ids) != vectors.shape[0]:
            raise ValueError(f"{len(segment_ids)} segment ids for {vectors.shape[0]} vectors")
        if len(set(segment_ids)) != len(segment_ids):
            raise ValueError("segment ids must be unique")
        if not np.all(np.isfinite(vectors)):
            raise ValueError("vectors contain NaN or inf")
        self._segment_ids = [str(s) for s in segment_ids]
        self._vectors = l2_normalize(vectors)
        self.embedder_name = embedder_name
        self.dataset_id = dataset_id
        if ann not in ("auto", "flat", "ivf"):
            raise ValueError(f"ann must be 'auto', 'flat' or 'ivf'; got {ann!r}")
        self.ann = ann if ann != "auto" else ("ivf" if len(self._segment_ids) >= IVF_MIN_SEGMENTS else "flat")
        if self.ann == "ivf":
            usable = (trained_ivf is not None and trained_ivf.ntotal == len(self._segment_ids)
                      and trained_ivf.d == self.dim)
            self._faiss = trained_ivf if usable else _ivf_index(self._vectors)
        else:
            self._faiss = faiss.IndexFlatIP(self.dim)
            self._faiss.add(self._vectors)

    @property
    def dim(self) -> int:
        return int(self._vectors.shape[1])

    @property
    def segment_ids(self) -> list[str]:
        return list(self._segment_ids)

    @property
    def vectors(self) -> np.ndarray:
        """float32 ``(n, dim)``, L2-normalised rows (a read-only view)."""
        view = self._vectors.view()
        view.flags.writeable = False
        return view

    def __len__(self) -> int:
        return len(self._segment_ids)

    def search(self, query: np.ndarray, top_k: int) -> list[tuple[str, float]] | list[list[tuple[str, float]]]:
        """The ``top_k`` most cosine-similar segments, best first; equal scores are ordered by segment id.

        Args:
            query: float ``(dim,)`` for one query, or ``(q, dim)`` for ``q`` queries (normalised here).
            top_k: how many results per query (capped at ``len(self)``), ≥ 1.

        Returns:
            For ``(dim,)``: ``[(segment_id, cosine), ...]``. For ``(q, dim)``: one such list per row.

        Raises:
            ValueError: wrong dimension, non-finite query, or ``top_k < 1``.
        """
        query = np.asarray(query)
        single = query.ndim == 1
        queries = query[None] if single else query
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"query must be ({self.dim},) or (q, {self.dim}); got shape {query.shape}")
        if not np.all(np.isfinite(queries)):
            raise ValueError("query contains NaN or inf")
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1; got {top_k}")
        top_k = min(top_k, len(self))
        queries = l2_normalize(queries)
        with search_threads(len(queries)):
            results = [self._search_one(row, top_k) for row in queries]
        return results[0] if single else results

    def _search_one(self, query: np.ndarray, top_k: int) -> list[tuple[str, float]]:
        if self.ann == "ivf":  # approximate: the probed lists' best, ties by id among what was found
            scores, rows = self._faiss.search(query[None], top_k + 8)
            pairs = [(self._segment_ids[r], float(s)) for s, r in zip(scores[0], rows[0]) if r >= 0]
            pairs.sort(key=lambda pair: (-pair[1], pair[0]))
            return pairs[:top_k]
        # Fetch more than top_k while the score at the cut still ties with the one just past it, so
        # that ties at the boundary are broken by segment id rather than by FAISS's internal order.
        fetch = min(len(self), top_k + 8)
        while True:
            scores, rows = self._faiss.search(query[None], fetch)
            pairs = [(self._segment_ids[r], float(s)) for s, r in zip(scores[0], rows[0]) if r >= 0]
            if fetch == len(self) or pairs[-1][1] < pairs[top_k - 1][1]:
                break
            fetch = min(len(self), fetch * 2)
        pairs.sort(key=lambda pair: (-pair[1], pair[0]))
        return pairs[:top_k]

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``vectors.npy`` (float32 ``(n, dim)``, normalised), ``segment_ids.json``, ``meta.json``
        (format, embedder name, dim, dataset id, count) and, for IVF, the trained index ``ivf.faiss`` (so
        ``load`` skips k-means) into ``directory``, atomically: everything is written to a sibling temporary
        folder that then replaces ``directory``.
        """
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = directory.with_name(f".{directory.name}.tmp-{secrets.token_hex(4)}")
        tmp.mkdir()
        try:
            np.save(tmp / _VECTORS_FILE, self._vectors, allow_pickle=False)
            (tmp / _IDS_FILE).write_text(json.dumps(self._segment_ids, ensure_ascii=False))
            if self.ann == "ivf":  # the trained inverted lists: loading skips k-means (≈ 25 s at 1M × 192)
                faiss.write_index(self._faiss, str(tmp / _IVF_FILE))
            meta = {"format": INDEX_FORMAT, "format_version": INDEX_FORMAT_VERSION, "metric": "cosine",
                    "embedder": self.embedder_name, "dim": self.dim, "dataset_id": self.dataset_id,
                    "count": len(self)}
            (tmp / _META_FILE).write_text(json.dumps(meta, sort_keys=True, indent=2))
            if directory.exists():
                old = directory.with_name(f".{directory.name}.old-{secrets.token_hex(4)}")
                os.replace(directory, old)
                os.replace(tmp, directory)
                shutil.rmtree(old)
            else:
                os.replace(tmp, directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> "EmbeddingIndex":
        """Read an index written by ``save``.

        Raises:
            FileNotFoundError: ``directory`` or one of its three files is missing.
            ValueError: the files disagree with each other (count, dim, format).
        """
        directory = Path(directory)
        meta = read_index_meta(directory)
        vectors = np.load(directory / _VECTORS_FILE, allow_pickle=False)
        segment_ids = json.loads((directory / _IDS_FILE).read_text())
        if vectors.shape != (meta["count"], meta["dim"]) or len(segment_ids) != meta["count"]:
            raise ValueError(f"index at {directory} is inconsistent: meta says {meta['count']}×{meta['dim']}, "
                             f"vectors are {vectors.shape}, {len(segment_ids)} segment ids")
        trained_ivf = None
        if (directory / _IVF_FILE).is_file():
            trained_ivf = faiss.read_index(str(directory / _IVF_FILE))
            trained_ivf.nprobe = max(1, int(trained_ivf.nlist * IVF_PROBE_FRACTION))
        return cls(segment_ids, vectors, embedder_name=meta["embedder"], dataset_id=meta["dataset_id"],
                   ann="ivf" if trained_ivf is not None else "auto", trained_ivf=trained_ivf)


FEW_QUERIES = 16
"""``search_threads``: below this many queries a FAISS search runs on the calling thread alone."""


@contextlib.contextmanager
def search_threads(num_queries: int) -> Iterator[None]:
    """Run FAISS searches of ``num_queries`` queries on one OpenMP thread when they are few, restoring the
    thread count afterwards (per calling thread: OpenMP's ``nthreads`` is a per-thread setting).

    FAISS parallelises flat, IVF and scalar-quantizer search over *queries*: for one query the other
    OpenMP threads only wake, spin and join. On a shared 2-core machine under load that costs far more
    than the search itself — 10k × 192 flat: p50 12 ms with 2 threads against 0.17 ms with one (measured
    in this project, see README "Measured"). Batches of ``FEW_QUERIES`` or more keep every thread."""
    if num_queries >= FEW_QUERIES:
        yield
        return
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)


IVF_MIN_SEGMENTS = 200_000
"""``EmbeddingIndex(ann="auto")`` switches from exact search (``IndexFlatIP``) to an inverted-file index at
this many segments: exact search costs ``n · dim`` per query (≈ 0.1 s at 1M × 192 on 2 cores)."""
IVF_PROBE_FRACTION = 1 / 16
"""Share of the IVF lists probed per query (``nprobe = nlist / 16``)."""


def _ivf_index(vectors: np.ndarray) -> Any:
    """FAISS ``IndexIVFFlat`` (inner product) over float32 ``(n, dim)`` L2-normalised rows: ``nlist ≈ √n``
    lists (at most 1,024) trained by k-means on a seeded sample of ``40 · nlist`` rows, ``nlist / 16``
    lists probed per query (Jégou et al. 2011, the inverted-file half of "Product quantization for
    nearest neighbor search"; FAISS, Johnson et al. 2019). Deterministic for the same vectors."""
    n, dim = vectors.shape
    nlist = int(min(1024, max(16, round(math.sqrt(n)))))
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    sample = np.random.default_rng(0).choice(n, size=min(n, 40 * nlist), replace=False)
    index.cp.seed = 1234
    index.cp.niter = 10
    index.train(vectors[np.sort(sample)])
    index.add(vectors)
    index.nprobe = max(1, int(nlist * IVF_PROBE_FRACTION))
    return index


def read_index_meta(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """``meta.json`` of a saved index, after checking that all three files are present.

    Raises:
        FileNotFoundError: a file is missing (the index was never written, or not completely).
        ValueError: ``meta.json`` is not an embedding index of a known format version.
    """
    directory = Path(directory)
    for name in (_META_FILE, _VECTORS_FILE, _IDS_FILE):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"no embedding index at {directory}: {name} is missing")
    meta = json.loads((directory / _META_FILE).read_text())
    if meta.get("format") != INDEX_FORMAT or meta.get("format_version") != INDEX_FORMAT_VERSION:
        raise ValueError(f"{directory / _META_FILE} is not a {INDEX_FORMAT} v{INDEX_FORMAT_VERSION}: {meta}")
    return meta


def l2_normalize(vectors: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """float32 copy of ``vectors`` (``(..., dim)``) with unit L2 norm on the last axis; zero rows stay zero."""
    vectors = np.asarray(vectors, dtype=np.float64)
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return np.ascontiguousarray(vectors / np.maximum(norms, eps), dtype=np.float32)


# ---------------------------------------------------------------------------------------------------
# Aggregation: scores → shares


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
