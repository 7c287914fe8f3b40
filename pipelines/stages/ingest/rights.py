"""``linernotes rights``: explain the policy's decision for one track; register opt-outs.

``explain_track`` re-evaluates every policy check for a track against the delivery and the purpose of the
latest ingest run that saw it (or a named run), with today's opt-out registry, and shows what that run
recorded for the track and its files.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

import pyarrow.parquet as pq

from pipelines.stages.ingest.delivery import INGEST as STAGE
from pipelines.stages.ingest.delivery import parse_track, read_delivery, read_licenses
from provenance.policy import OptOutRegistry, RunPurpose, explain
from provenance.records import Purpose
from provenance.store import LineageStore
from provenance.workspace import Workspace


class ExplainError(ValueError):
    """No ingest run to explain from, or the track is not in its delivery."""


def explain_track(workspace: Workspace, track_id: str, run_id: str | None = None) -> dict[str, Any]:
    """Every policy check for ``track_id`` plus the recorded outcome, as one JSON-able dict.

    Raises:
        ExplainError: no (such) ingest run, or the track is not in that run's delivery.
        pipelines.stages.ingest.delivery.DeliveryError: the run's delivery can no longer be read.
    """

    store = LineageStore(workspace.store_url)
    try:
        runs = [r for r in store.list_runs(STAGE) if r["status"] == "succeeded"]
        if run_id is not None:
            runs = [r for r in runs if r["run_id"] == run_id]
            if not runs:
                raise ExplainError(f"no succeeded ingest run {run_id} in {workspace.root}")
        if not runs:
            raise ExplainError(f"no ingest run in {workspace.root}: run `linernotes ingest DELIVERY` first")
        registry = OptOutRegistry.from_rows(store.list_opt_outs())
    finally:
        store.close()
    for run in reversed(runs):
        config = run["config"]
        delivery = read_delivery(config["delivery"], default_license_id=config.get("license_id"))
        rows = [row for row in delivery.tracks if row.get("track_id") == track_id]
        if rows:
            break
    else:
        raise ExplainError(f"track {track_id!r} is in no ingested delivery (runs: {', '.join(r['run_id'] for r in runs)})")
    purpose = RunPurpose(Purpose(config["purpose"]), config["territory"], dt.date.fromisoformat(config["as_of"]))
    licenses, _ = read_licenses(delivery, run["run_id"])
    record, field_rejection = parse_track(rows[0], delivery.delivery_id)
    checks = [] if record is None else explain(record, licenses, purpose, registry)
    recorded = _recorded(workspace, run["run_id"], track_id)
    admitted_now = record is not None and all(c.passed for c in checks)
    return {
        "track_id": track_id,
        "run_id": run["run_id"],
        "delivery": str(delivery.root),
        "purpose": purpose.to_dict(),
        "duplicate_rows": len(rows) - 1,
        "field_check": None if field_rejection is None else field_rejection["detail"],
        "checks": [{**dataclasses.asdict(c), "reason": c.reason.value if c.reason else None} for c in checks],
        "admitted_by_policy_now": admitted_now,
        "recorded": recorded,
    }


def _recorded(workspace: Workspace, run_id: str, track_id: str) -> dict[str, Any]:
    run_dir = workspace.run_dir(run_id)
    outcome: dict[str, Any] = {"status": "unknown", "rejections": []}
    rejections_path, tracks_path = run_dir / "rejections.parquet", run_dir / "tracks.parquet"
    if rejections_path.is_file():
        rows = pq.read_table(rejections_path).to_pylist()
        mine = sorted((r for r in rows if r["record_id"] == track_id or r["record_id"].startswith(f"{track_id}/")),
                      key=lambda r: (r["record_kind"] != "track", r["record_id"]))
        outcome["rejections"] = [{k: r[k] for k in ("record_kind", "record_id", "reason", "detail")} for r in mine]
        if any(r["record_kind"] == "track" and r["record_id"] == track_id for r in mine):
            outcome["status"] = "rejected"
    if tracks_path.is_file() and track_id in set(pq.read_table(tracks_path, columns=["track_id"])["track_id"].to_pylist()):
        outcome["status"] = "accepted"
    return outcome


def add_opt_out(workspace: Workspace, kind: str, value: str, reason: str = "") -> dict[str, Any]:
    """Register an opt-out in the lineage store; later ingest runs reject what it names (``opted_out``)."""
    store = LineageStore(workspace.store_url)
    try:
        added = store.add_opt_out(kind, value, reason)
        return {"kind": kind, "value": value, "added": added, "opt_outs": len(store.list_opt_outs())}
    finally:
        store.close()

