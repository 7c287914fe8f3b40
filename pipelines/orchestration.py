"""Dagster definitions: the stages of a run spec as assets, one partition per delivery, a sensor on the delivery inbox
and a daily schedule that re-curates what an opt-out reaches.

``dagster dev`` (or ``make dagster``) from the repository root loads ``defs`` from here (``[tool.dagster]`` in
pyproject.toml). No stage logic lives in this module: a materialization is ``linernotes run SPEC`` on one delivery,
through the same runner (:func:`pipelines.runner.run_spec`), its cache and its lineage store.

- **Assets**: one per stage of the spec (``$LINERNOTES_SPEC``, default ``infra/runs/inbox.yaml``), in chain order,
  each depending on the one before; partitioned by the dynamic partitions ``deliveries``, whose keys are delivery
  folder names in the inbox. One multi-asset materializes any subset of them: the runner runs the spec on
  ``<inbox>/<delivery>`` up to the last selected stage (a stage reads what the one before it wrote, so those before
  it run too, ``cached`` when unchanged), and every selected stage's result becomes its materialization: counts
  (accepted, rejected by reason), the stage's Run id and the whole run's, output ids (the data version is the main
  one: a catalog, a dataset), links to HTML reports and Great Expectations Data Docs. Ingest's two expectation suites
  are asset checks. ``code_version`` is the stage's cache identity without its inputs (name, version, code version,
  config), so Dagster shows a changed stage, and what follows it, as stale.
- **Sensor** ``delivery_inbox``: a delivery is a subfolder of the inbox holding a ``_READY`` marker (written by the
  uploader after the last file); the sensor adds its partition and requests one run with ``run_key`` = its name, so a
  delivery is curated once and a half-uploaded one (no marker) never. Its cursor lists the deliveries it requested.
- **Schedule** ``opt_out_recuration`` (daily, 03:00 UTC; only when the spec runs ingest): each ingest
  materialization records the opt-out registry it applied (``opt_out_registry``: its content id); a delivery whose
  last one recorded another registry, and whose accepted recordings the registry now names, is re-curated.
  ``SkipReason`` otherwise.
- **Resources**: ``inbox`` (``$LINERNOTES_INBOX``, default ``./inbox``), ``workspace`` (root and lineage-store URL)
  and ``ray`` (the cluster address). Unset, the last two resolve as ``linernotes run`` resolves them: the spec's
  ``workspace:``, ``$LINERNOTES_WORKDIR``, ``$LINERNOTES_STORE_URL``, the spec's engine, ``$RAY_ADDRESS``.
"""

# no `from __future__ import annotations`: Dagster reads the decorated functions' annotations as types
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import dagster as dg
from dagster import AssetExecutionContext, ScheduleEvaluationContext, SensorEvaluationContext
import pyarrow.parquet as pq

from pipelines.lineage.walk import matching_tracks
from pipelines.runner import RunFailed, run_spec
from pipelines.runspec import RunSpec, load_spec
from pipelines.stage import CACHED, RAN, get_stage, hashed_config
from pipelines.stages.ingest.stage import opt_out_registry
from provenance import records
from provenance.policy import OptOutRegistry
from provenance.store import LineageStore, code_version
from provenance.workspace import Workspace

SPEC_ENV = "LINERNOTES_SPEC"
INBOX_ENV = "LINERNOTES_INBOX"
# the checkout's spec; an installed package (an image: `uv sync --no-editable`) has no infra/ beside it, so there the
# working directory's (the image's WORKDIR /app holds infra/), unless $LINERNOTES_SPEC names one
_PACKAGED_SPEC = Path(__file__).resolve().parents[1] / "infra" / "runs" / "inbox.yaml"
DEFAULT_SPEC = _PACKAGED_SPEC if _PACKAGED_SPEC.is_file() else Path("infra") / "runs" / "inbox.yaml"
DEFAULT_INBOX = "./inbox"
READY_MARKER = "_READY"
DELIVERIES = dg.DynamicPartitionsDefinition(name="deliveries")
GROUP = "curation"
#: the metadata key of the opt-out registry's content id on an ingest materialization
REGISTRY_KEY = "opt_out_registry"
#: where a stage's work runs, as Dagster's kind tags
_KINDS = {"beam": "beam", "ray": "ray", "ray-train": "ray", "local": "python"}


