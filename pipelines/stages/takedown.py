"""``linernotes takedown``: a rights holder, a track or an ISRC leaves the training data.

One takedown, one ``takedown`` Run in the lineage store (the ``takedown`` stage, through the runner; never cached,
see :class:`TakedownStage`):

1. the opt-out goes into the registry (``LineageStore.add_opt_out``), so every later ingest rejects the
   recordings (``opted_out``) and every later shard run leaves them out;
2. the tracks it names are found (in the catalog, in every ingest run's tracks, in every dataset), and with
   them every affected dataset, checkpoint trained on one, generation sampled from one, and stored
   attribution that credits one of the tracks;
3. each affected dataset gets a new version without the recordings: the shard stage, run through the runner as
   a child Run of the takedown, with the affected dataset's own shard config on the workspace's curated catalog,
   the opt-outs applied. The new dataset is linked to the one it replaces
   (``LineageStore.add_dataset_parent``). Checkpoints are not retrained here: the list says which ones
   were trained on the recordings, for the training team to retire or retrain on the new version.

The full list is written to ``runs/<run_id>/takedown.json``.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from pipelines.lineage.walk import known_tracks, matching_tracks
from pipelines.stage import Resources, Stage, StageContext, StageOutput, get_stage, run_stage
from provenance import records
from provenance.policy import OptOutRegistry, normalize_isrc
from provenance.store import OPT_OUT_KINDS, LineageStore
from provenance.workspace import Workspace

STAGE = "takedown"


@dataclass
class TakedownResult:
    """What a takedown registered, found and rebuilt."""

    run_id: str
    kind: str
    value: str
    added: bool  # False when the opt-out was already registered
    tracks: list[dict[str, Any]]  # the recordings it names: track_id, title, rights_holder, isrc
    datasets: list[dict[str, Any]]  # affected: dataset_id, tracks (named ones it holds), num_segments removed
    checkpoints: list[dict[str, Any]]
    generations: list[dict[str, Any]]
    attributions: list[dict[str, Any]]  # stored attributions crediting the tracks (query, method, share)
    rebuilt: list[dict[str, Any]] = field(default_factory=list)  # parent_dataset_id → dataset_id, shard run
    report_path: str = ""

    stage_result: Any = field(default=None, repr=False, compare=False)  # pipelines.stage.StageResult

    def to_json(self) -> dict[str, Any]:
        """The stage contract's shape (``stage``, ``run_id``, ``status``, ``inputs``, ``outputs``, ``counts``) with
        what the takedown registered, found and rebuilt beside it."""
        if self.stage_result is not None:
            return self.stage_result.to_json()
        fields = {k: v for k, v in asdict(self).items() if k != "stage_result"}
        return {"stage": STAGE, **fields,
                "counts": {"tracks": len(self.tracks), "datasets": len(self.datasets),
                           "checkpoints": len(self.checkpoints), "generations": len(self.generations),
                           "attributions": len(self.attributions), "rebuilt": len(self.rebuilt)}}

    @classmethod
    def from_stage(cls, result: Any) -> "TakedownResult":
        names = {f.name for f in dataclasses.fields(cls)} - {"run_id", "stage_result"}
        return cls(run_id=result.run_id, **{k: v for k, v in result.details.items() if k in names},
                   stage_result=result)


def parse_takedown(kind: str, value: str) -> tuple[str, str]:
    """Validate and normalise one takedown target (ISRCs upper case without hyphens).

    Raises:
        ValueError: an unknown kind or an empty value.
    """
    if kind not in OPT_OUT_KINDS:
        raise ValueError(f"takedown kind {kind!r} is not one of {', '.join(OPT_OUT_KINDS)}")
    value = (value or "").strip()
    if not value:
        raise ValueError(f"takedown {kind} is empty")
    return kind, normalize_isrc(value) if kind == "isrc" else value


class TakedownConfig(BaseModel):
    """Config of the ``takedown`` stage (``linernotes takedown``): one opt-out target, why, and whether to rebuild.

    The target is validated and normalised when the config is built (ISRCs upper case without hyphens), so a bad
    one fails before anything is registered.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["rights_holder", "track_id", "isrc"] = Field(description="What the value names: every recording "
                                                                           "of a rights holder, a track, an ISRC.")
    value: str = Field(description="The rights holder's name (case-insensitive), the track id, or the ISRC.")
    reason: str = Field("", description="Why (kept with the opt-out).")
    rebuild: bool = Field(True, description="Re-shard every affected dataset without the recordings (needs the "
                                            "curated catalog).")

    @field_validator("value")
    @classmethod
    def _normalised(cls, value: str, info: ValidationInfo) -> str:
        return parse_takedown(info.data.get("kind", "track_id"), value)[1]


