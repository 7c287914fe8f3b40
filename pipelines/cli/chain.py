"""The chain's commands: ``ingest``, ``shard``, ``train``, ``generate``, ``attribute``, ``index``, ``demo``. Each is
a thin shell: it builds the stage's config, runs the stage, prints its result (``submit``: ``pipelines.cli.run``)."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from pipelines.cli.common import (
    CliError,
    ConfigOpt,
    ForceOpt,
    JsonOpt,
    SetOpt,
    WorkdirOpt,
    app,
    emit,
    errors,
    open_workspace,
    out_console,
    progress_bar,
    render_generic,
    run_stage_command,
    say,
)
from provenance.workspace import DEFAULT_WORKDIR

# ingest -----------------------------------------------------------------------------------------------

@app.command()
def ingest(
    delivery: Annotated[Path, typer.Argument(help="Delivery folder with tracks.csv, files.csv, licenses.csv.")],
    purpose: Annotated[str, typer.Option(help="commercial | non-commercial")] = "commercial",
    territory: Annotated[str, typer.Option(help="ISO 3166-1 alpha-2 code, or Worldwide.")] = "Worldwide",
    as_of: Annotated[Optional[str], typer.Option("--as-of", help="Judge rights at this date (YYYY-MM-DD); "
                                                 "default today.")] = None,
    opt_out: Annotated[Optional[Path], typer.Option(help="Opt-out CSV (kind,value).")] = None,
    license_id: Annotated[Optional[str], typer.Option("--license", help="Licence agreement (a licenses.csv id) "
                                                      "for recordings the delivery names none for, e.g. DDEX.")] = None,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    workdir: WorkdirOpt = Path(DEFAULT_WORKDIR),
    json_mode: JsonOpt = False,
    force: ForceOpt = False,
) -> None:
    """Admit a delivery's recordings under the rights policy; decode and measure every file (Apache Beam)."""
    from pipelines.stages.ingest import expectations_worker

    expectations_worker.prestart()  # Great Expectations' ~5 s import, beside this command's start
    with errors():
        if as_of is not None:
            try:
                dt.date.fromisoformat(as_of)
            except ValueError as err:
                raise CliError(f"--as-of {as_of!r} is not a date (YYYY-MM-DD)") from err
        if opt_out is not None and not opt_out.is_file():
            raise CliError(f"--opt-out {opt_out} does not exist")
    run_stage_command("ingest", config, overrides, workdir, json_mode, render_ingest, force=force,
                      select={"delivery": str(delivery)}, purpose=purpose, territory=territory, as_of=as_of,
                      opt_out_csv=str(opt_out) if opt_out else None, license_id=license_id)


def render_ingest(payload: dict[str, Any]) -> None:
    table = Table(title=f"ingest {payload['run_id']}", title_justify="left")
    for column in ("table", "input", "accepted", "rejected", "rejected by reason"):
        table.add_column(column, justify="right" if column in {"input", "accepted", "rejected"} else "left")
    for name in ("messages", "tracks", "files", "licenses"):
        if name not in payload["counts"]:
            continue
        c = payload["counts"][name]
        reasons = ", ".join(f"{r}: {n}" for r, n in c["rejected_by_reason"].items()) or "—"
        table.add_row(name, str(c["input"]), str(c["accepted"]), str(c["rejected"]), reasons)
    out_console.print(table)
    out_console.print(f"mixtures built from stems: {payload['counts']['mixtures_built']}")
    index = payload["counts"].get("recording_index")
    if index:
        linked = ", ".join(f"{n} {action}" for action, n in index["duplicates_of_earlier"].items()) or "none"
        out_console.print(f"duplicates of {index['earlier_recordings']} recordings of {index['earlier_deliveries']} "
                          f"earlier deliveries: {linked}")
    out_console.print(f"catalog: {Path(payload['outputs']['tracks']).parent}")


# shard ------------------------------------------------------------------------------------------------

@app.command()
def shard(
    segment_s: Annotated[Optional[float], typer.Option("--segment-s", help="Segment length in seconds [10].")] = None,
    sample_rate_hz: Annotated[Optional[int], typer.Option("--sample-rate-hz", help="Dataset sample rate [32000].")] = None,
    validation_fraction: Annotated[Optional[float], typer.Option(help="Fraction of tracks held out [0.1].")] = None,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    workdir: WorkdirOpt = Path(DEFAULT_WORKDIR),
    json_mode: JsonOpt = False,
    force: ForceOpt = False,
) -> None:
    """Cut the curated catalog into segments and write deterministic WebDataset shards (Ray Data)."""
    run_stage_command("shard", config, overrides, workdir, json_mode, render_generic("shard"), force=force,
                      segment_s=segment_s, sample_rate_hz=sample_rate_hz, validation_fraction=validation_fraction)


