"""The ``embedding`` attribution method end to end: index a dataset's segments, attribute a query.

``build_embedding_index`` embeds every segment of a dataset (``embed_clip`` over the segment's flac) and
caches the index in the workspace; ``EmbeddingAttributor`` loads it once with the catalog and answers
queries; ``attribute_audio`` / ``attribute_file`` are one-shot wrappers. Results are
``provenance.attribution.AttributionResult``; storing them is the caller's
(``LineageStore.add_attributions(result.query_id, result.method, run_id, result.dataset_id,
result.rows())``).

Dataset folder (written by the shard stage): ``index.parquet`` (``records.SHARD_ENTRY``), the WebDataset
tars it names, ``dataset.json``. Each sample has ``KEY.flac`` (mono PCM_16), ``KEY.mel.npy``, ``KEY.json``.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cleaning.audio import read_audio
from cleaning.embed import MEL_STATS, embed_clip, load_embedder
from cleaning.measure import measure_pcm_sha256
from pipelines.catalog import read_catalog_licenses, read_catalog_tracks
from provenance import records
from provenance.attribution import (
    COSINE_TEMPERATURE,
    TRACK_META_FIELDS,
    AttributionResult,
    Embedder,
    EmbeddingIndex,
    ScoredSegment,
    aggregate,
    read_index_meta,
)
from provenance.workspace import Workspace

METHOD = "embedding"
DEFAULT_SPLITS: tuple[str, ...] = (records.Split.TRAIN.value,)

Progress = Callable[[str, int, int], None]  # (message, done, total), as every stage reports
"""Called as ``progress("indexing segments", done, total)`` after each segment is embedded."""


def index_dir(workspace: Workspace, dataset_id: str, embedder_name: str,
              splits: Sequence[str] = DEFAULT_SPLITS) -> Path:
    """Where an index is cached: ``indexes/<dataset_id>/<embedder.name>`` for the train split (the
    default), ``indexes/<dataset_id>/<embedder.name>__<split>-<split>`` for other split sets."""
    splits = _check_splits(splits)
    suffix = "" if splits == DEFAULT_SPLITS else "__" + "-".join(splits)
    return workspace.indexes_dir / dataset_id / f"{embedder_name}{suffix}"


def read_shard_index(workspace: Workspace, dataset_id: str) -> list[dict[str, Any]]:
    """The dataset's ``index.parquet`` rows (``records.SHARD_ENTRY``), sorted by segment id.

    Raises:
        FileNotFoundError: the dataset folder has no ``index.parquet`` (not built, or not committed).
    """
    path = workspace.dataset_dir(dataset_id) / "index.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"dataset {dataset_id!r} has no shard index at {path}; run the shard stage first")
    rows = records.read_table(path, records.SHARD_ENTRY).to_pylist()
    return sorted(rows, key=lambda row: row["segment_id"])


def build_embedding_index(workspace: Workspace, dataset_id: str, embedder: Embedder,
                          progress: Progress | None = None, splits: Sequence[str] = DEFAULT_SPLITS,
                          rebuild: bool = False) -> EmbeddingIndex:
    """Embed every segment of ``dataset_id`` in ``splits`` and cache the index, or load the cached one.

    Only the train split by default: attribution asks which *training* recordings shaped an output, and
    validation segments were never trained on (pass ``splits=("train", "validation")`` to include them,
    e.g. to evaluate retrieval). Each segment's vector is ``embed_clip`` of its flac member (mean of the
    window vectors, L2-normalised); rows are ordered by segment id, so the same dataset and embedder
    give the same files.

    The cache at ``index_dir(...)`` is reused when it is complete: written by ``EmbeddingIndex.save``
    (atomic), by the same ``embedder.name``, for this dataset, with exactly the selected segment ids.
    Otherwise (or with ``rebuild=True``) it is rebuilt and replaced.

    Args:
        progress: called as ``progress("indexing segments", done, total)`` after each segment embedded
            (not when cached).

    Raises:
        FileNotFoundError: no dataset index, or a shard it names is missing.
        ValueError: an unknown split, no segments in the selected splits, or a shard that lacks a segment
            or whose flac bytes do not match the index's sha256 (a corrupt or half-written dataset).
        cleaning.audio.AudioDecodeError: a segment's flac cannot be decoded.
    """
    splits = _check_splits(splits)
    entries = [row for row in read_shard_index(workspace, dataset_id) if row["split"] in splits]
    if not entries:
        raise ValueError(f"dataset {dataset_id!r} has no segments in splits {list(splits)}")
    directory = index_dir(workspace, dataset_id, embedder.name, splits)
    if not rebuild:
        cached = _load_if_complete(directory, dataset_id, embedder.name, [row["segment_id"] for row in entries])
        if cached is not None:
            return cached

    vectors = np.zeros((len(entries), embedder.dim), dtype=np.float32)
    row_of = {row["segment_id"]: i for i, row in enumerate(entries)}
    done = 0
    for segment_id, audio, sample_rate_hz in iter_segment_audio(workspace.dataset_dir(dataset_id), entries):
        vectors[row_of[segment_id]] = embed_clip(embedder, audio, sample_rate_hz)
        done += 1
        if progress is not None:
            progress("indexing segments", done, len(entries))
    index = EmbeddingIndex([row["segment_id"] for row in entries], vectors, embedder_name=embedder.name,
                           dataset_id=dataset_id)
    index.save(directory)
    return index


def iter_segment_audio(dataset_dir: str | os.PathLike[str], entries: Sequence[Mapping[str, Any]]
                       ) -> Iterator[tuple[str, np.ndarray, int]]:
    """Decode the flac member of each shard-index entry, reading each tar once, front to back.

    Yields:
        ``(segment_id, audio, sample_rate_hz)`` with audio float32 ``(channels, samples)``, in shard
        order, then member order within a shard.

    Raises:
        FileNotFoundError: a shard is missing.
        ValueError: a shard lacks an entry's flac, or its bytes do not match the entry's sha256.
    """
    dataset_dir = Path(dataset_dir)
    by_shard: dict[str, dict[str, Mapping[str, Any]]] = {}
    for entry in entries:
        by_shard.setdefault(entry["shard"], {})[f"{entry['key']}.flac"] = entry
    for shard in sorted(by_shard):
        wanted = by_shard[shard]
        path = dataset_dir / shard
        if not path.is_file():
            raise FileNotFoundError(f"shard {path} named in index.parquet is missing")
        found = 0
        with tarfile.open(path, mode="r|*") as tar:
            for member in tar:
                entry = wanted.get(member.name)
                if entry is None or not member.isfile():
                    continue
                data = tar.extractfile(member).read()
                if entry.get("sha256") and records.sha256_hex(data) != entry["sha256"]:
                    raise ValueError(f"{path}: {member.name} does not match its sha256 in index.parquet "
                                     f"(segment {entry['segment_id']}); the shard is corrupt")
                audio, sample_rate_hz = read_audio(io.BytesIO(data))
                found += 1
                yield entry["segment_id"], audio, sample_rate_hz
        if found != len(wanted):
            raise ValueError(f"{path} lacks {len(wanted) - found} of the {len(wanted)} flac members that "
                             f"index.parquet puts there")


@dataclass
class EmbeddingAttributor:
    """The ``embedding`` method for one dataset, loaded once: the index, segment → track, and the
    catalog's track and licence metadata. Build it with ``from_workspace``; call ``attribute`` per query.
    """

    workspace: Workspace
    dataset_id: str
    embedder: Embedder
    index: EmbeddingIndex
    segment_entries: dict[str, dict[str, Any]]  # segment_id → SHARD_ENTRY row
    catalog_tracks: dict[str, dict[str, Any]]  # track_id → TRACK_META_FIELDS (licence joined)
    catalog_licenses: dict[str, dict[str, Any]]  # license_id → {license_name, license_url}

    @classmethod
    def from_workspace(cls, workspace: Workspace, dataset_id: str, embedder: Embedder | None = None,
                       splits: Sequence[str] = DEFAULT_SPLITS,
                       progress: Progress | None = None) -> "EmbeddingAttributor":
        """Load (building on first use) the dataset's index for ``embedder`` (default ``mel-stats``) and
        read the catalog (``tracks.parquet``, ``licenses.parquet``; either may be absent).

        Raises: as ``build_embedding_index``.
        """
        embedder = embedder if embedder is not None else load_embedder(MEL_STATS)
        index = build_embedding_index(workspace, dataset_id, embedder, progress=progress, splits=splits)
        entries = {row["segment_id"]: row for row in read_shard_index(workspace, dataset_id)}
        return cls(workspace, dataset_id, embedder, index, entries, read_catalog_tracks(workspace),
                   read_catalog_licenses(workspace))

    def attribute(self, audio: np.ndarray, sample_rate_hz: int, query_id: str, top_k: int = 10,
                  temperature: float | None = COSINE_TEMPERATURE) -> AttributionResult:
        """Rank training segments by cosine similarity to the query and share credit among the top k.

        The query is embedded like the segments were: ``embed_clip``, the mean of its window vectors
        (so a long query is summarised by its average timbre; a per-window max over the index would
        favour brief resemblances and is not done here). Shares follow
        ``provenance.attribution.share_weights``: by default a softmax of the cosines at
        ``COSINE_TEMPERATURE`` (0.05), so a near-copy of one segment takes most of the credit; pass
        ``temperature=None`` for shares proportional to ``max(cosine, 0)``. Cosines that are all zero (a
        silent query embeds to the zero vector), all equal or undefined give no segments and no shares, with
        the reason in ``no_attribution`` (``provenance.attribution.aggregate``): shares are money.

        Args:
            audio: float32 ``(channels, samples)`` at ``sample_rate_hz``, any length > 0.
            query_id: generation id, or sha256 of the query's decoded PCM.
            top_k: segments to retrieve and share credit among (capped at the index size).

        Raises:
            ValueError: empty or non-finite audio, ``top_k < 1``.
        """
        query = embed_clip(self.embedder, audio, sample_rate_hz)
        hits = self.index.search(query, top_k)
        ranked = [ScoredSegment(segment_id, self.segment_entries[segment_id]["track_id"], score, rank)
                  for rank, (segment_id, score) in enumerate(hits, start=1)]
        track_meta = self._track_meta(ranked)
        return aggregate(ranked, track_meta, method=METHOD, query_id=query_id, dataset_id=self.dataset_id,
                         temperature=temperature)

    def _track_meta(self, ranked: Sequence[ScoredSegment]) -> dict[str, dict[str, Any]]:
        """Catalog metadata of the ranked segments' tracks; a track the catalog lacks (e.g. a later
        ingest dropped it) falls back to its segment's ``json`` member in the shard."""
        meta: dict[str, dict[str, Any]] = {}
        for segment in ranked:
            if segment.track_id in meta:
                continue
            if segment.track_id in self.catalog_tracks:
                meta[segment.track_id] = self.catalog_tracks[segment.track_id]
            else:
                meta[segment.track_id] = self._segment_json_meta(segment.segment_id)
        return meta

    def _segment_json_meta(self, segment_id: str) -> dict[str, Any]:
        return read_segment_json_meta(self.workspace, self.dataset_id, self.segment_entries[segment_id],
                                      self.catalog_licenses)