class DeliveryInbox(dg.ConfigurableResource):
    """The folder deliveries land in: one subfolder per delivery, complete once its ``_READY`` marker is there."""

    path: str = DEFAULT_INBOX

    def root(self) -> Path:
        """The inbox as a local folder (a ``file://`` URL is one).

        Raises:
            ValueError: another URL scheme: ingest reads deliveries from the filesystem.
        """
        parsed = urlparse(self.path)
        if parsed.scheme not in ("", "file") or (parsed.scheme == "file" and parsed.netloc not in ("", "localhost")):
            raise ValueError(f"{INBOX_ENV}={self.path}: the inbox must be a local folder or file:// URL (ingest reads "
                             "deliveries from the filesystem); mount the bucket and name the mount")
        return Path(parsed.path if parsed.scheme == "file" else self.path).expanduser().resolve()

    def ready(self) -> list[str]:
        """Names of the deliveries holding the ``_READY`` marker, sorted; none when the inbox does not exist yet.
        Folders whose name starts with ``.`` or ``_`` (an uploader's staging) are never deliveries."""
        root = self.root()
        if not root.is_dir():
            return []
        return sorted(p.name for p in root.iterdir()
                      if p.is_dir() and p.name[0] not in "._" and (p / READY_MARKER).is_file())

    def folder(self, delivery: str) -> Path:
        """The folder of a ready delivery.

        Raises:
            ValueError: no such folder in the inbox, or it has no ``_READY`` marker yet.
        """
        path = self.root() / delivery
        if not (path / READY_MARKER).is_file():
            raise ValueError(f"delivery {delivery!r}: no {path / READY_MARKER}; a delivery is curated once its upload "
                             f"is complete and {READY_MARKER} is written in its folder")
        return path


class LinernotesWorkspace(dg.ConfigurableResource):
    """The workspace and lineage store the runs write to; unset, as ``linernotes run`` resolves them (the spec's
    ``workspace:``, else ``$LINERNOTES_WORKDIR``, else ``./linernotes-work``; ``$LINERNOTES_STORE_URL``, else the
    workspace's SQLite file)."""

    root: str | None = None
    store_url: str | None = None

    def open(self, spec: RunSpec) -> Workspace:
        """The spec's workspace (``root`` when set, see :func:`partition_spec`), its folders made."""
        return Workspace.at(spec.workspace, self.store_url).ensure()


class RayCluster(dg.ConfigurableResource):
    """The Ray cluster the stages' Ray work joins (``ray://HEAD:10001`` or ``auto``); unset, the spec's
    ``engine.ray_address``, else ``$RAY_ADDRESS``, else a local Ray in the run's process."""

    address: str | None = None


def build_definitions(spec_path: str | os.PathLike[str] | None = None) -> dg.Definitions:
    """The assets, sensor, schedule and resources for one run spec (default ``$LINERNOTES_SPEC``, else
    ``infra/runs/inbox.yaml``). The spec's ``delivery`` is replaced by each partition's folder.

    Raises:
        pipelines.config.ConfigError: the spec is missing or invalid (one line naming the key).
    """
    path = Path(spec_path or os.environ.get(SPEC_ENV) or DEFAULT_SPEC).resolve()
    template = partition_spec(path, path.parent)  # the stage configs; the spec's folder stands in for a delivery
    assets = curation_assets(path, template)
    schedules = [opt_out_schedule(path, assets)] if "ingest" in template.stages else []
    return dg.Definitions(
        assets=[assets], sensors=[inbox_sensor(assets)], schedules=schedules,
        resources={"inbox": DeliveryInbox(path=os.environ.get(INBOX_ENV) or DEFAULT_INBOX),
                   "workspace": LinernotesWorkspace(), "ray": RayCluster()})


def partition_spec(spec_path: Path, delivery: Path, workspace: LinernotesWorkspace | None = None,
                   ray: RayCluster | None = None) -> RunSpec:
    """The spec as one delivery's run: its ``delivery`` set to ``delivery``, its workspace and Ray address to the
    resources' when they set them (the ``--set``/``--workdir`` of ``linernotes run``).

    Raises:
        pipelines.config.ConfigError: as :func:`pipelines.runspec.load_spec`.
    """
    overrides = [f"delivery={json.dumps(str(delivery))}"]  # a JSON string is YAML: any path reads back as itself
    if ray is not None and ray.address:
        overrides.append(f"engine.ray_address={json.dumps(ray.address)}")
    return load_spec(spec_path, overrides, workspace=workspace.root if workspace else None)


def stage_code_version(spec: RunSpec, name: str) -> str:
    """16 hex digits of the sha256 of what a stage's cache key holds but its inputs: the stage's name and version, the
    code version, the config without engine keys. An unset ``purpose.as_of`` (rights judged on the day of the run)
    is left out, or every stage would read stale each morning."""
    stage = get_stage(name)
    config = hashed_config(stage, spec.stages[name])
    if spec.purpose.as_of is None:
        config.pop("as_of", None)
    return records.sha256_hex(records.canonical_json(
        {"stage": name, "version": stage.version, "code_version": code_version(), "config": config}))[:16]


