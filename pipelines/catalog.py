"""Reading the curated catalog's tables (``catalog/*.parquet``) for the stages and commands that only look rows up,
and the catalog's content id. Light: pyarrow, no audio or model library."""

from __future__ import annotations

from typing import Any

import pyarrow.parquet as pq

from provenance import records
from provenance.workspace import Workspace


def catalog_id(workspace: Workspace, tables: tuple[str, ...] = ("tracks", "audio_files", "licenses")) -> str:
    """Content id of the workspace's catalog tables: ``cat-`` + sha256 over each table's file sha256.

    Raises:
        FileNotFoundError: tables are missing (the message names each and the command that writes them).
    """
    paths = {name: workspace.catalog_table(name) for name in tables}
    missing = [str(path) for path in paths.values() if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"the curated catalog is incomplete, missing {', '.join(missing)}: "
                                f"run `linernotes ingest DELIVERY` first")
    digests = {name: records.file_sha256(path) for name, path in paths.items()}
    return "cat-" + records.sha256_hex(records.canonical_json(digests))[:16]


def read_catalog_licenses(workspace: Workspace) -> dict[str, dict[str, Any]]:
    """``license_id`` → {license_name, license_url} from the catalog; empty if there is no licences table."""
    path = workspace.catalog_table("licenses")
    if not path.is_file():
        return {}
    table = pq.read_table(path, columns=["license_id", "license_name", "license_url"])
    return {row["license_id"]: row for row in table.to_pylist()}


def read_catalog_tracks(workspace: Workspace) -> dict[str, dict[str, Any]]:
    """``track_id`` → ``TRACK_META_FIELDS`` from the catalog's tracks joined with its licences; empty if
    there is no tracks table."""
    path = workspace.catalog_table("tracks")
    if not path.is_file():
        return {}
    columns = ["track_id", "title", "artist", "rights_holder", "license_id", "attribution"]
    licenses = read_catalog_licenses(workspace)
    tracks: dict[str, dict[str, Any]] = {}
    for row in pq.read_table(path, columns=columns).to_pylist():
        license_ = licenses.get(row["license_id"] or "", {})
        tracks[row["track_id"]] = {**{k: row[k] for k in columns[1:]},
                                   "license_name": license_.get("license_name"),
                                   "license_url": license_.get("license_url")}
    return tracks
