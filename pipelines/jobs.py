"""Jobs that wrap the ``train``, ``generate`` and ``attribute`` cores with lineage: resolve inputs from the
store, register a Run with its counts, keep outputs in the workspace."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cleaning.audio import read_audio, write_audio
from cleaning.measure import measure_pcm_sha256
from cleaning.mel import MelConfig
from pipelines.config import config_dict
from pipelines.inputs import MissingInputError, read_dataset_manifest, resolve_checkpoint, resolve_dataset
from pipelines.stage import Resources, Stage, StageContext, StageOutput
from provenance.records import canonical_json, sha256_hex
from provenance.store import LineageStore
from provenance.workspace import Workspace


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


@dataclass
class AttributeJobResult:
    run_id: str
    query_id: str
    dataset_id: str
    result: Any  # provenance.attribution.AttributionResult

    def to_json(self) -> dict[str, Any]:
        return {"stage": "attribute", "run_id": self.run_id, "query_id": self.query_id,
                "dataset_id": self.dataset_id, **self.result.to_dict()}


@dataclass
class GenerateJobResult:
    run_id: str
    generation_id: str
    checkpoint_id: str
    path: Path
    duration_s: float
    sampler: str
    attribution: AttributeJobResult | None

    def to_json(self) -> dict[str, Any]:
        return {"stage": "generate", "run_id": self.run_id, "generation_id": self.generation_id,
                "checkpoint_id": self.checkpoint_id, "sampler": self.sampler, "duration_s": self.duration_s,
                "outputs": {"wav": str(self.path)},
                "attribution": self.attribution.to_json() if self.attribution else None}


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
        from pipelines.takedown import check_dataset_cleared

        dataset = resolve_dataset(ctx.store, ctx.workspace, ctx.select.get("dataset"))
        check_dataset_cleared(ctx.workspace, ctx.store, dataset["dataset_id"])  # no training on taken-down recordings
        manifest = read_dataset_manifest(ctx.workspace, dataset["dataset_id"])
        if not manifest["shards"]["train"]:
            raise MissingInputError(f"dataset {dataset['dataset_id']} has no train shards")
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


def run_attribute(workspace: Workspace, audio: np.ndarray, sample_rate_hz: int, query_id: str,
                  dataset_id: str | None = None, top_k: int = 10, store: LineageStore | None = None,
                  kind: str = "attribute",
                  progress: Callable[[str, int, int], None] | None = None, method: str = "embedding",
                  checkpoint_id: str | None = None, text: str = "", index_config: Any = None,
                  unlearning: Any = None) -> AttributeJobResult:
    """Attribute audio (float32 ``(channels, samples)``) with ``method``; store the result.

    ``embedding`` needs a dataset (default the newest); ``dtrak`` and ``unlearning`` need a checkpoint
    (default the newest, which must then be trained on ``dataset_id`` when that is given) and attribute to
    its dataset. A missing index is built first (cached in the workspace; ``progress`` is called as
    ``("indexing segments" | "D-TRAK features", done, total)``). See ``pipelines.attribution_methods``.

    Args:
        text: the query's prompt (``""``: unknown), the condition of the white-box methods' losses.
        index_config: a ``pipelines.index.IndexConfig`` (default ``IndexConfig()``).
        unlearning: ``pipelines.attribution_methods.UnlearningSettings`` (default settings).

    Raises:
        ValueError: unknown method; a checkpoint of another dataset.
        MissingInputError: no dataset or checkpoint.
    """
    from pipelines.attribution_methods import METHODS, load_attributor

    if method not in METHODS:
        raise ValueError(f"unknown attribution method {method!r}; choose one of {', '.join(METHODS)}")
    own_store = store is None
    store = store or LineageStore(workspace.store_url)
    try:
        checkpoint = None
        if method != "embedding":
            checkpoint = resolve_checkpoint(store, workspace, checkpoint_id)
            if dataset_id is not None and checkpoint["dataset_id"] != dataset_id:
                raise ValueError(f"checkpoint {checkpoint['checkpoint_id']} was trained on {checkpoint['dataset_id']}, "
                                 f"not {dataset_id}: pass --checkpoint with one trained on it")
            dataset_id = checkpoint["dataset_id"]
        dataset = resolve_dataset(store, workspace, dataset_id)
        run_config = {"method": method, "query_id": query_id, "dataset_id": dataset["dataset_id"], "top_k": top_k}
        if checkpoint is not None:
            run_config["checkpoint_id"] = checkpoint["checkpoint_id"]
        with store.run(kind, run_config) as run:
            attributor = load_attributor(workspace, method, dataset_id=dataset["dataset_id"], checkpoint=checkpoint,
                                         config=index_config, settings=unlearning, progress=progress)
            result = attributor.attribute(audio, sample_rate_hz, query_id, top_k=top_k, text=text)
            store.add_attributions(query_id, method, run.run_id, dataset["dataset_id"], result.rows())
            run.counts = {"segments": len(result.segments), "tracks": len(result.tracks),
                          "rights_holders": len(result.rights_holders)}
        return AttributeJobResult(run.run_id, query_id, dataset["dataset_id"], result)
    finally:
        if own_store:
            store.close()


def run_attribute_file(workspace: Workspace, path: str | Path, dataset_id: str | None = None,
                       top_k: int = 10, progress: Callable[[str, int, int], None] | None = None,
                       method: str = "embedding", checkpoint_id: str | None = None, text: str = "",
                       index_config: Any = None, unlearning: Any = None) -> AttributeJobResult:
    """Attribute any audio file with ``method`` (see ``run_attribute``); its query id is the sha256 of its
    decoded PCM.

    Raises:
        FileNotFoundError: no such file. cleaning.audio.AudioDecodeError: not decodable audio.
    """
    audio, sample_rate_hz = read_audio(path)
    return run_attribute(workspace, audio, sample_rate_hz, "pcm-" + measure_pcm_sha256(audio)[:16],
                         dataset_id=dataset_id, top_k=top_k, progress=progress, method=method,
                         checkpoint_id=checkpoint_id, text=text, index_config=index_config, unlearning=unlearning)


@dataclass
class IndexJobResult:
    run_id: str
    result: Any  # pipelines.stage.StageResult of the index stage

    def to_json(self) -> dict[str, Any]:
        return self.result.to_json()


def run_index(workspace: Workspace, config: Any, checkpoint_id: str | None = None,
              progress: Callable[[str, int, int], None] | None = None) -> IndexJobResult:
    """Build (or resume, or reuse) a checkpoint's attribution index (``pipelines.index``) through the stage runner.

    ``config`` is a ``pipelines.index.IndexConfig``; ``checkpoint_id`` defaults to the newest checkpoint.

    Raises:
        MissingInputError: no checkpoint.
    """
    from pipelines.index import INDEX
    from pipelines.stage import run_stage

    result = run_stage(INDEX, workspace, config, progress=progress, select={"checkpoint": checkpoint_id})
    return IndexJobResult(result.run_id, result)


def run_generate(workspace: Workspace, prompt: str, seed: int, duration_s: float, out: str | Path | None = None,
                 checkpoint_id: str | None = None, num_steps: int | None = 50, guidance_scale: float | None = 3.0,
                 top_k: int = 10, status: Callable[[str], None] | None = None,
                 progress: Callable[[str, int, int], None] | None = None, *, sampler: str | None = None,
                 conditions: dict[str, Any] | None = None, context_path: str | Path | None = None,
                 regenerate_s: tuple[float, float] | None = None,
                 vocoder: str | Path | None = None) -> GenerateJobResult:
    """Sample a mel (the checkpoint's sampler), vocode it (Griffin-Lim, or a local HiFi-GAN generator), write
    the WAV, register the Generation and attribute it.

    ``num_steps``/``guidance_scale`` None take the checkpoint config's defaults; ``conditions`` are musical
    conditions (bpm, key, instrument); ``context_path`` an audio file to continue (or, with ``regenerate_s``,
    to inpaint). The generation id is ``gen-`` + 16 hex of the sha256 of the request (checkpoint, prompt,
    seed, duration, steps, guidance, and the options that are set) and the sampler: the same request gives
    the same id and the same audio.
    """
    from training.generate import generate

    say = status or (lambda message: None)
    store = LineageStore(workspace.store_url)
    try:
        checkpoint = resolve_checkpoint(store, workspace, checkpoint_id)
        request = {"checkpoint_id": checkpoint["checkpoint_id"], "prompt": prompt, "seed": seed,
                   "duration_s": duration_s, "num_steps": num_steps, "guidance_scale": guidance_scale}
        options = {"sampler": sampler, "conditions": conditions or None,
                   "context_sha256": sha256_hex(Path(context_path).read_bytes()) if context_path else None,
                   "regenerate_s": list(regenerate_s) if regenerate_s else None,
                   "vocoder": str(vocoder) if vocoder else None}
        request.update({key: value for key, value in options.items() if value is not None})
        context_audio, context_rate = read_audio(context_path) if context_path else (None, None)
        with store.run("generate", request) as run:
            run_id = run.run_id
            say(f"sampling {duration_s:g} s from {checkpoint['checkpoint_id']}")
            result = generate(checkpoint["uri"], prompt=prompt, seed=seed, duration_s=duration_s,
                              num_steps=num_steps, guidance_scale=guidance_scale, sampler=sampler,
                              conditions=conditions, context_audio=context_audio,
                              context_sample_rate_hz=context_rate, regenerate_s=regenerate_s, vocoder=vocoder)
            generation_id = "gen-" + sha256_hex(canonical_json({**request, "sampler": result.sampler}))[:16]
            gen_dir = workspace.generation_dir(generation_id)
            wav = write_audio(gen_dir / "generation.wav", result.audio, result.sample_rate_hz, subtype="PCM_16")
            path = wav
            if out is not None:
                path = Path(out).expanduser().resolve()
                path.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(wav, path)
            record = {"generation_id": generation_id, "checkpoint_id": checkpoint["checkpoint_id"], "run_id": run_id,
                      "prompt": prompt, "conditioning": canonical_json({"text": prompt, "guidance_scale": guidance_scale,
                                                      **({"musical": conditions} if conditions else {})}),
                      "seed": seed, "sampler": result.sampler, "duration_s": duration_s, "uri": str(wav)}
            (gen_dir / "generation.json").write_text(json.dumps(record, indent=2))
            if store.get_generation(generation_id) is None:
                store.add_generation(record)
            run.counts, run.outputs = {"generations": 1}, {"wav": str(path), "generation_id": generation_id}
        say("attributing the generation")
        written, sample_rate_hz = read_audio(wav)
        attribution = run_attribute(workspace, written, sample_rate_hz, generation_id,
                                    dataset_id=checkpoint["dataset_id"], top_k=top_k, store=store, progress=progress,
                                    text=prompt)
        return GenerateJobResult(run_id, generation_id, checkpoint["checkpoint_id"], path, duration_s,
                                 result.sampler, attribution)
    finally:
        store.close()
