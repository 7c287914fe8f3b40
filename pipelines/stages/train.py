"""The ``train`` stage on the contract and the callers' entry points of the model stages: ``run_train``,
``run_index``, and (from their own modules, kept here for callers) ``run_generate`` (``pipelines.stages.generate``),
``run_attribute`` and ``run_attribute_file`` (``pipelines.attribution.attribute``)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cleaning.mel import MelConfig
from pipelines.attribution.attribute import AttributeJobResult, run_attribute, run_attribute_file
from pipelines.config import config_dict
from pipelines.stages.generate import GenerateJobResult, run_generate
from pipelines.inputs import MissingInputError, read_dataset_manifest, resolve_dataset
from pipelines.stage import Resources, Stage, StageContext, StageOutput
from provenance.records import sha256_hex
from provenance.store import LineageStore
from provenance.workspace import Workspace

__all__ = ["AttributeJobResult", "GenerateJobResult", "TRAIN", "TrainJobResult", "find_resumable_train_run",
           "run_attribute", "run_attribute_file", "run_generate", "run_index", "run_train"]


@dataclass
class TrainJobResult:
    run_id: str
    checkpoint_id: str  # "" when the run stopped before the end
    dataset_id: str
    step: int
    checkpoint_path: Path
    losses: list[float] = field(default_factory=list)
    status: str = "ran"  # ran | cached
    stage_result: Any = field(default=None, repr=False)  # pipelines.stage.StageResult

    def to_json(self) -> dict[str, Any]:
        """The stage contract's result shape with the train details (``checkpoint_id``, ``loss``) beside it."""
        if self.stage_result is not None:
            payload = self.stage_result.to_json()
            payload.pop("losses", None)
            return {**payload, "checkpoint_id": self.checkpoint_id,
                    "outputs": {**payload["outputs"], "checkpoint": str(self.checkpoint_path)}}
        return {"stage": "train", "run_id": self.run_id, "checkpoint_id": self.checkpoint_id,
                "dataset_id": self.dataset_id, "counts": {"steps": self.step}, "loss": _loss_summary(self.losses),
                "outputs": {"checkpoint": str(self.checkpoint_path)}}


def find_resumable_train_run(store: LineageStore, run_id: str | None = None) -> dict[str, Any]:
    """The train run ``--resume`` continues: ``run_id``, or the newest train run that did not succeed
    (failed, stopped, or still marked running after a kill) whose Ray Train run no later run finished.

    Raises:
        MissingInputError: no such run, or nothing to resume.
    """
    runs = store.list_runs("train")
    if run_id is not None:
        match = [run for run in runs if run["run_id"] == run_id]
        if not match:
            raise MissingInputError(f"no train run {run_id} in the lineage store: see `linernotes runs`")
        return match[0]
    finished = {_ray_run_name(run) for run in runs if run["status"] == "succeeded"}
    candidates = [run for run in runs if run["status"] != "succeeded" and _ray_run_name(run) not in finished]
    if not candidates:
        raise MissingInputError("no interrupted train run to resume: start one with `linernotes train`")
    return candidates[-1]


def _ray_run_name(run: dict[str, Any]) -> str:
    return str((run.get("config") or {}).get("ray_run_name") or run["run_id"])


