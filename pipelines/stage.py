"""The stage contract and its runner: every stage has one shape, and the plumbing every stage needs is here, once.

A **stage** (after NeMo Curator's ``ProcessingStage`` and datatrove's pipeline block) has a name, a version, a
typed config (a frozen pydantic model), resources, declared **inputs** (the content ids of what it reads: a
catalog version, stem decisions, a dataset, a checkpoint) and a ``run`` that returns its **outputs** (paths, with
content ids) and its **counts** (accepted, rejected by reason, …). A stage does the work and nothing else.

The **runner** (:func:`run_stage`), and only it:

1. opens the lineage store and the engines (or takes the run's, when a whole run shares them), and holds the
   workspace lock (:func:`workspace_lock`) for the stage, unless its caller holds it and passes it on (a whole run's
   stages, a takedown's re-shard, a generation's attribution): one writer per workspace, on SQLite and PostgreSQL
   alike; a second is refused with :class:`provenance.locks.LockHeld`, which names the holder's run id;
2. asks the stage for its inputs, which validates them before any Run exists (a bad reference track, a missing
   catalog: a clear error and no Run);
3. computes the stage's **cache key**: sha256 of its name and version, the code version (package version and git
   commit), the resolved config without engine settings, and the inputs' content ids. A ``succeeded`` Run with the
   same key whose outputs are still whole (every path there, every file output unchanged by sha256, and the
   stage's own ``outputs_valid`` check: a dataset's tars, an index's arrays) makes the stage ``cached``: no work,
   no new Run, the earlier Run's result;
4. otherwise registers a Run (:meth:`provenance.store.LineageStore.run`: ``running``, then ``succeeded``, or
   ``failed`` with the error, never left ``running``), writes ``runs/<run_id>/config.json`` (resolved config, its
   sha256, the cache key, the inputs) before the stage starts, runs the stage, and writes ``summary.json``.

Work resumed *inside* a stage (ingest's per-file cache, the D-TRAK done-mask, Ray Train checkpoints) stays in the
stage. Every stage's result has one JSON shape: ``stage``, ``run_id``, ``status`` (``ran`` or ``cached``),
``inputs``, ``outputs``, ``counts``, and the stage's own details beside them.
"""

from __future__ import annotations

import importlib
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict

from pipelines.catalog import advance_catalog, catalogs_dir
from pipelines.engines import Engine, EngineConfig
from provenance import records
from provenance.locks import HeldLock
from provenance.store import LineageStore, code_version, new_run_id
from provenance.workspace import Workspace

Progress = Callable[[str, int, int], None]
Status = Callable[[str], None]

RAN = "ran"
CACHED = "cached"


class Resources(BaseModel):
    """What one unit of a stage's work needs, and which engine runs it."""

    model_config = ConfigDict(frozen=True)

    engine: Literal["local", "ray", "beam", "ray-train"] = "local"
    cpus: float = 1.0
    gpus: float = 0.0  # used when the cluster has GPUs


@dataclass
class StageContext:
    """What the runner hands a stage's ``inputs`` and ``run``.

    ``select`` names which upstream outputs to read (``{"dataset": id, "checkpoint": id}``; absent or None: the
    newest), for ``inputs`` to resolve into content ids. ``options`` are run controls that change how the work runs,
    never what it computes (``stop_after_steps``, which interrupted run to resume), or inputs a caller holds in
    memory (the attribute stage's decoded query audio), which ``inputs`` then names by content id; they stay out of
    the cache key. ``inputs``, ``run_id`` and ``run_dir`` are set only inside
    ``run`` (a Run exists then). ``store`` is open for the stage to register the records it creates (a Dataset, a
    Checkpoint), never to register Runs. ``lock`` is the workspace lock the stage runs under: a stage that runs another
    stage passes it to :func:`run_stage` (``lock=ctx.lock``), which would otherwise refuse it as held.
    """

    workspace: Workspace
    store: LineageStore
    engine: Engine
    progress: Progress | None = None
    status: Status | None = None
    select: Mapping[str, str | None] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict)
    prepared: dict[str, Any] = field(default_factory=dict)  # what ``inputs`` read, for ``run`` not to read twice
    inputs: dict[str, str] = field(default_factory=dict)
    run_id: str = ""
    run_dir: Path | None = None
    lock: HeldLock | None = None

    def say(self, message: str) -> None:
        if self.status is not None:
            self.status(message)


