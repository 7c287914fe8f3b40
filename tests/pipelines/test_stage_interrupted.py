"""The runner after a kill -9: a stage's Run left ``running`` by a SIGKILLed process is marked ``interrupted`` when the
next stage starts, is never the cached result, and ``linernotes runs`` shows it; on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict
from typer.testing import CliRunner

from pipelines.stage import CACHED, RAN, Stage, StageContext, StageOutput, run_stage
from provenance.store import LineageStore
from provenance.workspace import STORE_URL_ENV, Workspace

SPAWN = multiprocessing.get_context("spawn")
FOREVER_S = 600.0


class SleepyConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    value: int = 1


class SleepyStage(Stage):
    """Given ``options["started"]`` (a queue), puts its run id there and sleeps until killed; else returns at once."""

    name = "sleepy"
    config_model = SleepyConfig

    def run(self, ctx: StageContext, config: SleepyConfig) -> StageOutput:
        if (started := ctx.options.get("started")) is not None:
            started.put(ctx.run_id)
            time.sleep(FOREVER_S)
        return StageOutput(outputs={}, counts={"value": config.value})


SLEEPY = SleepyStage()


def stage_until_killed(workdir: str, store_url: str, started: Any) -> None:
    """The child process: the sleepy stage through the runner, until the test kills it."""
    run_stage(SLEEPY, Workspace.at(workdir, store_url=store_url), SleepyConfig(), options={"started": started})


def test_a_stage_killed_mid_run_is_interrupted_on_the_next_start_and_never_cached(store_url, tmp_path: Path,
                                                                                  monkeypatch) -> None:
    workspace = Workspace.at(tmp_path / "work", store_url=store_url)
    started = SPAWN.Queue()
    child = SPAWN.Process(target=stage_until_killed, args=(str(workspace.root), store_url, started), daemon=True)
    child.start()
    try:
        killed = started.get(timeout=60)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.join(30)
    with LineageStore(store_url) as store:
        assert store.get_run(killed)["status"] == "running"

    rerun = run_stage(SLEEPY, workspace, SleepyConfig())  # same config, same cache key: the killed Run is no result
    assert rerun.status == RAN and rerun.run_id != killed and rerun.counts == {"value": 1}
    with LineageStore(store_url) as store:
        run = store.get_run(killed)
        assert run["status"] == "interrupted" and run["error"] == f"interrupted: process {child.pid} is gone"
        assert store.get_run(rerun.run_id)["cache_key"] == run["cache_key"]
    again = run_stage(SLEEPY, workspace, SleepyConfig())
    assert (again.status, again.run_id) == (CACHED, rerun.run_id)

    from pipelines.cli import app

    monkeypatch.setenv(STORE_URL_ENV, store_url)
    shown = CliRunner().invoke(app, ["runs", "--json", "--workdir", str(workspace.root)])
    assert shown.exit_code == 0, shown.output
    statuses = {r["run_id"]: r["status"] for r in json.loads(shown.stdout)["runs"]}
    assert statuses == {killed: "interrupted", rerun.run_id: "succeeded"}
