"""Catalog versions: ingest, separate and clean commit ``catalogs/<catalog_id>/`` and never overwrite one; ``catalog``
links to the latest; a workspace of the layout before versions is migrated on first use; lineage walks versions."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pipelines.catalog import (
    catalogs_dir,
    commit_catalog,
    derive_catalog,
    latest_catalog,
    list_catalogs,
    migrate_catalog,
    resolve_catalog,
)
from pipelines.stages.clean import CleanConfig
from pipelines.lineage.walk import lineage
from pipelines.stage import CACHED, RAN, get_stage, run_stage
from provenance import records
from provenance.store import LineageStore
from provenance.workspace import Workspace
from tests.pipelines.test_clean import _catalog as clean_catalog
from tests.pipelines.test_stage import linernotes


def _tracks(*ids: str):
    return records.to_table([{"track_id": t, "title": t.upper(), "rights_holder": "R", "license_id": "L"}
                             for t in ids], records.TRACK)


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: records.file_sha256(p) for p in sorted(folder.iterdir())}


def test_versions_are_content_addressed_and_never_overwritten(tmp_path):
    workspace = Workspace.at(tmp_path / "w").ensure()
    assert latest_catalog(workspace) is None
    first = commit_catalog(workspace, {"tracks": _tracks("a", "b")}, parent=None, stage="ingest", run_id="r1")
    assert workspace.catalog_dir.is_symlink() and workspace.catalog_table("tracks").resolve() == first.table("tracks")
    before = _digests(first.root)

    derived = derive_catalog(workspace, first, {"stem_scores": _tracks("x")}, stage="clean", run_id="r2")
    assert derived.catalog_id != first.catalog_id and latest_catalog(workspace) == derived
    assert _digests(first.root) == before, "the parent version is untouched"
    assert records.file_sha256(derived.table("tracks")) == records.file_sha256(first.table("tracks"))
    info = derived.info()
    assert info["parent"] == first.catalog_id and info["stage"] == "clean" and set(info["tables"]) == {
        "tracks", "stem_scores"}

    # the same tables again: the same id, the first catalog.json kept, nothing overwritten
    again = commit_catalog(workspace, {"tracks": _tracks("a", "b")}, parent=None, stage="ingest", run_id="r3")
    assert again.catalog_id == first.catalog_id and again.info()["run_id"] == "r1"
    assert latest_catalog(workspace) == first and _digests(first.root) == before
    assert [v.catalog_id for v in list_catalogs(workspace)] == sorted(
        [first.catalog_id, derived.catalog_id], key=lambda i: (catalogs_dir(workspace) / i).stat().st_mtime)
    assert not [p for p in catalogs_dir(workspace).iterdir() if p.name.startswith(".")], "no staging left behind"

    assert resolve_catalog(workspace, derived.catalog_id[:10]) == derived
    with pytest.raises(FileNotFoundError, match="no catalog version 'cat-nope'.*the versions are"):
        resolve_catalog(workspace, "cat-nope")


def test_a_cached_stage_never_moves_catalog_back_to_an_ancestor(tmp_path):
    from pipelines.catalog import advance_catalog

    workspace = Workspace.at(tmp_path / "w").ensure()
    first = commit_catalog(workspace, {"tracks": _tracks("a")}, parent=None, stage="ingest", run_id="r1")
    cleaned = derive_catalog(workspace, first, {"stem_scores": _tracks("x")}, stage="clean", run_id="r2")
    advance_catalog(workspace, first.catalog_id)  # e.g. `linernotes ingest` again, cached, after a clean
    assert latest_catalog(workspace) == cleaned, "the latest still holds clean's decisions"
    other = commit_catalog(workspace, {"tracks": _tracks("b")}, parent=None, stage="ingest", run_id="r3")
    assert latest_catalog(workspace) == other
    advance_catalog(workspace, first.catalog_id)  # another delivery's version: it becomes the latest again
    assert latest_catalog(workspace) == first


def test_a_damaged_version_is_replaced_whole(tmp_path):
    workspace = Workspace.at(tmp_path / "w").ensure()
    first = commit_catalog(workspace, {"tracks": _tracks("a")}, parent=None, stage="ingest", run_id="r1")
    first.table("tracks").unlink()
    again = commit_catalog(workspace, {"tracks": _tracks("a")}, parent=None, stage="ingest", run_id="r2")
    assert again.catalog_id == first.catalog_id and again.table("tracks").is_file()
    assert again.info()["run_id"] == "r2"


def test_a_catalog_folder_of_the_old_layout_is_migrated_on_first_use(tmp_path):
    workspace = Workspace.at(tmp_path / "w").ensure()
    records.write_table(_tracks("a", "b"), workspace.catalog_table("tracks"))  # a plain folder, as before versions
    digest = records.file_sha256(workspace.catalog_table("tracks"))
    assert not workspace.catalog_dir.is_symlink()
    version = latest_catalog(workspace)
    assert version is not None and workspace.catalog_dir.is_symlink()
    assert records.file_sha256(version.table("tracks")) == digest and version.info()["stage"] == "migrated"
    assert migrate_catalog(workspace) is None, "migrating twice does nothing"


def test_clean_commits_a_new_version_and_lineage_walks_it(tmp_path, ray_local):
    workspace = clean_catalog(tmp_path)  # tables written into a plain catalog/ folder: migrated by the runner
    config = CleanConfig(methods=[])  # the explicit checks only
    first = run_stage(get_stage("clean"), workspace, config)
    assert first.status == RAN
    read, wrote = first.inputs["catalog"], first.output_ids["catalog"]
    parent, child = resolve_catalog(workspace, read), resolve_catalog(workspace, wrote)
    assert read != wrote and child.info()["parent"] == read and latest_catalog(workspace) == child
    assert not parent.table("stem_scores").exists() and child.table("stem_scores").is_file()
    assert records.file_sha256(child.table("audio_files")) == records.file_sha256(parent.table("audio_files"))
    assert first.outputs["catalog_stem_scores"] == str(child.table("stem_scores"))

    # re-run on the new version: clean keys on the audio files only, so it is cached, and no version is added
    versions = len(list_catalogs(workspace))
    second = run_stage(get_stage("clean"), workspace, config)
    assert second.status == CACHED and second.run_id == first.run_id
    assert len(list_catalogs(workspace)) == versions and latest_catalog(workspace) == child

    # every Run records the version it read and the one it wrote; lineage walks them both ways
    with LineageStore(workspace.store_url) as store:
        (run,) = store.list_runs("clean")
    assert run["inputs"]["catalog"] == read and run["output_ids"]["catalog"] == wrote
    walked = lineage(workspace, wrote)
    assert walked["kind"] == "catalog" and walked["catalog"]["stage"] == "clean" and walked["catalog"]["latest"]
    assert [v["catalog_id"] for v in walked["came_from"]] == [read]
    up = lineage(workspace, read, kind="catalog")
    assert up["derived"] == [wrote] and [r["run_id"] for r in up["read_by"]] == [first.run_id]

    done = linernotes("lineage", wrote, "--json", workdir=workspace.root)
    assert done.returncode == 0, done.stderr[-2000:]
    payload = json.loads(done.stdout)
    assert payload["kind"] == "catalog" and payload["came_from"][0]["catalog_id"] == read
    shown = linernotes("lineage", wrote, workdir=workspace.root)
    assert shown.returncode == 0 and f"catalog {read}" in shown.stdout and "written by clean" in shown.stdout
    assert os.readlink(workspace.catalog_dir) == os.path.join("catalogs", wrote)
