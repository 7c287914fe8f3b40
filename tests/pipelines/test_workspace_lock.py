"""Every stage holds the workspace lock, not only `linernotes run`: while a stage runs, a single-stage command as a user
runs it (`linernotes shard`, `linernotes ingest`) exits 75 naming the holder's run id and registers nothing, the HTTP
API's stage endpoints answer 409 with the holder, read-only commands still answer; a stage run by another stage with
the lock passed on does not wait for itself. On SQLite and PostgreSQL."""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import soundfile as sf
from fastapi.testclient import TestClient
from pydantic import BaseModel, ConfigDict

from pipelines.api.app import create_app
from pipelines.stage import RAN, Stage, StageContext, StageOutput, run_stage, workspace_lock
from provenance.locks import LockHeld
from provenance.store import LineageStore
from provenance.workspace import STORE_URL_ENV, Workspace
from tests.conftest import sine
from tests.pipelines.test_ingest import LICENSES, track, write_csv

ROOT = Path(__file__).resolve().parents[2]
LINERNOTES = Path(sys.executable).with_name("linernotes")
SPAWN = multiprocessing.get_context("spawn")
START_S = 120.0  # a spawned child's imports and its stage's start on 2 busy cores
TOKEN = "lock-test-token"


class HoldConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    value: int = 1


class HoldStage(Stage):
    """Puts its run id on ``options["started"]`` and waits for ``options["release"]``; with ``options["nested"]``
    (``"passed"`` or ``"taken"``) it runs a ``HoldStage`` of value 2 inside, passing its lock on or not."""

    name = "hold"
    config_model = HoldConfig

    def run(self, ctx: StageContext, config: HoldConfig) -> StageOutput:
        if (started := ctx.options.get("started")) is not None:
            started.put(ctx.run_id)
            ctx.options["release"].wait(START_S)
        details = {}
        if (nested := ctx.options.get("nested")) is not None:
            inner = run_stage(HOLD, ctx.workspace, HoldConfig(value=2), engine=ctx.engine, parent_run_id=ctx.run_id,
                              lock=ctx.lock if nested == "passed" else None)
            details["inner_run_id"] = inner.run_id
        return StageOutput(outputs={}, counts={"value": config.value}, details=details)


HOLD = HoldStage()


def hold_stage(workdir: str, store_url: str, started: Any, release: Any) -> None:
    """The child process: the hold stage through the runner, holding the workspace until ``release`` is set."""
    run_stage(HOLD, Workspace.at(workdir, store_url=store_url), HoldConfig(),
              options={"started": started, "release": release})


@pytest.fixture
def held(store_url: str, tmp_path: Path):
    """A workspace whose lock a stage in another process holds: ``(workspace, holder run id)``; released after."""
    workspace = Workspace.at(tmp_path / "work", store_url=store_url).ensure()
    started, release = SPAWN.Queue(), SPAWN.Event()
    child = SPAWN.Process(target=hold_stage, args=(str(workspace.root), store_url, started, release), daemon=True)
    child.start()
    try:
        yield workspace, started.get(timeout=START_S)
        release.set()
        child.join(START_S)
        assert child.exitcode == 0
    finally:
        if child.is_alive():
            os.kill(child.pid, signal.SIGKILL)
            child.join(30)


