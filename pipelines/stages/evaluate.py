"""Evaluating and sampling a trained model, as stages on the contract: ``evaluate`` (FAD of each checkpoint of a
train run against held-out validation segments, and a report) and ``variations`` (a batch of generations over
seeds, guidance scales and durations).

Both are deterministic for their seeds (``training.generate.generate`` is, and so is the FAD of its outputs), so a
re-run with the same inputs and config is ``cached``. Their inputs: ``evaluate`` reads the train run's checkpoint
files (content id: sha256 over each ``checkpoint.pt``'s path and sha256) and its dataset; ``variations`` reads a
checkpoint. A vocoder file is an input by its sha256. Light at import: torch loads when a stage runs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field

from pipelines.inputs import resolve_checkpoint
from pipelines.stage import Resources, Stage, StageContext, StageOutput, StageResult, run_stage
from provenance import records
from provenance.workspace import Workspace

MAX_DURATION_S = 600.0


class EvaluateConfig(BaseModel):
    """Config of the ``evaluate`` stage (``linernotes evaluate``; ``--config FILE --set key=value``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    embedder: str = Field("mel-stats", description="Embedding space of the FAD (cleaning.embed.load_embedder).")
    num_references: int = Field(16, ge=1, description="Validation segments compared against (one generation "
                                                      "each).")
    num_steps: Optional[int] = Field(None, ge=1, description="Sampler steps; None: the checkpoint config's.")
    guidance_scale: Optional[float] = Field(None, ge=0, description="Guidance scale; None: the config's.")
    sampler: Optional[str] = Field(None, description="ddim/ddpm (ε, v) or euler/heun (flow); None: the config's.")
    vocoder: Optional[str] = Field(None, description="Local HiFi-GAN generator checkpoint; None: Griffin-Lim.")
    seed: int = Field(0, description="Seed of the first generation (the i-th uses seed + i).")


class EvaluateStage(Stage):
    """The evaluate stage on the contract: a train run's checkpoints → FAD per step and a report."""

    name = "evaluate"
    version = "1"
    config_model = EvaluateConfig
    resources = Resources(engine="local", cpus=1.0)
    reads = ("train_run", "checkpoints", "dataset", "vocoder")
    writes = ("parquet", "plot", "report", "json")

    def inputs(self, ctx: StageContext, config: EvaluateConfig) -> dict[str, str]:
        """The train run (``select["train_run"]``, default the newest succeeded one), its checkpoint files, its
        dataset; checks the embedder name.

        Raises:
            FileNotFoundError: no such train run, or its checkpoint folder is gone. ValueError: a bad embedder name.
        """
        from cleaning.embed import load_embedder

        train_run = _train_run(ctx, ctx.select.get("train_run"))
        run_dir = ctx.workspace.root / "ray_results" / train_run["run_id"]
        if not run_dir.is_dir():
            raise FileNotFoundError(f"train run {train_run['run_id']} left no checkpoint folder at {run_dir}")
        dataset_id = (train_run.get("config") or {}).get("dataset_id")
        if not dataset_id:
            raise FileNotFoundError(f"train run {train_run['run_id']} names no dataset_id")
        ctx.prepared.update(embedder=load_embedder(config.embedder), run_dir=run_dir)
        files = {str(path.relative_to(run_dir)): records.file_sha256(path)
                 for path in sorted(run_dir.rglob("checkpoint.pt"))}
        found = {"train_run": train_run["run_id"], "dataset": dataset_id,
                 "checkpoints": "sha256:" + records.sha256_hex(records.canonical_json(files))}
        if config.vocoder:
            found["vocoder"] = "sha256:" + records.file_sha256(config.vocoder)
        return found

    def run(self, ctx: StageContext, config: EvaluateConfig) -> StageOutput:
        from training.evaluate import evaluate_run

        dataset_id = ctx.inputs["dataset"]
        evaluation = evaluate_run(ctx.prepared["run_dir"], ctx.workspace.dataset_dir(dataset_id),
                                  ctx.prepared["embedder"], ctx.workspace.run_dir(ctx.run_id),
                                  embedder_name=config.embedder, num_references=config.num_references,
                                  seed=config.seed, num_steps=config.num_steps, guidance_scale=config.guidance_scale,
                                  sampler=config.sampler, vocoder=config.vocoder, progress=ctx.progress)
        best = min(evaluation.rows, key=lambda row: row["fad"])
        counts = {"checkpoints": len(evaluation.rows), "best_step": best["step"], "best_fad": best["fad"],
                  "vocoder_floor_fad": evaluation.vocoder_floor_fad}
        details = {"train_run_id": ctx.inputs["train_run"], "dataset_id": dataset_id,
                   "fad_by_step": {str(row["step"]): row["fad"] for row in evaluation.rows}}
        return StageOutput(outputs=dict(evaluation.outputs), counts=counts, details=details)


EVALUATE = EvaluateStage()


def _train_run(ctx: StageContext, train_run_id: str | None) -> dict[str, Any]:
    if train_run_id:
        train_run = ctx.store.get_run(train_run_id)
        if train_run is None or train_run["kind"] != "train":
            raise FileNotFoundError(f"no train run {train_run_id} in {ctx.workspace.root}: see `linernotes runs`")
        return train_run
    finished = [r for r in ctx.store.list_runs("train") if r["status"] == "succeeded"]
    if not finished:
        raise FileNotFoundError(f"no finished train run in {ctx.workspace.root}: run `linernotes train` first")
    return finished[-1]


class VariationsConfig(BaseModel):
    """Config of the ``variations`` stage (``linernotes variations``; ``--config FILE --set key=value``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    prompt: str = Field(description="Text the model is conditioned on.")
    seeds: list[int] = Field(min_length=1, description="Seeds, one generation each (per scale and duration).")
    guidance_scales: Optional[list[float]] = Field(None, min_length=1, description="Guidance scales; None: the "
                                                                                   "checkpoint config's.")
    durations_s: list[float] = Field([5.0], min_length=1, description="Durations in seconds, each in (0, 600].")
    num_steps: Optional[int] = Field(None, ge=1, description="Sampler steps; None: the checkpoint config's.")
    sampler: Optional[str] = Field(None, description="ddim/ddpm (ε, v) or euler/heun (flow); None: the config's.")
    vocoder: Optional[str] = Field(None, description="Local HiFi-GAN generator checkpoint; None: Griffin-Lim.")


class VariationsStage(Stage):
    """The variations stage on the contract: a checkpoint → WAVs for every seed × guidance scale × duration."""

    name = "variations"
    version = "1"
    config_model = VariationsConfig
    resources = Resources(engine="local", cpus=1.0)
    reads = ("checkpoint", "vocoder")
    writes = ("folder", "listing")

    def inputs(self, ctx: StageContext, config: VariationsConfig) -> dict[str, str]:
        """The checkpoint (``select["checkpoint"]``, default the newest) and the vocoder file.

        Raises:
            MissingInputError: no checkpoint. ValueError: a duration outside (0, 600] s.
        """
        if any(not 0 < d <= MAX_DURATION_S for d in config.durations_s):
            raise ValueError(f"durations_s must be in (0, {MAX_DURATION_S:g}] seconds, got {config.durations_s}")
        checkpoint = resolve_checkpoint(ctx.store, ctx.workspace, ctx.select.get("checkpoint"))
        ctx.prepared["checkpoint"] = checkpoint
        found = {"checkpoint": checkpoint["checkpoint_id"]}
        if config.vocoder:
            found["vocoder"] = "sha256:" + records.file_sha256(config.vocoder)
        return found

    def run(self, ctx: StageContext, config: VariationsConfig) -> StageOutput:
        from cleaning.audio import write_audio
        from training.generate import generate_variations

        results = generate_variations(ctx.prepared["checkpoint"]["uri"], config.prompt, config.seeds,
                                      config.guidance_scales or [None], config.durations_s,
                                      num_steps=config.num_steps, sampler=config.sampler, vocoder=config.vocoder)
        folder = ctx.workspace.run_dir(ctx.run_id)
        items = []
        for result in results:
            name = f"seed{result.seed}-{result.sampler}-{result.duration_s:g}s.wav"
            path = write_audio(folder / name, result.audio, result.sample_rate_hz, subtype="PCM_16")
            items.append({"wav": str(path), "seed": result.seed, "sampler": result.sampler,
                          "duration_s": result.duration_s})
        listing = folder / "variations.json"
        listing.write_text(json.dumps({**config.model_dump(), "checkpoint_id": ctx.inputs["checkpoint"],
                                       "items": items}, indent=2))
        return StageOutput(outputs={"folder": str(folder), "listing": str(listing)},
                           counts={"generations": len(items)},
                           details={"checkpoint_id": ctx.inputs["checkpoint"], "items": items})


VARIATIONS = VariationsStage()


def variations_payload(result: StageResult, out_dir: Path | None = None) -> dict[str, Any]:
    """A variations result as JSON (``outputs.wavs``: every WAV), its WAVs and listing copied to ``out_dir`` when
    given (also when the result is cached)."""
    payload = result.to_json()
    items = payload["items"]
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        items = [{**item, "wav": str(out_dir / Path(item["wav"]).name)} for item in items]
        for before, after in zip(payload["items"], items):
            shutil.copyfile(before["wav"], after["wav"])
        listing = json.loads(Path(result.outputs["listing"]).read_text())
        (out_dir / "variations.json").write_text(json.dumps({**listing, "items": items}, indent=2))
        payload["outputs"] = {**payload["outputs"], "folder": str(out_dir),
                              "listing": str(out_dir / "variations.json")}
    payload["items"] = items
    payload["outputs"] = {**payload["outputs"], "wavs": [item["wav"] for item in items]}
    return payload


# callers' entry points ------------------------------------------------------------------------------------

def run_evaluate(workspace: Workspace, train_run_id: str | None = None, *, embedder: str = "mel-stats",
                 num_references: int = 16, num_steps: int | None = None, guidance_scale: float | None = None,
                 sampler: str | None = None, vocoder: Path | None = None, seed: int = 0,
                 progress: Any = None) -> dict[str, Any]:
    """Evaluate a train run's checkpoints (``training.evaluate.evaluate_run``) through the stage runner; returns
    the result's JSON (``train_run_id``, ``fad_by_step``, ``counts``, ``outputs``).

    Raises:
        FileNotFoundError: no such train run, or its checkpoint folder is gone.
        ValueError: a bad embedder name; see ``evaluate_run``.
    """
    config = EvaluateConfig(embedder=embedder, num_references=num_references, num_steps=num_steps,
                            guidance_scale=guidance_scale, sampler=sampler, vocoder=str(vocoder) if vocoder else None,
                            seed=seed)
    return run_stage(EVALUATE, workspace, config, progress=progress, select={"train_run": train_run_id}).to_json()


def run_variations(workspace: Workspace, prompt: str, seeds: list[int], guidance_scales: list[float] | None,
                   durations_s: list[float], out_dir: Path | None = None, checkpoint_id: str | None = None,
                   num_steps: int | None = None, sampler: str | None = None,
                   vocoder: Path | None = None) -> dict[str, Any]:
    """Generate every seed × guidance scale × duration from a checkpoint (default the newest) through the stage
    runner: WAVs (PCM_16) and ``variations.json`` in the run's folder, copied to ``out_dir`` when given.

    Raises:
        pipelines.inputs.MissingInputError: no checkpoint.
    """
    config = VariationsConfig(prompt=prompt, seeds=seeds, guidance_scales=guidance_scales, durations_s=durations_s,
                              num_steps=num_steps, sampler=sampler, vocoder=str(vocoder) if vocoder else None)
    result = run_stage(VARIATIONS, workspace, config, select={"checkpoint": checkpoint_id})
    return variations_payload(result, out_dir)