class TakedownStage(Stage):
    """The takedown stage on the contract: an opt-out → the registry, the list of what it reaches, new datasets.

    **Never cached.** A takedown is an act, not a computation: it writes the opt-out registry and re-shards with the
    registry as it is then, and each request must leave its own Run (a repeated takedown is recorded too). Its
    inputs name the registry's state and the catalog, and a ``request`` id that is new for every call
    (``takedown-`` + a random uuid), so no two cache keys are equal. The re-shard goes through the runner (the
    ``shard`` stage, a child Run of the takedown), so *it* is cached when the same dataset already exists.
    """

    name = STAGE
    version = "1"
    config_model = TakedownConfig
    resources = Resources(engine="ray", cpus=1.0)
    reads = ("opt_outs", "catalog", "request")
    writes = ("report", "datasets")

    def inputs(self, ctx: StageContext, config: TakedownConfig) -> dict[str, str]:
        from pipelines.catalog import catalog_id

        opt_outs = [{k: row[k] for k in ("kind", "value")} for row in ctx.store.list_opt_outs()]
        try:
            catalog = catalog_id(ctx.workspace)
        except FileNotFoundError:
            catalog = "none"
        return {"opt_outs": "optouts-" + records.sha256_hex(records.canonical_json(opt_outs))[:16],
                "catalog": catalog, "request": f"takedown-{uuid.uuid4().hex}"}

    def run(self, ctx: StageContext, config: TakedownConfig) -> StageOutput:
        store, run_id, kind, value = ctx.store, ctx.run_id, config.kind, config.value
        if kind == "rights_holder":  # the registry matches names case-insensitively: reuse the spelling on file
            value = next((o["value"] for o in store.list_opt_outs() if o["kind"] == kind
                          and o["value"].casefold() == value.casefold()), value)
        added = store.add_opt_out(kind, value, config.reason or f"takedown {run_id}")
        result = _affected(ctx.workspace, store, run_id, kind, value, added)
        ctx.say(f"{kind}={value} names {len(result.tracks)} track(s) in {len(result.datasets)} dataset(s), "
                f"{len(result.checkpoints)} checkpoint(s), {len(result.generations)} generation(s)")
        if config.rebuild and result.datasets:
            result.rebuilt = _rebuild(ctx, result.datasets, f"takedown {kind}={value}")
        report = ctx.workspace.run_dir(run_id) / "takedown.json"
        report.parent.mkdir(parents=True, exist_ok=True)
        result.report_path = str(report)
        payload = result.to_json()
        report.write_text(json.dumps(payload, indent=2, default=str) + "\n")
        details = {k: v for k, v in payload.items() if k not in {"stage", "run_id", "counts"}}
        return StageOutput(outputs={"report": str(report)}, counts=payload["counts"],
                           output_ids={f"dataset_replacing_{r['parent_dataset_id']}": r["dataset_id"]
                                       for r in result.rebuilt},
                           details=details)


TAKEDOWN = TakedownStage()


def _rebuild(ctx: StageContext, datasets: list[dict[str, Any]], why: str) -> list[dict[str, Any]]:
    """Re-shard the affected datasets (one shard run per distinct shard config) through the runner, as child Runs
    of the takedown; link each new dataset to the one it replaces."""
    from pipelines.stages.shard.stage import ShardResult

    configs: dict[str, tuple[Any, list[str]]] = {}
    for dataset in datasets:
        config = _shard_config(ctx.workspace, dataset["dataset_id"])
        configs.setdefault(config.sha256(), (config, []))[1].append(dataset["dataset_id"])
    rebuilt = []
    for config, parents in configs.values():
        ctx.say(f"re-sharding without the recordings (replaces {', '.join(parents)})")
        shard = ShardResult.from_stage(run_stage(get_stage("shard"), ctx.workspace, config, engine=ctx.engine,
                                                 progress=ctx.progress, status=ctx.status,
                                                 parent_run_id=ctx.run_id, lock=ctx.lock))
        for parent in parents:
            if shard.dataset_id != parent:
                ctx.store.add_dataset_parent(shard.dataset_id, parent, ctx.run_id, why)
            rebuilt.append({"parent_dataset_id": parent, "dataset_id": shard.dataset_id,
                            "shard_run_id": shard.run_id, "num_tracks": shard.num_tracks,
                            "num_segments": shard.num_segments, "reused": shard.reused})
    return rebuilt


