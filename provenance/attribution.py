"""Attribution: the embedder interface and the embedding index (cosine search over training segments).

The ground floor of the ``embedding`` attribution method: ``Embedder`` turns audio into vectors,
``EmbeddingIndex`` finds the training segments most similar to a query. Turning scores into segment, track and
rights-holder shares (``aggregate``, ``share_weights``, ``no_shares_reason``, ``AttributionResult``, ...) lives in
``provenance.shares``, the shared tail of every method; its public names are re-exported here, so
``from provenance.attribution import aggregate`` keeps working.

Pure: numpy, faiss. Embedders live upstairs (``cleaning.embed``) and reach this module
through the ``Embedder`` protocol; ``pipelines.attribution.index`` wires them together.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import faiss
import numpy as np

from provenance.shares import (  # re-exported: callers import them from provenance.attribution
    COSINE_TEMPERATURE as COSINE_TEMPERATURE,
    NO_ATTRIBUTION_REASONS as NO_ATTRIBUTION_REASONS,
    TRACK_META_FIELDS as TRACK_META_FIELDS,
    AttributionResult as AttributionResult,
    NoAttribution as NoAttribution,
    RightsHolderShare as RightsHolderShare,
    ScoredSegment as ScoredSegment,
    TrackShare as TrackShare,
    aggregate as aggregate,
    attribution_table as attribution_table,
    no_shares_reason as no_shares_reason,
    share_weights as share_weights,
)

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
