"""The workspace lock and interrupted Runs, on both backends (SQLite file, PostgreSQL server), with real processes:
a second holder is refused with the first named, or waits for it; a lock whose holder was SIGKILLed is taken over;
no two holders ever hold it at once; a Run whose process was SIGKILLed is marked ``interrupted``, never cached."""

from __future__ import annotations

import datetime as dt
import multiprocessing
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from provenance.locks import LockHeld, locks
from provenance.store import LineageStore, runs
from tests.provenance import lock_workers

SPAWN = multiprocessing.get_context("spawn")  # a fresh interpreter: no engine or connection shared with pytest
START_S = 60.0  # how long a child may take to start and take the lock (2 busy cores)


@pytest.fixture
def store(store_url: str) -> Iterator[LineageStore]:
    store = LineageStore(store_url)
    yield store
    store.close()


@pytest.fixture
def spawn() -> Iterator[Callable[..., multiprocessing.Process]]:
    """Start ``target(*args)`` in a child process; children still alive at the end are killed and reaped."""
    children: list[multiprocessing.Process] = []

    def start(target: Callable[..., None], *args: object) -> multiprocessing.Process:
        child = SPAWN.Process(target=target, args=args, daemon=True)
        child.start()
        children.append(child)
        return child

    yield start
    for child in children:
        if child.is_alive():
            os.kill(child.pid, signal.SIGKILL)
        child.join(30)


def test_second_holder_is_refused_with_the_first_named_or_waits_for_it(store, store_url, spawn) -> None:
    acquired, release = SPAWN.Event(), SPAWN.Event()
    child = spawn(lock_workers.hold, store_url, "workspace", "run-a", acquired, release)
    assert acquired.wait(START_S)

    with pytest.raises(LockHeld) as refused:
        with store.lock("workspace", "run-b"):
            pytest.fail("two holders at once")
    message = str(refused.value)
    assert message.startswith(f"the workspace is in use by run run-a (pid {child.pid} on {socket.gethostname()} "
                              f"since {refused.value.info.acquired_at}): wait with --wait, or stop it")
    assert refused.value.info.holder == "run-a" and refused.value.waited_s is None

    started = time.monotonic()
    with pytest.raises(LockHeld, match="still in use by run run-a .* after waiting"):
        with store.lock("workspace", "run-b", wait=True, timeout_s=0.5, poll_s=0.1):
            pytest.fail("two holders at once")
    assert time.monotonic() - started >= 0.5

    threading.Timer(1.0, release.set).start()  # the first holder lets go while we wait
    started = time.monotonic()
    with store.lock("workspace", "run-b", wait=True, timeout_s=START_S, poll_s=0.05):
        assert time.monotonic() - started >= 1.0
        assert store.lock_holder("workspace").holder == "run-b"
    child.join(START_S)
    assert child.exitcode == 0
    assert store.lock_holder("workspace") is None  # released on exit


def test_lock_is_released_when_the_block_raises(store) -> None:
    with pytest.raises(KeyError):
        with store.lock("workspace", "run-a"):
            raise KeyError("boom")
    assert store.lock_holder("workspace") is None
    with store.lock("workspace", "run-b"):
        pass


def test_lock_of_a_sigkilled_process_is_taken_over(store, store_url, spawn) -> None:
    acquired = SPAWN.Event()
    child = spawn(lock_workers.hold_until_killed, store_url, "workspace", "run-a", acquired)
    assert acquired.wait(START_S)
    with pytest.raises(LockHeld, match="run run-a"):  # alive: not taken over
        with store.lock("workspace", "run-b"):
            pytest.fail("two holders at once")

    os.kill(child.pid, signal.SIGKILL)
    # Not reaped yet (a zombie until join): it is as gone as a reaped process. Waiting only covers the kill's delivery.
    with store.lock("workspace", "run-b", wait=True, timeout_s=10, poll_s=0.05):
        info = store.lock_holder("workspace")
        assert (info.holder, info.pid) == ("run-b", os.getpid())
    child.join(START_S)
    assert child.exitcode == -signal.SIGKILL


def test_no_two_holders_at_once(store_url, spawn, tmp_path: Path) -> None:
    """Two processes × 15 acquisitions, each appending a start line and an end line under the lock."""
    times, path, ready = 15, tmp_path / "log.txt", SPAWN.Barrier(2)
    children = [spawn(lock_workers.append_under_lock, store_url, "workspace", f"run-{k}", str(path), times, ready)
                for k in range(2)]
    for child in children:
        child.join(180)
        assert child.exitcode == 0
    lines = path.read_text().splitlines()
    assert len(lines) == 2 * 2 * times
    for start, end in zip(lines[::2], lines[1::2]):
        assert start.startswith("+") and end == "-" + start[1:], "two holders overlapped"
    assert sorted(lines[::2]) == sorted(f"+run-{k}:{i}" for k in range(2) for i in range(times))
    holders = [line.split(":")[0] for line in lines[::2]]
    assert sum(a != b for a, b in zip(holders, holders[1:])) >= 2, "the processes never took turns: no contention"


