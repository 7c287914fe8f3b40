"""The ``ingest`` stage on Apache Beam: a delivery in, a curated catalog and its rejections out.

Pipeline (on the engine's Beam runner: the DirectRunner by default; another through ``beam_options``, which the
stage hands to the engine, ``pipelines.engines``)::

    tracks.csv ─▶ group by track_id ─▶ decide (dedupe, fields, rights policy) ─┐
    files.csv ──▶ key by track_id ───────────────────────────────────────────────┴▶ co-group ─▶ route files
        ─▶ reshuffle ─▶ decode + measure each file ─▶ co-group with decisions ─▶ finalize track
           (build the mixture from the stems when none was delivered; a track without usable audio is rejected)
        ─▶ on the driver: the rows to Parquet a batch at a time (``pipelines.stages.ingest.tables``); link duplicate
           recordings, within the delivery and with every earlier delivery's through the workspace's recording
           index (``pipelines.stages.ingest.duplicates``, ``…recordings``); the catalog tables, less the duplicates

The per-record steps are pure functions in ``pipelines.stages.ingest.steps``, the Beam adapters and the graph are in
``pipelines.stages.ingest.beam`` and the config in ``pipelines.stages.ingest.config``; this module holds the stage and
the driver, and imports Beam and the audio libraries only when the stage runs (``linernotes stages`` describes it without
them). Every input row of ``tracks.csv``, ``files.csv`` and ``licenses.csv`` (or of the DDEX messages) ends in
exactly one of: accepted, or a Rejection with its reason. The driver reads the three tables, fails before any audio
is read on a table-level problem, and writes the catalog Parquet tables atomically when the pipeline is done.

The two Great Expectations suites (the delivery's rows before any audio is read, the curated catalog after) run in a
worker process (``pipelines.stages.ingest.expectations_worker``) started when the stage starts, so that GX's ~5 s
import overlaps Beam's import and the kernels' warm-up; its Data Docs pages are rendered while the run goes on.
"""

from __future__ import annotations

import re
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from pipelines.catalog import commit_catalog
from pipelines.stages.ingest.delivery import INGEST as STAGE
from pipelines.stages.ingest.delivery import Delivery, file_record_id, read_delivery, read_licenses
from pipelines.engines import EngineConfig
from pipelines.stages.ingest.config import MEASURE_VERSION, IngestConfig
from pipelines.stages.ingest.recordings import RecordingIndex
from pipelines.stage import Resources, Stage, StageContext, StageOutput, cache_key
from provenance.policy import OptOutRegistry
from provenance.records import (
    DEAL,
    DUPLICATE,
    LICENSE,
    RELEASE,
    RejectionReason,
    canonical_json,
    rejection,
    sha256_hex,
    to_table,
    write_table,
)
from provenance.store import LineageStore
from provenance.workspace import Workspace

__all__ = ["CATALOG_TABLES", "INGEST_STAGE", "IngestConfig", "IngestResult", "IngestStage", "apply_delivery_report",
           "opt_out_registry", "reconcile", "reject_encoding_problems", "run_fingerprint", "run_ingest"]

CATALOG_TABLES = ("licenses", "tracks", "audio_files", "rejections", "duplicates", "releases", "deals")
"""The Parquet tables every ingest run writes into its run folder and the catalog."""


@dataclass
class IngestResult:
    """What an ingest run did. ``counts`` reconcile: for each table, accepted + rejected = input rows.

    ``status`` is ``ran`` or ``cached`` (an earlier run with the same cache key; ``run_id`` is that run's)."""

    run_id: str
    delivery_id: str
    counts: dict[str, Any]
    outputs: dict[str, str]
    rejections: list[dict[str, Any]] = field(default_factory=list)
    status: str = "ran"
    stage_result: Any = field(default=None, repr=False)  # pipelines.stage.StageResult

    def to_json(self) -> dict[str, Any]:
        """The stage contract's result shape (``stage``, ``run_id``, ``status``, ``inputs``, ``outputs``,
        ``counts``) with ``delivery_id`` beside it."""
        if self.stage_result is not None:
            return self.stage_result.to_json()
        return {"stage": STAGE, "run_id": self.run_id, "status": self.status, "delivery_id": self.delivery_id,
                "counts": self.counts, "outputs": self.outputs}


