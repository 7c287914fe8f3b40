"""The records that are the contract between stages, as explicit Arrow schemas.

Every stage reads and writes these tables; Parquet on disk, ``pa.Table`` in memory. Field names carry
their units (``_s``, ``_hz``, ``_dbfs``, ``_lufs``, ``_samples``). Bump ``SCHEMA_VERSION`` on any
change; it is written into every Parquet file's metadata.
"""

from __future__ import annotations

import enum
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA_VERSION = "2"


class Role(enum.StrEnum):
    """Role of an audio file within a track (the MUSDB18 stems; ``instrument`` refines ``other``)."""

    MIXTURE = "mixture"
    VOCALS = "vocals"
    DRUMS = "drums"
    BASS = "bass"
    OTHER = "other"


class Split(enum.StrEnum):
    TRAIN = "train"
    VALIDATION = "validation"


class Purpose(enum.StrEnum):
    """Purpose a run states; the rights policy admits recordings for it."""

    COMMERCIAL = "commercial"
    NON_COMMERCIAL = "non-commercial"


class RejectionReason(enum.StrEnum):
    """Why a record was not admitted. Every dropped record carries exactly one of these."""

    # messages (DDEX ERN)
    XML_UNSAFE = "xml_unsafe"
    SCHEMA_INVALID = "schema_invalid"
    # table rows
    MISSING_FIELD = "missing_field"
    INVALID_FIELD = "invalid_field"
    INVALID_ENCODING = "invalid_encoding"
    DUPLICATE_ID = "duplicate_id"
    # rights policy
    UNKNOWN_LICENSE = "unknown_license"
    LICENSE_DENIES_AI_TRAINING = "license_denies_ai_training"
    LICENSE_NOT_COMMERCIAL = "license_not_commercial"
    LICENSE_TERRITORY = "license_territory"
    LICENSE_NOT_YET_VALID = "license_not_yet_valid"
    LICENSE_EXPIRED = "license_expired"
    OPTED_OUT = "opted_out"
    # files and audio
    UNKNOWN_TRACK = "unknown_track"
    TRACK_REJECTED = "track_rejected"
    INVALID_ROLE = "invalid_role"
    DUPLICATE_FILE = "duplicate_file"
    PATH_OUTSIDE_DELIVERY = "path_outside_delivery"
    MISSING_FILE = "missing_file"
    DECODE_ERROR = "decode_error"
    EMPTY_AUDIO = "empty_audio"
    FORMAT_MISMATCH = "format_mismatch"
    TOO_MANY_CHANNELS = "too_many_channels"
    NON_FINITE_SAMPLES = "non_finite_samples"
    STEM_MISMATCH = "stem_mismatch"
    STEM_RESIDUAL = "stem_residual"
    DUPLICATE_RECORDING = "duplicate_recording"
    NO_AUDIO = "no_audio"
    # shard
    SHORTER_THAN_SEGMENT = "shorter_than_segment"
    MIXTURE_DROPPED = "mixture_dropped"  # clean's final decision on the track's mixture is drop
    NO_KEPT_STEMS = "no_kept_stems"  # stems required (shard.stems) and clean dropped every stem of the track
    SILENT_SEGMENT = "silent_segment"  # a segment whose peak is below shard.silence_floor_dbfs


def _schema(fields: list[pa.Field], name: str) -> pa.Schema:
    return pa.schema(fields, metadata={"linernotes.record": name, "linernotes.schema_version": SCHEMA_VERSION})


LICENSE = _schema(
    [
        pa.field("license_id", pa.string(), nullable=False),
        pa.field("licensor", pa.string()),
        pa.field("license_name", pa.string()),
        pa.field("license_url", pa.string()),
        pa.field("territories", pa.list_(pa.string())),
        pa.field("valid_from", pa.date32()),
        pa.field("valid_until", pa.date32()),
        pa.field("ai_training", pa.string()),  # "allowed" | "denied"
        pa.field("commercial_use", pa.bool_()),
        pa.field("attribution_required", pa.bool_()),
        pa.field("delivery_id", pa.string()),
    ],
    "Licence",
)

TRACK = _schema(
    [
        pa.field("track_id", pa.string(), nullable=False),
        pa.field("isrc", pa.string()),
        pa.field("iswc", pa.string()),
        pa.field("title", pa.string()),
        pa.field("artist", pa.string()),
        pa.field("rights_holder", pa.string()),
        pa.field("license_id", pa.string()),
        pa.field("attribution", pa.string()),
        pa.field("genre", pa.string()),
        pa.field("tags", pa.list_(pa.string())),
        pa.field("description", pa.string()),
        pa.field("bpm", pa.float64()),
        pa.field("key", pa.string()),
        pa.field("delivery_id", pa.string()),
        pa.field("run_id", pa.string()),
    ],
    "Track",
)