@dataclass
class StageOutput:
    """What a stage's ``run`` returns.

    Attributes:
        outputs: name → path (str) of every file or folder it wrote that a later stage or user reads.
        counts: accepted, rejected by reason and the stage's other tallies (JSON-ready).
        output_ids: name → content id of outputs that have one (a dataset id, a catalog id); files without one
            are identified by their sha256 by the runner.
        details: the stage's own result fields (JSON-ready), reported beside the common ones.
        status: the Run's status: ``succeeded``, or ``stopped`` when the stage stopped on purpose before the end
            (a stopped Run is never a cached result; the stage resumes it).
    """

    outputs: dict[str, str]
    counts: dict[str, Any]
    output_ids: dict[str, str] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    status: str = "succeeded"


@dataclass
class StageResult:
    """A stage's result, ran or cached: the one shape every stage reports (``to_json``)."""

    stage: str
    run_id: str
    status: str  # ran | cached
    inputs: dict[str, str]
    outputs: dict[str, str]
    counts: dict[str, Any]
    output_ids: dict[str, str] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {**self.details, "stage": self.stage, "run_id": self.run_id, "status": self.status,
                "inputs": self.inputs, "outputs": self.outputs, "output_ids": self.output_ids, "counts": self.counts}


class Stage(ABC):
    """One stage of the chain. Subclasses set the class attributes and implement ``run`` (and usually ``inputs``).

    Attributes:
        name: the stage's name (the Run kind, the CLI command, the run spec key).
        version: bump when the stage computes something different from the same inputs and config.
        config_model: the frozen pydantic config.
        resources: the engine and the CPUs/GPUs of one unit of work.
        engine_keys: config keys that choose where work runs, not what it computes (kept out of the cache key).
        key_inputs: the inputs that enter the cache key (None: all). The others are recorded for lineage only, where
            a narrower input covers what the stage reads (clean keys on the catalog's ``audio_files`` table and
            records the whole ``catalog`` version it read).
        reads: names of the inputs, as :meth:`inputs` returns them; writes: names of the outputs.
    """

    name: ClassVar[str]
    version: ClassVar[str] = "1"
    config_model: ClassVar[type[BaseModel]]
    resources: ClassVar[Resources] = Resources()
    engine_keys: ClassVar[tuple[str, ...]] = ()
    key_inputs: ClassVar[tuple[str, ...] | None] = None
    reads: ClassVar[tuple[str, ...]] = ()
    writes: ClassVar[tuple[str, ...]] = ()

    def inputs(self, ctx: StageContext, config: Any) -> dict[str, str]:
        """Content ids of what the stage reads (name → id); validates them. Runs before any Run is registered.

        Raises:
            FileNotFoundError, ValueError: an input is missing or unusable (the message says which and the fix).
        """
        return {}

    @abstractmethod
    def run(self, ctx: StageContext, config: Any) -> StageOutput:
        """Do the work; the runner has registered the Run (``ctx.run_id``) and opened the engines."""

    def outputs_valid(self, run: Mapping[str, Any]) -> bool:
        """Whether a cached Run's outputs are still whole beyond what the runner checks (that every output path
        exists and every file output has its recorded sha256): a dataset's tars, an index's arrays, the audio a
        catalog points to. ``run`` is the Run row (``outputs``, ``output_ids``, ``counts``)."""
        return True

    def resolved_config(self, config: Any) -> dict[str, Any]:
        """The config as recorded and hashed (every field; subclasses add derived values)."""
        return json.loads(config.model_dump_json())

    def record(self, ctx: StageContext, config: Any) -> dict[str, Any]:
        """Facts recorded in the Run's config beside the resolved config, never hashed (the dataset a train run
        read, the Ray Train run it continues). ``ctx.run_id`` and ``ctx.inputs`` are set."""
        return {}

    def engine_config(self, config: Any) -> EngineConfig:
        """Engine settings a stage config carries for the command line (``address``, ``num_cpus``)."""
        values = {"ray_address": getattr(config, "address", None), "num_cpus": getattr(config, "num_cpus", None)}
        return EngineConfig(**{k: v for k, v in values.items() if v is not None})


