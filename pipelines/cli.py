"""The ``linernotes`` command line: one command per stage, each taking ``--workdir`` and ``--json``.

With ``--json`` a command prints exactly one JSON object on stdout (what it did: counts, ids, paths) and
sends progress to stderr. On bad arguments or missing inputs it exits non-zero with a one-line reason.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from provenance.workspace import DEFAULT_WORKDIR, Workspace

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

app = typer.Typer(name="linernotes", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Curate licensed music catalogs, train diffusion models on them, attribute what they generate.")
err_console = Console(stderr=True)
out_console = Console()

WorkdirOpt = Annotated[Path, typer.Option("--workdir", "-w", help="Workspace folder (lineage store, tables, "
                                          "datasets, checkpoints, generations).", envvar="LINERNOTES_WORKDIR")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object describing what was done.")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Config override key=value (repeatable).")]
ConfigOpt = Annotated[Optional[Path], typer.Option("--config", help="YAML file with the stage config.")]


class CliError(Exception):
    """An error the user can fix; printed as one line, exit code 2."""


@contextmanager
def _errors() -> Iterator[None]:
    """Turn the errors a user can act on into a one-line message and a non-zero exit."""
    from cleaning.audio import AudioDecodeError
    from pipelines.config import ConfigError
    from pipelines.delivery import DeliveryError

    try:
        yield
    except (CliError, ConfigError, DeliveryError, FileNotFoundError, AudioDecodeError, ValueError) as err:
        err_console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from err
    except KeyboardInterrupt as err:
        err_console.print("[bold red]interrupted[/]")
        raise typer.Exit(130) from err


def _say(message: str) -> None:
    """A status line on stderr (stdout stays free for ``--json``)."""
    err_console.print(f"[dim]›[/] {message}", highlight=False)


def _emit(payload: dict[str, Any], json_mode: bool, render: Callable[[dict[str, Any]], None]) -> None:
    if json_mode:
        sys.stdout.write(json.dumps(payload, default=str) + "\n")
    else:
        render(payload)


def _workspace(workdir: Path) -> Workspace:
    return Workspace.at(workdir).ensure()


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
) -> None:
    """Admit a delivery's recordings under the rights policy; decode and measure every file (Apache Beam)."""
    with _errors():
        from pipelines.config import load_config, parse_overrides
        from pipelines.ingest import IngestConfig, run_ingest

        if as_of is not None:
            try:
                dt.date.fromisoformat(as_of)
            except ValueError as err:
                raise CliError(f"--as-of {as_of!r} is not a date (YYYY-MM-DD)") from err
        if opt_out is not None and not opt_out.is_file():
            raise CliError(f"--opt-out {opt_out} does not exist")
        cfg = load_config(IngestConfig, config, parse_overrides(overrides or []), purpose=purpose,
                          territory=territory, as_of=as_of, opt_out_csv=str(opt_out) if opt_out else None,
                          license_id=license_id)
        result = run_ingest(delivery, _workspace(workdir), cfg, status=_say)
        _emit(result.to_json(), json_mode, _render_ingest)


def _render_ingest(payload: dict[str, Any]) -> None:
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
) -> None:
    """Cut the curated catalog into segments and write deterministic WebDataset shards (Ray Data)."""
    with _errors():
        from pipelines.config import load_config, parse_overrides
        from pipelines.shard import ShardConfig, run_shard

        cfg = load_config(ShardConfig, config, parse_overrides(overrides or []), segment_s=segment_s,
                          sample_rate_hz=sample_rate_hz, validation_fraction=validation_fraction)
        with _progress(json_mode) as progress:
            result = run_shard(_workspace(workdir), cfg, progress=progress)
        _emit(result.to_json(), json_mode, _render_generic("shard"))


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
) -> None:
    """Train the mel-spectrogram diffusion model on a dataset's train shards (Ray Train, TorchTrainer)."""
    with _errors():
        from pipelines.cli_train import check_resume_options
        from pipelines.config import load_config, parse_overrides
        from pipelines.jobs import run_train
        from training.config import TrainConfig

        check_resume_options(resume or bool(resume_run), steps, batch_size, num_workers, use_gpu, dataset, config,
                             overrides)
        cfg = load_config(TrainConfig, config, parse_overrides(overrides or []), steps=steps,
                          batch_size=batch_size, num_workers=num_workers, use_gpu=use_gpu)
        with _progress(json_mode) as progress:
            result = run_train(_workspace(workdir), cfg, dataset_id=dataset, status=_say,
                               progress=progress, resume=resume_run or resume, stop_after_steps=stop_after_steps)
        _emit(result.to_json(), json_mode, _render_generic("train"))


from pipelines.cli_train import submit as _submit  # noqa: E402  (linernotes submit, issue 5b)

app.command(name="submit")(_submit)


# generate ---------------------------------------------------------------------------------------------

