"""Ingest's output tables on the driver, streamed to Parquet: the pipeline's rows are written a batch at a time as they
are read, and the driver keeps of each row only what duplicate linking and the counts need.

The Beam pipeline writes every output row as a JSON line (``beam.ROWS_FILE``: ``<table>\\t<row>``). ``stage_rows``
reads them once, writes each table's rows to an unsorted Parquet file in batches of ``BATCH_ROWS`` (through the
record's schema: ``provenance.records.TRACK``, ``AUDIO_FILE``, ``REJECTION``; fields outside it, such as the
``_fingerprint_file`` a mixture row carries, are dropped), and keeps small rows for the rest of ingest:

- tracks: ``track_id``;
- audio files: ``track_id``, ``role``, ``sha256``, ``derived_from`` and the private fields duplicate linking reads
  (``_fingerprint_file`` or ``_fingerprint``, ``_record_id``);
- rejections: ``record_kind`` and ``reason``, for the counts.

``finish_table`` then writes a catalog table: the staged rows less the rows of rejected duplicate tracks, with the
driver's own rows (licence and duplicate rejections) added, sorted, written atomically. The sort is Arrow's, in
memory, on columns (a few hundred bytes a row, against the ~3 KB a row of Python dicts took).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from provenance.records import AUDIO_FILE, REJECTION, TRACK, to_table, write_table

__all__ = ["BATCH_ROWS", "SORT_KEYS", "StagedTables", "finish_table", "finish_tables", "stage_rows"]

BATCH_ROWS = 4096
"""Rows of one table converted to Arrow and written at once."""

_SCHEMAS: dict[str, pa.Schema] = {"tracks": TRACK, "audio_files": AUDIO_FILE, "rejections": REJECTION}

SORT_KEYS: dict[str, tuple[str, ...]] = {"tracks": ("track_id",), "audio_files": ("track_id", "role", "instrument"),
                                         "rejections": ("record_kind", "record_id", "reason")}
"""The order of each streamed catalog table's rows."""

_KEEP = {"tracks": ("track_id",),
         "audio_files": ("track_id", "role", "sha256", "derived_from", "_fingerprint_file", "_fingerprint",
                         "_record_id"),
         "rejections": ("record_kind", "reason")}


@dataclass
class StagedTables:
    """What ``stage_rows`` read: the small rows (see the module docstring) and where each table's rows went.

    Attributes:
        folder: holds ``<table>.parquet`` for ``tracks``, ``audio_files`` and ``rejections`` (unsorted).
        decoded: how many measured rows were decoded by this run (``False``) or taken from the measurement cache
            (``True``), from the rows' ``_cached`` field.
    """

    folder: Path
    tracks: list[dict[str, Any]] = field(default_factory=list)
    audio_files: list[dict[str, Any]] = field(default_factory=list)
    rejections: list[dict[str, Any]] = field(default_factory=list)
    decoded: Counter[bool] = field(default_factory=Counter)

    def path(self, table: str) -> Path:
        return self.folder / f"{table}.parquet"


def stage_rows(lines: Iterable[str], folder: Path, batch_rows: int = BATCH_ROWS) -> StagedTables:
    """Read the pipeline's JSON lines (``<table>\\t<row>``) and write each table's rows to ``folder/<table>.parquet``,
    ``batch_rows`` at a time; every table gets a file, an empty one when no row names it.

    Raises:
        KeyError: a line names a table other than ``tracks``, ``audio_files``, ``rejections``, or a row lacks a
            non-nullable field of its record (a bug in the pipeline, never a property of the delivery).
    """
    folder.mkdir(parents=True, exist_ok=True)
    staged = StagedTables(folder)
    kept = {"tracks": staged.tracks, "audio_files": staged.audio_files, "rejections": staged.rejections}
    buffers: dict[str, list[dict[str, Any]]] = {table: [] for table in _SCHEMAS}
    writers = {table: pq.ParquetWriter(staged.path(table), schema, compression="zstd")
               for table, schema in _SCHEMAS.items()}
    try:
        for line in lines:
            table, _, text = line.partition("\t")
            if not text.strip():
                continue
            row = json.loads(text)
            if "_cached" in row:
                staged.decoded[bool(row["_cached"])] += 1
            kept[table].append({key: row[key] for key in _KEEP[table] if key in row})
            buffer = buffers[table]
            buffer.append(row)
            if len(buffer) >= batch_rows:
                writers[table].write_table(to_table(buffer, _SCHEMAS[table]))
                buffer.clear()
        for table, buffer in buffers.items():
            if buffer:
                writers[table].write_table(to_table(buffer, _SCHEMAS[table]))
    finally:
        for writer in writers.values():
            writer.close()
    return staged


def finish_table(staged: Path, schema: pa.Schema, path: Path, *, drop_track_ids: Iterable[str] = (),
                 extra_rows: Sequence[Mapping[str, Any]] = (), sort_keys: Sequence[str] = ()) -> Path:
    """Write the catalog table at ``path``: the rows of the Parquet file ``staged`` whose ``track_id`` is not in
    ``drop_track_ids``, plus ``extra_rows`` (dicts, through ``schema``), sorted by ``sort_keys`` (ascending, stable;
    strings by code point, as Python sorts them). Returns ``path``.

    Raises:
        KeyError: an extra row lacks a non-nullable field of ``schema``.
        pyarrow.ArrowInvalid: ``staged`` does not hold ``schema``'s columns.
    """
    table = pq.read_table(staged, schema=schema)
    dropped = sorted(set(drop_track_ids))
    if dropped:
        member = pc.is_in(table["track_id"], value_set=pa.array(dropped, pa.string()))
        table = table.filter(pc.invert(pc.fill_null(member, False)))
    if extra_rows:
        table = pa.concat_tables([table, to_table(extra_rows, schema)])
    if sort_keys:
        table = table.sort_by([(key, "ascending") for key in sort_keys])
    return write_table(table, path)


def finish_tables(staged: StagedTables, folder: Path, *, drop_track_ids: Iterable[str] = (),
                  extra_rejections: Sequence[Mapping[str, Any]] = ()) -> dict[str, Path]:
    """Write the catalog's ``tracks``, ``audio_files`` and ``rejections`` into ``folder`` (``finish_table``, in
    ``SORT_KEYS`` order): the tracks in ``drop_track_ids`` and their files left out, ``extra_rejections`` (the
    driver's own) added. Returns {table: path}.

    Raises:
        KeyError: an extra rejection lacks a non-nullable field of ``REJECTION``.
    """
    dropped = set(drop_track_ids)
    return {table: finish_table(staged.path(table), schema, folder / f"{table}.parquet",
                                drop_track_ids=dropped if table != "rejections" else (),
                                extra_rows=extra_rejections if table == "rejections" else (),
                                sort_keys=SORT_KEYS[table])
            for table, schema in _SCHEMAS.items()}
