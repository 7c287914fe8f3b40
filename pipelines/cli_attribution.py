"""CLI of the attribution index and methods: ``linernotes index`` and the body of ``linernotes attribute``.

Registered in ``pipelines.cli``; helpers of that module are imported inside the functions so that either
module can be imported first.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Optional

import typer
from pydantic import Field

from pipelines.index import IndexConfig
from provenance.workspace import DEFAULT_WORKDIR


class AttributeConfig(IndexConfig):
    """``linernotes attribute --config/--set`` keys: every ``IndexConfig`` key (which index to use or build)
    plus the ``unlearning`` method's settings (``pipelines.attribution_methods.UnlearningSettings``)."""

    candidates: int = Field(50, ge=1)
    rerank_from: Literal["dtrak", "embedding"] = "dtrak"
    step_size: float = Field(3e-5, gt=0)
    damping: float = Field(0.1, gt=0)
    num_steps: int = Field(1, ge=1)
    normalize: bool = True

    def index_config(self) -> IndexConfig:
        return IndexConfig(**{k: getattr(self, k) for k in IndexConfig.model_fields})


def index(
    checkpoint: Annotated[Optional[str], typer.Option(help="Checkpoint id; default the newest.")] = None,
    projection_dim: Annotated[Optional[int], typer.Option(help="D-TRAK feature dimension (512–32768).")] = None,
    num_workers: Annotated[Optional[int], typer.Option(help="Ray actors featurizing segments.")] = None,
    use_gpu: Annotated[Optional[bool], typer.Option("--use-gpu/--no-gpu", help="One GPU per actor.")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", help="YAML file with the stage config.")] = None,
    overrides: Annotated[Optional[list[str]], typer.Option("--set", help="Config override key=value.")] = None,
    workdir: Annotated[Path, typer.Option("--workdir", "-w", help="Workspace folder.",
                                          envvar="LINERNOTES_WORKDIR")] = Path(DEFAULT_WORKDIR),
    json_mode: Annotated[bool, typer.Option("--json", help="Print one JSON object describing what was done.")] = False,
) -> None:
    """Build a checkpoint's attribution index: embedding index, D-TRAK features (resumable), Fisher."""
    from pipelines.cli import CliError, _emit, _errors, _progress, _render_generic, _workspace
    from pipelines.config import load_config, parse_overrides
    from pipelines.jobs import run_index

    with _errors():
        if workdir is not None and not os.fspath(workdir):
            raise CliError("--workdir must not be empty")
        index_config = load_config(IndexConfig, config, parse_overrides(overrides or []),
                                   projection_dim=projection_dim, num_workers=num_workers, use_gpu=use_gpu)
        with _progress(json_mode) as progress:
            result = run_index(_workspace(workdir), index_config, checkpoint_id=checkpoint, progress=progress)
        _emit(result.to_json(), json_mode, _render_generic("index"))


def attribute_file(file: Path, dataset: str | None, top_k: int, method: str, checkpoint: str | None, prompt: str,
                   config: Path | None, overrides: list[str] | None, workspace: Any, json_mode: bool,
                   progress_bar: Callable[..., Any], emit: Callable[..., None], render: Callable[..., None]) -> None:
    """``linernotes attribute FILE``: validate, load the config, run ``run_attribute_file``, print."""
    from pipelines.attribution_methods import METHODS, UnlearningSettings
    from pipelines.cli import CliError
    from pipelines.config import load_config, parse_overrides
    from pipelines.jobs import run_attribute_file

    if not file.is_file():
        raise CliError(f"no audio file at {file}")
    if top_k < 1:
        raise CliError(f"--top-k must be ≥ 1, got {top_k}")
    if method not in METHODS:
        raise CliError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    settings = load_config(AttributeConfig, config, parse_overrides(overrides or []))
    unlearning = UnlearningSettings(settings.candidates, settings.rerank_from, settings.step_size, settings.damping,
                                    settings.num_steps, settings.normalize)
    with progress_bar(json_mode) as progress:
        result = run_attribute_file(workspace, file, dataset_id=dataset, top_k=top_k, progress=progress,
                                    method=method, checkpoint_id=checkpoint, text=prompt,
                                    index_config=settings.index_config(), unlearning=unlearning)
    emit(result.to_json(), json_mode, render)
