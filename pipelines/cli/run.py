"""``linernotes run SPEC``: a declared curation run (``pipelines.runspec``), every stage through the runner;
``linernotes submit [SPEC]``: the same run, or the training job, on a Ray cluster (``pipelines.engines.submit``)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from pipelines.cli.common import (
    CliError,
    ForceOpt,
    JsonOpt,
    SetOpt,
    app,
    emit,
    err_console,
    errors,
    out_console,
    progress_bar,
    render_generic,
    say,
)
from provenance.workspace import DEFAULT_WORKDIR



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


TRAIN_ONLY = ("--steps", "--batch-size", "--num-workers", "--use-gpu/--no-gpu", "--dataset", "--config")


@app.command()
def submit(
    spec: Annotated[Optional[Path], typer.Argument(help="A run spec (YAML) to run whole on the cluster, as `linernotes "
                                                        "run SPEC`; without it, the training job `linernotes train` "
                                                        "runs (the train options below).")] = None,
    address: Annotated[str, typer.Option(help="The cluster's dashboard (Ray Jobs API), http://HEAD:8265.",
                                         envvar="RAY_API_SERVER_ADDRESS")] = ...,
    steps: Annotated[Optional[int], typer.Option(help="Training: optimizer steps.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Training: segments per step (per worker).")] = None,
    num_workers: Annotated[Optional[int], typer.Option(help="Training: Ray Train workers.")] = None,
    use_gpu: Annotated[Optional[bool], typer.Option("--use-gpu/--no-gpu", help="Training: train on GPUs.")] = None,
    dataset: Annotated[Optional[str], typer.Option(help="Training: dataset id; default the newest.")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", help="Training: YAML file with the train "
                                                   "config.")] = None,
    cluster_workdir: Annotated[Optional[str], typer.Option(help="The workspace path as the cluster's nodes see "
                                                           "it (shared storage); default the same path as here.")] = None,
    working_dir: Annotated[Optional[Path], typer.Option(help="Upload this checkout's code with the job (when the "
                                                        "cluster's image lacks linernotes or has another version).")] = None,
    command: Annotated[str, typer.Option(help="How the cluster runs linernotes.")] = "linernotes",
    token: Annotated[Optional[str], typer.Option(help="Ray auth token; default $RAY_AUTH_TOKEN or "
                                                 "~/.ray/auth_token.", envvar="RAY_AUTH_TOKEN")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Wait for the job and print its result (a run: its run id "
                                       "and stage table).")] = False,
    timeout_s: Annotated[float, typer.Option("--timeout-s", help="How long --wait waits (and, up to 600 s, how "
                                             "long to retry while a new cluster's job agent starts).")] = 3600.0,
    overrides: Annotated[Optional[list[str]], typer.Option("--set", help="Override key=value (repeatable): with "
                                                           "SPEC, STAGE.KEY=VALUE as `linernotes run`; else a train "
                                                           "key.")] = None,
    workdir: Annotated[Optional[Path], typer.Option("--workdir", "-w", help="Workspace folder; with SPEC default its "
                                                    "`workspace:`, else $LINERNOTES_WORKDIR or "
                                                    "./linernotes-work.")] = None,
    json_mode: JsonOpt = False,
) -> None:
    """Send a whole run (`linernotes submit SPEC`), or the training job `linernotes train` runs here, to a Ray cluster
    through the Ray Jobs API. The spec is validated and pinned here (every stage config with its defaults, absolute
    paths); the workspace and the delivery must be shared storage the cluster's nodes mount at the same paths."""
    with errors():
        if spec is None:
            _submit_train(address, steps, batch_size, num_workers, use_gpu, dataset, config, cluster_workdir,
                          working_dir, command, token, wait, timeout_s, overrides, workdir, json_mode)
            return
        given = (steps, batch_size, num_workers, use_gpu, dataset, config)
        for flag, value in zip(TRAIN_ONLY, given):
            if value is not None:
                raise CliError(f"{flag.split('/')[0]} is a train option; with a run spec set the stage's key: "
                               "--set train.KEY=VALUE (e.g. --set train.steps=20)")
        import yaml

        from pipelines.engines.submit import submit_run
        from pipelines.runspec import load_spec, parse_spec, pin_spec

        loaded = load_spec(spec, overrides or [], workspace=str(workdir) if workdir else None)
        pinned = pin_spec(loaded, workspace=cluster_workdir)
        checked = parse_spec(pinned, base_dir=Path.cwd(), source=str(spec))  # the pinned spec is itself valid
        try:
            result = submit_run(address, yaml.safe_dump(pinned, sort_keys=False), checked.sha256,
                                code_dir=str(working_dir) if working_dir else None, token=token, command=command,
                                wait=wait, timeout_s=timeout_s, agent_wait_s=min(timeout_s, 600.0), status=say)
        except (ConnectionError, TimeoutError, RuntimeError) as err:
            raise CliError(str(err)) from err
        payload = {**result.to_json(), "spec_sha256": checked.sha256,
                   "run_id": (result.result or {}).get("run_id")}
        emit(payload, json_mode, _render_submitted_run)


def _render_submitted_run(payload: dict[str, Any]) -> None:
    out_console.print(f"job {payload['job_id']} {payload['status']} at {payload['address']} "
                      f"(spec sha256 {payload['spec_sha256'][:16]})", highlight=False)
    if payload.get("result"):
        render_run(payload["result"])
    else:
        out_console.print(f"follow it: ray job logs --follow --address {payload['address']} {payload['job_id']}",
                          highlight=False)


def _submit_train(address: str, steps: int | None, batch_size: int | None, num_workers: int | None,
                  use_gpu: bool | None, dataset: str | None, config: Path | None, cluster_workdir: str | None,
                  working_dir: Path | None, command: str, token: str | None, wait: bool, timeout_s: float,
                  overrides: list[str] | None, workdir: Path | None, json_mode: bool) -> None:
    """`linernotes submit` without a spec: the training job of `linernotes train`, every config field pinned."""
    from pipelines.config import load_config, parse_overrides
    from pipelines.engines.submit import submit_train
    from pipelines.runspec import WORKDIR_ENV
    from training.config import TrainConfig

    cfg = load_config(TrainConfig, config, parse_overrides(overrides or []), steps=steps,
                      batch_size=batch_size, num_workers=num_workers, use_gpu=use_gpu)
    workdir = workdir or Path(os.environ.get(WORKDIR_ENV) or DEFAULT_WORKDIR)
    try:
        result = submit_train(address, cfg, cluster_workdir or str(workdir.expanduser().resolve()),
                              dataset_id=dataset, working_dir=str(working_dir) if working_dir else None,
                              token=token, command=command, wait=wait, timeout_s=timeout_s,
                              agent_wait_s=min(timeout_s, 600.0), status=say)
    except (ConnectionError, TimeoutError, RuntimeError) as err:
        raise CliError(str(err)) from err
    emit(result.to_json(), json_mode, render_generic("submit"))
