"""``linernotes run SPEC``: a declared curation run, stage by stage through the stage runner.

The whole run is a Run (kind ``run``) in the lineage store; each stage that runs is a child Run
(``parent_run_id``); a stage whose cache key matches a finished Run with its outputs is ``cached`` and adds no Run.
Each stage reads what the stage before it in the spec wrote (the catalog version, the dataset, the checkpoint, the
train Run), not whatever is newest in the workspace; a stage left out (``--from``, ``--until``, or not in the spec)
lets the next read the workspace's newest. One engine (local Ray or a cluster, Beam runner options) serves every
stage of the run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pipelines.engines import Engine
from pipelines.runspec import RunSpec
from pipelines.stage import (  # workspace_lock is still imported from here too
    CACHED,
    Progress,
    Status,
    StageResult,
    get_stage,
    plan_stage,
    run_stage,
    workspace_lock,
)
from provenance.store import LineageStore, new_run_id
from provenance.workspace import Workspace

RUN_KIND = "run"
#: what a stage's result hands the next stage: its output ids, and the train Run for evaluate
CARRIED = ("catalog", "dataset", "checkpoint", "generation")


class RunFailed(RuntimeError):
    """A stage of the run failed; ``payload`` is the run's result so far (the failed stage last)."""

    def __init__(self, message: str, payload: dict[str, Any]) -> None:
        super().__init__(message)
        self.payload = payload


@dataclass
class _Chain:
    """What flows from stage to stage: ``select`` for the next stage, and the rows of the result."""

    select: dict[str, str | None]
    rows: list[dict[str, Any]] = field(default_factory=list)

    def carry(self, name: str, result: StageResult) -> None:
        self.select.update({k: v for k, v in result.output_ids.items() if k in CARRIED})
        if name == "train":
            self.select["train_run"] = result.run_id


def window(spec: RunSpec, from_stage: str | None = None, until_stage: str | None = None) -> list[str]:
    """The spec's stages that this invocation runs (``--from``/``--until``, both included), in chain order.

    Raises:
        ValueError: ``--from``/``--until`` names a stage the spec does not have, or they are out of order.
    """
    names = list(spec.stages)
    for flag, name in (("--from", from_stage), ("--until", until_stage)):
        if name is not None and name not in names:
            raise ValueError(f"{flag} {name}: the spec runs {', '.join(names)}")
    start = names.index(from_stage) if from_stage else 0
    end = names.index(until_stage) + 1 if until_stage else len(names)
    if start >= end:
        raise ValueError(f"--from {from_stage} comes after --until {until_stage}")
    return names[start:end]