def hashed_config(stage: Stage, config: Any) -> dict[str, Any]:
    """The resolved config without engine keys: what the config sha256 and the cache key are computed over."""
    return {k: v for k, v in stage.resolved_config(config).items() if k not in stage.engine_keys}


def cache_key(stage: Stage, config: Any, inputs: Mapping[str, str]) -> str:
    """sha256 over the stage's name and version, the code version, the config without engine keys, and the inputs
    named in ``stage.key_inputs`` (all by default)."""
    keyed = {k: v for k, v in inputs.items() if stage.key_inputs is None or k in stage.key_inputs}
    return records.sha256_hex(records.canonical_json({
        "stage": stage.name, "version": stage.version, "code_version": code_version(),
        "config": hashed_config(stage, config), "inputs": dict(sorted(keyed.items())),
    }))


def config_sha256(stage: Stage, config: Any) -> str:
    """sha256 of the resolved config without engine keys (written next to every output)."""
    return records.sha256_hex(records.canonical_json(hashed_config(stage, config)))


def workspace_lock(workspace: Workspace) -> str:
    """The name of a workspace's lock in the lineage store (several workspaces may share a PostgreSQL store)."""
    return f"workspace:{workspace.root}"


def run_stage(stage: Stage, workspace: Workspace, config: Any, *, engine: Engine | None = None,
              progress: Progress | None = None, status: Status | None = None,
              select: Mapping[str, str | None] | None = None, options: Mapping[str, Any] | None = None,
              parent_run_id: str | None = None, force: bool = False, lock: HeldLock | None = None) -> StageResult:
    """Run ``stage`` with ``config`` on ``workspace`` through the contract (see the module docstring).

    Args:
        engine: the run's engines; None: this call opens them from the config's engine keys and closes them.
        progress: ``progress(phase, done, total)`` callbacks; status: one-line status messages.
        select: which upstream outputs the stage reads (``{"dataset": id}``; default the newest).
        options: run controls outside the cache key (see :class:`StageContext`).
        parent_run_id: the whole run this stage belongs to (``linernotes run``), recorded on the Run.
        force: run even when a cached result exists.
        lock: the workspace lock the caller holds (a whole run's, or ``ctx.lock`` of the stage that runs this one);
            None: this call takes it, as the stage's run id, for as long as it runs (a lock whose holder's process is
            gone is taken over), and refuses at once when another holder has it.

    Returns:
        The result; ``status`` is ``cached`` when an earlier Run with the same cache key still has its outputs.

    Raises:
        provenance.locks.LockHeld: another holder (a ``linernotes run``, another stage) has the workspace lock; the
            message names its run id. Nothing is registered.
        ValueError: ``lock`` is another workspace's lock.
        Whatever the stage's ``inputs`` or ``run`` raise; a Run registered before the error is marked ``failed``.
    """
    own_engine = engine is None
    engine = engine or Engine(stage.engine_config(config))
    workspace.ensure()
    run_id = new_run_id(stage.name)  # the lock's holder, and the Run's id when the stage runs
    try:
        with LineageStore(workspace.store_url) as store, _hold_workspace(store, workspace, run_id, lock) as held:
            store.mark_interrupted()  # Runs whose process was killed are `interrupted`, never left `running`
            ctx = StageContext(workspace, store, engine, progress, status, dict(select or {}), dict(options or {}),
                               lock=held)
            if held is not lock and held.taken_over is not None:
                ctx.say(f"took the workspace over from {held.taken_over[0].describe()}: {held.taken_over[1]}")
            inputs = stage.inputs(ctx, config)
            key = cache_key(stage, config, inputs)
            if not force and (cached := _cached_result(store, stage, key, workspace)) is not None:
                ctx.say(f"{stage.name}: cached (run {cached.run_id})")
                result = cached
            else:
                result = _run(stage, ctx, config, inputs, key, parent_run_id, run_id)
            if "catalog" in result.output_ids:  # a stage that commits a catalog version makes it the latest
                advance_catalog(workspace, result.output_ids["catalog"])
            return result
    finally:
        if own_engine:
            engine.close()


