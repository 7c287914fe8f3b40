"""``linernotes run SPEC``: a declared curation run (``pipelines.runspec``), every stage through the runner."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from pipelines.cli.common import (
    ForceOpt,
    JsonOpt,
    SetOpt,
    app,
    emit,
    err_console,
    errors,
    out_console,
    progress_bar,
    say,
)



@app.command("run")
def run_command(
    spec: Annotated[Path, typer.Argument(help="A run spec (YAML): delivery, purpose, stages, workspace, engine; "
                                              "see infra/runs/.")],
    overrides: SetOpt = None,
    from_stage: Annotated[Optional[str], typer.Option("--from", help="Start at this stage of the spec (the stages "
                                                      "before it are skipped; it reads the workspace's newest).")] = None,
    until_stage: Annotated[Optional[str], typer.Option("--until", help="Stop after this stage of the spec.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan (run or cached, and why) and do "
                                          "nothing.")] = False,
    workdir: Annotated[Optional[Path], typer.Option("--workdir", "-w", help="Workspace folder; default the spec's "
                                                    "`workspace:`, else $LINERNOTES_WORKDIR or ./linernotes-work.")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="When another run holds the workspace, wait for it "
                                       "(default: refuse, naming it).")] = False,
    wait_timeout_s: Annotated[Optional[float], typer.Option("--wait-timeout-s", help="With --wait, give up after "
                                                            "this many seconds.")] = None,
    json_mode: JsonOpt = False,
    force: ForceOpt = False,
) -> None:
    """Run a curation spec: each stage through the runner, cached by content; a re-run with nothing changed does no
    work. `--set STAGE.KEY=VALUE` overrides a stage's config (e.g. `--set shard.segment_s=5`)."""
    with errors():
        from pipelines.runner import RunFailed, plan_spec, render_plan, run_spec
        from pipelines.runspec import load_spec

        loaded = load_spec(spec, overrides or [], workspace=str(workdir) if workdir else None)
        if dry_run:
            emit(plan_spec(loaded, from_stage=from_stage, until_stage=until_stage, force=force), json_mode,
                 lambda p: render_plan(p, out_console.print))
            return
        try:  # another run holding the workspace exits 75 (errors())
            with progress_bar(json_mode) as progress:
                payload = run_spec(loaded, from_stage=from_stage, until_stage=until_stage, force=force, wait=wait,
                                   wait_timeout_s=wait_timeout_s, progress=progress, status=say)
        except RunFailed as err:
            if json_mode:
                print(json.dumps(err.payload, default=str))
            err_console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from err
    emit(payload, json_mode, render_run)


def render_run(payload: dict[str, Any]) -> None:
    table = Table(title=f"run {payload['run_id']} ({payload['status']})", title_justify="left")
    for column in ("stage", "status", "run", "outputs", "counts"):
        table.add_column(column, overflow="fold")
    for row in payload["stages"]:
        ids = ", ".join(f"{k} {v}" for k, v in (row.get("output_ids") or {}).items() if not v.startswith("sha256:"))
        table.add_row(row["stage"], row["status"], row.get("run_id") or "", ids,
                      json.dumps(row.get("counts") or {})[:100])
    out_console.print(table)