def run_ingest(delivery_root: str | Path, workspace: Workspace, config: IngestConfig,
               status: Callable[[str], None] | None = None, *, engine: Any = None) -> IngestResult:
    """Run ingest end to end through the stage runner: read the delivery, run the Beam pipeline, write the
    catalog, register the run. An unchanged delivery, config and opt-out registry whose catalog tables are still
    as that run wrote them is ``cached``: no work, that run's result.

    Raises:
        pipelines.stages.ingest.delivery.DeliveryError: a table-level problem (before any audio is read).
        FileNotFoundError: the opt-out CSV does not exist.
    """
    from pipelines.stage import run_stage

    result = run_stage(INGEST_STAGE, workspace, config, status=status, engine=engine,
                       select={"delivery": str(delivery_root)})
    rejections = pq.read_table(result.outputs["rejections"]).to_pylist() if "rejections" in result.outputs else []
    return IngestResult(result.run_id, result.details["delivery_id"], result.counts, result.outputs, rejections,
                        status=result.status, stage_result=result)


class IngestStage(Stage):
    """The ingest stage on the contract: a delivery (+ licences, opt-outs) → the curated catalog (Apache Beam)."""

    name = STAGE
    version = "1"
    config_model = IngestConfig
    resources = Resources(engine="beam", cpus=1.0)
    engine_keys = ("beam_options",)
    reads = ("delivery", "opt_outs", "recordings")
    writes = CATALOG_TABLES + ("data_docs",)

    def engine_config(self, config: IngestConfig) -> EngineConfig:
        """The config's Beam pipeline options go to the engine (``--config infra/beam/flink.yaml``)."""
        return EngineConfig(beam_options=config.beam_options)

    def inputs(self, ctx: StageContext, config: IngestConfig) -> dict[str, str]:
        root = ctx.select.get("delivery")
        if not root:
            raise ValueError("ingest needs a delivery folder: `linernotes ingest DELIVERY`")
        delivery = read_delivery(root, default_license_id=config.license_id)
        opt_outs = opt_out_registry(ctx.store, config)
        ctx.prepared.update(delivery=delivery, opt_outs=opt_outs)
        # what the earlier deliveries in the workspace hold: a new (or grown) one can make a track here a duplicate
        recordings = recording_index(ctx.workspace.root, config).content_id(delivery.delivery_id)
        return {"delivery": "dlv-" + run_fingerprint(delivery, config, opt_outs)[:16], "recordings": recordings}

    def record(self, ctx: StageContext, config: IngestConfig) -> dict[str, Any]:
        delivery = ctx.prepared["delivery"]
        return {"delivery": str(delivery.root), "delivery_id": delivery.delivery_id}

    def outputs_valid(self, run: Mapping[str, Any]) -> bool:
        """The catalog's audio (delivered files and built mixtures) is still there, and the workspace's recording
        index holds exactly the run's mixtures (later deliveries are compared with them)."""
        outputs = run.get("outputs") or {}
        path = outputs.get("audio_files")
        uris = pq.read_table(path, columns=["uri"])["uri"].to_pylist() if path else []
        if not all(Path(uri).is_file() for uri in uris if uri):
            return False
        return _indexed(Path(path).parents[2] if path else None, run)

    def run(self, ctx: StageContext, config: IngestConfig) -> StageOutput:
        delivery, opt_outs = ctx.prepared["delivery"], ctx.prepared["opt_outs"]
        fingerprint = run_fingerprint(delivery, config, opt_outs)
        # the cache key holds the inputs, so the earlier deliveries' recordings too
        reusable = _find_reusable_run(ctx.store, ctx.workspace, cache_key(self, config, ctx.inputs))
        if reusable is not None:  # same cache key, its catalog version lost or changed since: take its tables
            ctx.say(f"nothing changed since ingest run {reusable['run_id']}: reusing its outputs")
            counts, outputs = _reuse_run(ctx.workspace, reusable)
            version = self._commit(ctx, outputs)
        else:
            from pipelines.stages.ingest import expectations_worker

            worker = expectations_worker.acquire()  # it imports GX while this process imports Beam
            try:
                counts, outputs, recordings = _ingest(ctx, config, delivery, opt_outs, worker)
                worker.wait_docs()  # all of the run's Data Docs are written before anything is committed
            except Exception:
                _finish_docs(worker)  # the pages of what was checked, for the failed run's folder
                raise
            finally:
                expectations_worker.release(worker)
            version = self._commit(ctx, outputs)
            # the accepted mixtures are the delivery's in the index, for later deliveries
            recording_index(ctx.workspace.root, config).put(delivery.delivery_id, ctx.run_id, recordings)
        return StageOutput(outputs=outputs, counts=counts, output_ids={"catalog": version.catalog_id},
                           details={"delivery_id": delivery.delivery_id, "fingerprint": fingerprint,
                                    "catalog_id": version.catalog_id})


    @staticmethod
    def _commit(ctx: StageContext, outputs: dict[str, str]) -> Any:
        version = commit_catalog(ctx.workspace, {name: Path(outputs[name]) for name in CATALOG_TABLES},
                                 parent=None, stage=STAGE, run_id=ctx.run_id)
        outputs.update({name: str(version.table(name)) for name in CATALOG_TABLES})
        ctx.say(f"catalog version {version.catalog_id}")
        return version


