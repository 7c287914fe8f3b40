"""The workspace's recording index: every recording an ingest accepted, so that a later delivery's duplicates of
it are found (exact by the sha256 of the decoded PCM, near by the Haitsma–Kalker sub-fingerprint index of
``cleaning.fingerprint_index``).

Layout, under ``Workspace.recordings_dir / <purpose>-<territory>`` (one index per rights judgement:
``pipelines.stages.ingest.stage.recording_index``)::

    <sequence:06d>-<delivery_id>/   one segment per delivery, numbered in the order deliveries were first indexed
        segment.json               delivery_id, sequence, run_ids, counts, content id, the two files below
        tracks-<id>.parquet        row j = recording j: track_id, sha256, num_frames, fingerprint (LE uint32 bytes)
        postings-<id>.parquet      key (uint32), track (j), offset (frame); sorted by key, row groups of 32,768

A segment holds the mixtures the latest ingest run of its delivery accepted (a re-run for another purpose replaces
them; ingest's cache counts a run as valid only while its delivery's segment holds exactly its mixtures). A delivery
is compared with the segments of the deliveries indexed **before** it (``earlier``): a re-run of a delivery never
meets its own recordings, nor those of a delivery that came after it. Rewriting
a segment writes new files, then ``segment.json`` (atomically), then removes the old files: a crash leaves the
old segment or the new one, whole.

Queries read one row group of postings at a time, only those whose key range holds a queried key, and the
fingerprints only of candidates: a segment is never loaded whole. Light to import (pyarrow): resolving ingest's
inputs reads only the ``segment.json`` files.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from provenance import records

if TYPE_CHECKING:
    from cleaning.fingerprint_index import Candidates, Postings

SEGMENT_FILE = "segment.json"
INDEX_VERSION = "1"  # bump when what a segment holds or how it is laid out changes
ROW_GROUP_ROWS = 32_768  # postings per row group: 384 KB raw, the unit a query reads
BATCH_FRAMES = 1_000_000  # sub-fingerprints (with their postings ≈ 16 MB) a segment is written with at a time
_FOLDER = re.compile(r"^(\d{6})-(.+)$")

TRACKS_SCHEMA = pa.schema([
    pa.field("track_id", pa.string(), nullable=False),
    pa.field("sha256", pa.string(), nullable=False),  # of the decoded PCM (AudioFile sha256)
    pa.field("num_frames", pa.int32(), nullable=False),
    pa.field("fingerprint", pa.binary(), nullable=False),  # little-endian uint32 sub-fingerprints
])
POSTINGS_SCHEMA = pa.schema([
    pa.field("key", pa.uint32(), nullable=False),
    pa.field("track", pa.int32(), nullable=False),
    pa.field("offset", pa.int32(), nullable=False),
])


@dataclass(frozen=True)
class Recording:
    """One accepted mixture to index: its track, the sha256 of its decoded PCM and its fingerprint (uint32
    ``(frames,)``, ``cleaning.fingerprint.fingerprint``), or the path of the file holding it (raw little-endian
    uint32, ``pipelines.stages.ingest.steps.write_fingerprint``), read only when the segment is written."""

    track_id: str
    sha256: str
    fingerprint: np.ndarray | str | os.PathLike[str]

    def load(self) -> np.ndarray:
        """The fingerprint, uint32 ``(frames,)`` (read from its file when the Recording names one)."""
        if isinstance(self.fingerprint, np.ndarray):
            return self.fingerprint.astype(np.uint32, copy=False)
        return np.fromfile(self.fingerprint, dtype="<u4").astype(np.uint32)

    def num_frames(self) -> int:
        if isinstance(self.fingerprint, np.ndarray):
            return int(self.fingerprint.shape[0])
        return os.path.getsize(self.fingerprint) // 4


@dataclass(frozen=True)
class Segment:
    """The recordings of one delivery (see the module docstring); ``info`` is its ``segment.json``."""

    root: Path
    info: Mapping[str, Any]

    @property
    def delivery_id(self) -> str:
        return self.info["delivery_id"]

    @property
    def sequence(self) -> int:
        return int(self.info["sequence"])

    @property
    def content_id(self) -> str:
        return self.info["content_id"]

    @property
    def tracks_path(self) -> Path:
        return self.root / self.info["tracks"]

    @property
    def postings_path(self) -> Path:
        return self.root / self.info["postings"]

    def read_hashes(self) -> list[tuple[str, str]]:
        """``(track_id, sha256)`` of every recording, in row order (recording ``j`` is row ``j``)."""
        table = pq.read_table(self.tracks_path, columns=["track_id", "sha256"])
        return list(zip(table["track_id"].to_pylist(), table["sha256"].to_pylist()))

    def read_fingerprints(self, rows: Iterable[int]) -> dict[int, tuple[str, np.ndarray]]:
        """Recording ``j`` → (track_id, uint32 ``(frames,)`` fingerprint) for each ``j`` in ``rows``, reading only
        the row groups that hold them."""
        wanted = sorted(set(int(j) for j in rows))
        if not wanted:
            return {}
        parquet = pq.ParquetFile(self.tracks_path)
        bounds = np.cumsum([0] + [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)])
        out: dict[int, tuple[str, np.ndarray]] = {}
        for group in sorted({int(np.searchsorted(bounds, j, side="right")) - 1 for j in wanted}):
            table = parquet.read_row_group(group, columns=["track_id", "fingerprint"])
            ids, prints = table["track_id"].to_pylist(), table["fingerprint"].to_pylist()
            for j in wanted:
                if bounds[group] <= j < bounds[group + 1]:
                    k = j - int(bounds[group])
                    out[j] = (ids[k], np.frombuffer(prints[k], dtype="<u4").astype(np.uint32))
        return out

    def query(self, query: Postings, max_shift_frames: int) -> Candidates:
        """Vote ``query``'s postings against this segment's (``cleaning.fingerprint_index.vote``), reading only the
        row groups whose key range holds a queried key, one at a time."""
        from cleaning.fingerprint_index import Postings, match_postings, vote

        parquet = pq.ParquetFile(self.postings_path)
        found: list[tuple[np.ndarray, ...]] = []
        for group in range(parquet.num_row_groups):
            stats = parquet.metadata.row_group(group).column(0).statistics
            if stats is None or not stats.has_min_max:
                low, high = 0, len(query)
            else:
                low = int(np.searchsorted(query.keys, stats.min, side="left"))
                high = int(np.searchsorted(query.keys, stats.max, side="right"))
            if low == high:
                continue
            table = parquet.read_row_group(group)
            index = Postings(table["key"].to_numpy(), table["track"].to_numpy(), table["offset"].to_numpy())
            part = Postings(query.keys[low:high], query.tracks[low:high], query.offsets[low:high])
            found.append(match_postings(part, index, max_shift_frames))
        if not found:
            return vote(*(np.zeros(0, np.int64),) * 3, max_shift_frames)
        return vote(*(np.concatenate(column) for column in zip(*found)), max_shift_frames)


class RecordingIndex:
    """The segments under ``root`` (``Workspace.recordings_dir``); creating the object touches nothing."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)

    def segments(self) -> list[Segment]:
        """Every segment, in the order their deliveries were first indexed."""
        if not self.root.is_dir():
            return []
        found = []
        for folder in self.root.iterdir():
            if folder.is_dir() and _FOLDER.match(folder.name) and (folder / SEGMENT_FILE).is_file():
                found.append(Segment(folder, json.loads((folder / SEGMENT_FILE).read_text())))
        return sorted(found, key=lambda s: s.sequence)

    def segment_of(self, delivery_id: str) -> Segment | None:
        return next((s for s in self.segments() if s.delivery_id == delivery_id), None)

    def earlier(self, delivery_id: str) -> list[Segment]:
        """The segments a delivery is compared with: those indexed before its own (all of them, for a delivery
        never indexed)."""
        segments = self.segments()
        own = next((s.sequence for s in segments if s.delivery_id == delivery_id), None)
        return [s for s in segments if own is None or s.sequence < own]

    def content_id(self, delivery_id: str) -> str:
        """Content id of what ``earlier(delivery_id)`` holds: ``rec-`` + 16 hex over each segment's delivery and
        content id, or ``rec-none``. An input of ingest: a new or grown earlier delivery changes it."""
        earlier = [[s.delivery_id, s.content_id] for s in self.earlier(delivery_id)]
        if not earlier:
            return "rec-none"
        return "rec-" + records.sha256_hex(records.canonical_json([INDEX_VERSION, earlier]))[:16]

    def holds(self, delivery_id: str, mixtures: Mapping[str, str]) -> bool:
        """Whether the delivery's segment holds exactly ``mixtures`` (track_id → sha256: what a run accepted)."""
        segment = self.segment_of(delivery_id)
        if segment is None:
            return not mixtures
        try:  # a concurrent put (no lock: a --dry-run plan) may remove the files between the check and the read
            return dict(segment.read_hashes()) == dict(mixtures)
        except FileNotFoundError:
            return False

    def put(self, delivery_id: str, run_id: str, recordings: Sequence[Recording]) -> Segment:
        """Make ``recordings`` (what a run of the delivery accepted) its segment's content: a new segment, numbered
        after every other, when the delivery has none.

        Memory does not grow with the delivery: the fingerprints are read ``BATCH_FRAMES`` sub-fingerprints at a
        time, written to the tracks file a row group at a time, and their postings spilled as sorted runs beside
        the segment; the postings file is then written one key range at a time (each range's postings gathered
        from every run, sorted, stop words dropped), so it is sorted by key as one sort would leave it.

        Returns:
            The segment as written (the existing one when it already held exactly these recordings).
        """
        existing = self.segment_of(delivery_id)
        ordered = sorted({rec.track_id: rec for rec in recordings}.values(), key=lambda rec: rec.track_id)
        summary = [[rec.track_id, rec.sha256, records.sha256_hex(rec.load().astype("<u4").tobytes())]
                   for rec in ordered]
        content_id = records.sha256_hex(records.canonical_json([INDEX_VERSION, summary]))[:16]
        run_ids = list(existing.info.get("run_ids", [])) if existing is not None else []
        if existing is not None and existing.content_id == content_id:
            return existing
        if existing is None:
            sequence = max((s.sequence for s in self.segments()), default=0) + 1
            folder = self.root / f"{sequence:06d}-{_safe(delivery_id)}"
        else:
            sequence, folder = existing.sequence, existing.root
        folder.mkdir(parents=True, exist_ok=True)
        tag = f"{content_id}-{uuid.uuid4().hex[:6]}"
        tracks_name, postings_name = f"tracks-{tag}.parquet", f"postings-{tag}.parquet"
        spill = folder / f".spill-{tag}"
        try:
            runs = self._write_tracks(ordered, folder / tracks_name, spill)
            num_postings = _write_postings(runs, folder / postings_name)
        finally:
            shutil.rmtree(spill, ignore_errors=True)
        info = {"index_version": INDEX_VERSION, "delivery_id": delivery_id, "sequence": sequence,
                "content_id": content_id, "run_ids": run_ids + [run_id], "recordings": len(ordered),
                "postings": postings_name, "tracks": tracks_name, "num_postings": num_postings}
        records.write_json(info, folder / SEGMENT_FILE)
        for old in folder.glob("*.parquet"):
            if old.name not in (tracks_name, postings_name):
                old.unlink()
        return Segment(folder, info)

    @staticmethod
    def _write_tracks(ordered: Sequence[Recording], path: Path, spill: Path) -> list[tuple[Path, Path, Path]]:
        """Write the tracks file (row groups of 256) a batch at a time; spill each batch's postings (all of them,
        sorted, track numbers the row numbers) as ``.npy`` files under ``spill``. Returns the runs' paths."""
        from cleaning.fingerprint_index import build_postings

        spill.mkdir(parents=True, exist_ok=True)
        runs: list[tuple[Path, Path, Path]] = []
        with pq.ParquetWriter(path, TRACKS_SCHEMA, compression="zstd") as writer:
            first = 0
            for rows in batches_by_size([rec.num_frames() for rec in ordered], BATCH_FRAMES):
                batch = [ordered[j] for j in rows]
                prints = [rec.load() for rec in batch]
                writer.write_table(records.to_table(
                    [{"track_id": rec.track_id, "sha256": rec.sha256, "num_frames": int(p.shape[0]),
                      "fingerprint": p.astype("<u4").tobytes()} for rec, p in zip(batch, prints)], TRACKS_SCHEMA),
                    row_group_size=256)
                postings = build_postings(prints, max_postings=None)
                paths = tuple(spill / f"run-{len(runs):05d}-{name}.npy" for name in ("keys", "tracks", "offsets"))
                for target, column in zip(paths, (postings.keys, postings.tracks + np.int32(first), postings.offsets)):
                    np.save(target, column)
                runs.append(paths)
                first += len(batch)
            if not ordered:
                writer.write_table(records.to_table([], TRACKS_SCHEMA))
        return runs