AUDIO_FILE = _schema(
    [
        pa.field("track_id", pa.string(), nullable=False),
        pa.field("role", pa.string(), nullable=False),
        pa.field("instrument", pa.string(), nullable=False),  # "" when the role needs no refinement
        pa.field("uri", pa.string()),
        pa.field("derived_from", pa.string()),  # "" for delivered files; "sum_of_stems" for built mixtures
        pa.field("sha256", pa.string()),  # of the decoded PCM (float32, little endian, interleaved)
        pa.field("sample_rate_hz", pa.int32()),
        pa.field("num_channels", pa.int32()),
        pa.field("num_samples", pa.int64()),
        pa.field("duration_s", pa.float64()),
        pa.field("peak_dbfs", pa.float64()),
        pa.field("loudness_lufs", pa.float64()),
        pa.field("clipped_fraction", pa.float64()),
        pa.field("silent_fraction", pa.float64()),
        pa.field("true_peak_dbtp", pa.float64()),  # ITU-R BS.1770-4 Annex 2, 4× oversampling
        pa.field("dc_offset", pa.float64()),  # max over channels of |mean|, full-scale units
        pa.field("stem_residual_db", pa.float64()),  # mixture rows with stems: ‖m − Σs‖² / ‖m‖² in dB
        pa.field("run_id", pa.string()),
    ],
    "AudioFile",
)

DUPLICATE = _schema(
    [
        pa.field("track_id", pa.string(), nullable=False),  # the later track (rejected duplicate_recording, or
        # accepted in place of an earlier delivery's with on_duplicate: replace)
        pa.field("duplicate_of", pa.string(), nullable=False),  # the track it duplicates, kept
        pa.field("kind", pa.string(), nullable=False),  # "exact" (same decoded PCM) | "near" (fingerprint)
        pa.field("similarity", pa.float64()),  # 1 − bit error rate of the fingerprints; 1.0 for exact
        pa.field("run_id", pa.string()),
        pa.field("duplicate_of_delivery_id", pa.string()),  # the delivery of duplicate_of (this one's, or earlier)
        pa.field("action", pa.string()),  # "rejected" | "replaced" (accepted: on_duplicate is replace)
    ],
    "Duplicate",
)

REJECTION = _schema(
    [
        pa.field("record_kind", pa.string(), nullable=False),  # "track" | "audio_file" | "license" | ...
        pa.field("record_id", pa.string(), nullable=False),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),  # a RejectionReason value
        pa.field("detail", pa.string()),
        pa.field("run_id", pa.string()),
    ],
    "Rejection",
)

STEM_SCORE = _schema(
    [
        pa.field("track_id", pa.string(), nullable=False),
        pa.field("role", pa.string(), nullable=False),
        pa.field("instrument", pa.string(), nullable=False),
        pa.field("method", pa.string(), nullable=False),
        pa.field("score", pa.float64()),
        pa.field("decision", pa.string()),  # "keep" | "drop"
        pa.field("reason", pa.string()),
        pa.field("run_id", pa.string()),
    ],
    "StemScore",
)

SEGMENT = _schema(
    [
        pa.field("segment_id", pa.string(), nullable=False),  # f"{track_id}@{start_sample}"
        pa.field("track_id", pa.string(), nullable=False),
        pa.field("start_sample", pa.int64()),  # at the dataset sample rate
        pa.field("num_samples", pa.int64()),
        pa.field("start_s", pa.float64()),
        pa.field("duration_s", pa.float64()),
        pa.field("split", pa.string()),
    ],
    "Segment",
)