INGEST_STAGE = IngestStage()


def _ingest(ctx: StageContext, config: IngestConfig, delivery: Delivery, opt_outs: OptOutRegistry,
            worker: Any) -> tuple[dict[str, Any], dict[str, str], list[Any]]:
    """Check, decode and measure the delivery (Beam), link duplicates (within it and with the earlier deliveries'
    recordings), write and check the curated catalog. ``worker``: the Great Expectations worker
    (``expectations_worker.ExpectationsWorker``) that checks the tables.

    Returns:
        (counts, outputs, the accepted mixtures as ``recordings.Recording`` for the recording index).
    """
    say, workspace, run_id, run_dir = ctx.say, ctx.workspace, ctx.run_id, ctx.run_dir
    say("checking the delivery tables (Great Expectations)")
    delivered = delivery  # every input row, for reconciliation
    delivery, encoding_rejections, encoding_rejected = reject_encoding_problems(delivery, run_id)
    request = worker.submit("delivery", {"run_dir": str(run_dir), "tables": {
        table: getattr(delivery, table) for table in ("tracks", "files", "licenses")}})
    # while the worker imports GX and checks the tables: Beam's import, and the kernels when they run here
    from pipelines.stages.ingest.beam import build_pipeline
    from pipelines.stages.ingest.duplicates import link_duplicates, recordings_to_index

    if _runs_in_process(ctx.engine.beam_options()):
        from cleaning.warmup import warm_kernels

        warm_kernels()
    delivery_report = worker.report(request)
    if delivery_report.table_errors:  # the run stops here: its Data Docs say why
        worker.wait_docs()
    delivery, expectation_rejections, delivery_report, prerejected = apply_delivery_report(
        delivery, delivery_report, encoding_rejections, encoding_rejected, run_id)
    licenses, license_rejections = read_licenses(delivery, run_id)
    license_rejections += expectation_rejections
    license_rejections += [rejection("message", error["message"], STAGE, RejectionReason(error["reason"]),
                                     error["detail"], run_id) for error in delivery.message_errors]
    say(f"ingesting {len(delivery.tracks)} tracks, {len(delivery.files)} files from {delivery.root}")
    with tempfile.TemporaryDirectory(dir=run_dir, prefix=".beam-") as staging_name:
        staging = Path(staging_name)
        with ctx.engine.beam_pipeline() as pipeline:  # the engine's runner: DirectRunner unless configured
            build_pipeline(pipeline, delivery, licenses, config, opt_outs, workspace.mixtures_dir,
                           staging, run_id, workspace.root / "cache" / "measurements", prerejected,
                           fingerprints_dir=fingerprints_dir(workspace))
        from pipelines.stages.ingest.beam import ROWS_FILE
        from pipelines.stages.ingest.tables import finish_tables, stage_rows

        staged = stage_rows(_lines(staging.glob(f"{ROWS_FILE}*.jsonl")), staging / "tables")
        earlier = recording_index(workspace.root, config).earlier(delivery.delivery_id)
        say(f"linking duplicate recordings (within the delivery and with {len(earlier)} earlier deliveries)")
        started, linked = time.perf_counter(), len(staged.tracks)
        tracks, audio_files, duplicate_rejections, duplicates = link_duplicates(
            staged.tracks, staged.audio_files, config.near_duplicate_threshold, run_id,
            delivery_id=delivery.delivery_id, earlier=earlier, on_duplicate=config.on_duplicate,
            spill_dir=staging / "postings")
        linked_s = time.perf_counter() - started
        say(f"linked {linked} tracks in {linked_s:.2f} s ({1000 * linked_s / max(linked, 1):.2f} ms per track): "
            f"{len(duplicates)} duplicates")
        recordings = recordings_to_index(tracks, audio_files)
        say("writing the curated catalog")
        dropped = {d["track_id"] for d in duplicates if d["action"] == "rejected"}
        outputs = finish_tables(staged, run_dir, drop_track_ids=dropped,
                                extra_rejections=license_rejections + duplicate_rejections)
    outputs = {name: str(path) for name, path in outputs.items()}
    decoded = staged.decoded
    rejections = staged.rejections + license_rejections + duplicate_rejections  # kind and reason, for the counts
    license_rows = sorted(licenses.values(), key=lambda r: r["license_id"])
    tables = {
        "licenses": to_table(license_rows, LICENSE),
        "duplicates": to_table(sorted(duplicates, key=lambda d: d["track_id"]), DUPLICATE),
    }
    # DDEX: the releases and deals of the messages that could be read (empty tables for a CSV delivery,
    # so that the catalog never shows an earlier delivery's)
    tables["releases"] = to_table([{**row, "run_id": run_id} for row in delivered.releases], RELEASE)
    tables["deals"] = to_table([{**row, "run_id": run_id} for row in delivered.deals], DEAL)
    counts = reconcile(delivered, tracks, audio_files, rejections, len(license_rows))
    # files and built mixtures that were decoded and measured by this run, or taken from the cache
    counts["work"] = {"audio_measured": decoded[False], "audio_from_cache": decoded[True]}
    counts["duplicates"] = dict(sorted(Counter(d["kind"] for d in duplicates).items()))
    counts["recording_index"] = {
        "earlier_deliveries": len(earlier),
        "earlier_recordings": sum(int(s.info.get("recordings", 0)) for s in earlier),
        "duplicates_of_earlier": dict(sorted(Counter(d["action"] for d in duplicates
                                                     if d["duplicate_of_delivery_id"] != delivery.delivery_id).items())),
    }
    if delivered.format == "ddex":
        counts["ddex"] = {"releases": len(delivered.releases), "deals": len(delivered.deals),
                          "deals_granting_ai_training": sum(d["grants_ai_training"] for d in delivered.deals)}
    say("checking the curated catalog (Great Expectations)")
    request = worker.submit("curated", {"run_dir": str(run_dir), "counts": counts,
                                        "audio_files_path": outputs["audio_files"]})
    outputs.update({name: str(write_table(table, run_dir / f"{name}.parquet")) for name, table in tables.items()})
    curated_report = worker.report(request)
    counts["expectations"] = {
        "delivery": {"success": delivery_report.success, "rows_rejected": len(expectation_rejections)},
        "curated": {"success": curated_report.success,
                    "failed": sorted({name for rows in curated_report.failed_rows.values()
                                      for names in rows.values() for name in names}
                                     | set(curated_report.table_errors))},
    }
    outputs["data_docs"] = str(curated_report.data_docs_index)  # written by the worker: ``worker.wait_docs()``
    return counts, outputs, recordings