# train ------------------------------------------------------------------------------------------------

@app.command()
def train(
    steps: Annotated[Optional[int], typer.Option(help="Optimizer steps.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Segments per step (per worker).")] = None,
    num_workers: Annotated[Optional[int], typer.Option(help="Ray Train workers [1].")] = None,
    use_gpu: Annotated[Optional[bool], typer.Option("--use-gpu/--no-gpu", help="Train on GPUs.")] = None,
    dataset: Annotated[Optional[str], typer.Option(help="Dataset id; default the newest.")] = None,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    workdir: WorkdirOpt = Path(DEFAULT_WORKDIR),
    json_mode: JsonOpt = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the newest interrupted train run (its own "
                                         "config and dataset) from its latest checkpoint.")] = False,
    resume_run: Annotated[Optional[str], typer.Option("--resume-run", help="Continue this train run id.")] = None,
    stop_after_steps: Annotated[Optional[int], typer.Option(help="Checkpoint and stop at this step "
                                                            "(continue with --resume).")] = None,
    force: ForceOpt = False,
) -> None:
    """Train the mel-spectrogram diffusion model on a dataset's train shards (Ray Train, TorchTrainer)."""
    with errors():
        from pipelines.config import load_config, parse_overrides
        from pipelines.stages.train import run_train
        from training.config import TrainConfig

        check_resume_options(resume or bool(resume_run), steps, batch_size, num_workers, use_gpu, dataset, config,
                             overrides)
        cfg = load_config(TrainConfig, config, parse_overrides(overrides or []), steps=steps,
                          batch_size=batch_size, num_workers=num_workers, use_gpu=use_gpu)
        with progress_bar(json_mode) as progress:
            result = run_train(open_workspace(workdir), cfg, dataset_id=dataset, status=say,
                               progress=progress, resume=resume_run or resume, stop_after_steps=stop_after_steps,
                               force=force)
        emit(result.to_json(), json_mode, render_generic("train"))




# generate ---------------------------------------------------------------------------------------------

