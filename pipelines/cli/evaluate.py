"""``linernotes evaluate`` (FAD per checkpoint and a run report) and ``linernotes variations`` (a batch of
generations over seeds, guidance scales and durations): thin shells over the ``evaluate`` and ``variations``
stages (``pipelines.stages.evaluate``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from pipelines.cli.common import (
    CliError,
    ConfigOpt,
    ForceOpt,
    JsonOpt,
    SetOpt,
    WorkdirOpt,
    app,
    errors,
    render_generic,
    run_stage_command,
)
from provenance.workspace import DEFAULT_WORKDIR


@app.command()
def evaluate(
    run: Annotated[Optional[str], typer.Option(help="Train run id; default the newest succeeded train run.")] = None,
    embedder: Annotated[Optional[str], typer.Option(help="Embedding space of the FAD (cleaning.embed.load_embedder) "
                                                         "[mel-stats].")] = None,
    num_references: Annotated[Optional[int], typer.Option(help="Validation segments to compare against (one "
                                                               "generation each) [16].")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Sampler steps; default the checkpoint config's.")] = None,
    guidance_scale: Annotated[Optional[float], typer.Option(help="Guidance scale; default the config's.")] = None,
    sampler: Annotated[Optional[str], typer.Option(help="ddim/ddpm (ε, v) or euler/heun (flow).")] = None,
    vocoder: Annotated[Optional[Path], typer.Option(help="Local HiFi-GAN generator checkpoint; default "
                                                         "Griffin-Lim.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of the first generation (the i-th uses seed + i) "
                                                     "[0].")] = None,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    workdir: WorkdirOpt = Path(DEFAULT_WORKDIR),
    json_mode: JsonOpt = False,
    force: ForceOpt = False,
) -> None:
    """FAD of generations against held-out validation segments for every checkpoint of a train run, and a
    report (evaluation.parquet, loss_fad.png, report.html) in the evaluate run's folder."""
    with errors():
        if num_references is not None and num_references < 1:
            raise CliError(f"--num-references must be ≥ 1, got {num_references}")
        if steps is not None and steps < 1:
            raise CliError(f"--steps must be ≥ 1, got {steps}")
    run_stage_command("evaluate", config, overrides, workdir, json_mode, render_generic("evaluate"), force=force,
                      select={"train_run": run}, embedder=embedder, num_references=num_references, num_steps=steps,
                      guidance_scale=guidance_scale, sampler=sampler, vocoder=str(vocoder) if vocoder else None,
                      seed=seed)


@app.command()
def variations(
    prompt: Annotated[str, typer.Option(help="Text the model is conditioned on.")],
    seed: Annotated[list[int], typer.Option(help="Seeds (repeatable).")],
    guidance_scale: Annotated[Optional[list[float]], typer.Option(help="Guidance scales (repeatable); default "
                                                                       "the checkpoint config's.")] = None,
    duration_s: Annotated[Optional[list[float]], typer.Option("--duration-s", help="Durations in seconds "
                                                                                  "(repeatable) [5].")] = None,
    out_dir: Annotated[Optional[Path], typer.Option(help="Also copy the WAVs here; default only the run's "
                                                         "folder.")] = None,
    checkpoint: Annotated[Optional[str], typer.Option(help="Checkpoint id; default the newest.")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Sampler steps; default the config's.")] = None,
    sampler: Annotated[Optional[str], typer.Option(help="ddim/ddpm (ε, v) or euler/heun (flow).")] = None,
    vocoder: Annotated[Optional[Path], typer.Option(help="Local HiFi-GAN generator checkpoint.")] = None,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    workdir: WorkdirOpt = Path(DEFAULT_WORKDIR),
    json_mode: JsonOpt = False,
    force: ForceOpt = False,
) -> None:
    """A batch of variations (every seed × guidance scale × duration) written as WAVs with a variations.json."""
    with errors():
        if duration_s and any(not 0 < d <= 600 for d in duration_s):
            raise CliError(f"--duration-s must be in (0, 600] seconds, got {duration_s}")

    def finish(result: Any) -> dict[str, Any]:
        from pipelines.stages.evaluate import variations_payload

        return variations_payload(result, out_dir)

    run_stage_command("variations", config, overrides, workdir, json_mode, render_generic("variations"),
                      force=force, finish=finish, select={"checkpoint": checkpoint}, prompt=prompt, seeds=seed,
                      guidance_scales=guidance_scale or None, durations_s=duration_s or None, num_steps=steps,
                      sampler=sampler, vocoder=str(vocoder) if vocoder else None)