SHARD_ENTRY = _schema(
    [
        pa.field("segment_id", pa.string(), nullable=False),
        pa.field("track_id", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("start_sample", pa.int64()),
        pa.field("num_samples", pa.int64()),
        pa.field("start_s", pa.float64()),
        pa.field("duration_s", pa.float64()),
        pa.field("shard", pa.string(), nullable=False),  # shard file name relative to the dataset folder
        pa.field("key", pa.string(), nullable=False),  # WebDataset sample key inside the shard
        pa.field("members", pa.list_(pa.string())),  # e.g. ["<key>.flac", "<key>.json", "<key>.mel.npy"]
        pa.field("sha256", pa.string()),  # of the segment's flac member bytes
    ],
    "ShardEntry",
)

DATASET = _schema(
    [
        pa.field("dataset_id", pa.string(), nullable=False),
        pa.field("run_id", pa.string()),
        pa.field("config_sha256", pa.string()),
        pa.field("uri", pa.string()),
        pa.field("num_tracks", pa.int64()),
        pa.field("num_segments", pa.int64()),
        pa.field("num_train_segments", pa.int64()),
        pa.field("num_validation_segments", pa.int64()),
        pa.field("num_shards", pa.int64()),
    ],
    "Dataset",
)

CHECKPOINT = _schema(
    [
        pa.field("checkpoint_id", pa.string(), nullable=False),
        pa.field("dataset_id", pa.string()),
        pa.field("run_id", pa.string()),
        pa.field("step", pa.int64()),
        pa.field("config_sha256", pa.string()),
        pa.field("uri", pa.string()),
    ],
    "Checkpoint",
)

GENERATION = _schema(
    [
        pa.field("generation_id", pa.string(), nullable=False),
        pa.field("checkpoint_id", pa.string()),
        pa.field("run_id", pa.string()),
        pa.field("prompt", pa.string()),
        pa.field("conditioning", pa.string()),  # JSON
        pa.field("seed", pa.int64()),
        pa.field("sampler", pa.string()),
        pa.field("duration_s", pa.float64()),
        pa.field("uri", pa.string()),
    ],
    "Generation",
)

ATTRIBUTION = _schema(
    [
        pa.field("generation_id", pa.string(), nullable=False),  # or the query file's sha256 for `attribute FILE`
        pa.field("method", pa.string(), nullable=False),
        pa.field("segment_id", pa.string(), nullable=False),
        pa.field("rank", pa.int32()),
        pa.field("score", pa.float64()),
        pa.field("track_id", pa.string()),
        pa.field("rights_holder", pa.string()),
        pa.field("share", pa.float64()),  # the segment's share; shares over a query sum to 1
    ],
    "Attribution",
)

RUN = _schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("kind", pa.string()),
        pa.field("spec_sha256", pa.string()),
        pa.field("code_version", pa.string()),
        pa.field("status", pa.string()),
        pa.field("started_at", pa.string()),
        pa.field("finished_at", pa.string()),
        pa.field("counts", pa.string()),  # JSON: {"accepted": n, "rejected": {reason: n}, ...}
    ],
    "Run",
)

SCHEMAS: dict[str, pa.Schema] = {
    "Licence": LICENSE,
    "Track": TRACK,
    "AudioFile": AUDIO_FILE,
    "Rejection": REJECTION,
    "Duplicate": DUPLICATE,
    "StemScore": STEM_SCORE,
    "Segment": SEGMENT,
    "ShardEntry": SHARD_ENTRY,
    "Dataset": DATASET,
    "Checkpoint": CHECKPOINT,
    "Generation": GENERATION,
    "Attribution": ATTRIBUTION,
    "Run": RUN,
}


def segment_id(track_id: str, start_sample: int) -> str:
    """The Segment key: ``{track_id}@{start_sample}`` with ``start_sample`` at the dataset sample rate."""
    return f"{track_id}@{int(start_sample)}"


def rejection(
    record_kind: str, record_id: str, stage: str, reason: RejectionReason, detail: str = "", run_id: str = ""
) -> dict[str, Any]:
    """A Rejection row. ``reason`` must be a ``RejectionReason``; ``detail`` says what was seen."""
    return {
        "record_kind": record_kind,
        "record_id": record_id,
        "stage": stage,
        "reason": RejectionReason(reason).value,
        "detail": detail,
        "run_id": run_id,
    }


def to_table(rows: Iterable[Mapping[str, Any]], schema: pa.Schema) -> pa.Table:
    """Rows (dicts) → a table with exactly ``schema``'s columns, in its order.

    Raises:
        KeyError: a row lacks a non-nullable field.
        pyarrow.ArrowInvalid / ArrowTypeError: a value does not fit its field's type.
    """
    rows = list(rows)
    columns: dict[str, list[Any]] = {}
    for field in schema:
        if not field.nullable:
            columns[field.name] = [row[field.name] for row in rows]
        else:
            columns[field.name] = [row.get(field.name) for row in rows]
    return pa.Table.from_pydict(columns, schema=schema)


def write_table(table: pa.Table, path: str | os.PathLike[str]) -> Path:
    """Write a Parquet file atomically (temporary name in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        pq.write_table(table, tmp, compression="zstd")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text(text: str, path: str | os.PathLike[str]) -> Path:
    """Write a UTF-8 text file atomically (temporary name in the same folder, then rename).

    The file gets the process umask's permissions, like a plain ``open``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_json(value: Any, path: str | os.PathLike[str], default: Any = None) -> Path:
    """Write ``value`` as indented, key-sorted JSON atomically; ``default`` is ``json.dumps``'s fallback.

    Raises:
        TypeError: a value JSON cannot encode and ``default`` does not convert.
    """
    return write_text(json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False, default=default) + "\n", path)


