"""The ``generate`` stage: sample a mel from a checkpoint (its sampler), vocode it (Griffin-Lim, or a local HiFi-GAN
generator), write the WAV, register the Generation, and attribute it (the ``attribute`` stage, through the runner,
as a child Run).

The generation id is ``gen-`` + 16 hex of the sha256 of the request (checkpoint, prompt, seed, duration, steps,
guidance, and the options that are set) and the sampler: the same request gives the same id and the same audio
(``training.generate.generate`` is deterministic for a seed). So a request whose inputs (the checkpoint, the context
audio, the vocoder file, the dataset and catalog the attribution credits) and config match a finished Run is
``cached``: that Run's WAV (checked by sha256) and attribution.

Light at import: torch loads when the stage runs.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field

from pipelines.attribution.attribute import ATTRIBUTE, attribute_config, credit_tables_id
from pipelines.inputs import resolve_checkpoint
from pipelines.stage import Resources, Stage, StageContext, StageOutput, StageResult, run_stage
from provenance import records
from provenance.records import canonical_json, sha256_hex
from provenance.workspace import Workspace

STAGE = "generate"
MAX_DURATION_S = 600.0


class GenerateConfig(BaseModel):
    """Config of the ``generate`` stage (``linernotes generate``; ``--config FILE --set key=value``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    prompt: str = Field(description="Text the model is conditioned on ('' samples unconditionally).")
    seed: int = Field(0, description="Seed of the initial noise and every later random draw.")
    duration_s: float = Field(5.0, gt=0, le=MAX_DURATION_S, description="Length of the generated track, seconds.")
    num_steps: Optional[int] = Field(None, ge=1, description="Sampler steps; None: the checkpoint config's.")
    guidance_scale: Optional[float] = Field(None, ge=0, description="Classifier-free guidance scale; None: the "
                                                                     "checkpoint config's.")
    sampler: Optional[str] = Field(None, description="ddim/ddpm (ε, v) or euler/heun (flow); None: the config's.")
    bpm: Optional[float] = Field(None, gt=0, description="Tempo condition, beats per minute.")
    key: Optional[str] = Field(None, description="Key condition, e.g. 'A minor', 'F#'.")
    instrument: Optional[str] = Field(None, description="Instrument condition, e.g. 'piano'.")
    context_path: Optional[str] = Field(None, description="Audio file to continue (or inpaint with regenerate_s).")
    regenerate_s: Optional[tuple[float, float]] = Field(None, description="START, END seconds of the context to "
                                                                          "regenerate (inpainting).")
    vocoder: Optional[str] = Field(None, description="Local HiFi-GAN generator checkpoint; None: Griffin-Lim.")
    top_k: int = Field(10, ge=1, description="Training segments the generation is attributed to.")

    def conditions(self) -> dict[str, Any] | None:
        """The musical conditions that are set (None when none is)."""
        given = {k: v for k, v in {"bpm": self.bpm, "key": self.key, "instrument": self.instrument}.items()
                 if v is not None}
        return given or None


class GenerateStage(Stage):
    """The generate stage on the contract: a checkpoint → a generation (WAV, record) and its attribution."""

    name = STAGE
    version = "1"
    config_model = GenerateConfig
    resources = Resources(engine="local", cpus=1.0)
    reads = ("checkpoint", "dataset", "catalog", "context", "vocoder")
    writes = ("wav", "record", "attribution")

    def inputs(self, ctx: StageContext, config: GenerateConfig) -> dict[str, str]:
        """The checkpoint (and the dataset and catalog the attribution credits), the context audio and the vocoder
        file by sha256.

        Raises:
            MissingInputError: no checkpoint. FileNotFoundError: no context or vocoder file.
        """
        checkpoint = resolve_checkpoint(ctx.store, ctx.workspace, ctx.select.get("checkpoint"))
        found = {"checkpoint": checkpoint["checkpoint_id"], "dataset": checkpoint["dataset_id"],
                 "catalog": credit_tables_id(ctx.workspace)}
        for name, path in (("context", config.context_path), ("vocoder", config.vocoder)):
            if path is not None:
                if not Path(path).is_file():
                    raise FileNotFoundError(f"no {name} file at {path}")
                found[name] = "sha256:" + records.file_sha256(path)
        ctx.prepared["checkpoint"] = checkpoint
        return found

    def run(self, ctx: StageContext, config: GenerateConfig) -> StageOutput:
        from cleaning.audio import read_audio, write_audio
        from training.generate import generate

        checkpoint = ctx.prepared["checkpoint"]
        request = generation_request(config, checkpoint["checkpoint_id"])
        context_audio, context_rate = read_audio(config.context_path) if config.context_path else (None, None)
        ctx.say(f"sampling {config.duration_s:g} s from {checkpoint['checkpoint_id']}")
        result = generate(checkpoint["uri"], prompt=config.prompt, seed=config.seed, duration_s=config.duration_s,
                          num_steps=config.num_steps, guidance_scale=config.guidance_scale, sampler=config.sampler,
                          conditions=config.conditions(), context_audio=context_audio,
                          context_sample_rate_hz=context_rate, regenerate_s=config.regenerate_s,
                          vocoder=config.vocoder)
        generation_id = "gen-" + sha256_hex(canonical_json({**request, "sampler": result.sampler}))[:16]
        gen_dir = ctx.workspace.generation_dir(generation_id)
        wav = write_audio(gen_dir / "generation.wav", result.audio, result.sample_rate_hz, subtype="PCM_16")
        conditioning = {"text": config.prompt, "guidance_scale": config.guidance_scale,
                        **({"musical": config.conditions()} if config.conditions() else {})}
        record = {"generation_id": generation_id, "checkpoint_id": checkpoint["checkpoint_id"], "run_id": ctx.run_id,
                  "prompt": config.prompt, "conditioning": canonical_json(conditioning), "seed": config.seed,
                  "sampler": result.sampler, "duration_s": config.duration_s, "uri": str(wav)}
        record_path = gen_dir / "generation.json"
        record_path.write_text(json.dumps(record, indent=2))
        if ctx.store.get_generation(generation_id) is None:
            ctx.store.add_generation(record)
        ctx.say("attributing the generation")
        written, sample_rate_hz = read_audio(wav)
        attribution = run_stage(ATTRIBUTE, ctx.workspace,
                                attribute_config(top_k=config.top_k, prompt=config.prompt), engine=ctx.engine,
                                progress=ctx.progress, status=ctx.status, select={"dataset": ctx.inputs["dataset"]},
                                options={"query_audio": (written, sample_rate_hz), "query_id": generation_id},
                                parent_run_id=ctx.run_id, lock=ctx.lock)
        details = {"generation_id": generation_id, "checkpoint_id": checkpoint["checkpoint_id"],
                   "sampler": result.sampler, "duration_s": config.duration_s, "attribution": attribution.to_json()}
        return StageOutput(outputs={"wav": str(wav), "record": str(record_path)},
                           counts={"generations": 1, "attributed_segments": attribution.counts.get("segments", 0)},
                           output_ids={"generation": generation_id}, details=details)


GENERATE = GenerateStage()


def generation_request(config: GenerateConfig, checkpoint_id: str) -> dict[str, Any]:
    """What the generation id is computed from (with the resolved sampler): the request, options that are set."""
    request: dict[str, Any] = {"checkpoint_id": checkpoint_id, "prompt": config.prompt, "seed": config.seed,
                               "duration_s": config.duration_s, "num_steps": config.num_steps,
                               "guidance_scale": config.guidance_scale}
    options = {"sampler": config.sampler, "conditions": config.conditions(),
               "context_sha256": records.file_sha256(config.context_path) if config.context_path else None,
               "regenerate_s": list(config.regenerate_s) if config.regenerate_s else None,
               "vocoder": config.vocoder}
    request.update({key: value for key, value in options.items() if value is not None})
    return request


# callers' entry points ------------------------------------------------------------------------------------

@dataclass
class GenerateJobResult:
    """A generate stage result; ``path`` is the WAV (the ``out`` copy when one was asked for)."""

    run_id: str
    generation_id: str
    checkpoint_id: str
    path: Path
    duration_s: float
    sampler: str
    attribution: Any  # pipelines.attribution.attribute.AttributeJobResult | None
    stage_result: StageResult | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        """The stage contract's shape with the generation (``generation_id``, ``sampler``, ``attribution``);
        ``outputs.out``: the copy asked for with ``out``."""
        if self.stage_result is None:
            return {"stage": STAGE, "run_id": self.run_id, "generation_id": self.generation_id,
                    "checkpoint_id": self.checkpoint_id, "sampler": self.sampler, "duration_s": self.duration_s,
                    "outputs": {"wav": str(self.path)},
                    "attribution": self.attribution.to_json() if self.attribution else None}
        payload = self.stage_result.to_json()
        if str(self.path) != payload["outputs"]["wav"]:
            payload["outputs"] = {**payload["outputs"], "out": str(self.path)}
        return payload

    @classmethod
    def from_stage(cls, result: StageResult, out: str | Path | None = None) -> "GenerateJobResult":
        """The result, with the WAV copied to ``out`` when given (also when the result is cached)."""
        from pipelines.attribution.attribute import AttributeJobResult

        d = result.details
        path = Path(result.outputs["wav"])
        if out is not None:
            target = Path(out).expanduser().resolve()
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
            path = target
        attribution = d.get("attribution")
        attributed = None
        if attribution:
            attributed = AttributeJobResult.from_stage(StageResult(
                "attribute", attribution["run_id"], attribution["status"], attribution["inputs"],
                attribution["outputs"], attribution["counts"], attribution.get("output_ids") or {},
                {k: v for k, v in attribution.items()
                 if k not in {"stage", "run_id", "status", "inputs", "outputs", "output_ids", "counts"}}))
        return cls(result.run_id, d["generation_id"], d["checkpoint_id"], path, d["duration_s"], d["sampler"],
                   attributed, result)


def run_generate(workspace: Workspace, prompt: str, seed: int, duration_s: float, out: str | Path | None = None,
                 checkpoint_id: str | None = None, num_steps: int | None = 50, guidance_scale: float | None = 3.0,
                 top_k: int = 10, status: Callable[[str], None] | None = None,
                 progress: Callable[[str, int, int], None] | None = None, *, sampler: str | None = None,
                 conditions: dict[str, Any] | None = None, context_path: str | Path | None = None,
                 regenerate_s: tuple[float, float] | None = None, vocoder: str | Path | None = None,
                 engine: Any = None, force: bool = False) -> GenerateJobResult:
    """Generate, register and attribute a track through the stage runner (see the module docstring).

    ``num_steps``/``guidance_scale`` None take the checkpoint config's defaults; ``conditions`` are musical
    conditions (``bpm``, ``key``, ``instrument``); ``context_path`` an audio file to continue (or, with
    ``regenerate_s``, to inpaint); ``out`` a path the WAV is also copied to.

    Raises:
        MissingInputError: no checkpoint. pydantic.ValidationError (a ValueError): a bad value or condition key.
    """
    config = GenerateConfig(prompt=prompt, seed=seed, duration_s=duration_s, num_steps=num_steps,
                            guidance_scale=guidance_scale, sampler=sampler, top_k=top_k,
                            context_path=str(context_path) if context_path else None, regenerate_s=regenerate_s,
                            vocoder=str(vocoder) if vocoder else None, **(conditions or {}))
    result = run_stage(GENERATE, workspace, config, engine=engine, progress=progress, status=status,
                       select={"checkpoint": checkpoint_id}, force=force)
    return GenerateJobResult.from_stage(result, out)
