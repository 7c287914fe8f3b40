"""The lineage store: runs, datasets, checkpoints, generations and attributions, linked by id.

SQLite by default (a file in the workspace), any SQLAlchemy URL otherwise (PostgreSQL). Bulk tables stay
in Parquet; the store holds the records that link them and the paths of the Parquet files each run wrote.
It also holds the workspace lock (:meth:`LineageStore.lock`, :mod:`provenance.locks`), and knows which process runs
each Run (pid, host, boot id, start tick: :mod:`provenance.process`), so a Run whose process was killed is marked
``interrupted`` (:meth:`LineageStore.mark_interrupted`), and so are the Runs of a lock holder whose lock is taken
over.

The tables, and creating and migrating them, live in :mod:`provenance.schema`; they are re-exported here.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import logging
import os
import secrets
import subprocess
from collections.abc import Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from importlib import metadata as package_metadata
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from provenance.locks import HEARTBEAT_S, LOCK_STALE_S, HeldLock, LockInfo, hold_lock, read_lock
from provenance.process import ProcessIdentity, this_process, why_gone
from provenance.records import canonical_json, sha256_hex
from provenance.schema import (  # the tables and OPT_OUT_KINDS are still imported from here too
    OPT_OUT_KINDS,
    attributions,
    checkpoints,
    create_schema,
    dataset_parents,
    dataset_tracks,
    datasets,
    generations,
    opt_outs,
    runs,
)
from provenance.schema import metadata as metadata

log = logging.getLogger(__name__)

#: the commit of code that is not a git checkout, for :func:`code_version`
GIT_COMMIT_ENV = "LINERNOTES_GIT_COMMIT"


@functools.cache
def code_version() -> str:
    """The installed package's version, plus ``+g<commit>`` (12 hex digits) when the code is a git checkout, else
    the commit ``$LINERNOTES_GIT_COMMIT`` names (code that is no checkout: an image built with ``--build-arg
    GIT_COMMIT``, the packages ``linernotes submit --working-dir`` ships to a Ray job).

    Part of every stage's cache key, so a new commit re-runs what it may compute differently. A checkout with
    uncommitted changes still reports its last commit: the key names code, not edits.
    """
    try:
        version = package_metadata.version("linernotes")
    except package_metadata.PackageNotFoundError:
        version = "0+unknown"
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    commit = commit or os.environ.get(GIT_COMMIT_ENV, "").strip()[:12]
    return f"{version}+g{commit}" if commit else version


_RUN_JSON = ("counts", "outputs", "config", "inputs", "output_ids")  # the ``runs`` columns that hold JSON


def utc_now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def new_run_id(kind: str) -> str:
    """``{kind}-{UTC timestamp}-{6 random hex}``: sortable by start time, unique across machines."""
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{kind}-{stamp}-{secrets.token_hex(3)}"


class LineageStore:
    """Lineage records in a SQL database (SQLAlchemy Core).

    Args:
        url: SQLAlchemy URL, e.g. ``sqlite:////abs/path/lineage.sqlite`` or ``postgresql+psycopg://...``.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = sa.create_engine(url, future=True)
        create_schema(self.engine)

    def __enter__(self) -> "LineageStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _begin(self) -> Iterator[sa.Connection]:
        with self.engine.begin() as connection:
            yield connection

    def close(self) -> None:
        self.engine.dispose()

    # runs -------------------------------------------------------------------------------------------
    def start_run(self, kind: str, config: Mapping[str, Any], run_id: str | None = None, *,
                  cache_key: str | None = None, inputs: Mapping[str, str] | None = None,
                  parent_run_id: str | None = None, spec_sha256: str | None = None) -> str:
        """Register a run as ``running``; returns its id. ``config`` is the resolved stage config as recorded;
        ``spec_sha256`` its hash (default: of ``config``; the runner passes the hash of the config alone, without
        what it records beside it).

        Prefer :meth:`run`, which cannot leave the run ``running``."""
        run_id = run_id or new_run_id(kind)
        config_json = canonical_json(config)
        me = this_process()
        with self._begin() as c:
            c.execute(runs.insert().values(
                run_id=run_id, kind=kind, spec_sha256=spec_sha256 or sha256_hex(config_json), config=config_json,
                code_version=code_version(), status="running", started_at=utc_now(), cache_key=cache_key,
                inputs=canonical_json(dict(inputs or {})), parent_run_id=parent_run_id, pid=me.pid,
                hostname=me.hostname, boot_id=me.boot_id, process_start_ticks=me.process_start_ticks,
            ))
        return run_id

    def finish_run(self, run_id: str, counts: Mapping[str, Any], outputs: Mapping[str, Any] | None = None,
                   status: str = "succeeded", error: str | None = None,
                   output_ids: Mapping[str, str] | None = None) -> None:
        with self._begin() as c:
            c.execute(runs.update().where(runs.c.run_id == run_id).values(
                status=status, finished_at=utc_now(), counts=canonical_json(counts),
                outputs=canonical_json(outputs or {}), error=error, output_ids=canonical_json(dict(output_ids or {})),
            ))

    @contextmanager
    def run(self, kind: str, config: Mapping[str, Any], *, run_id: str | None = None, cache_key: str | None = None,
            inputs: Mapping[str, str] | None = None, parent_run_id: str | None = None,
            spec_sha256: str | None = None) -> Iterator["RunRecord"]:
        """A Run for the ``with`` block: registered ``running``; when the block ends, ``record.status``
        (``succeeded``, or ``stopped`` for work that stopped on purpose and can be resumed) with what the block put
        on the yielded record (``counts``, ``outputs``, ``output_ids``); ``failed`` with ``"ErrorType: message"``
        when it raises (KeyboardInterrupt included), and the error propagates."""
        record = RunRecord(self.start_run(kind, config, run_id, cache_key=cache_key, inputs=inputs,
                                          parent_run_id=parent_run_id, spec_sha256=spec_sha256))
        try:
            yield record
        except BaseException as err:
            self.finish_run(record.run_id, record.counts, record.outputs, status="failed",
                            error=f"{type(err).__name__}: {err}", output_ids=record.output_ids)
            raise
        self.finish_run(record.run_id, record.counts, record.outputs, status=record.status,
                        output_ids=record.output_ids)

    def mark_interrupted(self) -> list[dict[str, Any]]:
        """Mark ``interrupted`` every ``running`` Run of this host whose process is gone (killed, crashed), with
        ``finished_at`` now and the error ``"interrupted: process P is gone"`` (and what gave it away when the pid is
        in use again: another boot id or start tick, see :func:`provenance.process.why_gone`); returns those Runs,
        oldest first.

        The stage runner calls it at start, so no Run stays ``running`` after its process died. Runs of another host
        (their process cannot be checked from here: a takeover of their lock marks them, :meth:`lock`) and Runs
        recorded before pids were (no ``pid``) are left alone. A Run recorded before boot ids and start ticks were is
        checked by its pid alone. Each Run is updated only while still ``running``, so a Run that finishes meanwhile
        keeps its result.
        """
        r = runs.c
        query = (sa.select(r.run_id, r.pid, r.hostname, r.boot_id, r.process_start_ticks)
                 .where((r.status == "running") & (r.hostname == this_process().hostname) & r.pid.is_not(None))
                 .order_by(r.started_at))
        with self.engine.connect() as c:
            gone = [(row.run_id, why) for row in c.execute(query)
                    if (why := why_gone(ProcessIdentity(row.pid, row.hostname, row.boot_id,
                                                         row.process_start_ticks))) is not None]
        marked = []
        for run_id, why in gone:
            with self._begin() as c:
                updated = c.execute(runs.update().where((r.run_id == run_id) & (r.status == "running"))
                                    .values(status="interrupted", finished_at=utc_now(),
                                            error=f"interrupted: {why}")).rowcount
            if updated:
                marked.append(self.get_run(run_id))
        return marked

    def find_cached_run(self, kind: str, cache_key: str) -> dict[str, Any] | None:
        """The newest ``succeeded`` run of ``kind`` with ``cache_key``, or None (a ``running``, ``stopped``,
        ``failed`` or ``interrupted`` Run is never a cached result)."""
        query = (sa.select(runs).where((runs.c.kind == kind) & (runs.c.cache_key == cache_key)
                                       & (runs.c.status == "succeeded"))
                 .order_by(runs.c.started_at.desc()).limit(1))
        with self.engine.connect() as c:
            row = c.execute(query).first()
        return None if row is None else self._decode(dict(row._mapping), _RUN_JSON)

    def get_run(self, run_id: str) -> dict[str, Any] | None:
        return self._one(runs, runs.c.run_id == run_id, json_fields=_RUN_JSON)

    def list_runs(self, kind: str | None = None) -> list[dict[str, Any]]:
        query = sa.select(runs).order_by(runs.c.started_at)
        if kind:
            query = query.where(runs.c.kind == kind)
        with self.engine.connect() as c:
            return [self._decode(dict(r._mapping), _RUN_JSON) for r in c.execute(query)]

    # the workspace lock ------------------------------------------------------------------------------
    def lock(self, name: str, holder: str, *, wait: bool = False, timeout_s: float | None = None,
             poll_s: float = 0.5, stale_s: float = LOCK_STALE_S,
             heartbeat_s: float = HEARTBEAT_S) -> AbstractContextManager[HeldLock]:
        """Hold the lock ``name`` (``"workspace"`` keeps two runs off one workspace) as ``holder`` (a run id) for a
        ``with`` block: taken atomically, released on exit (also on an error), its heartbeat refreshed by a
        background thread meanwhile. A lock whose holder's process is gone (this host: pid, boot id and start tick),
        or whose heartbeat is older than ``stale_s`` (any host), is taken over; in the same transaction the
        abandoned holder's Run and its ``running`` descendants (``parent_run_id``) are marked ``interrupted`` with
        why (``"interrupted: process P is gone"``, ``"interrupted: lock taken over: no heartbeat for N s"``), which
        :meth:`mark_interrupted` cannot do for a process of another host. See :mod:`provenance.locks` for how, and
        its limits.

        Args:
            wait: poll every ``poll_s`` seconds until the lock is free, at most ``timeout_s`` seconds (None: no limit);
                False: refuse at once.

        Raises:
            LockHeld: a live holder has the lock; the message names its run id, pid, host and since when.
        """
        return hold_lock(self.engine, name, holder, wait=wait, timeout_s=timeout_s, poll_s=poll_s, stale_s=stale_s,
                         heartbeat_s=heartbeat_s, on_takeover=_interrupt_abandoned)

    def lock_holder(self, name: str) -> LockInfo | None:
        """Who holds the lock ``name`` now (None: free). A holder whose process is gone still shows until the next
        :meth:`lock` takes it over."""
        return read_lock(self.engine, name)

    # datasets ---------------------------------------------------------------------------------------
    def add_dataset(self, record: Mapping[str, Any], track_segments: Mapping[str, int]) -> None:
        """Register a Dataset (idempotent: re-registering the same id keeps the first record)."""
        with self._begin() as c:
            exists = c.execute(sa.select(datasets.c.dataset_id).where(
                datasets.c.dataset_id == record["dataset_id"])).first()
            if exists:
                return
            c.execute(datasets.insert().values(**_pick(datasets, record), created_at=utc_now()))
            if track_segments:
                c.execute(dataset_tracks.insert(), [
                    {"dataset_id": record["dataset_id"], "track_id": t, "num_segments": int(n)}
                    for t, n in sorted(track_segments.items())
                ])

    def get_dataset(self, dataset_id: str) -> dict[str, Any] | None:
        return self._one(datasets, datasets.c.dataset_id == dataset_id)

    def latest_dataset(self) -> dict[str, Any] | None:
        return self._latest(datasets)

    def datasets_with_track(self, track_id: str) -> list[str]:
        with self.engine.connect() as c:
            return [r[0] for r in c.execute(sa.select(dataset_tracks.c.dataset_id)
                                            .where(dataset_tracks.c.track_id == track_id))]

    # checkpoints ------------------------------------------------------------------------------------
    def add_checkpoint(self, record: Mapping[str, Any]) -> None:
        with self._begin() as c:
            c.execute(checkpoints.insert().values(**_pick(checkpoints, record), created_at=utc_now()))

    def get_checkpoint(self, checkpoint_id: str) -> dict[str, Any] | None:
        return self._one(checkpoints, checkpoints.c.checkpoint_id == checkpoint_id)

    def latest_checkpoint(self) -> dict[str, Any] | None:
        return self._latest(checkpoints)

    # generations ------------------------------------------------------------------------------------
    def add_generation(self, record: Mapping[str, Any]) -> None:
        with self._begin() as c:
            c.execute(generations.insert().values(**_pick(generations, record), created_at=utc_now()))

    def get_generation(self, generation_id: str) -> dict[str, Any] | None:
        return self._one(generations, generations.c.generation_id == generation_id)

    # attributions -----------------------------------------------------------------------------------
    def add_attributions(self, generation_id: str, method: str, run_id: str, dataset_id: str,
                         rows: list[Mapping[str, Any]]) -> None:
        """Store one query's ranked segments, replacing an earlier result for the same query and method.

        ``generation_id`` is the Attribution key: a Generation's id, or the id of an attributed audio file.
        """
        with self._begin() as c:
            c.execute(attributions.delete().where(
                (attributions.c.generation_id == generation_id) & (attributions.c.method == method)))
            if rows:
                c.execute(attributions.insert(), [
                    {"generation_id": generation_id, "method": method, "run_id": run_id, "dataset_id": dataset_id,
                     **{k: row[k] for k in ("segment_id", "rank", "score", "track_id", "rights_holder", "share")}}
                    for row in rows
                ])

    def get_attributions(self, generation_id: str, method: str | None = None) -> list[dict[str, Any]]:
        query = sa.select(attributions).where(attributions.c.generation_id == generation_id)
        if method:
            query = query.where(attributions.c.method == method)
        with self.engine.connect() as c:
            return [dict(r._mapping) for r in c.execute(query.order_by(attributions.c.method, attributions.c.rank))]

    # opt-outs ---------------------------------------------------------------------------------------
    def add_opt_out(self, kind: str, value: str, reason: str = "") -> bool:
        """Register an opt-out (idempotent); returns False when it was already registered.

        Raises:
            ValueError: ``kind`` is not one of ``rights_holder``, ``track_id``, ``isrc``, or ``value`` is empty.
        """
        if kind not in OPT_OUT_KINDS:
            raise ValueError(f"opt-out kind {kind!r} is not one of {', '.join(OPT_OUT_KINDS)}")
        if not value.strip():
            raise ValueError("opt-out value is empty")
        with self._begin() as c:
            if c.execute(sa.select(opt_outs.c.kind).where((opt_outs.c.kind == kind) &
                                                          (opt_outs.c.value == value))).first():
                return False
            c.execute(opt_outs.insert().values(kind=kind, value=value, reason=reason, added_at=utc_now()))
        return True

    def list_opt_outs(self) -> list[dict[str, Any]]:
        with self.engine.connect() as c:
            return [dict(r._mapping) for r in c.execute(sa.select(opt_outs).order_by(opt_outs.c.kind,
                                                                                      opt_outs.c.value))]

    # lineage walks ----------------------------------------------------------------------------------
    def list_datasets(self) -> list[dict[str, Any]]:
        """Every Dataset, oldest first."""
        return self._all(sa.select(datasets).order_by(datasets.c.created_at, datasets.c.dataset_id))

    def dataset_track_segments(self, dataset_id: str) -> dict[str, int]:
        """``{track_id: num_segments}`` of one dataset (empty for an unknown id)."""
        query = (sa.select(dataset_tracks.c.track_id, dataset_tracks.c.num_segments)
                 .where(dataset_tracks.c.dataset_id == dataset_id).order_by(dataset_tracks.c.track_id))
        with self.engine.connect() as c:
            return {r[0]: int(r[1]) for r in c.execute(query)}

    def datasets_with_tracks(self, track_ids: Iterable[str]) -> dict[str, list[str]]:
        """``{dataset_id: [track_id, ...]}`` for the datasets holding any of ``track_ids`` (ids sorted)."""
        wanted = sorted(set(track_ids))
        found: dict[str, list[str]] = {}
        with self.engine.connect() as c:
            for chunk in _chunks(wanted):
                query = (sa.select(dataset_tracks.c.dataset_id, dataset_tracks.c.track_id)
                         .where(dataset_tracks.c.track_id.in_(chunk)))
                for dataset_id, track_id in c.execute(query):
                    found.setdefault(dataset_id, []).append(track_id)
        return {d: sorted(t) for d, t in sorted(found.items())}

    def checkpoints_of_datasets(self, dataset_ids: Iterable[str]) -> list[dict[str, Any]]:
        """Checkpoints trained on any of ``dataset_ids``, oldest first."""
        ids = sorted(set(dataset_ids))
        return self._all(sa.select(checkpoints).where(checkpoints.c.dataset_id.in_(ids))
                         .order_by(checkpoints.c.created_at, checkpoints.c.checkpoint_id)) if ids else []

    def generations_of_checkpoints(self, checkpoint_ids: Iterable[str]) -> list[dict[str, Any]]:
        """Generations sampled from any of ``checkpoint_ids``, oldest first."""
        ids = sorted(set(checkpoint_ids))
        return self._all(sa.select(generations).where(generations.c.checkpoint_id.in_(ids))
                         .order_by(generations.c.created_at, generations.c.generation_id)) if ids else []

    def list_generations(self) -> list[dict[str, Any]]:
        """Every Generation, oldest first."""
        return self._all(sa.select(generations).order_by(generations.c.created_at, generations.c.generation_id))

    def attributions_to_tracks(self, track_ids: Iterable[str]) -> list[dict[str, Any]]:
        """Stored attribution results that name any of ``track_ids``, aggregated per (query, method, track).

        Returns rows with ``generation_id`` (the Attribution key: a generation or an attributed file),
        ``method``, ``track_id``, ``rights_holder``, ``share`` (the track's summed segment shares, in [0, 1]),
        ``best_rank`` (its best segment's rank, 1 = first) and ``segments`` (how many of its segments ranked).
        """
        wanted = sorted(set(track_ids))
        rows: list[dict[str, Any]] = []
        a = attributions.c
        with self.engine.connect() as c:
            for chunk in _chunks(wanted):
                query = (sa.select(a.generation_id, a.method, a.track_id, sa.func.max(a.rights_holder),
                                   sa.func.sum(a.share), sa.func.min(a.rank), sa.func.count())
                         .where(a.track_id.in_(chunk)).group_by(a.generation_id, a.method, a.track_id))
                rows.extend({"generation_id": r[0], "method": r[1], "track_id": r[2], "rights_holder": r[3],
                             "share": float(r[4]), "best_rank": int(r[5]), "segments": int(r[6])}
                            for r in c.execute(query))
        return sorted(rows, key=lambda r: (r["generation_id"], r["method"], -r["share"], r["track_id"]))

    def add_dataset_parent(self, dataset_id: str, parent_dataset_id: str, run_id: str, reason: str) -> None:
        """Record that ``dataset_id`` was derived from ``parent_dataset_id`` (idempotent)."""
        with self._begin() as c:
            key = ((dataset_parents.c.dataset_id == dataset_id)
                   & (dataset_parents.c.parent_dataset_id == parent_dataset_id))
            if c.execute(sa.select(dataset_parents.c.dataset_id).where(key)).first():
                return
            c.execute(dataset_parents.insert().values(dataset_id=dataset_id, parent_dataset_id=parent_dataset_id,
                                                      run_id=run_id, reason=reason, created_at=utc_now()))

    def dataset_parents(self, dataset_id: str) -> list[dict[str, Any]]:
        """The datasets ``dataset_id`` was derived from (with the run and reason)."""
        return self._all(sa.select(dataset_parents).where(dataset_parents.c.dataset_id == dataset_id)
                         .order_by(dataset_parents.c.created_at))

    def dataset_children(self, dataset_id: str) -> list[dict[str, Any]]:
        """The dataset versions derived from ``dataset_id``."""
        return self._all(sa.select(dataset_parents).where(dataset_parents.c.parent_dataset_id == dataset_id)
                         .order_by(dataset_parents.c.created_at))

    def _all(self, query: Any) -> list[dict[str, Any]]:
        with self.engine.connect() as c:
            return [dict(r._mapping) for r in c.execute(query)]

    # helpers ----------------------------------------------------------------------------------------
    def _one(self, table: sa.Table, where: Any, json_fields: tuple[str, ...] = ()) -> dict[str, Any] | None:
        with self.engine.connect() as c:
            row = c.execute(sa.select(table).where(where)).first()
        return None if row is None else self._decode(dict(row._mapping), json_fields)

    def _latest(self, table: sa.Table) -> dict[str, Any] | None:
        with self.engine.connect() as c:
            row = c.execute(sa.select(table).order_by(table.c.created_at.desc()).limit(1)).first()
        return None if row is None else dict(row._mapping)

    @staticmethod
    def _decode(row: dict[str, Any], json_fields: tuple[str, ...]) -> dict[str, Any]:
        for name in json_fields:
            if row.get(name):
                row[name] = json.loads(row[name])
        return row