@contextmanager
def _hold_workspace(store: LineageStore, workspace: Workspace, run_id: str,
                    held: HeldLock | None) -> Iterator[HeldLock]:
    """The workspace lock for one stage: ``held`` (the caller's) as it is, else taken as ``run_id`` for the block."""
    name = workspace_lock(workspace)
    if held is not None:
        if held.info.name != name:
            raise ValueError(f"run_stage got the lock {held.info.name!r}, not this workspace's {name!r}: pass the "
                             f"lock of the workspace the stage runs on")
        yield held
        return
    with store.lock(name, run_id) as taken:
        yield taken


@dataclass
class StagePlan:
    """What :func:`run_stage` would do: ``cached`` (and the cached result) or ``run``, and why."""

    stage: str
    status: str  # cached | run
    why: str
    inputs: dict[str, str]
    cached: StageResult | None = None


def plan_stage(stage: Stage, workspace: Workspace, config: Any, *, store: LineageStore, engine: Engine,
               select: Mapping[str, str | None] | None = None) -> StagePlan:
    """Resolve ``stage``'s inputs and cache key, and say whether :func:`run_stage` would run it; does no work.

    ``why`` names what differs from the stage's newest succeeded Run: the config keys, the inputs, the code version,
    or outputs that are gone.

    Raises:
        Whatever the stage's ``inputs`` raise (a missing upstream output: run the stage before it).
    """
    ctx = StageContext(workspace, store, engine, select=dict(select or {}))
    inputs = stage.inputs(ctx, config)
    key = cache_key(stage, config, inputs)
    cached = _cached_result(store, stage, key, workspace)
    if cached is not None:
        return StagePlan(stage.name, CACHED, f"run {cached.run_id} has this cache key and its outputs", inputs,
                         cached)
    return StagePlan(stage.name, "run", _why_run(store, stage, config, inputs, key), inputs)


def _why_run(store: LineageStore, stage: Stage, config: Any, inputs: Mapping[str, str], key: str) -> str:
    finished = [run for run in store.list_runs(stage.name) if run["status"] == "succeeded"]
    if not finished:
        return "no earlier run"
    last = finished[-1]
    if last.get("cache_key") == key:
        return f"the outputs of run {last['run_id']} are gone or changed"
    now, before = hashed_config(stage, config), last.get("config") or {}
    keys = sorted(k for k, v in now.items() if before.get(k) != v)
    was = last.get("inputs") or {}
    changed = sorted(k for k, v in inputs.items() if (stage.key_inputs is None or k in stage.key_inputs)
                     and was.get(k) != v)
    reasons = ([f"config {', '.join(keys)} changed"] if keys else []) + (
        [f"input {', '.join(changed)} changed"] if changed else [])
    return (" and ".join(reasons) or "the code version changed") + f" since run {last['run_id']}"