def _finish_docs(worker: Any) -> None:
    """Let ``worker`` finish the Data Docs of a run that failed, if it can (its failure is not this one's)."""
    from pipelines.stages.ingest.expectations_worker import ExpectationsWorkerError

    try:
        worker.wait_docs()
    except ExpectationsWorkerError:
        pass


def _runs_in_process(options: Any) -> bool:
    """Whether a Beam pipeline with ``options`` runs its DoFns in this process (the DirectRunner, not in
    ``multi_processing`` mode): then kernels warmed here serve its workers."""
    from apache_beam.options.pipeline_options import DirectOptions, StandardOptions

    runner = options.view_as(StandardOptions).runner
    name = runner if isinstance(runner, str) or runner is None else type(runner).__name__
    return (name or "DirectRunner").removesuffix("Runner").lower() in ("direct", "bundlebased", "switchingdirect") \
        and options.view_as(DirectOptions).direct_running_mode != "multi_processing"


def reject_encoding_problems(delivery: Delivery, run_id: str
                             ) -> tuple[Delivery, list[dict[str, Any]], dict[str, str]]:
    """The delivery without its rows holding bytes that are not UTF-8, each rejected ``invalid_encoding``.

    Returns:
        (the delivery left, the Rejections, {track id: reason} of the rejected track rows).
    """
    import dataclasses

    from pipelines.stages.ingest.delivery import encoding_problem

    rejections: list[dict[str, Any]] = []
    rejected_tracks: dict[str, str] = {}
    clean: dict[str, list[dict[str, Any]]] = {}
    for table in ("tracks", "files", "licenses"):
        clean[table] = []
        for row in getattr(delivery, table):
            problem = encoding_problem(row)
            if problem is None:
                clean[table].append(row)
                continue
            rejections.append(rejection(_KINDS[table], _record_id(table, row), STAGE, RejectionReason.INVALID_ENCODING,
                                        f"{table} row {row['_row']}: {problem}", run_id))
            if table == "tracks":
                rejected_tracks[row.get("track_id", "")] = RejectionReason.INVALID_ENCODING.value
    return dataclasses.replace(delivery, **clean), rejections, rejected_tracks


