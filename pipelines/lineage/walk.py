"""``linernotes lineage ID``: walk the lineage store both ways from a track, dataset, checkpoint or generation.

Downstream, a track reaches the datasets that hold its segments, the checkpoints trained on those datasets
and the generations sampled from those checkpoints, plus every stored attribution that names it. Upstream,
a generation comes from a checkpoint, trained on a dataset, cut from tracks under licences held by rights
holders; its stored attributions say which of those tracks it draws on most.

Clean's decisions sit between a track's stems and the datasets: a track shows its stems with their latest decision
(the latest catalog version's ``stem_scores``) and, per dataset, which stems it holds; a dataset shows the catalog
version and the clean Run whose decisions it was built with, the stems those decisions dropped, and every Run that
produced it (a dataset is content-addressed: another catalog version may give the same dataset again).

Track metadata (title, rights holder, licence, ISRC) comes from the curated catalog and from the tracks
tables of every ingest run in the workspace (the newest run wins), so a track a later ingest dropped is
still described.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from pipelines.catalog import (
    catalogs_dir,
    latest_catalog,
    list_catalogs,
    read_catalog_licenses,
    read_stem_decisions,
    resolve_catalog,
)
from provenance.policy import OptOutRegistry
from provenance.store import LineageStore
from provenance.workspace import Workspace

KINDS = ("track", "catalog", "dataset", "checkpoint", "generation")
TRACK_FIELDS = ("track_id", "isrc", "title", "artist", "rights_holder", "license_id", "attribution")


class LineageError(ValueError):
    """No record with the asked id (or one of the asked kind) in the lineage store."""


def known_tracks(workspace: Workspace, store: LineageStore) -> dict[str, dict[str, Any]]:
    """``track_id`` → ``TRACK_FIELDS`` plus ``license_name``, from every ingest run's ``tracks.parquet``
    (oldest first, so the newest wins) and the curated catalog (wins over all)."""
    paths = [workspace.run_dir(run["run_id"]) / "tracks.parquet" for run in store.list_runs("ingest")]
    paths.append(workspace.catalog_table("tracks"))
    tracks: dict[str, dict[str, Any]] = {}
    for path in paths:
        if not path.is_file():
            continue
        table = pq.read_table(path)
        columns = [c for c in TRACK_FIELDS if c in table.column_names]
        for row in table.select(columns).to_pylist():
            tracks[row["track_id"]] = row
    licenses = read_catalog_licenses(workspace)
    for row in tracks.values():
        row["license_name"] = licenses.get(row.get("license_id") or "", {}).get("license_name")
    return tracks


def matching_tracks(tracks: Mapping[str, Mapping[str, Any]], registry: OptOutRegistry) -> list[str]:
    """Ids of the tracks an opt-out registry names (by track id, ISRC or rights holder), sorted."""
    return sorted(track_id for track_id, row in tracks.items() if not registry.check(row).admitted)


def lineage(workspace: Workspace, entity_id: str, kind: str | None = None) -> dict[str, Any]:
    """The lineage of one record, both ways, as one JSON-able dict with ``kind`` and ``id``.

    Args:
        entity_id: a generation, checkpoint, dataset, catalog version or track id.
        kind: restrict the lookup to one of ``KINDS``; by default the first kind that has the id, in the
            order generation, checkpoint, dataset, catalog, track.

    Raises:
        LineageError: no record has the id (the message lists the kinds looked in).
        ValueError: an unknown ``kind``.
    """
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind {kind!r} is not one of {', '.join(KINDS)}")
    store = LineageStore(workspace.store_url)
    try:
        walk = _Walk(workspace, store)
        for candidate in (kind,) if kind else ("generation", "checkpoint", "dataset", "catalog", "track"):
            found = getattr(walk, candidate)(entity_id)
            if found is not None:
                return {"kind": candidate, "id": entity_id, **found}
        looked = kind or "generation, checkpoint, dataset or track"
        also = "" if kind else " and no catalog version"
        raise LineageError(f"no {looked} with id {entity_id!r}{also} in the lineage store {_safe_url(workspace)}")
    finally:
        store.close()


class _Walk:
    """One lineage query's lookups (tracks metadata read once)."""

    def __init__(self, workspace: Workspace, store: LineageStore) -> None:
        self.workspace, self.store = workspace, store
        self._tracks: dict[str, dict[str, Any]] | None = None

    @property
    def tracks(self) -> dict[str, dict[str, Any]]:
        if self._tracks is None:
            self._tracks = known_tracks(self.workspace, self.store)
        return self._tracks

    # one function per kind: None when the id is not of that kind ---------------------------------------
    def track(self, track_id: str) -> dict[str, Any] | None:
        in_datasets = self.store.datasets_with_tracks([track_id])
        attributed = self.store.attributions_to_tracks([track_id])
        if not in_datasets and not attributed and track_id not in self.tracks:
            return None
        datasets = [self._dataset_brief(d, segments=self.store.dataset_track_segments(d).get(track_id, 0),
                                        stems=self._manifest(d).get("stems", {}).get(track_id))
                    for d in in_datasets]
        checkpoints = self.store.checkpoints_of_datasets(in_datasets)
        generations = self.store.generations_of_checkpoints(c["checkpoint_id"] for c in checkpoints)
        registry = OptOutRegistry.from_rows(self.store.list_opt_outs())
        meta = self.tracks.get(track_id, {"track_id": track_id})
        decision = registry.check(meta)
        return {
            "track": meta,
            "opted_out": None if decision.admitted else decision.detail,
            "stems": self._stems(track_id),
            "datasets": datasets,
            "checkpoints": [_checkpoint_brief(c) for c in checkpoints],
            "generations": [_generation_brief(g) for g in generations],
            "attributions": attributed,
        }

    def dataset(self, dataset_id: str) -> dict[str, Any] | None:
        record = self.store.get_dataset(dataset_id)
        if record is None:
            return None
        checkpoints = self.store.checkpoints_of_datasets([dataset_id])
        generations = self.store.generations_of_checkpoints(c["checkpoint_id"] for c in checkpoints)
        run = self.store.get_run(record["run_id"]) or {}
        return {
            "dataset": record,
            "run": self._run_brief(record["run_id"]),
            "catalog": (run.get("inputs") or {}).get("catalog"),
            "decisions": self._decisions_used(dataset_id, run),
            "runs": self._runs_producing(dataset_id),
            "derived_from": self.store.dataset_parents(dataset_id),
            "versions": self.store.dataset_children(dataset_id),
            **self._contents(dataset_id),
            "checkpoints": [_checkpoint_brief(c) for c in checkpoints],
            "generations": [_generation_brief(g) for g in generations],
        }

    def catalog(self, catalog_id: str) -> dict[str, Any] | None:
        """A catalog version: the Run that wrote it and the versions it came from (back to the ingest of a
        delivery), the versions derived from it, the Runs that read it and the datasets they made."""
        try:
            version = resolve_catalog(self.workspace, catalog_id)
        except FileNotFoundError:
            return None
        chain, seen = [], set()
        info: dict[str, Any] | None = version.info()
        while info is not None and info["catalog_id"] not in seen:  # up the parents
            seen.add(info["catalog_id"])
            run = self.store.get_run(info.get("run_id") or "") or {}
            chain.append({"catalog_id": info["catalog_id"], "stage": info.get("stage"),
                          "run_id": info.get("run_id"), "delivery": (run.get("config") or {}).get("delivery"),
                          "tables": sorted(info.get("tables", {}))})
            parent = info.get("parent")
            info = resolve_catalog(self.workspace, parent).info() if parent and self._has_catalog(parent) else None
        readers = [run for run in self.store.list_runs()
                   if (run.get("inputs") or {}).get("catalog") == version.catalog_id]
        datasets = sorted({(run.get("output_ids") or {})["dataset"] for run in readers
                           if run["status"] == "succeeded" and "dataset" in (run.get("output_ids") or {})})
        children = [v.catalog_id for v in list_catalogs(self.workspace)
                    if v.info().get("parent") == version.catalog_id]
        return {
            "catalog": {**chain[0], "uri": str(version.root), "latest": self._latest() == version.catalog_id},
            "came_from": chain[1:],
            "derived": children,
            "read_by": [{k: run.get(k) for k in ("run_id", "kind", "status")} for run in readers],
            "datasets": [self._dataset_brief(d) for d in datasets],
        }

    def _has_catalog(self, catalog_id: str) -> bool:
        return (catalogs_dir(self.workspace) / catalog_id).is_dir()

    def _latest(self) -> str | None:
        latest = latest_catalog(self.workspace)
        return latest.catalog_id if latest else None

    def checkpoint(self, checkpoint_id: str) -> dict[str, Any] | None:
        record = self.store.get_checkpoint(checkpoint_id)
        if record is None:
            return None
        return {
            "checkpoint": record,
            "run": self._run_brief(record["run_id"]),
            "dataset": self._dataset_brief(record["dataset_id"]),
            **self._contents(record["dataset_id"]),
            "generations": [_generation_brief(g) for g in self.store.generations_of_checkpoints([checkpoint_id])],
        }

    def generation(self, generation_id: str) -> dict[str, Any] | None:
        record = self.store.get_generation(generation_id)
        if record is None:
            return None
        checkpoint = self.store.get_checkpoint(record["checkpoint_id"]) or {}
        dataset_id = checkpoint.get("dataset_id")
        return {
            "generation": record,
            "run": self._run_brief(record["run_id"]),
            "checkpoint": _checkpoint_brief(checkpoint) if checkpoint else None,
            "dataset": self._dataset_brief(dataset_id) if dataset_id else None,
            **(self._contents(dataset_id) if dataset_id else {"tracks": [], "rights_holders": [], "licenses": []}),
            "attributions": self.attributions(generation_id),
        }

    # pieces ---------------------------------------------------------------------------------------------
    def attributions(self, query_id: str) -> dict[str, dict[str, Any]]:
        """Stored attribution of a query per method: ranked segments, and shares per track and rights holder."""
        by_method: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for row in self.store.get_attributions(query_id):
            by_method[row["method"]].append(row)
        return {method: summarize_attribution(rows, self.tracks) for method, rows in sorted(by_method.items())}

    def _contents(self, dataset_id: str) -> dict[str, list[dict[str, Any]]]:
        """A dataset's tracks (with metadata), and its rights holders and licences with track counts."""
        segments = self.store.dataset_track_segments(dataset_id)
        tracks = [{**{f: self.tracks.get(t, {}).get(f) for f in (*TRACK_FIELDS, "license_name")},
                   "track_id": t, "num_segments": n} for t, n in segments.items()]
        holders: Counter[str] = Counter()
        holder_segments: Counter[str] = Counter()
        licenses: dict[str, dict[str, Any]] = {}
        for track in tracks:
            holder = track["rights_holder"] or "(unknown)"
            holders[holder] += 1
            holder_segments[holder] += track["num_segments"]
            license_id = track["license_id"] or "(unknown)"
            entry = licenses.setdefault(license_id, {"license_id": license_id,
                                                     "license_name": track["license_name"], "tracks": 0})
            entry["tracks"] += 1
        return {
            "tracks": tracks,
            "rights_holders": [{"rights_holder": h, "tracks": holders[h], "segments": holder_segments[h]}
                               for h in sorted(holders)],
            "licenses": [licenses[k] for k in sorted(licenses)],
        }

    def _stems(self, track_id: str) -> list[dict[str, Any]]:
        """The track's stems in the latest catalog version, each with its latest decision (None: undecided)."""
        version = latest_catalog(self.workspace)
        if version is None or not version.table("audio_files").is_file():
            return []
        decided = {(r["track_id"], r["role"], r["instrument"] or ""): r for r in read_stem_decisions(version)}
        rows = pq.read_table(version.table("audio_files"), columns=["track_id", "role", "instrument"]).to_pylist()
        out = []
        for row in sorted((r for r in rows if r["track_id"] == track_id and r["role"] != "mixture"),
                          key=lambda r: (r["role"], r["instrument"] or "")):
            decision = decided.get((track_id, row["role"], row["instrument"] or "")) or {}
            out.append({"role": row["role"], "instrument": row["instrument"] or "",
                        "decision": decision.get("decision"), "reason": decision.get("reason") or "",
                        "method": decision.get("method"), "run_id": decision.get("run_id")})
        return out

    def _decisions_used(self, dataset_id: str, run: Mapping[str, Any]) -> dict[str, Any]:
        """The catalog version and clean decisions a dataset was sharded with, and the stems they dropped (None
        when that version is no longer in the workspace)."""
        manifest, inputs = self._manifest(dataset_id), run.get("inputs") or {}
        catalog_id = manifest.get("catalog_id") or inputs.get("catalog")
        clean_run_id = manifest.get("clean_run_id")
        dropped = None
        if catalog_id and self._has_catalog(catalog_id):
            dropped = [{"track_id": r["track_id"], "role": r["role"], "instrument": r["instrument"] or "",
                        "reason": r["reason"]}
                       for r in read_stem_decisions(resolve_catalog(self.workspace, catalog_id))
                       if r["decision"] == "drop"]
        return {"catalog_id": catalog_id, "decisions": manifest.get("decisions") or inputs.get("decisions"),
                "clean_run_id": clean_run_id, "clean_run": self._run_brief(clean_run_id) if clean_run_id else None,
                "stems": bool((manifest.get("config") or {}).get("stems")), "dropped": dropped}

    def _runs_producing(self, dataset_id: str) -> list[dict[str, Any]]:
        """Every succeeded Run that produced the dataset, oldest first: the one that built it and those that found
        it built (the same content from another catalog version or other decisions), each with the catalog version,
        decisions and clean Run it read (``dataset.json`` keeps the first build's)."""
        out = []
        for run in self.store.list_runs():
            if run["status"] != "succeeded" or dataset_id not in (run.get("output_ids") or {}).values():
                continue
            inputs, config = run.get("inputs") or {}, run.get("config") or {}
            out.append({**{k: run.get(k) for k in ("run_id", "kind", "started_at")},
                        "catalog_id": inputs.get("catalog"), "decisions": inputs.get("decisions"),
                        "clean_run_id": config.get("clean_run_id"),
                        "reused": bool((run.get("counts") or {}).get("reused"))})
        return out

    def _manifest(self, dataset_id: str) -> dict[str, Any]:
        """A dataset's ``dataset.json`` (empty when its folder is gone)."""
        uri = (self.store.get_dataset(dataset_id) or {}).get("uri")
        path = Path(uri) / "dataset.json" if uri else None
        return json.loads(path.read_text()) if path is not None and path.is_file() else {}

    def _dataset_brief(self, dataset_id: str, **extra: Any) -> dict[str, Any]:
        record = self.store.get_dataset(dataset_id) or {}
        keep = ("dataset_id", "run_id", "num_tracks", "num_segments", "created_at", "uri")
        return {"dataset_id": dataset_id, **{k: record.get(k) for k in keep if k in record}, **extra}

    def _run_brief(self, run_id: str) -> dict[str, Any] | None:
        run = self.store.get_run(run_id)
        if run is None:
            return None
        return {k: run.get(k) for k in ("run_id", "kind", "status", "started_at", "finished_at")}