def curation_assets(spec_path: Path, template: RunSpec) -> dg.AssetsDefinition:
    """One asset per stage of the spec, in chain order, materialized by one multi-asset through the runner."""
    names = list(template.stages)
    specs = []
    for before, name in zip([None, *names], names):
        stage = get_stage(name)
        specs.append(dg.AssetSpec(
            name, deps=[before] if before else [], group_name=GROUP, code_version=stage_code_version(template, name),
            description=(type(stage).__doc__ or name).strip().splitlines()[0],
            kinds={_KINDS.get(stage.resources.engine, "python")},
            metadata={"stage_version": stage.version,
                      "config": dg.MetadataValue.json(hashed_config(stage, template.stages[name]))}))
    checks = [] if "ingest" not in names else [
        dg.AssetCheckSpec("delivery_expectations", asset="ingest",
                          description="The delivery's rows pass the delivery suite (rows that fail are rejected with a "
                                      "reason; a warning, not an error)."),
        dg.AssetCheckSpec("curated_expectations", asset="ingest",
                          description="The curated catalog passes the curated suite.")]

    @dg.multi_asset(name="curation", specs=specs, check_specs=checks, partitions_def=DELIVERIES, can_subset=True)
    def curation(context: AssetExecutionContext, inbox: DeliveryInbox, workspace: LinernotesWorkspace,
                 ray: RayCluster) -> Iterator[dg.MaterializeResult]:
        folder = inbox.folder(context.partition_key)
        spec = partition_spec(spec_path, folder, workspace, ray)
        opened = workspace.open(spec)
        selected = [n for n in names if dg.AssetKey(n) in context.selected_asset_keys]
        if not selected:
            raise ValueError("ingest's asset checks run with ingest: materialize ingest (cached when unchanged)")
        check_names = {key.name for key in context.selected_asset_check_keys}
        registry = _registry(opened, spec).content_id() if "ingest" in selected else None  # before ingest reads it
        failure: RunFailed | None = None
        try:
            payload = run_spec(spec, until_stage=selected[-1], wait=True, status=context.log.info, workspace=opened)
        except RunFailed as err:
            payload, failure = err.payload, err
        for row in payload["stages"]:
            if row["stage"] not in selected or row["status"] not in (RAN, CACHED):
                continue
            metadata = stage_metadata(row, payload, folder)
            results = []
            if row["stage"] == "ingest":
                metadata[REGISTRY_KEY] = registry
                results = [r for r in expectation_checks(row) if r.check_name in check_names]
            ids = [v for v in row["output_ids"].values() if not v.startswith("sha256:")]
            yield dg.MaterializeResult(asset_key=row["stage"], metadata=metadata, check_results=results,
                                       data_version=dg.DataVersion(ids[0]) if ids else None)
        if failure is not None:
            raise failure

    return curation


def stage_metadata(row: Mapping[str, Any], payload: Mapping[str, Any], delivery: Path) -> dict[str, Any]:
    """A stage's materialization metadata from its row of the run's result: ``status`` (ran|cached), ``run_id`` (the
    stage's Run), ``whole_run_id``, ``<name>_id`` per output id, every number of its counts flattened to a dotted key
    (``tracks.accepted``, ``tracks.rejected_by_reason.opted_out``; Dagster plots them over time), the counts as
    JSON, and a path link per HTML output (ingest's ``data_docs``) and the stage's ``summary``."""
    metadata: dict[str, Any] = {
        "status": row["status"], "run_id": row["run_id"], "whole_run_id": payload["run_id"],
        "spec_sha256": payload["spec_sha256"], "delivery": dg.MetadataValue.path(str(delivery)),
        "counts": dg.MetadataValue.json(row.get("counts") or {}),
    }
    metadata.update({f"{name}_id": value for name, value in row["output_ids"].items()
                     if not value.startswith("sha256:")})
    metadata.update(_numbers(row.get("counts") or {}))
    for name, path in (row.get("outputs") or {}).items():
        if str(path).endswith(".html") or name == "summary":
            metadata[name] = dg.MetadataValue.path(str(path))
    return metadata


def expectation_checks(row: Mapping[str, Any]) -> list[dg.AssetCheckResult]:
    """Ingest's Great Expectations results (its counts' ``expectations``) as the two asset checks. A delivery row that
    fails is rejected with a reason and the run goes on: a warning; a curated catalog that fails is an error."""
    found = (row.get("counts") or {}).get("expectations") or {}
    docs = (row.get("outputs") or {}).get("data_docs")
    links = {"data_docs": dg.MetadataValue.path(docs)} if docs else {}
    delivery, curated = found.get("delivery") or {}, found.get("curated") or {}
    return [
        dg.AssetCheckResult(check_name="delivery_expectations", passed=bool(delivery.get("success")),
                            severity=dg.AssetCheckSeverity.WARN,
                            metadata={"rows_rejected": int(delivery.get("rows_rejected", 0)), **links}),
        dg.AssetCheckResult(check_name="curated_expectations", passed=bool(curated.get("success")),
                            metadata={"failed": dg.MetadataValue.json(curated.get("failed", [])), **links}),
    ]