def batches_by_size(sizes: Sequence[int], budget: int) -> list[list[int]]:
    """Consecutive runs of ``range(len(sizes))`` whose sizes sum to at most ``budget`` (a larger one alone): how
    ingest holds a bounded number of sub-fingerprints at a time (``sizes`` in frames)."""
    batches: list[list[int]] = []
    total = budget + 1
    for j, size in enumerate(sizes):
        if total + size > budget:
            batches.append([])
            total = 0
        batches[-1].append(j)
        total += size
    return batches


def _write_postings(runs: Sequence[tuple[Path, Path, Path]], path: Path) -> int:
    """Merge the sorted runs into one postings file sorted by (key, track, offset), stop words dropped, one key range
    of about ``BATCH_FRAMES`` postings at a time. Returns the number of postings written."""
    from cleaning.fingerprint_index import MAX_POSTINGS, Postings, drop_frequent

    total = sum(int(np.load(keys, mmap_mode="r").shape[0]) for keys, _, _ in runs)
    parts = 1 << max(0, int(np.ceil(np.log2(max(total, 1) / BATCH_FRAMES))))
    bounds = [int(b) for b in np.linspace(0, 1 << 32, parts + 1)]
    written = 0
    with pq.ParquetWriter(path, POSTINGS_SCHEMA, compression="zstd") as writer:
        for low, high in zip(bounds[:-1], bounds[1:]):
            pieces = []
            for keys_path, tracks_path, offsets_path in runs:
                keys = np.load(keys_path, mmap_mode="r")
                a, b = np.searchsorted(keys, [low, high], side="left") if high < (1 << 32) else \
                    (int(np.searchsorted(keys, low, side="left")), keys.shape[0])
                if b > a:
                    pieces.append((np.array(keys[a:b]), np.array(np.load(tracks_path, mmap_mode="r")[a:b]),
                                   np.array(np.load(offsets_path, mmap_mode="r")[a:b])))
            if not pieces:
                continue
            keys, tracks, offsets = (np.concatenate(column) for column in zip(*pieces))
            order = np.lexsort((offsets, tracks, keys))
            postings = drop_frequent(Postings(keys[order], tracks[order], offsets[order]), MAX_POSTINGS)
            if not len(postings):
                continue
            writer.write_table(pa.table({"key": pa.array(postings.keys, pa.uint32()),
                                         "track": pa.array(postings.tracks, pa.int32()),
                                         "offset": pa.array(postings.offsets, pa.int32())}, schema=POSTINGS_SCHEMA),
                               row_group_size=ROW_GROUP_ROWS)
            written += len(postings)
        if not written:
            writer.write_table(POSTINGS_SCHEMA.empty_table())
    return written


def _safe(delivery_id: str) -> str:
    return records.safe_name(delivery_id)