def linernotes(*args: str, store_url: str) -> subprocess.CompletedProcess:
    env = {**os.environ, STORE_URL_ENV: store_url,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([str(LINERNOTES), *args], capture_output=True, text=True, env=env, timeout=600)


def write_delivery(root: Path) -> Path:
    root.mkdir()
    sf.write(root / "a.wav", sine(440, 1.0, 22050, 0.5).T, 22050)
    write_csv(root / "licenses.csv", LICENSES[:1], list(LICENSES[0]))
    write_csv(root / "tracks.csv", [track("a", "L-open")], list(track("a", "L-open")))
    write_csv(root / "files.csv", [{"track_id": "a", "role": "mixture", "instrument": "", "path": "a.wav"}],
              ["track_id", "role", "instrument", "path"])
    return root


def test_single_stage_commands_refuse_a_held_workspace_naming_the_holder(held, store_url, tmp_path) -> None:
    workspace, holder = held
    delivery = write_delivery(tmp_path / "delivery")
    for command in (["shard"], ["ingest", str(delivery), "--as-of", "2026-11-21"]):
        refused = linernotes(*command, "--workdir", str(workspace.root), "--json", store_url=store_url)
        assert refused.returncode == 75, (command, refused.stderr[-2000:])
        assert refused.stdout == ""
        lines = [line for line in refused.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: the workspace:"), refused.stderr
        assert f"is in use by run {holder} (pid " in lines[0] and "try again when it has finished (`linernotes run --wait` waits for it)" in lines[0]

    shown = linernotes("runs", "--workdir", str(workspace.root), "--json", store_url=store_url)  # reads: no lock
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert [(r["run_id"], r["status"]) for r in json.loads(shown.stdout)["runs"]] == [(holder, "running")]
    with LineageStore(store_url) as store:
        assert store.lock_holder(workspace_lock(workspace)).holder == holder


def test_api_stage_endpoints_answer_409_naming_the_holder(held, store_url) -> None:
    workspace, holder = held
    with TestClient(create_app(workspace, token=TOKEN)) as client:
        auth = {"Authorization": f"Bearer {TOKEN}"}
        taken = client.post("/takedown", json={"kind": "track_id", "value": "a", "rebuild": False}, headers=auth)
        assert taken.status_code == 409, taken.text
        body = taken.json()
        assert body["holder"]["run_id"] == holder and f"in use by run {holder}" in body["detail"]
        attributed = client.post("/attribute", files={"file": ("q.wav", _wav_bytes(), "audio/wav")}, headers=auth)
        assert attributed.status_code == 409 and attributed.json()["holder"]["run_id"] == holder
        assert client.get("/opt-outs").json() == {"opt_outs": []}  # the refused takedown registered nothing
        assert client.get("/health").status_code == 200


def test_api_takedown_runs_once_the_workspace_is_free(store_url, tmp_path) -> None:
    workspace = Workspace.at(tmp_path / "work", store_url=store_url).ensure()
    with LineageStore(store_url) as store, store.lock(workspace_lock(workspace), "run-in-the-test"):
        with TestClient(create_app(workspace, token=TOKEN)) as client:
            refused = client.post("/takedown", json={"kind": "track_id", "value": "a", "rebuild": False},
                                  headers={"Authorization": f"Bearer {TOKEN}"})
        assert refused.status_code == 409 and refused.json()["holder"]["run_id"] == "run-in-the-test"
    with TestClient(create_app(workspace, token=TOKEN)) as client:
        done = client.post("/takedown", json={"kind": "track_id", "value": "a", "rebuild": False},
                           headers={"Authorization": f"Bearer {TOKEN}"})
        assert done.status_code == 200, done.text
        assert [o["value"] for o in client.get("/opt-outs").json()["opt_outs"]] == ["a"]
    with LineageStore(store_url) as store:
        assert store.lock_holder(workspace_lock(workspace)) is None  # released when the stage ended


def test_a_stage_takes_over_the_lock_of_a_killed_stage_and_interrupts_its_run(store_url, tmp_path) -> None:
    workspace = Workspace.at(tmp_path / "work", store_url=store_url).ensure()
    started, release = SPAWN.Queue(), SPAWN.Event()
    child = SPAWN.Process(target=hold_stage, args=(str(workspace.root), store_url, started, release), daemon=True)
    child.start()
    try:
        holder = started.get(timeout=START_S)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.join(30)
    said: list[str] = []
    result = run_stage(HOLD, workspace, HoldConfig(value=7), status=said.append)
    assert result.status == RAN and result.counts == {"value": 7}
    assert said[0].startswith(f"took the workspace over from run {holder} (pid {child.pid} on ")
    assert said[0].endswith(f": process {child.pid} is gone")
    with LineageStore(store_url) as store:
        killed = store.get_run(holder)
        assert (killed["status"], killed["error"]) == ("interrupted", f"interrupted: process {child.pid} is gone")
        assert store.lock_holder(workspace_lock(workspace)) is None


def test_a_stage_that_runs_a_stage_passes_its_lock_on(store_url, tmp_path) -> None:
    workspace = Workspace.at(tmp_path / "work", store_url=store_url).ensure()
    outer = run_stage(HOLD, workspace, HoldConfig(value=3), options={"nested": "passed"})
    assert outer.status == RAN
    with LineageStore(store_url) as store:
        inner = store.get_run(outer.details["inner_run_id"])
        assert (inner["parent_run_id"], inner["status"]) == (outer.run_id, "succeeded")
        assert store.lock_holder(workspace_lock(workspace)) is None

    with pytest.raises(LockHeld, match=r"in use by run hold-\S+ \(pid") as refused:  # not passed on: refused
        run_stage(HOLD, workspace, HoldConfig(value=4), options={"nested": "taken"})
    with LineageStore(store_url) as store:
        outer_run = store.get_run(refused.value.info.holder)
        assert outer_run["kind"] == "hold" and outer_run["status"] == "failed"  # the holder is the outer Run
        assert "LockHeld" in outer_run["error"]

    other = Workspace.at(tmp_path / "other", store_url=store_url).ensure()
    with LineageStore(store_url) as store, store.lock(workspace_lock(other), "run-other") as other_lock:
        with pytest.raises(ValueError, match="not this workspace's"):
            run_stage(HOLD, workspace, HoldConfig(value=5), lock=other_lock)


def _wav_bytes() -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, sine(440, 1.0, 16000, 0.5).T, 16000, format="WAV", subtype="PCM_16")
    return buffer.getvalue()
