"""Catalog versions, and reading the curated catalog's tables. Light: pyarrow, no audio or model library.

A catalog is a set of versions, never a folder that changes. Ingest, separate and clean each commit a new
``catalogs/<catalog_id>/`` (the id: a hash of its tables' bytes) and never overwrite one; ``catalog`` in the
workspace is a symbolic link to the latest version, switched atomically, so ``catalog/tracks.parquet`` is always a
whole version. Each version holds ``catalog.json``: its id, the version it was derived from (``parent``), the stage
and Run that wrote it, and each table's sha256. A workspace whose ``catalog/`` is still a plain folder (the layout
before versions) is migrated on first use: its tables become a version and ``catalog`` a link to it.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from provenance import records
from provenance.workspace import Workspace

VERSION_FILE = "catalog.json"


@dataclass(frozen=True)
class CatalogVersion:
    """One committed catalog version: ``catalog_id`` and its folder ``root``."""

    catalog_id: str
    root: Path

    def table(self, name: str) -> Path:
        """The path of table ``name`` (``tracks``, ``audio_files``, ``licenses``, ``stem_scores``, …)."""
        return self.root / f"{name}.parquet"

    def info(self) -> dict[str, Any]:
        """``catalog.json``: ``catalog_id``, ``parent``, ``stage``, ``run_id``, ``tables`` (name → sha256)."""
        path = self.root / VERSION_FILE
        return json.loads(path.read_text()) if path.is_file() else {"catalog_id": self.catalog_id}


def catalogs_dir(workspace: Workspace) -> Path:
    return workspace.root / "catalogs"


def version_id(digests: Mapping[str, str]) -> str:
    """The content id of a version whose tables have the sha256 ``digests`` (name → hex): ``cat-`` + 16 hex."""
    return "cat-" + records.sha256_hex(records.canonical_json(dict(sorted(digests.items()))))[:16]


def latest_catalog(workspace: Workspace) -> CatalogVersion | None:
    """The version ``catalog`` points at (a plain ``catalog/`` folder is migrated first); None before any ingest."""
    migrate_catalog(workspace)
    link = workspace.catalog_dir
    if not link.is_symlink():
        return None
    target = (link.parent / os.readlink(link)).resolve()
    return CatalogVersion(target.name, target) if target.is_dir() else None


def resolve_catalog(workspace: Workspace, catalog_id: str | None = None) -> CatalogVersion:
    """The version ``catalog_id`` (a ``cat-`` id, or a unique prefix of one), or the latest when None.

    Raises:
        FileNotFoundError: no catalog yet (run ``linernotes ingest DELIVERY``), or no version with that id.
    """
    if catalog_id is None:
        latest = latest_catalog(workspace)
        if latest is None:
            raise FileNotFoundError(f"the workspace {workspace.root} has no curated catalog "
                                    f"({workspace.catalog_table('tracks')} does not exist): "
                                    "run `linernotes ingest DELIVERY` first")
        return latest
    migrate_catalog(workspace)
    found = sorted(p for p in catalogs_dir(workspace).glob(f"{catalog_id}*") if p.is_dir())
    if len(found) != 1:
        known = ", ".join(v.catalog_id for v in list_catalogs(workspace)) or "none"
        raise FileNotFoundError(f"no catalog version {catalog_id!r} in {catalogs_dir(workspace)} "
                                f"({'ambiguous' if found else 'the versions are: ' + known})")
    return CatalogVersion(found[0].name, found[0])


def list_catalogs(workspace: Workspace) -> list[CatalogVersion]:
    """Every committed version, oldest first (by the time it was committed)."""
    folder = catalogs_dir(workspace)
    if not folder.is_dir():
        return []
    versions = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith("cat-")]
    return [CatalogVersion(p.name, p) for p in sorted(versions, key=lambda p: (p.stat().st_mtime, p.name))]


def commit_catalog(workspace: Workspace, tables: Mapping[str, pa.Table | Path], *, parent: str | None,
                   stage: str, run_id: str) -> CatalogVersion:
    """Write a new catalog version and point ``catalog`` at it.

    Args:
        tables: name → an Arrow table to write, or the path of a Parquet file to take as it is (hard-linked when
            the file system allows, else copied): a derived version takes its parent's unchanged tables so.
        parent: the id of the version this one was derived from (None for an ingest).

    Returns:
        The version. Committing tables identical to an existing version's gives that version (same id, its
        ``catalog.json`` kept); a damaged version with that id (a table missing or changed) is replaced.
    """
    migrate_catalog(workspace)
    folder = catalogs_dir(workspace)
    folder.mkdir(parents=True, exist_ok=True)
    staging = folder / f".tmp-{run_id}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        for name, table in sorted(tables.items()):
            target = staging / f"{name}.parquet"
            if isinstance(table, pa.Table):
                records.write_table(table, target)
            else:
                _link_or_copy(Path(table), target)
        digests = {name: records.file_sha256(staging / f"{name}.parquet") for name in sorted(tables)}
        catalog_id = version_id(digests)
        records.write_json({"catalog_id": catalog_id, "parent": parent, "stage": stage, "run_id": run_id,
                            "tables": digests}, staging / VERSION_FILE)
        final = folder / catalog_id
        if final.is_dir() and _intact(final, digests):
            shutil.rmtree(staging)
        else:
            if final.exists():  # damaged: move it aside, then put the whole new one in its place
                os.replace(final, folder / f".damaged-{catalog_id}-{uuid.uuid4().hex[:8]}")
            try:
                os.replace(staging, final)
            except OSError:  # another process committed the same tables meanwhile
                if not (final.is_dir() and _intact(final, digests)):
                    raise
                shutil.rmtree(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    point_catalog(workspace, catalog_id)
    return CatalogVersion(catalog_id, final)


def point_catalog(workspace: Workspace, catalog_id: str) -> None:
    """Make ``catalog`` a link to version ``catalog_id`` (atomic: a new link renamed over the old one).

    Raises:
        FileNotFoundError: no such version.
    """
    target = catalogs_dir(workspace) / catalog_id
    if not target.is_dir():
        raise FileNotFoundError(f"no catalog version {catalog_id} in {catalogs_dir(workspace)}")
    link = workspace.catalog_dir
    if link.is_symlink() and os.readlink(link) == os.path.join("catalogs", catalog_id):
        return
    tmp = link.with_name(f".catalog-{uuid.uuid4().hex[:8]}")
    os.symlink(os.path.join("catalogs", catalog_id), tmp)
    os.replace(tmp, link)


def advance_catalog(workspace: Workspace, catalog_id: str) -> None:
    """Make version ``catalog_id`` the latest, unless the latest was derived from it (then it is newer): a cached
    ingest after a clean must not move ``catalog`` back to the version without clean's decisions."""
    latest = latest_catalog(workspace)
    seen: set[str] = set()
    version = latest
    while version is not None and version.catalog_id not in seen:
        if version.catalog_id == catalog_id:
            return
        seen.add(version.catalog_id)
        parent = version.info().get("parent")
        version = CatalogVersion(parent, catalogs_dir(workspace) / parent) if parent and (
            catalogs_dir(workspace) / parent).is_dir() else None
    point_catalog(workspace, catalog_id)