@dataclass
class RunRecord:
    """What a running stage reports back to :meth:`LineageStore.run`: set its fields inside the block."""

    run_id: str
    counts: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, Any] = field(default_factory=dict)
    output_ids: dict[str, str] = field(default_factory=dict)
    status: str = "succeeded"


def _interrupt_abandoned(connection: sa.Connection, abandoned: LockInfo, why: str) -> list[str]:
    """Mark ``interrupted`` the ``running`` Runs of a lock holder that abandoned its lock: the holder's Run and its
    descendants (``parent_run_id``, any depth), on ``connection`` (the takeover's transaction). The error says why:
    ``"interrupted: process P is gone"`` when its process is known gone, else ``"interrupted: lock taken over: no
    heartbeat for N s"``. Returns the ids marked, sorted."""
    tree, frontier = {abandoned.holder}, {abandoned.holder}
    while frontier:
        children = {row[0] for chunk in _chunks(sorted(frontier)) for row in connection.execute(
            sa.select(runs.c.run_id).where(runs.c.parent_run_id.in_(chunk)))}
        frontier = children - tree
        tree |= frontier
    error = f"interrupted: {why}" if why.startswith("process ") else f"interrupted: lock taken over: {why}"
    marked = []
    for chunk in _chunks(sorted(tree)):
        running = (runs.c.run_id.in_(chunk)) & (runs.c.status == "running")
        ids = [row[0] for row in connection.execute(sa.select(runs.c.run_id).where(running))]
        connection.execute(runs.update().where(running).values(status="interrupted", finished_at=utc_now(),
                                                                error=error))
        marked.extend(ids)
    if marked:
        log.warning("lock %r taken over from %s: marked %s %s", abandoned.name, abandoned.describe(),
                    ", ".join(sorted(marked)), error)
    return sorted(marked)


def _chunks(values: list[str], size: int = 500) -> Iterator[list[str]]:
    """Slices of at most ``size`` values, so an ``IN (...)`` stays under SQLite's parameter limit."""
    for start in range(0, len(values), size):
        yield values[start:start + size]


def _pick(table: sa.Table, record: Mapping[str, Any]) -> dict[str, Any]:
    return {c.name: record[c.name] for c in table.columns if c.name in record and c.name != "created_at"}
