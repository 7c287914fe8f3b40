"""``linernotes takedown``: a rights holder, a track or an ISRC leaves the training data.

One takedown, one ``takedown`` Run in the lineage store:

1. the opt-out goes into the registry (``LineageStore.add_opt_out``), so every later ingest rejects the
   recordings (``opted_out``) and every later shard run leaves them out;
2. the tracks it names are found (in the catalog, in every ingest run's tracks, in every dataset), and with
   them every affected dataset, checkpoint trained on one, generation sampled from one, and stored
   attribution that credits one of the tracks;
3. each affected dataset gets a new version without the recordings: the shard stage
   (``pipelines.shard.run_shard``) re-run with the affected dataset's own shard config on the workspace's
   curated catalog, the opt-outs applied. The new dataset is linked to the one it replaces
   (``LineageStore.add_dataset_parent``). Checkpoints are not retrained here: the list says which ones
   were trained on the recordings, for the training team to retire or retrain on the new version.

The full list is written to ``runs/<run_id>/takedown.json``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from pipelines.lineage import known_tracks, matching_tracks
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

    def to_json(self) -> dict[str, Any]:
        return {"stage": STAGE, **asdict(self),
                "counts": {"tracks": len(self.tracks), "datasets": len(self.datasets),
                           "checkpoints": len(self.checkpoints), "generations": len(self.generations),
                           "attributions": len(self.attributions), "rebuilt": len(self.rebuilt)}}


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


def run_takedown(workspace: Workspace, kind: str, value: str, reason: str = "", rebuild: bool = True,
                 status: Callable[[str], None] | None = None,
                 progress: Callable[[str, int, int], None] | None = None) -> TakedownResult:
    """Register an opt-out, list what it affects, and build new dataset versions without its recordings.

    Args:
        kind: ``rights_holder`` | ``track_id`` | ``isrc``.
        value: the rights holder's name (case-insensitive), the track id, or the ISRC.
        rebuild: re-shard every affected dataset without the recordings (needs the curated catalog).
        progress: forwarded to the shard stage while a dataset is rebuilt.

    Raises:
        ValueError: a bad kind or value (before anything is registered).
        FileNotFoundError: ``rebuild`` and the workspace has no curated catalog to re-shard from.
    """
    from pipelines.shard import ShardConfig, run_shard

    kind, value = parse_takedown(kind, value)
    say = status or (lambda message: None)
    store = LineageStore(workspace.store_url)
    try:
        with store.run(STAGE, {"kind": kind, "value": value, "reason": reason, "rebuild": rebuild}) as run:
            run_id = run.run_id
            if kind == "rights_holder":  # the registry matches names case-insensitively: reuse the spelling on file
                value = next((o["value"] for o in store.list_opt_outs() if o["kind"] == kind
                              and o["value"].casefold() == value.casefold()), value)
            added = store.add_opt_out(kind, value, reason or f"takedown {run_id}")
            result = _affected(workspace, store, run_id, kind, value, added)
            say(f"{kind}={value} names {len(result.tracks)} track(s) in {len(result.datasets)} dataset(s), "
                f"{len(result.checkpoints)} checkpoint(s), {len(result.generations)} generation(s)")
            if rebuild and result.datasets:
                configs: dict[str, tuple[ShardConfig, list[str]]] = {}
                for dataset in result.datasets:
                    config = _shard_config(workspace, dataset["dataset_id"])
                    configs.setdefault(config.sha256(), (config, []))[1].append(dataset["dataset_id"])
                for config, parents in configs.values():
                    say(f"re-sharding without the recordings (replaces {', '.join(parents)})")
                    shard = run_shard(workspace, config, progress=progress)
                    for parent in parents:
                        if shard.dataset_id != parent:
                            store.add_dataset_parent(shard.dataset_id, parent, run_id, f"takedown {kind}={value}")
                        result.rebuilt.append({"parent_dataset_id": parent, "dataset_id": shard.dataset_id,
                                               "shard_run_id": shard.run_id, "num_tracks": shard.num_tracks,
                                               "num_segments": shard.num_segments, "reused": shard.reused})
            report = workspace.run_dir(run_id) / "takedown.json"
            report.parent.mkdir(parents=True, exist_ok=True)
            result.report_path = str(report)
            report.write_text(json.dumps(result.to_json(), indent=2, default=str) + "\n")
            run.counts = result.to_json()["counts"]
            run.outputs = {"report": str(report), "datasets": [r["dataset_id"] for r in result.rebuilt]}
        return result
    finally:
        store.close()


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
    from pipelines.shard import ShardConfig

    resolved = dict(read_dataset_manifest(workspace, dataset_id)["config"])
    resolved.pop("mel", None)
    return ShardConfig(**resolved)