@app.command()
def generate(
    prompt: Annotated[str, typer.Option(help="Text the model is conditioned on.")],
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    duration_s: Annotated[float, typer.Option("--duration-s", help="Length of the generated track in seconds.")] = 5.0,
    out: Annotated[Optional[Path], typer.Option(help="Also write the WAV here.")] = None,
    checkpoint: Annotated[Optional[str], typer.Option(help="Checkpoint id; default the newest.")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Sampler steps; default the checkpoint config's.")] = None,
    guidance_scale: Annotated[Optional[float], typer.Option(help="Classifier-free guidance scale; default the "
                                                                 "checkpoint config's.")] = None,
    top_k: Annotated[int, typer.Option(help="Training segments to attribute.")] = 10,
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
    workdir: WorkdirOpt = Path(DEFAULT_WORKDIR),
    json_mode: JsonOpt = False,
) -> None:
    """Generate a track (sampler + vocoder), register it, and attribute it to training recordings."""
    with _errors():
        from pipelines.jobs import run_generate

        if duration_s <= 0 or duration_s > 600:
            raise CliError(f"--duration-s must be in (0, 600] seconds, got {duration_s}")
        if steps is not None and steps < 1:
            raise CliError(f"--steps must be ≥ 1, got {steps}")
        if context is not None and not context.is_file():
            raise CliError(f"no audio file at --context {context}")
        conditions = {k: v for k, v in {"bpm": bpm, "key": key, "instrument": instrument}.items() if v is not None}
        with _progress(json_mode) as progress:
            result = run_generate(_workspace(workdir), prompt, seed, duration_s, out=out, checkpoint_id=checkpoint,
                                  num_steps=steps, guidance_scale=guidance_scale, top_k=top_k,
                                  status=_say, progress=progress, sampler=sampler, conditions=conditions or None,
                                  context_path=context, regenerate_s=regenerate_s, vocoder=vocoder)
        payload = result.to_json()
        _emit(payload, json_mode, _render_generation)


def _render_generation(payload: dict[str, Any]) -> None:
    out_console.print(f"generation {payload['generation_id']} ({payload['sampler']}, {payload['duration_s']:g} s) "
                      f"→ {payload['outputs']['wav']}")
    if payload.get("attribution"):
        _render_attribution(payload["attribution"])


# attribute --------------------------------------------------------------------------------------------

@app.command()
def attribute(
    file: Annotated[Path, typer.Argument(help="Any audio file (WAV, FLAC, Ogg, MP3).")],
    dataset: Annotated[Optional[str], typer.Option(help="Dataset id; default the newest.")] = None,
    top_k: Annotated[int, typer.Option(help="Training segments to return.")] = 10,
    method: Annotated[str, typer.Option(help="embedding | dtrak | unlearning (see `linernotes index`).")] = "embedding",
    checkpoint: Annotated[Optional[str], typer.Option(help="Checkpoint id for dtrak/unlearning; default the newest.")] = None,
    prompt: Annotated[str, typer.Option(help="The prompt the audio was generated from, if known.")] = "",
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    workdir: WorkdirOpt = Path(DEFAULT_WORKDIR),
    json_mode: JsonOpt = False,
) -> None:
    """Which training recordings does this audio draw on, and who holds their rights?"""
    with _errors():
        from pipelines.cli_attribution import attribute_file

        attribute_file(file, dataset, top_k, method, checkpoint, prompt, config, overrides, _workspace(workdir),
                       json_mode, _progress, _emit, _render_attribution)


def _render_attribution(payload: dict[str, Any]) -> None:
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
    with _errors():
        from pipelines.demo import run_demo

        with _progress(json_mode) as progress:
            result = run_demo(_workspace(workdir), num_tracks=num_tracks, track_duration_s=track_duration_s,
                              steps=steps, status=_say, progress=progress)
        _emit(result, json_mode, _render_demo)


def _render_demo(payload: dict[str, Any]) -> None:
    _render_ingest(payload["ingest"])
    _render_generic("shard")(payload["shard"])
    _render_generic("train")(payload["train"])
    _render_generation(payload["generate"])
    out_console.print(f"\n[bold]done in {payload['elapsed_s']:.0f} s.[/] outputs under {payload['workdir']}:")
    for name, path in payload["outputs"].items():
        out_console.print(f"  {name:<12} {path}")


# rights -----------------------------------------------------------------------------------------------

rights_app = typer.Typer(no_args_is_help=True, help="Explain rights decisions; register opt-outs.")
app.add_typer(rights_app, name="rights")


@rights_app.command("explain")
def rights_explain(
    track_id: Annotated[str, typer.Argument(help="A track id from a delivery's tracks.csv.")],
    run: Annotated[Optional[str], typer.Option(help="Ingest run id; default the newest that saw the track.")] = None,
    workdir: WorkdirOpt = Path(DEFAULT_WORKDIR),
    json_mode: JsonOpt = False,
) -> None:
    """Why was a track admitted or rejected? Every policy check, passed or not, and what the run recorded."""
    with _errors():
        from pipelines.rights import explain_track

        _emit(explain_track(_workspace(workdir), track_id, run), json_mode, _render_explain)


def _render_explain(payload: dict[str, Any]) -> None:
    purpose = payload["purpose"]
    out_console.print(f"[bold]{payload['track_id']}[/] in ingest run {payload['run_id']} "
                      f"({purpose['purpose']}, {purpose['territory']}, as of {purpose['as_of']})", highlight=False)
    if payload["field_check"]:
        out_console.print(f"[red]✗ fields:[/] {payload['field_check']}")
    table = Table(show_header=True, title_justify="left")
    for column in ("", "check", "detail"):
        table.add_column(column, overflow="fold")
    for check in payload["checks"]:
        table.add_row("[green]✓[/]" if check["passed"] else "[red]✗[/]", check["name"], check["detail"])
    out_console.print(table)
    recorded = payload["recorded"]
    out_console.print(f"recorded by the run: [bold]{recorded['status']}[/]")
    for rej in recorded["rejections"]:
        out_console.print(f"  {rej['record_kind']} {rej['record_id']}: {rej['reason']} — {rej['detail']}", highlight=False)
    if payload["duplicate_rows"]:
        out_console.print(f"{payload['duplicate_rows']} later row(s) repeat this id and were rejected as duplicate_id")


@rights_app.command("opt-out")
def rights_opt_out(
    rights_holder: Annotated[Optional[str], typer.Option(help="Opt out every recording of this rights holder.")] = None,
    track: Annotated[Optional[str], typer.Option(help="Opt out one track id.")] = None,
    isrc: Annotated[Optional[str], typer.Option(help="Opt out one ISRC.")] = None,
    reason: Annotated[str, typer.Option(help="Why (kept with the opt-out).")] = "",
    workdir: WorkdirOpt = Path(DEFAULT_WORKDIR),
    json_mode: JsonOpt = False,
) -> None:
    """Register an opt-out in the lineage store; every later ingest rejects what it names (opted_out)."""
    with _errors():
        from pipelines.rights import add_opt_out
        from provenance.policy import normalize_isrc

        given = [(k, v) for k, v in (("rights_holder", rights_holder), ("track_id", track),
                                      ("isrc", normalize_isrc(isrc) if isrc else None)) if v]
        if len(given) != 1:
            raise CliError("give exactly one of --rights-holder, --track, --isrc")
        payload = add_opt_out(_workspace(workdir), given[0][0], given[0][1], reason)
        _emit(payload, json_mode, lambda p: out_console.print(
            f"opt-out {p['kind']}={p['value']} {'registered' if p['added'] else 'was already registered'}; "
            f"{p['opt_outs']} opt-out(s) in the registry", highlight=False))


# runs -------------------------------------------------------------------------------------------------

@app.command()
def runs(workdir: WorkdirOpt = Path(DEFAULT_WORKDIR), json_mode: JsonOpt = False) -> None:
    """List the runs registered in the lineage store."""
    with _errors():
        from provenance.store import LineageStore

        store = LineageStore(_workspace(workdir).store_url)
        rows = store.list_runs()
        store.close()
        if json_mode:
            _emit({"runs": rows}, True, lambda p: None)
            return
        table = Table(title="runs", title_justify="left")
        for column in ("run", "kind", "status", "started", "counts"):
            table.add_column(column, overflow="fold")
        for row in rows:
            table.add_row(row["run_id"], row["kind"], row["status"], row["started_at"],
                          json.dumps(row.get("counts") or {})[:120])
        out_console.print(table)


# helpers ----------------------------------------------------------------------------------------------

def _render_generic(stage: str) -> Callable[[dict[str, Any]], None]:
    def render(payload: dict[str, Any]) -> None:
        table = Table(title=f"{stage} {payload.get('run_id', '')}", title_justify="left", show_header=False)
        table.add_column("key", style="bold")
        table.add_column("value", overflow="fold")
        for key, value in payload.items():
            if key in {"stage", "run_id"}:
                continue
            table.add_row(key, json.dumps(value, default=str) if isinstance(value, (dict, list)) else str(value))
        out_console.print(table)
    return render


@contextmanager
def _progress(json_mode: bool) -> Iterator[Callable[[str, int, int], None]]:
    """A rich progress bar on stderr, driven by ``(message, done, total)`` callbacks."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err_console, transient=False) as progress:
        tasks: dict[str, Any] = {}

        def update(message: str, done: int, total: int) -> None:
            if message not in tasks:
                tasks[message] = progress.add_task(message, total=total)
            progress.update(tasks[message], completed=done, total=total)

        yield update


# Commands that live in their own modules (one per area).
from pipelines.cli_attribution import index  # noqa: E402  (index per checkpoint)
from pipelines.cli_clean import clean_app  # noqa: E402  (clean run | separate | evaluate)
from pipelines.cli_eval import evaluate, variations  # noqa: E402  (FAD per checkpoint; batches of variations)
from pipelines.cli_lineage import register as _register_lineage  # noqa: E402  (lineage, takedown, report, serve)

app.command()(index)
app.command()(evaluate)
app.command()(variations)
app.add_typer(clean_app, name="clean")
_register_lineage(app)


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    app()