def read_table(path: str | os.PathLike[str], schema: pa.Schema | None = None) -> pa.Table:
    """Read a Parquet table; with ``schema``, cast to it (raises if a column is missing)."""
    table = pq.read_table(path)
    if schema is not None:
        table = table.select(schema.names).cast(schema)
    return table


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace: the form that is hashed."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def sha256_hex(data: bytes | str) -> str:
    if isinstance(data, str):
        data = data.encode("utf-8")
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of a file's bytes, hex (read in 1 MiB blocks).

    Raises:
        FileNotFoundError: no file at ``path``.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def safe_name(text: str, max_chars: int = 80) -> str:
    """``text`` as a file-name part: ASCII letters, digits, ``-`` and ``_`` kept, anything else ``_``,
    cut to ``max_chars``. Not unique: callers add a hash of the original."""
    return "".join(ch if (ch.isascii() and (ch.isalnum() or ch in "-_")) else "_" for ch in text)[:max_chars]


def sample_key(segment_id_: str) -> str:
    """WebDataset sample key of a segment: readable, dot-free, unique (a short hash disambiguates).

    ``"fma-Vibe_Ace@320000"`` → ``"fma-Vibe_Ace-0000320000-1a2b3c4d"``.
    """
    track_id, _, start = segment_id_.rpartition("@")
    return f"{safe_name(track_id)}-{int(start):010d}-{sha256_hex(segment_id_)[:8]}"


def conditioning_text(track: Mapping[str, Any]) -> str:
    """The text a model is conditioned on for a track: title, artist, genre, tags, description.

    ``tags`` may be a list or a ``;``-separated string. Empty parts are skipped; lower-cased.
    """
    tags = track.get("tags") or []
    if isinstance(tags, str):
        tags = [t for t in tags.split(";")]
    parts = [track.get("title"), track.get("artist"), track.get("genre"), *tags, track.get("description")]
    return " ".join(str(p).strip() for p in parts if p and str(p).strip()).lower()


# DDEX ERN releases and deals, kept by ingest of a DDEX delivery (``releases.parquet``, ``deals.parquet``) ----

RELEASE = _schema(
    [
        pa.field("release_id", pa.string(), nullable=False),  # "{message path}#{ReleaseReference}"
        pa.field("release_reference", pa.string()),  # ReleaseReference, e.g. "R0"
        pa.field("kind", pa.string()),  # "Release" | "TrackRelease"
        pa.field("release_type", pa.string()),  # ReleaseType, e.g. "Album", "SingleResourceRelease", "DjMix"
        pa.field("icpn", pa.string()),  # ICPN (UPC/EAN) as written; "" when none
        pa.field("grid", pa.string()),  # GRid; "" when none
        pa.field("proprietary_ids", pa.list_(pa.string())),
        pa.field("title", pa.string()),
        pa.field("display_artist", pa.string()),
        pa.field("genre", pa.string()),
        pa.field("resource_references", pa.list_(pa.string())),  # every resource listed, in document order
        pa.field("track_ids", pa.list_(pa.string())),  # the Tracks of its SoundRecordings, in document order
        pa.field("message", pa.string()),  # the message's path inside the delivery
        pa.field("message_id", pa.string()),  # MessageHeader/MessageId as written ("" when empty)
        pa.field("delivery_id", pa.string()),
        pa.field("run_id", pa.string()),
    ],
    "Release",
)

DEAL = _schema(
    [
        pa.field("deal_id", pa.string(), nullable=False),  # "{message path}#deal-{n}", n from 1 in document order
        pa.field("release_references", pa.list_(pa.string())),  # DealReleaseReference
        pa.field("release_ids", pa.list_(pa.string())),  # the RELEASE rows they name
        pa.field("commercial_model_types", pa.list_(pa.string())),
        pa.field("use_types", pa.list_(pa.string())),  # as written; UserDefined ones also in the next field
        pa.field("user_defined_use_types", pa.list_(pa.string())),
        pa.field("territories", pa.list_(pa.string())),  # TerritoryCode (ISO 3166-1 alpha-2 or "Worldwide")
        pa.field("excluded_territories", pa.list_(pa.string())),
        pa.field("valid_from", pa.date32()),  # ValidityPeriod StartDate (date part of StartDateTime)
        pa.field("valid_until", pa.date32()),  # null when open-ended
        pa.field("grants_ai_training", pa.bool_()),  # False for streaming/download deals: only a use type
        # that names AI training would grant it (pipelines.stages.ingest.ddex.deal_grants_training)
        pa.field("message", pa.string()),
        pa.field("message_id", pa.string()),
        pa.field("delivery_id", pa.string()),
        pa.field("run_id", pa.string()),
    ],
    "Deal",
)

SCHEMAS.update({"Release": RELEASE, "Deal": DEAL})
