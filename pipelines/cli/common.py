"""What every ``linernotes`` command shares: the app, the common options, one-line errors, JSON output, progress.

Every command module imports this one and nothing imports the command modules but ``pipelines.cli`` (no circle).
With ``--json`` a command prints exactly one JSON object on stdout (what it did: counts, ids, paths) and sends
progress to stderr. On bad arguments or missing inputs it exits 2 with a one-line reason; when another run holds the
workspace (a command that writes it takes the workspace lock), 75 (EX_TEMPFAIL: try again later) with a line naming
the holder's run id.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from provenance.workspace import STORE_URL_ENV, Workspace

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
ForceOpt = Annotated[bool, typer.Option("--force", help="Run even when an earlier run with the same inputs and "
                                       "config is still valid (otherwise reported as cached).")]
ConfigOpt = Annotated[Optional[Path], typer.Option("--config", help="YAML file with the stage config.")]


class CliError(Exception):
    """An error the user can fix; printed as one line, exit code 2."""


EXIT_LOCKED = 75  # EX_TEMPFAIL (sysexits.h): another run holds the workspace; try again later


@contextmanager
def errors() -> Iterator[None]:
    """Turn the errors a user can act on into a one-line message and exit status 2: a CliError, a missing file or
    input (FileNotFoundError), and every ValueError, which the config (ConfigError), delivery (DeliveryError),
    audio (AudioDecodeError) and rights errors are, so none of their modules is imported here. A workspace held by
    another run (``provenance.locks.LockHeld``) exits 75 with the line naming the holder."""
    try:
        yield
    except (CliError, FileNotFoundError, ValueError) as err:
        err_console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from err
    except RuntimeError as err:
        from provenance.locks import LockHeld  # already imported when it is one

        if not isinstance(err, LockHeld):
            raise
        err_console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_LOCKED) from err
    except KeyboardInterrupt as err:
        err_console.print("[bold red]interrupted[/]")
        raise typer.Exit(130) from err


def say(message: str) -> None:
    """A status line on stderr (stdout stays free for ``--json``)."""
    err_console.print(f"[dim]›[/] {message}", highlight=False)


def emit(payload: dict[str, Any], json_mode: bool, render: Callable[[dict[str, Any]], None]) -> None:
    if json_mode:
        sys.stdout.write(json.dumps(payload, default=str) + "\n")
    else:
        render(payload)


def open_workspace(workdir: Path) -> Workspace:
    """The workspace at ``workdir``, its folders made."""
    return Workspace.at(workdir).ensure()


def run_stage_command(stage: str, config_file: Path | None, overrides: list[str] | None, workdir: Path,
                      json_mode: bool, render: Callable[[dict[str, Any]], None],
                      select: dict[str, str | None] | None = None, force: bool = False,
                      finish: Callable[[Any], dict[str, Any]] | None = None, **options: Any) -> None:
    """The body of every stage command: the stage's config from the command's options, then ``--config FILE``,
    then ``--set key=value`` (last wins); the stage through the runner, with a progress bar; its result printed
    (one JSON object with ``--json``, else ``render``). ``select`` names the upstream outputs to read; ``force`` runs
    the stage even when a cached result exists; ``finish`` turns the ``StageResult`` into the printed payload
    (default its ``to_json()``), for a command that also copies an output where the user asked."""
    from pipelines.config import load_config, parse_overrides
    from pipelines.stage import get_stage, run_stage

    with errors():
        stage_ = get_stage(stage)
        config = load_config(stage_.config_model, config_file, parse_overrides(overrides or []), **options)
        with progress_bar(json_mode) as progress:
            result = run_stage(stage_, open_workspace(workdir), config, progress=progress, status=say, select=select,
                               force=force)
        emit(finish(result) if finish is not None else result.to_json(), json_mode, render)


def render_generic(stage: str) -> Callable[[dict[str, Any]], None]:
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
def progress_bar(json_mode: bool) -> Iterator[Callable[[str, int, int], None]]:
    """Progress on stderr, driven by ``(phase, done, total)`` callbacks: a rich bar on a terminal; elsewhere (a
    scheduler's log, CI, ``--json`` piped) one plain line per phase every few seconds and when it completes."""
    if not err_console.is_terminal:
        yield PlainProgress()
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err_console, transient=False) as progress:
        tasks: dict[str, Any] = {}

        def update(message: str, done: int, total: int) -> None:
            if message not in tasks:
                tasks[message] = progress.add_task(message, total=total)
            progress.update(tasks[message], completed=done, total=total)

        yield update


class PlainProgress:
    """``(phase, done, total)`` callbacks as log lines: ``phase: done/total (pct %, elapsed s)``, at most one per phase
    every ``every_s`` seconds, and always the first and the last (``done == total``)."""

    def __init__(self, every_s: float = 5.0, write: Callable[[str], None] | None = None) -> None:
        self.every_s = every_s
        self.write = write or (lambda line: print(line, file=sys.stderr, flush=True))
        self._started: dict[str, float] = {}
        self._last: dict[str, float] = {}

    def __call__(self, phase: str, done: int, total: int) -> None:
        now = time.monotonic()
        started = self._started.setdefault(phase, now)
        finished = total > 0 and done >= total
        if phase in self._last and not finished and now - self._last[phase] < self.every_s:
            return
        self._last[phase] = now
        count = f"{done}/{total} ({100.0 * done / total:.0f} %, " if total > 0 else f"{done} ("
        self.write(f"{phase}: {count}{now - started:.0f} s)")


@app.callback()
def _store_url(store_url: Annotated[Optional[str], typer.Option(
        "--store-url", envvar=STORE_URL_ENV, show_envvar=True,
        help="Lineage store SQLAlchemy URL, e.g. postgresql+psycopg://user@host/db "
             "(default: the workspace's lineage.sqlite).")] = None) -> None:
    """Curate licensed music catalogs, train diffusion models on them, attribute what they generate."""
    if store_url:
        os.environ[STORE_URL_ENV] = store_url  # read by Workspace.at in every command