def _plant(store: LineageStore, hostname: str, pid: int, heartbeat_age_s: float) -> None:
    stamp = (dt.datetime.now(dt.UTC) - dt.timedelta(seconds=heartbeat_age_s)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    with store.engine.begin() as c:
        c.execute(locks.delete())
        c.execute(locks.insert().values(name="workspace", holder="run-old", pid=pid, hostname=hostname,
                                        acquired_at=stamp, heartbeat_at=stamp))


@pytest.mark.parametrize("hostname", ["another-host.example", "this host"])
def test_a_live_or_remote_holder_keeps_the_lock_until_its_heartbeat_is_stale(store, hostname) -> None:
    hostname = socket.gethostname() if hostname == "this host" else hostname
    live_pid = os.getppid()  # alive, and not this process
    _plant(store, hostname, live_pid, heartbeat_age_s=60)
    with pytest.raises(LockHeld, match=f"run run-old \\(pid {live_pid} on {hostname} since"):
        with store.lock("workspace", "run-new"):
            pytest.fail("a live holder's lock was taken")
    _plant(store, hostname, live_pid, heartbeat_age_s=11 * 60)  # stale: a remote holder gone, or a reused pid
    with store.lock("workspace", "run-new"):
        assert store.lock_holder("workspace").holder == "run-new"
    with store.lock("workspace", "run-new", stale_s=3600):  # the stale limit is the caller's
        pass


def test_heartbeat_refreshes_while_held_and_reports_a_lost_lock(store) -> None:
    with store.lock("workspace", "run-a", heartbeat_s=0.05) as held:
        first = store.lock_holder("workspace").heartbeat_at
        deadline = time.monotonic() + 10
        while store.lock_holder("workspace").heartbeat_at == first and time.monotonic() < deadline:
            time.sleep(0.05)
        assert store.lock_holder("workspace").heartbeat_at > first  # the background thread beat
        assert held.heartbeat() is True
        with store.engine.begin() as c:  # another holder took it over meanwhile
            c.execute(locks.update().values(holder="run-b"))
        assert held.heartbeat() is False
    assert store.lock_holder("workspace").holder == "run-b"  # the release left the new holder's row alone


def test_a_run_of_a_sigkilled_process_is_interrupted_and_never_cached(store, store_url, spawn) -> None:
    started = SPAWN.Queue()
    child = spawn(lock_workers.run_until_killed, store_url, started)
    killed = started.get(timeout=START_S)
    live = store.start_run("ingest", {}, cache_key="k")  # this process's own Run: alive
    remote = store.start_run("ingest", {}, cache_key="k")
    with store.engine.begin() as c:  # a Run of another host: its process cannot be checked from here
        c.execute(runs.update().where(runs.c.run_id == remote).values(hostname="another-host.example"))
    assert store.get_run(killed)["pid"] == child.pid
    assert store.mark_interrupted() == []  # every process still runs

    os.kill(child.pid, signal.SIGKILL)
    child.join(START_S)
    assert store.get_run(killed)["status"] == "running"  # nothing ran to finish it
    marked = store.mark_interrupted()
    assert [r["run_id"] for r in marked] == [killed]
    run = store.get_run(killed)
    assert run["status"] == "interrupted" and run["error"] == f"interrupted: process {child.pid} is gone"
    assert run["finished_at"] >= run["started_at"] and run["hostname"] == socket.gethostname()
    assert {store.get_run(r)["status"] for r in (live, remote)} == {"running"}
    assert store.find_cached_run("ingest", "k") is None
    assert store.mark_interrupted() == []  # once
    assert {r["run_id"]: r["status"] for r in store.list_runs()}[killed] == "interrupted"


def test_a_store_made_before_pids_gains_the_columns(store_url) -> None:
    engine = sa.create_engine(store_url)
    old = sa.MetaData()
    sa.Table("runs", old, *(sa.Column(c.name, c.type, primary_key=c.primary_key) for c in runs.columns
                            if c.name not in ("pid", "hostname")))
    old.create_all(engine)
    with engine.begin() as c:
        c.execute(sa.text("INSERT INTO runs (run_id, kind, spec_sha256, config, code_version, status, started_at) "
                          "VALUES ('old-run', 'ingest', 'x', '{}', '0', 'running', '2026-01-01T00:00:00.000000Z')"))
    engine.dispose()
    with LineageStore(store_url) as store:
        assert store.get_run("old-run")["pid"] is None
        assert store.mark_interrupted() == []  # no pid: left alone
        assert store.get_run(store.start_run("ingest", {}))["pid"] == os.getpid()
