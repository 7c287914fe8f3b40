"""``linernotes clean …``: blind stem cleaning (``run``), demucs separation (``separate``) and the evaluation
of the cleaning methods (``evaluate``). """

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from pipelines.cli.common import (
    ConfigOpt,
    ForceOpt,
    JsonOpt,
    SetOpt,
    WorkdirOpt,
    app,
    emit,
    errors,
    out_console,
    progress_bar,
    render_generic,
    run_stage_command,
)
from provenance.workspace import DEFAULT_WORKDIR

clean_app = typer.Typer(no_args_is_help=True, help="Blind stem cleaning (FAD, unlearning), demucs separation, "
                        "and the evaluation of cleaning.")


@clean_app.command("run")
def clean_run(
    reference_track: Annotated[Optional[list[str]], typer.Option("--reference-track", help="A catalog track whose "
                               "stems are trusted clean (repeatable); the blind methods' reference set.")] = None,
    method: Annotated[Optional[list[str]], typer.Option("--method", help="fad | unlearning (repeatable) [fad].")] = None,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    workdir: WorkdirOpt = Path(DEFAULT_WORKDIR),
    json_mode: JsonOpt = False,
    force: ForceOpt = False,
) -> None:
    """Check and score every catalog stem; keep or drop by the config's rules; delete nothing (Ray)."""
    run_stage_command("clean", config, overrides, workdir, json_mode, _render_clean, force=force,
                      reference_tracks=reference_track, methods=method)


def _render_clean(payload: dict[str, Any]) -> None:

    out_console.print(f"[bold]clean {payload['run_id']}[/]: {payload['num_stems']} stems "
                      f"({payload['num_reference']} reference), kept {payload['num_kept']}, "
                      f"dropped {payload['num_dropped']}", highlight=False)
    table = Table(show_header=True, title_justify="left")
    table.add_column("reason")
    table.add_column("stems", justify="right")
    for reason, count in payload["dropped_by_reason"].items():
        table.add_row(reason, str(count))
    out_console.print(table)
    out_console.print(f"scores: {payload['outputs']['stem_scores']}")


@clean_app.command("separate")
def clean_separate(
    model: Annotated[Optional[str], typer.Option(help="demucs pretrained name (downloads on first use) or a local "
                                                 "checkpoint file [htdemucs].")] = None,
    track: Annotated[Optional[list[str]], typer.Option("--track", help="Only this track (repeatable).")] = None,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    workdir: WorkdirOpt = Path(DEFAULT_WORKDIR),
    json_mode: JsonOpt = False,
    force: ForceOpt = False,
) -> None:
    """Separate the mixtures of catalog tracks that have no stems into stems with demucs (Ray actors)."""
    run_stage_command("separate", config, overrides, workdir, json_mode,
                      lambda p: render_generic("separate")({k: v for k, v in p.items() if k != "stems"}),
                      force=force, model=model, tracks=track)


@clean_app.command("evaluate")
def clean_evaluate(
    out: Annotated[Path, typer.Option(help="Folder for report.html, its PNG plots and summary.json.")] = Path(
        "clean-evaluation"),
    source: Annotated[Optional[str], typer.Option(help="slakh (a delivery's Slakh stems) | synthetic [slakh].")] = None,
    delivery: Annotated[Optional[str], typer.Option(help="Delivery with Slakh stems [../shared/corpus].")] = None,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    json_mode: JsonOpt = False,
) -> None:
    """Plant contamination into clean stems; AUROC and precision per method and kind; separator SDR trained on
    uncontaminated, contaminated, cleaned and drop-planted sets (paired within a seed); an HTML report with
    plots."""

    with errors():
        from pipelines.experiments.clean_evaluate import EvaluateConfig, run_evaluate
        from pipelines.config import load_config, parse_overrides

        cfg = load_config(EvaluateConfig, config, parse_overrides(overrides or []), source=source, delivery=delivery)
        with progress_bar(json_mode) as progress:
            summary = run_evaluate(cfg, out, progress=progress)
        emit({k: v for k, v in summary.items() if k != "per_seed"}, json_mode, _render_evaluate)


def _render_evaluate(payload: dict[str, Any]) -> None:

    out_console.print(payload["description"], highlight=False)
    table = Table(title="detection (mean ± std over seeds)", title_justify="left")
    for column in ("method", "contamination", "AUROC", "precision@planted"):
        table.add_column(column)
    for method, per_kind in payload["detection"].items():
        for kind, f in per_kind.items():
            table.add_row(method, kind, f"{f['auroc_mean']:.3f} ± {f['auroc_std']:.3f}",
                          f"{f['precision_at_k_mean']:.3f} ± {f['precision_at_k_std']:.3f}")
    out_console.print(table)
    gains = payload.get("sdr_gain_db", {})
    for name, f in payload["sdr_db"].items():
        gain = gains.get(name)
        paired = (f"   paired gain {gain['mean']:+.2f} ± {gain['std']:.2f} dB "
                  f"({gain['seeds_above_contaminated']}/{payload['num_seeds']} seeds > 0)" if gain else "")
        out_console.print(f"SDR {name:<20} {f['mean']:6.2f} ± {f['std']:.2f} dB{paired}", highlight=False)
    for method, f in payload["gap_closed_percent"].items():
        out_console.print(f"gap closed by {method} (against {payload.get('gap_reference')}): "
                          f"{f.get('of_mean_gains', float('nan')):.1f} % of the mean gains, per seed "
                          f"{f['mean']:.1f} ± {f['std']:.1f} % (paper: {payload['paper_gap_closed_percent']} %)",
                          highlight=False)
    out_console.print(f"report: {payload['outputs']['report']}")


app.add_typer(clean_app, name="clean")