def inbox_sensor(assets: dg.AssetsDefinition) -> dg.SensorDefinition:
    """The sensor ``delivery_inbox`` (see the module docstring)."""

    @dg.sensor(name="delivery_inbox", target=assets, minimum_interval_seconds=30,
               default_status=dg.DefaultSensorStatus.RUNNING,  # curating starts with the daemon, no command
               description=f"Curates each delivery of the inbox once its {READY_MARKER} marker is there.")
    def delivery_inbox(context: SensorEvaluationContext, inbox: DeliveryInbox) -> dg.SensorResult:
        requested = set(json.loads(context.cursor)) if context.cursor else set()
        ready = inbox.ready()
        new = [name for name in ready if name not in requested]
        if not new:
            return dg.SensorResult(skip_reason=f"no new delivery with {READY_MARKER} in {inbox.root()} "
                                               f"({len(ready)} ready, every one requested)")
        known = set(context.instance.get_dynamic_partitions(DELIVERIES.name))
        unknown = [name for name in new if name not in known]
        return dg.SensorResult(
            run_requests=[dg.RunRequest(run_key=name, partition_key=name) for name in new],
            dynamic_partitions_requests=[DELIVERIES.build_add_request(unknown)] if unknown else [],
            cursor=json.dumps(sorted(requested | set(new))))

    return delivery_inbox


def opt_out_schedule(spec_path: Path, assets: dg.AssetsDefinition) -> dg.ScheduleDefinition:
    """The schedule ``opt_out_recuration`` (see the module docstring)."""

    @dg.schedule(name="opt_out_recuration", cron_schedule="0 3 * * *", execution_timezone="UTC", target=assets,
                 default_status=dg.DefaultScheduleStatus.RUNNING,
                 description="Re-curates, once a day, the deliveries holding recordings an opt-out registered since "
                             "their last curation names.")
    def opt_out_recuration(context: ScheduleEvaluationContext,
                           workspace: LinernotesWorkspace) -> list[dg.RunRequest] | dg.SkipReason:
        spec = partition_spec(spec_path, spec_path.parent, workspace)
        opened = workspace.open(spec)
        registry = _registry(opened, spec)
        current = registry.content_id()
        requests, changed = [], 0
        for delivery in context.instance.get_dynamic_partitions(DELIVERIES.name):
            last = _last_ingest(context.instance, delivery)
            if last is None or last.get(REGISTRY_KEY) == current:
                continue
            changed += 1
            named = matching_tracks(_accepted_tracks(opened, last["run_id"]), registry)
            if named:
                requests.append(dg.RunRequest(run_key=f"{delivery}@{current}", partition_key=delivery,
                                              tags={"linernotes/opt_out_registry": current,
                                                    "linernotes/opted_out_tracks": str(len(named))}))
        if requests:
            return requests
        if changed:
            return dg.SkipReason(f"opt-out registry {current}: {changed} deliveries were curated under another, none "
                                 "of them holds a recording it names")
        return dg.SkipReason(f"opt-out registry {current} unchanged since every delivery's last curation")

    return opt_out_recuration


def _registry(workspace: Workspace, spec: RunSpec) -> OptOutRegistry:
    """The opt-outs the spec's ingest applies (the lineage store's registry and the config's CSV)."""
    with LineageStore(workspace.store_url) as store:
        return opt_out_registry(store, spec.stages["ingest"])


def _last_ingest(instance: dg.DagsterInstance, delivery: str) -> dict[str, Any] | None:
    """The metadata values of a delivery's latest ingest materialization (None: never materialized)."""
    found = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey("ingest"), asset_partitions=[delivery]), limit=1).records
    if not found or found[0].asset_materialization is None:
        return None
    return {key: value.value for key, value in found[0].asset_materialization.metadata.items()}


def _accepted_tracks(workspace: Workspace, run_id: str) -> dict[str, dict[str, Any]]:
    """``track_id`` → row of the tracks an ingest Run accepted (its catalog version's ``tracks`` table)."""
    with LineageStore(workspace.store_url) as store:
        run = store.get_run(run_id) or {}
    path = (run.get("outputs") or {}).get("tracks")
    if not path or not Path(path).is_file():
        return {}
    rows = pq.read_table(path, columns=["track_id", "isrc", "rights_holder"]).to_pylist()
    return {row["track_id"]: row for row in rows}


def _numbers(counts: Mapping[str, Any], prefix: str = "") -> dict[str, int | float]:
    """The numeric leaves of nested counts, keyed by their dotted path."""
    flat: dict[str, int | float] = {}
    for key, value in counts.items():
        if isinstance(value, Mapping):
            flat.update(_numbers(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[f"{prefix}{key}"] = value
    return flat


defs = build_definitions()