def run_takedown(workspace: Workspace, kind: str, value: str, reason: str = "", rebuild: bool = True,
                 status: Callable[[str], None] | None = None,
                 progress: Callable[[str, int, int], None] | None = None) -> TakedownResult:
    """Register an opt-out, list what it affects, and build new dataset versions without its recordings (the
    takedown stage, through the runner).

    Args:
        kind: ``rights_holder`` | ``track_id`` | ``isrc``.
        value: the rights holder's name (case-insensitive), the track id, or the ISRC.
        rebuild: re-shard every affected dataset without the recordings (needs the curated catalog).
        progress: forwarded to the shard stage while a dataset is rebuilt.

    Raises:
        ValueError: a bad kind or value (before anything is registered).
        FileNotFoundError: ``rebuild`` and the workspace has no curated catalog to re-shard from.
    """
    kind, value = parse_takedown(kind, value)
    config = TakedownConfig(kind=kind, value=value, reason=reason, rebuild=rebuild)
    return TakedownResult.from_stage(run_stage(TAKEDOWN, workspace, config, status=status, progress=progress))


class OptedOutDataError(ValueError):
    """A dataset holds recordings the opt-out registry names; a run must not train on it."""


def check_dataset_cleared(workspace: Workspace, store: LineageStore, dataset_id: str) -> None:
    """Refuse a dataset that holds opted-out recordings (a takedown came after it was built).

    Raises:
        OptedOutDataError: naming the tracks and the dataset version built without them, if any.
    """
    rows = store.list_opt_outs()
    if not rows:
        return
    registry = OptOutRegistry.from_rows(rows)
    in_dataset = store.dataset_track_segments(dataset_id)
    tracks = known_tracks(workspace, store)
    named = sorted(t for t in in_dataset if not registry.check(tracks.get(t, {"track_id": t})).admitted)
    if not named:
        return
    versions = [c["dataset_id"] for c in store.dataset_children(dataset_id)]
    fix = (f"train on dataset {versions[-1]} (built without them)" if versions
           else "run `linernotes shard` for a dataset without them")
    shown = ", ".join(named[:5]) + (" …" if len(named) > 5 else "")
    raise OptedOutDataError(f"dataset {dataset_id} holds {len(named)} opted-out track(s) ({shown}): {fix}")


def _affected(workspace: Workspace, store: LineageStore, run_id: str, kind: str, value: str,
              added: bool) -> TakedownResult:
    """Everything one opt-out reaches: its tracks, datasets, checkpoints, generations, attributions."""
    registry = OptOutRegistry.from_rows([{"kind": kind, "value": value}])
    tracks = known_tracks(workspace, store)
    named = set(matching_tracks(tracks, registry))
    if kind == "track_id":
        named.add(value)  # in a dataset although no tracks table describes it any more
    in_datasets = store.datasets_with_tracks(named)
    if kind == "track_id" and value not in tracks and not any(value in t for t in in_datasets.values()):
        named.discard(value)
    datasets = []
    for dataset_id, track_ids in in_datasets.items():
        segments = store.dataset_track_segments(dataset_id)
        datasets.append({"dataset_id": dataset_id, "tracks": track_ids,
                         "num_segments": sum(segments.get(t, 0) for t in track_ids)})
    checkpoints = store.checkpoints_of_datasets(in_datasets)
    generations = store.generations_of_checkpoints(c["checkpoint_id"] for c in checkpoints)
    return TakedownResult(
        run_id=run_id, kind=kind, value=value, added=added,
        tracks=[{"track_id": t, **{f: tracks.get(t, {}).get(f) for f in ("title", "rights_holder", "isrc")}}
                for t in sorted(named)],
        datasets=datasets,
        checkpoints=[{k: c[k] for k in ("checkpoint_id", "dataset_id", "step", "uri")} for c in checkpoints],
        generations=[{k: g[k] for k in ("generation_id", "checkpoint_id", "prompt", "uri")} for g in generations],
        attributions=store.attributions_to_tracks(named),
    )


def _shard_config(workspace: Workspace, dataset_id: str) -> Any:
    """The shard config a dataset was built with (its ``dataset.json``)."""
    from pipelines.inputs import read_dataset_manifest
    from pipelines.stages.shard.stage import ShardConfig

    resolved = dict(read_dataset_manifest(workspace, dataset_id)["config"])
    resolved.pop("mel", None)
    return ShardConfig(**resolved)
