"""Resolving a stage's upstream inputs from the lineage store: a dataset, a checkpoint, a dataset's manifest.

Each lookup fails with :class:`MissingInputError`, whose message names the command that makes the input.
"""

from __future__ import annotations

import json
from typing import Any

from provenance.store import LineageStore
from provenance.workspace import Workspace


class MissingInputError(FileNotFoundError):
    """A stage's input is not in the workspace yet; the message says which command makes it."""


def resolve_dataset(store: LineageStore, workspace: Workspace, dataset_id: str | None) -> dict[str, Any]:
    """The named dataset, or the newest one. Raises MissingInputError saying to run ``shard``."""
    record = store.get_dataset(dataset_id) if dataset_id else store.latest_dataset()
    if record is None:
        what = f"dataset {dataset_id}" if dataset_id else "a dataset"
        raise MissingInputError(f"no {what} in {workspace.root}: run `linernotes shard` first")
    return record


def resolve_checkpoint(store: LineageStore, workspace: Workspace, checkpoint_id: str | None) -> dict[str, Any]:
    """The named checkpoint, or the newest one. Raises MissingInputError saying to run ``train``."""
    record = store.get_checkpoint(checkpoint_id) if checkpoint_id else store.latest_checkpoint()
    if record is None:
        what = f"checkpoint {checkpoint_id}" if checkpoint_id else "a checkpoint"
        raise MissingInputError(f"no {what} in {workspace.root}: run `linernotes train` first")
    return record


def read_dataset_manifest(workspace: Workspace, dataset_id: str) -> dict[str, Any]:
    """A dataset's ``dataset.json`` (shards per split, shard config with its mel config).

    Raises:
        MissingInputError: the manifest is missing (re-run ``shard``).
    """
    path = workspace.dataset_dir(dataset_id) / "dataset.json"
    if not path.is_file():
        raise MissingInputError(f"dataset {dataset_id} has no manifest at {path}: re-run `linernotes shard`")
    return json.loads(path.read_text())