def read_segment_json_meta(workspace: Workspace, dataset_id: str, entry: Mapping[str, Any],
                           catalog_licenses: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """``TRACK_META_FIELDS`` of a segment's track from its shard ``json`` member (for a track the catalog
    lacks), licence name and URL filled from ``catalog_licenses`` when the member has none.

    Raises:
        ValueError: the shard has no ``json`` member for the segment.
    """
    path = workspace.dataset_dir(dataset_id) / entry["shard"]
    name = f"{entry['key']}.json"
    with tarfile.open(path, mode="r:*") as tar:
        try:
            member = tar.extractfile(name)
        except KeyError as err:
            raise ValueError(f"track {entry['track_id']} is not in the catalog and {path} has no {name} "
                             f"to read its rights from") from err
        sample = json.loads(member.read())
    track = {field: sample.get(field) for field in TRACK_META_FIELDS}
    license_ = catalog_licenses.get(track.get("license_id") or "", {})
    for field in ("license_name", "license_url"):
        track[field] = track.get(field) or license_.get(field)
    return track


def attribute_audio(workspace: Workspace, audio: np.ndarray, sample_rate_hz: int, dataset_id: str,
                    query_id: str, top_k: int = 10, embedder: Embedder | None = None) -> AttributionResult:
    """One-shot ``embedding`` attribution of in-memory audio (loads the index and catalog each call; keep
    an ``EmbeddingAttributor`` to answer many queries). See ``EmbeddingAttributor.attribute``."""
    attributor = EmbeddingAttributor.from_workspace(workspace, dataset_id, embedder)
    return attributor.attribute(audio, sample_rate_hz, query_id, top_k)


def attribute_file(workspace: Workspace, path: str | os.PathLike[str], dataset_id: str, top_k: int = 10,
                   embedder: Embedder | None = None) -> AttributionResult:
    """``embedding`` attribution of an audio file; ``query_id`` is the sha256 of its decoded PCM
    (``cleaning.measure.measure_pcm_sha256``), so the same audio in another container gets the same id.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        cleaning.audio.AudioDecodeError: ``path`` is not decodable audio.
        ValueError: the file decodes to no samples.
    """
    audio, sample_rate_hz = read_audio(path)
    if audio.shape[1] == 0:
        raise ValueError(f"{path} decodes to no audio samples")
    return attribute_audio(workspace, audio, sample_rate_hz, dataset_id, measure_pcm_sha256(audio), top_k,
                           embedder)


def _load_if_complete(directory: Path, dataset_id: str, embedder_name: str,
                      segment_ids: Sequence[str]) -> EmbeddingIndex | None:
    """The cached index when it matches exactly; None when it is absent, half-written, of an older
    format, or for other segments (the caller rebuilds it)."""
    try:
        meta = read_index_meta(directory)
        if (meta["embedder"], meta["dataset_id"], meta["count"]) != (embedder_name, dataset_id, len(segment_ids)):
            return None
        index = EmbeddingIndex.load(directory)
    except (FileNotFoundError, ValueError):
        return None
    return index if index.segment_ids == list(segment_ids) else None


def _check_splits(splits: Sequence[str]) -> tuple[str, ...]:
    known = [s.value for s in records.Split]
    unknown = [s for s in splits if s not in known]
    if unknown or not splits:
        raise ValueError(f"splits must be a non-empty subset of {known}; got {list(splits)}")
    return tuple(s for s in known if s in splits)
