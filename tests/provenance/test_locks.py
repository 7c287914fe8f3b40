"""The workspace lock and interrupted Runs, on both backends (SQLite file, PostgreSQL server), with real processes:
a second holder is refused with the first named, or waits for it; a lock whose holder was SIGKILLed is taken over;
no two holders ever hold it at once; a Run whose process was SIGKILLed is marked ``interrupted``, never cached. A
holder or Run is alive only with its pid, boot id and start tick (a reused pid is not it), and a takeover marks the
abandoned holder's Runs ``interrupted``, with why."""

from __future__ import annotations

import datetime as dt
import multiprocessing
import os
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from provenance.locks import LockHeld, locks
from provenance.process import ProcessIdentity, process_start_ticks, this_process, why_gone
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
                              f"since {refused.value.info.acquired_at}): try again when it has finished (`linernotes run --wait` waits for it), or stop it")
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


def _plant(store: LineageStore, hostname: str, pid: int, heartbeat_age_s: float, holder: str = "run-old",
           **process: object) -> None:
    """Put a lock row in the store as a holder would have written it ``heartbeat_age_s`` ago (``process``: its
    ``boot_id`` and ``process_start_ticks``)."""
    stamp = (dt.datetime.now(dt.UTC) - dt.timedelta(seconds=heartbeat_age_s)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    with store.engine.begin() as c:
        c.execute(locks.delete())
        c.execute(locks.insert().values(name="workspace", holder=holder, pid=pid, hostname=hostname,
                                        acquired_at=stamp, heartbeat_at=stamp, **process))


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


def test_process_start_ticks_is_when_the_process_started() -> None:
    """Field 22 of /proc/<pid>/stat, in clock ticks after boot: a process started now has the uptime as it started."""
    uptime_s = lambda: float(Path("/proc/uptime").read_text().split()[0])  # noqa: E731
    before_s = uptime_s()
    child = subprocess.Popen(["sleep", "30"])
    after_s = uptime_s()
    try:
        ticks = process_start_ticks(child.pid)
        assert ticks is not None
        assert before_s - 0.05 <= ticks / os.sysconf("SC_CLK_TCK") <= after_s + 0.05
        assert ticks >= this_process().process_start_ticks  # this process started first
        assert why_gone(ProcessIdentity(child.pid, socket.gethostname(), this_process().boot_id, ticks)) is None
    finally:
        child.kill()
        child.wait()
    assert process_start_ticks(child.pid) is None
    assert why_gone(ProcessIdentity(child.pid, socket.gethostname())) == f"process {child.pid} is gone"
    assert why_gone(ProcessIdentity(child.pid, "another-host.example")) is None  # cannot be checked from here


def _this_process_but(changed: str | None) -> dict[str, object]:
    """This process's boot id and start tick, one of them changed: what a holder or Run written before a reboot, or by
    an earlier process with this pid, records."""
    me = this_process()
    assert me.boot_id and me.process_start_ticks, "this test needs /proc (Linux)"
    recorded: dict[str, object] = {"boot_id": me.boot_id, "process_start_ticks": me.process_start_ticks}
    if changed == "process_start_ticks":
        recorded[changed] = me.process_start_ticks - 1  # an earlier process had this pid
    elif changed == "boot_id":
        recorded[changed] = str(uuid.uuid4())  # the host booted again since
    return recorded


GONE_BECAUSE = {"process_start_ticks": "is now a process started at tick", "boot_id": "the host booted again since"}


@pytest.mark.parametrize("changed", [None, "process_start_ticks", "boot_id"])
def test_a_lock_holder_with_this_pid_is_alive_only_with_its_boot_and_start_tick(store, changed) -> None:
    recorded = _this_process_but(changed)
    holder = store.start_run("run", {})
    with store.engine.begin() as c:
        c.execute(runs.update().where(runs.c.run_id == holder).values(**recorded))
    _plant(store, socket.gethostname(), os.getpid(), heartbeat_age_s=1, holder=holder, **recorded)
    if changed is None:  # every field is this process's: a live holder (which happens to be us)
        with pytest.raises(LockHeld, match=f"run {holder} \\(pid {os.getpid()} "):
            with store.lock("workspace", "run-new"):
                pytest.fail("a live holder's lock was taken")
        assert store.mark_interrupted() == [] and store.get_run(holder)["status"] == "running"
        return
    with store.lock("workspace", "run-new") as held:  # a fresh heartbeat, yet the process is not the holder's
        assert store.lock_holder("workspace").holder == "run-new"
        abandoned, why = held.taken_over
        assert abandoned.holder == holder and why.startswith(f"process {os.getpid()} is gone (")
        assert GONE_BECAUSE[changed] in why
    run = store.get_run(holder)  # marked by the takeover itself
    assert run["status"] == "interrupted" and run["error"] == f"interrupted: {why}"


@pytest.mark.parametrize("changed", [None, "process_start_ticks", "boot_id"])
def test_a_run_with_this_pid_is_alive_only_with_its_boot_and_start_tick(store, changed) -> None:
    run_id = store.start_run("ingest", {}, cache_key="k")
    me = this_process()
    assert (store.get_run(run_id)["boot_id"], store.get_run(run_id)["process_start_ticks"]) == (
        me.boot_id, me.process_start_ticks)  # what start_run records
    with store.engine.begin() as c:
        c.execute(runs.update().where(runs.c.run_id == run_id).values(**_this_process_but(changed)))
    marked = store.mark_interrupted()
    if changed is None:
        assert marked == [] and store.get_run(run_id)["status"] == "running"
        return
    assert [r["run_id"] for r in marked] == [run_id]
    error = store.get_run(run_id)["error"]
    assert error.startswith(f"interrupted: process {os.getpid()} is gone (") and GONE_BECAUSE[changed] in error
    assert store.mark_interrupted() == []


def test_a_takeover_from_a_stale_remote_holder_interrupts_its_runs_and_their_children(store) -> None:
    remote = "another-host.example"
    ids = {}
    for name, parent in (("holder", None), ("child", "holder"), ("grandchild", "child"), ("finished_child", "holder"),
                         ("unrelated", None)):
        ids[name] = store.start_run("run" if parent is None else "shard", {},
                                    parent_run_id=ids[parent] if parent else None)
    with store.engine.begin() as c:  # every one a Run of another host: mark_interrupted cannot check them
        c.execute(runs.update().values(hostname=remote, pid=1))
    store.finish_run(ids["finished_child"], {"n": 1})
    assert store.mark_interrupted() == []

    _plant(store, remote, 1, heartbeat_age_s=11 * 60, holder=ids["holder"])
    with store.lock("workspace", "run-new") as held:
        assert held.taken_over[0].holder == ids["holder"]
    statuses = {name: store.get_run(run_id) for name, run_id in ids.items()}
    for name in ("holder", "child", "grandchild"):
        run = statuses[name]
        assert run["status"] == "interrupted", name
        assert run["error"].startswith("interrupted: lock taken over: no heartbeat for 66")
        assert run["error"].endswith(" s") and run["finished_at"] >= run["started_at"]
    assert statuses["finished_child"]["status"] == "succeeded" and statuses["finished_child"]["error"] is None
    assert statuses["unrelated"]["status"] == "running"


def test_a_takeover_from_a_sigkilled_holder_interrupts_its_runs(store, store_url, spawn) -> None:
    started = SPAWN.Queue()
    child = spawn(lock_workers.run_holding_lock_until_killed, store_url, "workspace", started)
    holder, child_run = started.get(timeout=START_S)
    with pytest.raises(LockHeld, match=f"run {holder} "):
        with store.lock("workspace", "run-b"):
            pytest.fail("two holders at once")
    assert {store.get_run(r)["status"] for r in (holder, child_run)} == {"running"}

    os.kill(child.pid, signal.SIGKILL)
    child.join(START_S)
    with store.lock("workspace", "run-b", wait=True, timeout_s=10, poll_s=0.05) as held:  # no mark_interrupted call
        assert held.taken_over == (held.taken_over[0], f"process {child.pid} is gone")
    for run_id in (holder, child_run):
        run = store.get_run(run_id)
        assert (run["status"], run["error"]) == ("interrupted", f"interrupted: process {child.pid} is gone")
    assert store.get_run(child_run)["parent_run_id"] == holder


def test_a_store_made_before_boot_ids_and_start_ticks_opens_and_checks_by_pid(store_url) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    engine = sa.create_engine(store_url)
    old = sa.MetaData()
    new_columns = ("boot_id", "process_start_ticks")
    for table in (runs, locks):
        sa.Table(table.name, old, *(sa.Column(c.name, c.type, primary_key=c.primary_key) for c in table.columns
                                    if c.name not in new_columns))
    old.create_all(engine)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    with engine.begin() as c:
        for run_id, pid in (("old-dead", dead.pid), ("old-alive", os.getpid())):
            c.execute(sa.text("INSERT INTO runs (run_id, kind, spec_sha256, config, code_version, status, started_at, "
                              "pid, hostname) VALUES (:r, 'run', 'x', '{}', '0', 'running', :t, :p, :h)"),
                      {"r": run_id, "t": stamp, "p": pid, "h": socket.gethostname()})
        c.execute(sa.text("INSERT INTO locks (name, holder, pid, hostname, acquired_at, heartbeat_at) "
                          "VALUES ('workspace', 'old-dead', :p, :h, :t, :t)"),
                  {"p": dead.pid, "h": socket.gethostname(), "t": stamp})
    engine.dispose()

    with LineageStore(store_url) as store:
        columns = {t: {c["name"] for c in sa.inspect(store.engine).get_columns(t)} for t in ("runs", "locks")}
        assert all(set(new_columns) <= names for names in columns.values())
        old_lock = store.lock_holder("workspace")
        assert (old_lock.holder, old_lock.boot_id, old_lock.process_start_ticks) == ("old-dead", None, None)
        with store.lock("workspace", "run-new") as held:  # the row read with its NULLs is the row deleted
            assert held.taken_over == (old_lock, f"process {dead.pid} is gone")
        assert store.get_run("old-dead")["error"] == f"interrupted: process {dead.pid} is gone"
        assert store.get_run("old-alive")["status"] == "running"  # checked by its pid alone: this process
        assert store.mark_interrupted() == []