def run_train(workspace: Workspace, config: Any, dataset_id: str | None = None,
              status: Callable[[str], None] | None = None,
              progress: Callable[[str, int, int], None] | None = None,
              resume: bool | str = False, stop_after_steps: int | None = None,
              engine: Any = None, force: bool = False) -> TrainJobResult:
    """Train on a dataset's train shards with Ray Train through the stage runner; register the Checkpoint.

    ``config`` is a ``training.config.TrainConfig`` (ignored when resuming: the resumed run's own config is
    used). Ray Train's run folder is ``config.storage_path`` (default ``WORKDIR/ray_results``) / the first
    run id. ``resume`` (True, or a run id) continues an interrupted run from its newest checkpoint under a
    new Run that records ``resumes``; ``stop_after_steps`` checkpoints and stops early (the Run ends
    ``stopped``; ``--resume`` continues it). The checkpoint id is ``ckpt-`` + 16 hex of the sha256 of the
    checkpoint file; only a finished run registers one. The same config on the same dataset as a finished run
    whose checkpoint is still there is ``cached``: no training, that run's result, unless ``force`` (or
    ``resume``, or ``stop_after_steps``). ``engine``: the run's engines (``pipelines.engines.Engine``; default a
    local Ray for this call).

    Raises:
        MissingInputError: no dataset, or nothing to resume.
    """
    from pipelines.stage import run_stage
    from training.config import TrainConfig

    options: dict[str, Any] = {"stop_after_steps": stop_after_steps}
    if resume:
        with LineageStore(workspace.store_url) as store:
            previous = find_resumable_train_run(store, resume if isinstance(resume, str) else None)
        stored = dict(previous["config"])
        options.update(ray_run_name=_ray_run_name(previous), resumes=previous["run_id"])
        dataset_id = stored.get("dataset_id")
        config = TrainConfig(**{k: v for k, v in stored.items() if k in TrainConfig.model_fields})
    # resuming, or stopping on purpose, always runs (a finished run of the same config is not what was asked for)
    result = run_stage(TRAIN, workspace, config, status=status, progress=progress, select={"dataset": dataset_id},
                       options=options, engine=engine, force=force or bool(resume) or stop_after_steps is not None)
    d = result.details
    checkpoint = Path(result.outputs["checkpoint"]) if "checkpoint" in result.outputs else Path(d["checkpoint_path"])
    return TrainJobResult(result.run_id, d.get("checkpoint_id", ""), d["dataset_id"], d["step"], checkpoint,
                          d["losses"], status=result.status, stage_result=result)


class TrainStage(Stage):
    """The train stage on the contract: a dataset → a checkpoint (Ray Train, resumable from its checkpoints)."""

    name = "train"
    version = "1"
    resources = Resources(engine="ray-train", cpus=1.0, gpus=1.0)
    engine_keys = ("storage_path",)
    reads = ("dataset",)
    writes = ("checkpoint",)

    @property
    def config_model(self) -> type:  # type: ignore[override]  (training.config is imported on use)
        from training.config import TrainConfig

        return TrainConfig

    def inputs(self, ctx: StageContext, config: Any) -> dict[str, str]:
        from pipelines.stages.takedown import check_dataset_cleared

        dataset = resolve_dataset(ctx.store, ctx.workspace, ctx.select.get("dataset"))
        check_dataset_cleared(ctx.workspace, ctx.store, dataset["dataset_id"])  # no training on taken-down recordings
        manifest = read_dataset_manifest(ctx.workspace, dataset["dataset_id"])
        if not manifest["shards"]["train"]:
            raise MissingInputError(f"dataset {dataset['dataset_id']} has no train shards")
        if config.source == "stems" and not (manifest["config"].get("stems") and manifest.get("stems")):
            from training.stems import NoStemsError, no_stems_message

            raise NoStemsError(no_stems_message(f"dataset {dataset['dataset_id']}"))
        return {"dataset": dataset["dataset_id"]}

    def record(self, ctx: StageContext, config: Any) -> dict[str, Any]:
        resumes = ctx.options.get("resumes")
        return {"dataset_id": ctx.inputs["dataset"], "ray_run_name": ctx.options.get("ray_run_name") or ctx.run_id,
                **({"resumes": resumes} if resumes else {})}

    def run(self, ctx: StageContext, config: Any) -> StageOutput:
        from training.train import train

        workspace, dataset_id = ctx.workspace, ctx.inputs["dataset"]
        ray_run_name = self.record(ctx, config)["ray_run_name"]
        manifest = read_dataset_manifest(workspace, dataset_id)
        dataset_dir = workspace.dataset_dir(dataset_id)
        shard_paths = [str(dataset_dir / name) for name in manifest["shards"]["train"]]
        storage_path = config.storage_path or str(workspace.root / "ray_results")
        ctx.engine.ray()
        verb = f"resuming {ctx.options['resumes']}:" if ctx.options.get("resumes") else "training"
        ctx.say(f"{verb} {config.steps} steps on {len(shard_paths)} shard(s) of {dataset_id} "
                f"(run folder {storage_path}/{ray_run_name})")
        result = train(shard_paths, dataset_id, MelConfig(**manifest["config"]["mel"]), config,
                       storage_path=storage_path, run_name=ray_run_name, progress=ctx.progress,
                       stop_after_steps=ctx.options.get("stop_after_steps"))
        losses = [float(x) for x in result.losses]
        loss = _loss_summary(losses)
        counts = {"steps": result.step, **{f"loss_{k}": v for k, v in loss.items()}}
        details = {"dataset_id": dataset_id, "step": result.step, "losses": losses, "loss": loss,
                   "ray_run_name": ray_run_name, "checkpoint_uri": result.checkpoint_uri}
        if not result.finished:
            return StageOutput(outputs={}, counts=counts, details={**details, "checkpoint_path": result.checkpoint_path},
                               status="stopped")
        checkpoint_id = "ckpt-" + sha256_hex(Path(result.checkpoint_path).read_bytes())[:16]
        target = _commit_checkpoint(ctx, config, result, checkpoint_id, dataset_id)
        return StageOutput(outputs={"checkpoint": str(target)}, counts=counts,
                           output_ids={"checkpoint": checkpoint_id}, details={**details, "checkpoint_id": checkpoint_id})