def migrate_catalog(workspace: Workspace) -> CatalogVersion | None:
    """Turn a plain ``catalog/`` folder (the layout before versions) into a version and a link to it.

    Returns:
        The version it became, or None when there was nothing to migrate.
    """
    old = workspace.catalog_dir
    if old.is_symlink() or not old.is_dir():
        return None
    tables = {p.stem: p for p in sorted(old.glob("*.parquet"))}
    aside = old.with_name(f".catalog-migrating-{uuid.uuid4().hex[:8]}")
    os.replace(old, aside)  # from here on ``catalog`` is absent, never half a version
    if not tables:
        shutil.rmtree(aside)
        return None
    try:
        version = commit_catalog(workspace, {name: aside / path.name for name, path in tables.items()},
                                 parent=None, stage="migrated", run_id="migrated")
    except BaseException:
        if not old.exists() and not old.is_symlink():
            os.replace(aside, old)  # put the old folder back: the next start migrates it again
        raise
    shutil.rmtree(aside)
    return version


def derive_catalog(workspace: Workspace, parent: CatalogVersion, changed: Mapping[str, pa.Table | Path], *,
                   stage: str, run_id: str) -> CatalogVersion:
    """A new version: ``parent``'s tables with ``changed`` ones replaced or added (``commit_catalog``)."""
    tables: dict[str, pa.Table | Path] = {p.stem: p for p in parent.root.glob("*.parquet")}
    tables.update(changed)
    return commit_catalog(workspace, tables, parent=parent.catalog_id, stage=stage, run_id=run_id)


def _intact(folder: Path, digests: Mapping[str, str]) -> bool:
    for name, digest in digests.items():
        path = folder / f"{name}.parquet"
        if not path.is_file() or records.file_sha256(path) != digest:
            return False
    return True


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def catalog_id(workspace: Workspace, tables: tuple[str, ...] = ("tracks", "audio_files", "licenses"),
               version: CatalogVersion | None = None) -> str:
    """Content id of some of a catalog version's tables (the latest version by default): ``cat-`` + sha256 over
    each table's file sha256. A stage keys its cache on the tables it reads, so a version that changed only others
    (clean's ``stem_scores``) does not re-run it.

    Raises:
        FileNotFoundError: tables are missing (the message names each and the command that writes them).
    """
    paths = {name: version.table(name) if version else workspace.catalog_table(name) for name in tables}
    missing = [str(path) for path in paths.values() if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"the curated catalog is incomplete, missing {', '.join(missing)}: "
                                f"run `linernotes ingest DELIVERY` first")
    digests = {name: records.file_sha256(path) for name, path in paths.items()}
    return "cat-" + records.sha256_hex(records.canonical_json(digests))[:16]


#: StemScore ``method`` values that carry a stem's decision: clean's ``final`` row, or ``reference`` (a trusted stem).
DECISION_METHODS = ("final", "reference")


def read_stem_decisions(version: CatalogVersion) -> list[dict[str, Any]]:
    """The decisions of a catalog version: its ``stem_scores`` rows whose method is ``final`` or ``reference``
    (track_id, role, instrument, decision ``keep``/``drop``, reason, run_id of the clean Run). Empty when the
    version holds no ``stem_scores`` (no clean run yet)."""
    path = version.table("stem_scores")
    if not path.is_file():
        return []
    return [row for row in pq.read_table(path).to_pylist() if row["method"] in DECISION_METHODS]


def decisions_id(version: CatalogVersion) -> str:
    """Content id of a version's stem decisions: ``decisions-`` + 16 hex of ``stem_scores.parquet``'s sha256, or
    ``none`` when the version has no decisions."""
    path = version.table("stem_scores")
    return "decisions-" + records.file_sha256(path)[:16] if path.is_file() else "none"


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
