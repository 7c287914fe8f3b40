"""Reading a catalog delivery's tables (``tracks.csv``, ``files.csv``, ``licenses.csv``) into row dicts.

Table-level problems (a missing file or column, undecodable text) raise ``DeliveryError`` before any
audio is read, naming the table and the column. Row-level problems become Rejections later, in ingest.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from provenance.policy import check_isrc, check_iswc, normalize_isrc, normalize_iswc, parse_bool, parse_territories
from provenance.records import RejectionReason, Role, rejection, sha256_hex

# the stage that reads deliveries (pipelines.stages.ingest.stage.STAGE); the default ``stage`` of its rejections
INGEST = "ingest"
TRACK_COLUMNS = ("track_id", "isrc", "title", "artist", "rights_holder", "license_id", "attribution",
                 "genre", "tags", "description")
TRACK_OPTIONAL = ("iswc", "bpm", "key")
FILE_COLUMNS = ("track_id", "role", "instrument", "path")
LICENSE_COLUMNS = ("license_id", "licensor", "license_name", "license_url", "territories", "valid_from",
                   "valid_until", "ai_training", "commercial_use", "attribution_required")


class DeliveryError(ValueError):
    """The delivery as a whole cannot be read (missing table or column, undecodable text)."""


@dataclass(frozen=True)
class Delivery:
    """A delivery's rows. Each row dict carries ``_row`` (1-based data row number in its table).

    ``format`` is ``csv`` (tracks.csv + files.csv) or ``ddex`` (ERN 4.x messages, ``*.xml``); either way the
    licence agreements come from ``licenses.csv``. ``messages`` lists the DDEX messages read and
    ``message_errors`` those that could not be (``{"message", "reason", "detail"}``); ``releases`` and
    ``deals`` hold the readable messages' releases and deals (``records.RELEASE``, ``records.DEAL`` rows).
    """

    root: Path
    delivery_id: str
    tracks: list[dict[str, Any]]
    files: list[dict[str, Any]]
    licenses: list[dict[str, Any]]
    format: str = "csv"
    messages: list[str] = field(default_factory=list)
    message_errors: list[dict[str, str]] = field(default_factory=list)
    releases: list[dict[str, Any]] = field(default_factory=list)  # DDEX: records.RELEASE rows (no run_id)
    deals: list[dict[str, Any]] = field(default_factory=list)  # DDEX: records.DEAL rows (no run_id)


def read_delivery(root: str | os.PathLike[str], default_license_id: str | None = None) -> Delivery:
    """Read a delivery folder: CSV tables, or DDEX ERN 4.x messages when there is no ``tracks.csv``.

    ``delivery_id`` is ``{folder name}-{sha256 of the tables' (or messages') bytes, 12 hex}``: the same
    delivery gets the same id wherever it lies. ``default_license_id`` fills an empty ``license_id`` (the
    licence agreement a DDEX delivery comes under: its deals for streaming or download never grant training).

    Raises:
        DeliveryError: the folder or a table is missing, a required column is absent, or a table is not
            UTF-8 text.
    """
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise DeliveryError(f"delivery folder {root} does not exist")
    if not (root / "tracks.csv").is_file() and any(root.rglob("*.xml")):
        delivery = _read_ddex_delivery(root)
    else:
        delivery = _read_csv_delivery(root)
    if default_license_id:
        for row in delivery.tracks:
            if not row.get("license_id"):
                row["license_id"] = default_license_id
    return delivery


def _read_ddex_delivery(root: Path) -> Delivery:
    from pipelines.stages.ingest.ddex import read_ern_records

    licenses_path = root / "licenses.csv"
    if not licenses_path.is_file():
        raise DeliveryError(f"delivery {root} has DDEX messages but no licenses.csv: DDEX deals do not grant AI "
                            "training, the licence agreements must be delivered beside the messages")
    licenses_blob = licenses_path.read_bytes()
    messages = sorted(root.rglob("*.xml"))
    digest = sha256_hex(b"".join([licenses_blob, *(p.read_bytes() for p in messages)]))[:12]
    try:
        records = read_ern_records(root)
    except FileNotFoundError as err:
        raise DeliveryError(str(err)) from err
    delivery_id = f"{root.name}-{digest}"
    return Delivery(root=root, delivery_id=delivery_id, tracks=records.tracks, files=records.files,
                    licenses=_parse_csv("licenses.csv", licenses_blob, LICENSE_COLUMNS), format="ddex",
                    messages=[p.relative_to(root).as_posix() for p in messages], message_errors=records.errors,
                    releases=[{**row, "delivery_id": delivery_id} for row in records.releases],
                    deals=[{**row, "delivery_id": delivery_id} for row in records.deals])


def _read_csv_delivery(root: Path) -> Delivery:
    blobs: dict[str, bytes] = {}
    for name in ("tracks.csv", "files.csv", "licenses.csv"):
        path = root / name
        if not path.is_file():
            raise DeliveryError(f"delivery {root} has no {name} (a delivery holds tracks.csv, files.csv, licenses.csv, "
                                "or DDEX ERN messages and licenses.csv)")
        blobs[name] = path.read_bytes()
    digest = sha256_hex(b"".join(blobs[n] for n in sorted(blobs)))[:12]
    return Delivery(
        root=root,
        delivery_id=f"{root.name}-{digest}",
        tracks=_parse_csv("tracks.csv", blobs["tracks.csv"], TRACK_COLUMNS),
        files=_parse_csv("files.csv", blobs["files.csv"], FILE_COLUMNS),
        licenses=_parse_csv("licenses.csv", blobs["licenses.csv"], LICENSE_COLUMNS),
    )


def _parse_csv(name: str, data: bytes, required: tuple[str, ...]) -> list[dict[str, Any]]:
    # Bytes that are not UTF-8 become lone surrogates (surrogateescape); the rows holding them are rejected
    # ``invalid_encoding`` by ``encoding_problem``, the rest of the table is read.
    text = data.decode("utf-8-sig", errors="surrogateescape")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = [h.strip() for h in (reader.fieldnames or [])]
    missing = [c for c in required if c not in header]
    if missing:
        raise DeliveryError(f"{name} lacks column(s) {', '.join(missing)}; it has {', '.join(header) or 'none'}")
    rows = []
    for number, raw in enumerate(reader, start=1):
        row = {(k or "").strip(): (v.strip() if isinstance(v, str) else "") for k, v in raw.items() if k is not None}
        if not any(row.values()):
            continue  # blank line
        row["_row"] = number
        rows.append(row)
    return rows


def encoding_problem(row: Mapping[str, Any]) -> str | None:
    """What is not UTF-8 in a row, or None. Invalid bytes are shown as ``\\xNN``."""
    for column, value in row.items():
        if isinstance(value, str) and any("\udc80" <= ch <= "\udcff" for ch in value):
            return f"column {column} holds bytes that are not UTF-8: {printable(value)!r}"
    return None


def printable(value: str) -> str:
    """``value`` with any undecodable bytes (lone surrogates) written as ``\\xNN``: safe to store."""
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


# licences ---------------------------------------------------------------------------------------------

def parse_license(row: Mapping[str, Any], delivery_id: str, stage: str = INGEST,
                  run_id: str = "") -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """A licences.csv row → (a ``records.LICENSE`` row, None) or (None, a Rejection)."""
    license_id = row.get("license_id", "")
    if problem := encoding_problem(row):
        return None, rejection("license", printable(license_id) or f"licenses.csv row {row.get('_row')}", stage,
                               RejectionReason.INVALID_ENCODING, problem, run_id)
    if not license_id:
        return None, rejection("license", f"licenses.csv row {row.get('_row')}", stage,
                               RejectionReason.MISSING_FIELD, "license_id is empty", run_id)
    try:
        record = {
            "license_id": license_id,
            "licensor": row.get("licensor", ""),
            "license_name": row.get("license_name", ""),
            "license_url": row.get("license_url", ""),
            "territories": parse_territories(row.get("territories")),
            "valid_from": _parse_date(row.get("valid_from"), "valid_from"),
            "valid_until": _parse_date(row.get("valid_until"), "valid_until"),
            "ai_training": (row.get("ai_training") or "").strip().lower(),
            "commercial_use": parse_bool(row.get("commercial_use"), "commercial_use"),
            "attribution_required": parse_bool(row.get("attribution_required"), "attribution_required"),
            "delivery_id": delivery_id,
        }
    except ValueError as err:
        return None, rejection("license", license_id, stage, RejectionReason.INVALID_FIELD, str(err), run_id)
    if record["ai_training"] not in {"allowed", "denied"}:
        return None, rejection("license", license_id, stage, RejectionReason.INVALID_FIELD,
                               f"ai_training: {row.get('ai_training')!r} is not allowed or denied", run_id)
    return record, None


def _parse_date(value: Any, name: str) -> dt.date | None:
    text = (value or "").strip()
    if not text:
        return None
    try:
        return dt.date.fromisoformat(text)
    except ValueError as err:
        raise ValueError(f"{name}: {text!r} is not an ISO date (YYYY-MM-DD)") from err


# tracks -----------------------------------------------------------------------------------------------

def parse_track(row: Mapping[str, Any], delivery_id: str, stage: str = INGEST,
                run_id: str = "") -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """A tracks.csv row → (a ``records.TRACK`` row, None) or (None, a Rejection for a bad field)."""
    track_id = row.get("track_id", "")
    if problem := encoding_problem(row):
        return None, rejection("track", printable(track_id) or f"tracks.csv row {row.get('_row')}", stage,
                               RejectionReason.INVALID_ENCODING, problem, run_id)
    if not track_id:
        return None, rejection("track", f"tracks.csv row {row.get('_row')}", stage,
                               RejectionReason.MISSING_FIELD, "track_id is empty", run_id)
    for required in ("license_id", "rights_holder"):
        if not row.get(required):
            hint = (" (DDEX deals do not grant AI training: name the licence agreement with `--license ID`)"
                    if required == "license_id" and row.get("_message") else "")
            return None, rejection("track", track_id, stage, RejectionReason.MISSING_FIELD,
                                   f"{required} is empty{hint}", run_id)
    bpm: float | None = None
    if row.get("bpm"):
        try:
            bpm = float(row["bpm"])
        except ValueError:
            return None, rejection("track", track_id, stage, RejectionReason.INVALID_FIELD,
                                   f"bpm: {row['bpm']!r} is not a number", run_id)
    isrc = normalize_isrc(row.get("isrc", ""))
    if isrc and (problem := check_isrc(isrc)):
        return None, rejection("track", track_id, stage, RejectionReason.INVALID_FIELD, problem, run_id)
    iswc = normalize_iswc(row.get("iswc", "")) if row.get("iswc") else ""
    if iswc and (problem := check_iswc(iswc)):
        return None, rejection("track", track_id, stage, RejectionReason.INVALID_FIELD, problem, run_id)
    record = {
        "track_id": track_id,
        "isrc": isrc,
        "iswc": iswc,
        "title": row.get("title", ""),
        "artist": row.get("artist", ""),
        "rights_holder": row.get("rights_holder", ""),
        "license_id": row.get("license_id", ""),
        "attribution": row.get("attribution", ""),
        "genre": row.get("genre", ""),
        "tags": [t.strip() for t in (row.get("tags") or "").split(";") if t.strip()],
        "description": row.get("description", ""),
        "bpm": bpm,
        "key": row.get("key", ""),
        "delivery_id": delivery_id,
        "run_id": run_id,
    }
    return record, None


# files ------------------------------------------------------------------------------------------------

def file_record_id(row: Mapping[str, Any]) -> str:
    """How a files.csv row is named in Rejections: ``track_id/role/instrument:path``."""
    return printable(f"{row.get('track_id', '')}/{row.get('role', '')}/{row.get('instrument', '')}:{row.get('path', '')}")


def check_file_row(row: Mapping[str, Any], root: Path, stage: str = INGEST,
                   run_id: str = "") -> tuple[Path | None, dict[str, Any] | None]:
    """Check a files.csv row before decoding: role, path inside the delivery, file present.

    Returns:
        (absolute path, None) or (None, a Rejection).
    """
    record_id = file_record_id(row)
    if problem := encoding_problem(row):
        return None, rejection("audio_file", record_id, stage, RejectionReason.INVALID_ENCODING, problem, run_id)
    for required in ("track_id", "role", "path"):
        if not row.get(required):
            return None, rejection("audio_file", record_id, stage, RejectionReason.MISSING_FIELD,
                                   f"{required} is empty", run_id)
    if row["role"] not in {r.value for r in Role}:
        return None, rejection("audio_file", record_id, stage, RejectionReason.INVALID_ROLE,
                               f"role {row['role']!r} is not one of {', '.join(r.value for r in Role)}", run_id)
    relative = Path(row["path"])
    if relative.is_absolute() or ".." in relative.parts:
        return None, rejection("audio_file", record_id, stage, RejectionReason.PATH_OUTSIDE_DELIVERY,
                               f"path {row['path']!r} is absolute or climbs out of the delivery", run_id)
    path = (root / relative)
    resolved = path.resolve()
    if not resolved.is_relative_to(root):
        return None, rejection("audio_file", record_id, stage, RejectionReason.PATH_OUTSIDE_DELIVERY,
                               f"path {row['path']!r} resolves to {resolved}, outside {root}", run_id)
    if not resolved.is_file():
        return None, rejection("audio_file", record_id, stage, RejectionReason.MISSING_FILE,
                               f"no file at {row['path']!r}", run_id)
    return resolved, None


def read_licenses(delivery: Delivery, run_id: str, stage: str = INGEST) -> tuple[dict[str, dict[str, Any]],
                                                                                list[dict[str, Any]]]:
    """The delivery's licence rows → ({license_id: ``records.LICENSE`` row}, Rejections for bad or repeated rows)."""
    licenses: dict[str, dict[str, Any]] = {}
    rejections: list[dict[str, Any]] = []
    for row in delivery.licenses:
        record, rej = parse_license(row, delivery.delivery_id, stage, run_id)
        if rej is not None:
            rejections.append(rej)
        elif record["license_id"] in licenses:
            rejections.append(rejection("license", record["license_id"], stage, RejectionReason.DUPLICATE_ID,
                                        f"licenses.csv row {row['_row']} repeats a licence id", run_id))
        else:
            licenses[record["license_id"]] = record
    return licenses, rejections