def apply_delivery_report(delivery: Delivery, report: Any, rejections: list[dict[str, Any]],
                          rejected_tracks: dict[str, str], run_id: str
                          ) -> tuple[Delivery, list[dict[str, Any]], Any, dict[str, str]]:
    """Turn the delivery suite's ``report`` (a ``ValidationReport`` of ``delivery``'s rows) into Rejections.

    A row failing expectations is rejected with a reason from the expectation (unique → ``duplicate_id``, not null
    → ``missing_field``, role → ``invalid_role``, others → ``invalid_field``) and the expectations it failed as
    detail. Rejected rows leave the delivery, so each has exactly one outcome. ``rejections`` and
    ``rejected_tracks`` are the earlier ones (``reject_encoding_problems``), added to.

    Returns:
        (the delivery without the rejected rows, every Rejection, ``report``,
        {track id: reason} for tracks none of whose rows is left, so their files say why).

    Raises:
        DeliveryError: a table-level failure (a missing column), naming it.
    """
    import dataclasses

    from pipelines.stages.ingest.delivery import DeliveryError

    if report.table_errors:
        raise DeliveryError("the delivery fails table-level expectations: " + "; ".join(report.table_errors))
    rejections, rejected_tracks = list(rejections), dict(rejected_tracks)
    kept: dict[str, list[dict[str, Any]]] = {}
    for table in ("tracks", "files", "licenses"):
        rows = getattr(delivery, table)
        failed = report.failed_rows.get(table, {})
        kept[table] = [row for i, row in enumerate(rows) if i not in failed]
        for i, names in sorted(failed.items()):
            row = rows[i]
            detail = f"{table} row {row['_row']} fails " + ", ".join(names)
            if row.get("_message") and any("(license_id)" in name for name in names):
                detail += (" (DDEX deals do not grant AI training: name the licence agreement with "
                           "`--license ID`)")
            reason = _expectation_reason(names)
            rejections.append(rejection(_KINDS[table], _record_id(table, row), STAGE, reason, detail, run_id))
            if table == "tracks":
                rejected_tracks.setdefault(row.get("track_id", ""), reason.value)
    left = {row.get("track_id") for row in kept["tracks"]}
    rejected_tracks = {t: r for t, r in rejected_tracks.items() if t and t not in left}
    return dataclasses.replace(delivery, **kept), rejections, report, rejected_tracks


_KINDS = {"tracks": "track", "files": "audio_file", "licenses": "license"}


def _record_id(table: str, row: Mapping[str, Any]) -> str:
    from pipelines.stages.ingest.delivery import printable

    if table == "files":
        return file_record_id(row)
    ids = {"tracks": "track_id", "licenses": "license_id"}
    return printable(row.get(ids[table]) or "") or f"{table}.csv row {row['_row']}"


def _expectation_reason(names: list[str]) -> RejectionReason:
    first = names[0]
    if "to_be_unique" in first:
        return RejectionReason.DUPLICATE_ID
    if "not_be_null" in first:
        return RejectionReason.MISSING_FIELD
    if "(role)" in first:
        return RejectionReason.INVALID_ROLE
    return RejectionReason.INVALID_FIELD