TRAIN = TrainStage()


def _loss_summary(losses: list[float]) -> dict[str, float | None]:
    """Mean of the first and of the last tenth of the per-step losses (None without steps)."""
    if not losses:
        return {"first": None, "last": None}
    tenth = max(1, len(losses) // 10)
    return {"first": float(np.mean(losses[:tenth])), "last": float(np.mean(losses[-tenth:]))}


def _commit_checkpoint(ctx: StageContext, config: Any, result: Any, checkpoint_id: str, dataset_id: str) -> Path:
    """Copy the finished checkpoint to ``checkpoints/<id>/checkpoint.pt`` (atomically), write its config.json,
    register the Checkpoint."""
    from pipelines.stage import config_sha256

    sha = config_sha256(TRAIN, config)
    target_dir = ctx.workspace.checkpoint_dir(checkpoint_id)
    target_dir.mkdir(parents=True, exist_ok=True)
    target, tmp = target_dir / "checkpoint.pt", target_dir / ".checkpoint.pt.tmp"
    shutil.copyfile(result.checkpoint_path, tmp)
    tmp.replace(target)
    (target_dir / "config.json").write_text(json.dumps(
        {"train": config_dict(config), "config_sha256": sha, "dataset_id": dataset_id, "step": result.step,
         "run_id": ctx.run_id}, indent=2))
    if ctx.store.get_checkpoint(checkpoint_id) is None:
        ctx.store.add_checkpoint({"checkpoint_id": checkpoint_id, "dataset_id": dataset_id, "run_id": ctx.run_id,
                                  "step": result.step, "config_sha256": sha, "uri": str(target)})
    return target


@dataclass
class IndexJobResult:
    run_id: str
    result: Any  # pipelines.stage.StageResult of the index stage

    def to_json(self) -> dict[str, Any]:
        return self.result.to_json()


def run_index(workspace: Workspace, config: Any, checkpoint_id: str | None = None,
              progress: Callable[[str, int, int], None] | None = None) -> IndexJobResult:
    """Build (or resume, or reuse) a checkpoint's attribution index (``pipelines.attribution.stage``) through the
    stage runner.

    ``config`` is a ``pipelines.attribution.stage.IndexConfig``; ``checkpoint_id`` defaults to the newest checkpoint.

    Raises:
        MissingInputError: no checkpoint.
    """
    from pipelines.attribution.stage import INDEX
    from pipelines.stage import run_stage

    result = run_stage(INDEX, workspace, config, progress=progress, select={"checkpoint": checkpoint_id})
    return IndexJobResult(result.run_id, result)
