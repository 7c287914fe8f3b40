"""``linernotes evaluate`` (FAD per checkpoint and a run report) and ``linernotes variations`` (a batch of
generations over seeds, guidance scales and durations): thin shells over ``pipelines.evaluate``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from pipelines.cli.common import CliError, app, emit, errors, progress_bar, render_generic
from provenance.workspace import DEFAULT_WORKDIR, Workspace


@app.command()
def evaluate(
    run: Annotated[Optional[str], typer.Option(help="Train run id; default the newest succeeded train run.")] = None,
    embedder: Annotated[str, typer.Option(help="Embedding space of the FAD (cleaning.embed.load_embedder).")]
    = "mel-stats",
    num_references: Annotated[int, typer.Option(help="Validation segments to compare against (one generation "
                                                     "each).")] = 16,
    steps: Annotated[Optional[int], typer.Option(help="Sampler steps; default the checkpoint config's.")] = None,
    guidance_scale: Annotated[Optional[float], typer.Option(help="Guidance scale; default the config's.")] = None,
    sampler: Annotated[Optional[str], typer.Option(help="ddim/ddpm (ε, v) or euler/heun (flow).")] = None,
    vocoder: Annotated[Optional[Path], typer.Option(help="Local HiFi-GAN generator checkpoint; default "
                                                         "Griffin-Lim.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the first generation (the i-th uses seed + i).")] = 0,
    workdir: Annotated[Path, typer.Option("--workdir", "-w", envvar="LINERNOTES_WORKDIR",
                                          help="Workspace folder.")] = Path(DEFAULT_WORKDIR),
    json_mode: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """FAD of generations against held-out validation segments for every checkpoint of a train run, and a
    report (evaluation.parquet, loss_fad.png, report.html) in the evaluate run's folder."""

    with errors():
        if num_references < 1:
            raise CliError(f"--num-references must be ≥ 1, got {num_references}")
        if steps is not None and steps < 1:
            raise CliError(f"--steps must be ≥ 1, got {steps}")
        from pipelines.evaluate import run_evaluate

        with progress_bar(json_mode) as progress:
            payload = run_evaluate(Workspace.at(workdir).ensure(), run, embedder=embedder,
                                   num_references=num_references, num_steps=steps, guidance_scale=guidance_scale,
                                   sampler=sampler, vocoder=vocoder, seed=seed, progress=progress)
        emit(payload, json_mode, render_generic("evaluate"))


@app.command()
def variations(
    prompt: Annotated[str, typer.Option(help="Text the model is conditioned on.")],
    seed: Annotated[list[int], typer.Option(help="Seeds (repeatable).")],
    guidance_scale: Annotated[Optional[list[float]], typer.Option(help="Guidance scales (repeatable); default "
                                                                       "the checkpoint config's.")] = None,
    duration_s: Annotated[Optional[list[float]], typer.Option("--duration-s", help="Durations in seconds "
                                                                                  "(repeatable).")] = None,
    out_dir: Annotated[Optional[Path], typer.Option(help="Folder for the WAVs; default the run's folder.")] = None,
    checkpoint: Annotated[Optional[str], typer.Option(help="Checkpoint id; default the newest.")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Sampler steps; default the config's.")] = None,
    sampler: Annotated[Optional[str], typer.Option(help="ddim/ddpm (ε, v) or euler/heun (flow).")] = None,
    vocoder: Annotated[Optional[Path], typer.Option(help="Local HiFi-GAN generator checkpoint.")] = None,
    workdir: Annotated[Path, typer.Option("--workdir", "-w", envvar="LINERNOTES_WORKDIR",
                                          help="Workspace folder.")] = Path(DEFAULT_WORKDIR),
    json_mode: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """A batch of variations (every seed × guidance scale × duration) written as WAVs with a variations.json."""
    with errors():
        from pipelines.evaluate import run_variations

        durations = duration_s or [5.0]
        if any(not 0 < d <= 600 for d in durations):
            raise CliError(f"--duration-s must be in (0, 600] seconds, got {durations}")
        payload = run_variations(Workspace.at(workdir).ensure(), prompt, seed, guidance_scale, durations,
                                 out_dir=out_dir, checkpoint_id=checkpoint, num_steps=steps, sampler=sampler,
                                 vocoder=vocoder)
        emit(payload, json_mode, render_generic("variations"))