def summarize_attribution(rows: Iterable[Mapping[str, Any]],
                          tracks: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Stored Attribution rows of one query and method → ``segments`` (by rank), ``tracks`` and
    ``rights_holders`` (summed shares, largest first), with each track's title and licence."""
    rows = sorted(rows, key=lambda r: r["rank"])
    track_share: dict[str, float] = defaultdict(float)
    holder_share: dict[str, float] = defaultdict(float)
    for row in rows:
        track_share[row["track_id"]] += row["share"]
        holder_share[row["rights_holder"]] += row["share"]
    return {
        "dataset_id": rows[0]["dataset_id"] if rows else None,
        "run_id": rows[0]["run_id"] if rows else None,
        "segments": [{k: row[k] for k in ("rank", "segment_id", "track_id", "rights_holder", "score", "share")}
                     for row in rows],
        "tracks": [{"track_id": t, "share": s, "title": tracks.get(t, {}).get("title"),
                    "rights_holder": tracks.get(t, {}).get("rights_holder"),
                    "license_id": tracks.get(t, {}).get("license_id"),
                    "license_name": tracks.get(t, {}).get("license_name"),
                    "attribution": tracks.get(t, {}).get("attribution")}
                   for t, s in sorted(track_share.items(), key=lambda kv: (-kv[1], kv[0]))],
        "rights_holders": [{"rights_holder": h, "share": s}
                           for h, s in sorted(holder_share.items(), key=lambda kv: (-kv[1], kv[0]))],
    }


def find_no_attribution(store: LineageStore, query_id: str, method: str) -> dict[str, str] | None:
    """Why a query has no stored ``method`` attribution, when its newest succeeded ``attribute`` Run found nothing
    to attribute: ``{"reason", "detail", "run_id", "dataset_id"}`` (``reason`` one of
    ``provenance.attribution.NO_ATTRIBUTION_REASONS``); None when that Run stored a ranking, or none ran.

    The reason is in the Run's counts (``no_attribution``: reason → 1); the detail in its ``summary.json`` (``""``
    when that file is gone)."""
    mine = [run for run in store.list_runs("attribute")
            if run.get("status") == "succeeded" and (run.get("inputs") or {}).get("query_id") == query_id
            and (run.get("config") or {}).get("method", "embedding") == method]
    if not mine:
        return None
    newest = mine[-1]  # list_runs is oldest first
    reasons = sorted(((newest.get("counts") or {}).get("no_attribution") or {}))
    if not reasons:
        return None
    detail = ""
    summary = (newest.get("outputs") or {}).get("summary")
    if summary and Path(summary).is_file():
        detail = (json.loads(Path(summary).read_text()).get("no_attribution") or {}).get("detail", "")
    return {"reason": reasons[0], "detail": detail, "run_id": newest["run_id"],
            "dataset_id": (newest.get("inputs") or {}).get("dataset")}


def _checkpoint_brief(record: Mapping[str, Any]) -> dict[str, Any]:
    return {k: record.get(k) for k in ("checkpoint_id", "dataset_id", "step", "run_id", "created_at", "uri")}


def _generation_brief(record: Mapping[str, Any]) -> dict[str, Any]:
    return {k: record.get(k) for k in ("generation_id", "checkpoint_id", "prompt", "seed", "duration_s",
                                       "created_at", "uri")}


def _safe_url(workspace: Workspace) -> str:
    """The store URL without a password."""
    import sqlalchemy as sa

    return sa.make_url(workspace.store_url).render_as_string(hide_password=True)