def run_fingerprint(delivery: Delivery, config: IngestConfig, opt_outs: OptOutRegistry) -> str:
    """What an ingest's outputs depend on: the delivery's tables, every audio file's (path, size, mtime),
    the config (purpose, territory, date; not the runner options), the opt-outs and ``MEASURE_VERSION``."""
    files = []
    for row in delivery.files:
        path = (delivery.root / (row.get("path") or "")).resolve()
        try:
            stat = path.stat()
            files.append([str(path), stat.st_size, stat.st_mtime_ns])
        except OSError:
            files.append([str(path), None, None])
    settings = {k: v for k, v in config.to_dict().items() if k != "beam_options"}
    return sha256_hex(canonical_json({
        "delivery_id": delivery.delivery_id, "config": settings, "files": sorted(files),
        "opt_outs": [sorted(opt_outs.rights_holders), sorted(opt_outs.track_ids), sorted(opt_outs.isrcs)],
        "measure_version": MEASURE_VERSION,
    }))


def _find_reusable_run(store: LineageStore, workspace: Workspace, key: str) -> dict[str, Any] | None:
    """The newest succeeded ingest run with the cache key ``key`` whose run-folder tables and audio are all still
    there, though the catalog version it committed is not whole (the runner would have reported it ``cached``), and
    whose tracks the recording index still holds.

    Only the same cache key: the key holds the code version (package version and git commit), the stage version,
    the config, the delivery fingerprint (which holds ``MEASURE_VERSION``) and the earlier deliveries' recordings.
    A run of other code may have judged the same delivery otherwise (the rights policy, the expectations, duplicate
    linking are code, not measurements), so its tables are never taken; the per-file measurement cache, keyed by
    ``MEASURE_VERSION``, is what spares decoding across code versions. Taking the run's own tables (their ``run_id``
    columns included) gives back the very catalog version it committed, so the stages after ingest stay cached too.
    """
    for run in reversed(store.list_runs(STAGE)):
        if run["status"] != "succeeded" or run.get("cache_key") != key:
            continue
        run_dir = workspace.run_dir(run["run_id"])
        tables = [run_dir / f"{name}.parquet" for name in CATALOG_TABLES]
        if not all(path.is_file() for path in tables) or not _indexed(workspace.root, run,
                                                                       run_dir / "audio_files.parquet"):
            continue
        uris = pq.read_table(run_dir / "audio_files.parquet", columns=["uri"])["uri"].to_pylist()
        if all(Path(uri).is_file() for uri in uris):
            return run
    return None


