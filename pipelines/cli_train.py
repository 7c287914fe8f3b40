"""CLI pieces of training (issue 5b): ``--resume`` checks for ``linernotes train`` and ``linernotes submit``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer


def check_resume_options(resume: bool, *given: Any) -> None:
    """``--resume`` takes the interrupted run's own config and dataset: refuse options that would differ."""
    from pipelines.cli import CliError

    if resume and any(value not in (None, [], False) for value in given):
        raise CliError("--resume continues a run with its own config and dataset: drop the other train options")


def submit(
    address: Annotated[str, typer.Option(help="The cluster's dashboard (Ray Jobs API), http://HEAD:8265.",
                                         envvar="RAY_API_SERVER_ADDRESS")],
    steps: Annotated[Optional[int], typer.Option(help="Optimizer steps.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Segments per step (per worker).")] = None,
    num_workers: Annotated[Optional[int], typer.Option(help="Ray Train workers.")] = None,
    use_gpu: Annotated[Optional[bool], typer.Option("--use-gpu/--no-gpu", help="Train on GPUs.")] = None,
    dataset: Annotated[Optional[str], typer.Option(help="Dataset id; default the newest.")] = None,
    cluster_workdir: Annotated[Optional[str], typer.Option(help="The workspace path as the cluster's nodes see "
                                                           "it; default the same path as --workdir.")] = None,
    working_dir: Annotated[Optional[Path], typer.Option(help="Upload this folder (e.g. the repository) as the "
                                                        "job's working directory.")] = None,
    command: Annotated[str, typer.Option(help="How the cluster runs linernotes.")] = "linernotes",
    token: Annotated[Optional[str], typer.Option(help="Ray auth token; default $RAY_AUTH_TOKEN or "
                                                 "~/.ray/auth_token.", envvar="RAY_AUTH_TOKEN")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Wait for the job and print its train result.")] = False,
    timeout_s: Annotated[float, typer.Option("--timeout-s", help="How long --wait waits (and, up to 600 s, how "
                                             "long to retry while a new cluster's job agent starts).")] = 3600.0,
    config: Annotated[Optional[Path], typer.Option("--config", help="YAML file with the stage config.")] = None,
    overrides: Annotated[Optional[list[str]], typer.Option("--set", help="Config override key=value.")] = None,
    workdir: Annotated[Path, typer.Option("--workdir", "-w", help="Workspace folder.",
                                          envvar="LINERNOTES_WORKDIR")] = Path("./linernotes-work"),
    json_mode: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Send the same training job `linernotes train` runs here to a Ray cluster (Ray Jobs API)."""
    from pipelines.cli import CliError, _emit, _errors, _render_generic, _say

    with _errors():
        from pipelines.config import load_config, parse_overrides
        from pipelines.submit import submit_train
        from training.config import TrainConfig

        cfg = load_config(TrainConfig, config, parse_overrides(overrides or []), steps=steps,
                          batch_size=batch_size, num_workers=num_workers, use_gpu=use_gpu)
        try:
            result = submit_train(address, cfg, cluster_workdir or str(workdir.expanduser().resolve()),
                                  dataset_id=dataset, working_dir=str(working_dir) if working_dir else None,
                                  token=token, command=command, wait=wait, timeout_s=timeout_s,
                                  agent_wait_s=min(timeout_s, 600.0), status=_say)
        except (ConnectionError, TimeoutError, RuntimeError) as err:
            raise CliError(str(err)) from err
        _emit(result.to_json(), json_mode, _render_generic("submit"))