def _run(stage: Stage, ctx: StageContext, config: Any, inputs: dict[str, str], key: str,
         parent_run_id: str | None, run_id: str) -> StageResult:
    resolved = stage.resolved_config(config)
    sha = config_sha256(stage, config)
    ctx.inputs, ctx.run_id = inputs, run_id
    ctx.run_dir = ctx.workspace.run_dir(ctx.run_id)
    extras = stage.record(ctx, config)
    with ctx.store.run(stage.name, {**resolved, **extras, "config_sha256": sha}, run_id=ctx.run_id, cache_key=key,
                       inputs=inputs, parent_run_id=parent_run_id, spec_sha256=sha) as run:
        records.write_json({"stage": stage.name, "version": stage.version, "config": resolved, "config_sha256": sha,
                            "cache_key": key, "inputs": inputs, "engine": ctx.engine.describe()},
                           ctx.run_dir / "config.json", default=str)
        output = stage.run(ctx, config)
        summary_path = ctx.run_dir / "summary.json"
        outputs = {**output.outputs, "summary": str(summary_path)}
        ids = {**output.output_ids}
        result = StageResult(stage.name, run.run_id, RAN, inputs, outputs, output.counts, ids, output.details)
        records.write_json(result.to_json(), summary_path, default=str)
        ids.update({name: "sha256:" + records.file_sha256(path) for name, path in outputs.items()
                    if name not in ids and Path(path).is_file()})
        run.counts, run.outputs, run.output_ids, run.status = output.counts, outputs, ids, output.status
    return StageResult(stage.name, run.run_id, RAN, inputs, outputs, output.counts, output.output_ids, output.details)


def _cached_result(store: LineageStore, stage: Stage, key: str, workspace: Workspace) -> StageResult | None:
    """The result of the newest succeeded Run with ``key``, when its outputs are still whole: every path exists, every
    file has the sha256 recorded when it was written, and the stage's own check (``outputs_valid``) passes."""
    run = store.find_cached_run(stage.name, key)
    if run is None:
        return None
    outputs, ids = run.get("outputs") or {}, run.get("output_ids") or {}
    for name, path in outputs.items():
        if not Path(path).exists():
            return None
        digest = ids.get(name, "")
        if digest.startswith("sha256:") and (not Path(path).is_file() or records.file_sha256(path) != digest[7:]):
            return None
    if "catalog" in ids and not (catalogs_dir(workspace) / ids["catalog"]).is_dir():
        return None
    if not stage.outputs_valid(run):
        return None
    summary = json.loads(Path(outputs["summary"]).read_text()) if "summary" in outputs else {}
    common = {"stage", "run_id", "status", "inputs", "outputs", "output_ids", "counts"}
    details = {k: v for k, v in summary.items() if k not in common}
    stage_ids = {k: v for k, v in ids.items() if not v.startswith("sha256:")}
    return StageResult(stage.name, run["run_id"], CACHED, run.get("inputs") or {}, outputs, run.get("counts") or {},
                       stage_ids, details)


# the registry ---------------------------------------------------------------------------------------------

#: Every stage on the contract, in chain order: name → ``module:attribute`` of its Stage instance (imported on use,
#: so listing names costs nothing).
STAGES: dict[str, str] = {
    "ingest": "pipelines.stages.ingest.stage:INGEST_STAGE",
    "separate": "pipelines.stages.separate:SEPARATE",
    "clean": "pipelines.stages.clean:CLEAN",
    "shard": "pipelines.stages.shard.stage:SHARD",
    "train": "pipelines.stages.train:TRAIN",
    "index": "pipelines.attribution.stage:INDEX",
    "generate": "pipelines.stages.generate:GENERATE",
    "attribute": "pipelines.attribution.attribute:ATTRIBUTE",
    "evaluate": "pipelines.stages.evaluate:EVALUATE",
    "variations": "pipelines.stages.evaluate:VARIATIONS",
    "takedown": "pipelines.stages.takedown:TAKEDOWN",
}


def get_stage(name: str) -> Stage:
    """The Stage named ``name``.

    Raises:
        KeyError: no stage has that name (the message lists the stages).
    """
    if name not in STAGES:
        raise KeyError(f"no stage {name!r}; the stages are {', '.join(STAGES)}")
    module, _, attribute = STAGES[name].partition(":")
    return getattr(importlib.import_module(module), attribute)


def describe_stage(stage: Stage) -> dict[str, Any]:
    """A stage as ``linernotes stages`` shows it: reads, writes, resources, and the JSON Schema of its config."""
    return {"stage": stage.name, "version": stage.version, "reads": list(stage.reads), "writes": list(stage.writes),
            "resources": stage.resources.model_dump(), "engine_keys": list(stage.engine_keys),
            "config_schema": stage.config_model.model_json_schema()}