@app.command()
def generate(
    prompt: Annotated[str, typer.Option(help="Text the model is conditioned on.")],
    seed: Annotated[Optional[int], typer.Option(help="Sampling seed [0].")] = None,
    duration_s: Annotated[float, typer.Option("--duration-s", help="Length of the generated track in seconds.")] = 5.0,
    out: Annotated[Optional[Path], typer.Option(help="Also write the WAV here.")] = None,
    checkpoint: Annotated[Optional[str], typer.Option(help="Checkpoint id; default the newest.")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Sampler steps; default the checkpoint config's.")] = None,
    guidance_scale: Annotated[Optional[float], typer.Option(help="Classifier-free guidance scale; default the "
                                                                 "checkpoint config's.")] = None,
    top_k: Annotated[Optional[int], typer.Option(help="Training segments to attribute [10].")] = None,
    sampler: Annotated[Optional[str], typer.Option(help="ddim/ddpm (ε, v) or euler/heun (flow).")] = None,
    bpm: Annotated[Optional[float], typer.Option(help="Tempo condition (beats per minute).")] = None,
    key: Annotated[Optional[str], typer.Option(help="Key condition, e.g. 'A minor', 'F#'.")] = None,
    instrument: Annotated[Optional[str], typer.Option(help="Instrument condition, e.g. 'piano'.")] = None,
    context: Annotated[Optional[Path], typer.Option(help="Audio to continue (or inpaint with --regenerate-s).")]
    = None,
    regenerate_s: Annotated[Optional[tuple[float, float]], typer.Option(
        "--regenerate-s", help="START END seconds of --context to regenerate (inpainting).")] = None,
    vocoder: Annotated[Optional[Path], typer.Option(help="Local HiFi-GAN generator checkpoint; default "
                                                         "Griffin-Lim.")] = None,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    workdir: WorkdirOpt = Path(DEFAULT_WORKDIR),
    json_mode: JsonOpt = False,
    force: ForceOpt = False,
) -> None:
    """Generate a track (sampler + vocoder), register it, and attribute it to training recordings."""
    with errors():
        if duration_s <= 0 or duration_s > 600:
            raise CliError(f"--duration-s must be in (0, 600] seconds, got {duration_s}")
        if steps is not None and steps < 1:
            raise CliError(f"--steps must be ≥ 1, got {steps}")
        if context is not None and not context.is_file():
            raise CliError(f"no audio file at --context {context}")

    def finish(result: Any) -> dict[str, Any]:
        from pipelines.stages.generate import GenerateJobResult

        return GenerateJobResult.from_stage(result, out).to_json()

    run_stage_command("generate", config, overrides, workdir, json_mode, render_generation, force=force,
                      finish=finish, select={"checkpoint": checkpoint}, prompt=prompt, seed=seed,
                      duration_s=duration_s, num_steps=steps, guidance_scale=guidance_scale, top_k=top_k,
                      sampler=sampler, bpm=bpm, key=key, instrument=instrument,
                      context_path=str(context) if context else None, regenerate_s=regenerate_s,
                      vocoder=str(vocoder) if vocoder else None)


def render_generation(payload: dict[str, Any]) -> None:
    out_console.print(f"generation {payload['generation_id']} ({payload['sampler']}, {payload['duration_s']:g} s) "
                      f"→ {payload['outputs']['wav']}")
    if payload.get("attribution"):
        render_attribution(payload["attribution"])


# attribute --------------------------------------------------------------------------------------------

@app.command()
def attribute(
    file: Annotated[Path, typer.Argument(help="Any audio file (WAV, FLAC, Ogg, MP3).")],
    dataset: Annotated[Optional[str], typer.Option(help="Dataset id; default the newest.")] = None,
    top_k: Annotated[Optional[int], typer.Option(help="Training segments to return [10].")] = None,
    method: Annotated[str, typer.Option(help="embedding | dtrak | unlearning (see `linernotes index`).")] = "embedding",
    checkpoint: Annotated[Optional[str], typer.Option(help="Checkpoint id for dtrak/unlearning; default the newest.")] = None,
    prompt: Annotated[Optional[str], typer.Option(help="The prompt the audio was generated from, if known.")] = None,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    workdir: WorkdirOpt = Path(DEFAULT_WORKDIR),
    json_mode: JsonOpt = False,
    force: ForceOpt = False,
) -> None:
    """Which training recordings does this audio draw on, and who holds their rights?"""
    with errors():
        from pipelines.attribution.methods import METHODS

        if not file.is_file():
            raise CliError(f"no audio file at {file}")
        if top_k is not None and top_k < 1:
            raise CliError(f"--top-k must be ≥ 1, got {top_k}")
        if method not in METHODS:
            raise CliError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    run_stage_command("attribute", config, overrides, workdir, json_mode, render_attribution, force=force,
                      select={"query": str(file), "dataset": dataset, "checkpoint": checkpoint}, method=method,
                      top_k=top_k, prompt=prompt)


def render_attribution(payload: dict[str, Any]) -> None:
    """The ranked segments, tracks and rights holders with their shares; or, for a query with nothing to attribute
    (``no_attribution``), one line saying why."""
    why = payload.get("no_attribution")
    if why:
        out_console.print(f"nothing to attribute ({payload['method']}): {why['reason']}, {why['detail']}; "
                          f"no ranking, no shares", markup=False, highlight=False, soft_wrap=True)
        return
    segments = Table(title=f"training segments ({payload['method']})", title_justify="left")
    for column in ("rank", "segment", "score", "share"):
        segments.add_column(column, justify="right" if column != "segment" else "left")
    for seg in payload["segments"]:
        segments.add_row(str(seg["rank"]), seg["segment_id"], f"{seg['score']:.4f}", f"{seg['share']:.1%}")
    tracks = Table(title="tracks", title_justify="left")
    for column in ("share", "track", "rights holder", "licence", "attribution"):
        tracks.add_column(column, justify="right" if column == "share" else "left", overflow="fold")
    for track in payload["tracks"]:
        tracks.add_row(f"{track['share']:.1%}", f"{track['title']} ({track['track_id']})", track["rights_holder"],
                       track.get("license_name") or track["license_id"], track.get("attribution") or "")
    holders = Table(title="rights holders", title_justify="left")
    holders.add_column("share", justify="right")
    holders.add_column("rights holder")
    for holder in payload["rights_holders"]:
        holders.add_row(f"{holder['share']:.1%}", holder["rights_holder"])
    out_console.print(segments, tracks, holders)


# demo -------------------------------------------------------------------------------------------------

@app.command()
def demo(
    num_tracks: Annotated[int, typer.Option(help="Scores to render into the demo delivery.")] = 6,
    track_duration_s: Annotated[float, typer.Option("--track-duration-s", help="Length of each rendered track.")] = 30.0,
    steps: Annotated[int, typer.Option(help="Training steps.")] = 1500,
    workdir: WorkdirOpt = Path(DEFAULT_WORKDIR),
    json_mode: JsonOpt = False,
) -> None:
    """Render a public-domain demo delivery, then run ingest → shard → train → generate → attribute."""
    with errors():
        from pipelines.demo.run import run_demo

        with progress_bar(json_mode) as progress:
            result = run_demo(open_workspace(workdir), num_tracks=num_tracks, track_duration_s=track_duration_s,
                              steps=steps, status=say, progress=progress)
        emit(result, json_mode, _render_demo)


def _render_demo(payload: dict[str, Any]) -> None:
    render_ingest(payload["ingest"])
    render_generic("shard")(payload["shard"])
    render_generic("train")(payload["train"])
    render_generation(payload["generate"])
    out_console.print(f"\n[bold]done in {payload['elapsed_s']:.0f} s.[/] outputs under {payload['workdir']}:")
    for name, path in payload["outputs"].items():
        out_console.print(f"  {name:<12} {path}")


def check_resume_options(resume: bool, *given: Any) -> None:
    """``--resume`` takes the interrupted run's own config and dataset: refuse options that would differ."""

    if resume and any(value not in (None, [], False) for value in given):
        raise CliError("--resume continues a run with its own config and dataset: drop the other train options")


@app.command()
def index(
    checkpoint: Annotated[Optional[str], typer.Option(help="Checkpoint id; default the newest.")] = None,
    projection_dim: Annotated[Optional[int], typer.Option(help="D-TRAK feature dimension (512–32768).")] = None,
    num_workers: Annotated[Optional[int], typer.Option(help="Ray actors featurizing segments.")] = None,
    use_gpu: Annotated[Optional[bool], typer.Option("--use-gpu/--no-gpu", help="One GPU per actor.")] = None,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    workdir: WorkdirOpt = Path(DEFAULT_WORKDIR),
    json_mode: JsonOpt = False,
    force: ForceOpt = False,
) -> None:
    """Build a checkpoint's attribution index: embedding index, D-TRAK features (resumable), Fisher."""
    run_stage_command("index", config, overrides, workdir, json_mode, render_generic("index"), force=force,
                      select={"checkpoint": checkpoint}, projection_dim=projection_dim, num_workers=num_workers,
                      use_gpu=use_gpu)


# stages -----------------------------------------------------------------------------------------------

@app.command()
def stages(json_mode: JsonOpt = False) -> None:
    """Every stage on the stage contract: what it reads and writes, its resources, and its config keys (the
    config reference: `--set key=value` and `--config FILE` take these keys)."""
    with errors():
        from pipelines.stage import STAGES, describe_stage, get_stage

        described = [describe_stage(get_stage(name)) for name in STAGES]
        emit({"stages": described}, json_mode, _render_stages)


def _render_stages(payload: dict[str, Any]) -> None:
    for stage in payload["stages"]:
        resources = stage["resources"]
        out_console.print(f"[bold]{stage['stage']}[/] v{stage['version']}: reads {', '.join(stage['reads']) or '—'}; "
                          f"writes {', '.join(stage['writes'])}; engine {resources['engine']}, "
                          f"per task {resources['cpus']:g} CPU"
                          + (f" and {resources['gpus']:g} GPU where the cluster has GPUs" if resources["gpus"] else ""),
                          highlight=False)
        table = Table(show_header=True, box=None, pad_edge=False)
        for column in ("key", "type", "default", "description"):
            table.add_column(column, overflow="fold")
        schema = stage["config_schema"]
        for key, spec in schema.get("properties", {}).items():
            kind = spec.get("type") or " | ".join(str(a.get("type", a.get("$ref", "?"))) for a in spec.get("anyOf", []))
            engine = " (engine)" if key in stage["engine_keys"] else ""
            table.add_row(key, kind, json.dumps(spec.get("default")), (spec.get("description") or "") + engine)
        out_console.print(table)