def run_spec(spec: RunSpec, *, from_stage: str | None = None, until_stage: str | None = None, force: bool = False,
             wait: bool = False, wait_timeout_s: float | None = None, progress: Progress | None = None,
             status: Status | None = None, workspace: Workspace | None = None) -> dict[str, Any]:
    """Run ``spec``: every stage in its window through :func:`pipelines.stage.run_stage`, as one whole-run Run.

    One run at a time per workspace: the run holds the workspace lock in the lineage store (so it holds on
    PostgreSQL too) from before its Run is registered until it ends, and passes it to each stage (which would take it
    otherwise); a lock left by a killed process is taken over, and the Runs of its holder are marked ``interrupted``.
    Runs a killed process left ``running`` are marked ``interrupted`` first.

    Returns:
        ``{"run_id", "status": "succeeded", "workspace", "spec_sha256", "stages": [{stage, status (ran|cached|skipped),
        run_id, inputs, outputs, output_ids, counts, and the stage's own details}, …]}`` in chain order.

    Raises:
        RunFailed: a stage failed (its row has ``status: failed`` and the error); the whole-run Run is ``failed``.
        ValueError: a bad ``--from``/``--until``.
        provenance.locks.LockHeld: another run holds the workspace (``wait``: still, after ``wait_timeout_s``).
    """
    selected = window(spec, from_stage, until_stage)
    workspace = (workspace or Workspace.at(spec.workspace)).ensure()  # an open one keeps its store URL
    chain = _Chain({"delivery": str(spec.delivery) if spec.delivery else None})
    say = status or (lambda message: None)
    run_id = new_run_id(RUN_KIND)
    with LineageStore(workspace.store_url) as store, \
            store.lock(workspace_lock(workspace), run_id, wait=wait, timeout_s=wait_timeout_s) as held, \
            Engine(spec.engine) as engine:
        if held.taken_over is not None:
            say(f"took the workspace over from {held.taken_over[0].describe()}: {held.taken_over[1]}")
        for interrupted in store.mark_interrupted():
            say(f"run {interrupted['run_id']} ({interrupted['kind']}) was interrupted: its process is gone")
        record = {"spec": spec.values, "source": spec.source, "from": from_stage, "until": until_stage}
        with store.run(RUN_KIND, record, run_id=run_id, spec_sha256=spec.sha256) as run:
            payload = {"run_id": run.run_id, "status": "running", "workspace": str(workspace.root),
                       "spec_sha256": spec.sha256, "stages": chain.rows}
            for name in spec.stages:
                if name not in selected:
                    chain.rows.append({"stage": name, "status": "skipped", "run_id": None, "inputs": {},
                                       "outputs": {}, "counts": {}})
                    continue
                say(f"{name}: starting")
                try:
                    result = run_stage(get_stage(name), workspace, spec.stages[name], engine=engine,
                                       progress=progress, status=say, select=chain.select,
                                       parent_run_id=run.run_id, force=force, lock=held)
                except Exception as err:
                    failed = [r for r in store.list_runs(name) if r.get("parent_run_id") == run.run_id]
                    chain.rows.append({"stage": name, "status": "failed",
                                       "run_id": failed[-1]["run_id"] if failed else None, "inputs": {},
                                       "outputs": {}, "counts": {}, "error": f"{type(err).__name__}: {err}"})
                    payload["status"] = "failed"
                    run.counts = {"stages": {row["stage"]: row["status"] for row in chain.rows}}
                    raise RunFailed(f"stage {name} failed: {type(err).__name__}: {err}", payload) from err
                chain.carry(name, result)
                chain.rows.append(result.to_json())  # the stage contract's shape, with the stage's own details
                say(f"{name}: {result.status} (run {result.run_id})")
            run.counts = {"stages": {row["stage"]: row["status"] for row in chain.rows}}
            run.output_ids = {k: v for k, v in chain.select.items() if k in CARRIED and v}
        payload["status"] = "succeeded"
    return payload


def plan_spec(spec: RunSpec, *, from_stage: str | None = None, until_stage: str | None = None,
              force: bool = False) -> dict[str, Any]:
    """What ``run_spec`` would do, stage by stage, without doing it: ``run`` or ``cached``, and why (which config
    key or input changed since the stage's last Run). A stage after one that runs is ``run`` too: its inputs are
    not known until then.

    Raises:
        Whatever a stage's ``inputs`` raise when its upstream output is missing.
    """
    selected = window(spec, from_stage, until_stage)
    workspace = Workspace.at(spec.workspace).ensure()
    chain = _Chain({"delivery": str(spec.delivery) if spec.delivery else None})
    upstream_runs: str | None = None
    with Engine(spec.engine) as engine, LineageStore(workspace.store_url) as store:
        for name in spec.stages:
            if name not in selected:
                chain.rows.append({"stage": name, "status": "skipped", "why": "outside --from/--until"})
            elif upstream_runs is not None:
                chain.rows.append({"stage": name, "status": "run",
                                   "why": f"after {upstream_runs}, which runs: its inputs come from that run"})
            else:
                plan = plan_stage(get_stage(name), workspace, spec.stages[name], store=store, engine=engine,
                                  select=chain.select)
                status = "run" if force else plan.status
                why = "--force" if force and plan.status == CACHED else plan.why
                chain.rows.append({"stage": name, "status": status, "why": why, "inputs": plan.inputs,
                                   "run_id": plan.cached.run_id if plan.cached else None})
                if status == CACHED and plan.cached is not None:
                    chain.carry(name, plan.cached)
                else:
                    upstream_runs = name
    return {"dry_run": True, "workspace": str(workspace.root), "spec_sha256": spec.sha256, "stages": chain.rows}


def render_plan(payload: dict[str, Any], write: Callable[[str], None]) -> None:
    """One line per stage: ``shard     run     config segment_s changed since run …``."""
    for row in payload["stages"]:
        write(f"{row['stage']:<9} {row['status']:<7} {row.get('why', '')}")