def _reuse_run(workspace: Workspace, previous: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """An identical earlier run's tables (its run folder): (counts with ``reused_from``, outputs)."""
    source = workspace.run_dir(previous["run_id"])
    outputs = {name: str(source / f"{name}.parquet") for name in CATALOG_TABLES}
    counts = {**previous["counts"], "work": {"audio_measured": 0, "audio_from_cache": 0},
              "reused_from": previous["run_id"]}
    return counts, outputs


def _indexed(root: Path | None, run: Mapping[str, Any], audio_files: Path | None = None) -> bool:
    """Whether the recording index of the workspace at ``root`` holds exactly the mixtures an ingest ``run``
    accepted (its ``audio_files`` output, or the table at ``audio_files``: the run folder's copy, which outlives a
    lost catalog version), so that what later deliveries are compared with is what this run found. A run from
    before the index (no ``recordings`` among its inputs) counts as held."""
    if "recordings" not in (run.get("inputs") or {}):
        return True
    delivery_id = (run.get("config") or {}).get("delivery_id")
    path = audio_files or (run.get("outputs") or {}).get("audio_files")
    if root is None or not delivery_id or not path or not Path(path).is_file():
        return False
    rows = pq.read_table(path, columns=["track_id", "role", "sha256"]).to_pylist()
    mixtures = {row["track_id"]: row["sha256"] for row in rows if row["role"] == "mixture"}
    return recording_index(root, run.get("config") or {}).holds(delivery_id, mixtures)


def fingerprints_dir(workspace: Workspace) -> Path:
    """Where ingest keeps the mixtures' fingerprints (content-addressed by decoded-PCM sha256 and sample rate,
    ``steps.fingerprint_file``), per ``MEASURE_VERSION``: read by duplicate linking and the recording index."""
    return workspace.root / "cache" / "fingerprints" / f"v{MEASURE_VERSION}"


def recording_index(root: Path, config: IngestConfig | Mapping[str, Any]) -> RecordingIndex:
    """The recording index of the workspace at ``root`` for the rights judgement of ``config`` (an IngestConfig or
    a Run's recorded config): one index per purpose and territory, ``recordings/<purpose>-<territory>/``, since
    what a delivery contributes is what a run for that purpose accepted. A commercial run never rejects a recording
    as a duplicate of one only a non-commercial catalog holds, and runs for two purposes on one workspace do not
    replace each other's segments (nor invalidate each other's cache). ``as_of`` is not part of it: a later date
    must still meet the deliveries indexed before."""
    get = config.get if isinstance(config, Mapping) else lambda key, default=None: getattr(config, key, default)
    purpose = str(getattr(get("purpose", "commercial"), "value", get("purpose", "commercial")))
    territory = re.sub(r"[^A-Za-z0-9]+", "_", str(get("territory", "Worldwide")))
    return RecordingIndex(Workspace(root).recordings_dir / f"{purpose}-{territory}")


def reconcile(delivery: Delivery, tracks: list[dict], audio_files: list[dict], rejections: list[dict],
              num_licenses: int) -> dict[str, Any]:
    """Counts per input table: ``input = accepted + rejected`` must hold for each (raises AssertionError
    otherwise: that would be a bug in ingest, never a property of the input)."""
    by_kind: dict[str, Counter[str]] = {"track": Counter(), "audio_file": Counter(), "license": Counter(),
                                        "message": Counter()}
    for rej in rejections:
        by_kind[rej["record_kind"]][rej["reason"]] += 1
    delivered = [f for f in audio_files if not f["derived_from"]]
    counts = {
        "tracks": {"input": len(delivery.tracks), "accepted": len(tracks),
                   "rejected": sum(by_kind["track"].values()), "rejected_by_reason": dict(sorted(by_kind["track"].items()))},
        "files": {"input": len(delivery.files), "accepted": len(delivered),
                  "rejected": sum(by_kind["audio_file"].values()),
                  "rejected_by_reason": dict(sorted(by_kind["audio_file"].items()))},
        "licenses": {"input": len(delivery.licenses), "accepted": num_licenses,
                     "rejected": sum(by_kind["license"].values()),
                     "rejected_by_reason": dict(sorted(by_kind["license"].items()))},
        "mixtures_built": len(audio_files) - len(delivered),
    }
    tables = ["tracks", "files", "licenses"]
    if delivery.format == "ddex":
        rejected = sum(by_kind["message"].values())
        counts["messages"] = {"input": len(delivery.messages), "accepted": len(delivery.messages) - rejected,
                              "rejected": rejected, "rejected_by_reason": dict(sorted(by_kind["message"].items()))}
        tables.append("messages")
    for table in tables:
        c = counts[table]
        if c["accepted"] + c["rejected"] != c["input"]:
            raise AssertionError(f"ingest lost records in {table}: {c}")
    return counts


def opt_out_registry(store: LineageStore, config: IngestConfig) -> OptOutRegistry:
    """The opt-outs an ingest with ``config`` applies: the lineage store's registry (``linernotes rights opt-out``,
    ``linernotes takedown``) merged with the config's ``opt_out_csv``.

    Raises:
        FileNotFoundError: the opt-out CSV does not exist.
        ValueError: a row of either names an unknown kind.
    """
    return _read_opt_outs(config.opt_out_csv).merged(OptOutRegistry.from_rows(store.list_opt_outs()))


def _read_opt_outs(path: str | None) -> OptOutRegistry:
    if not path:
        return OptOutRegistry()
    import csv

    with open(path, newline="", encoding="utf-8-sig") as handle:
        return OptOutRegistry.from_rows(csv.DictReader(handle))


def _lines(paths: Iterable[Path]) -> Iterator[str]:
    """The lines of the files at ``paths``, in path order."""
    for path in sorted(paths):
        with open(path, encoding="utf-8") as handle:
            yield from handle
