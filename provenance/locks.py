"""Named locks in the lineage store's database: one holder at a time, across processes and hosts.

The lock that keeps two runs off one workspace (DESIGN.md, "Stages and runs") is a row of the ``locks`` table,
keyed by the lock's name. Because it lives in the database, it works wherever the store does: a SQLite file on
one machine, or a PostgreSQL server shared by many.

- **Taking** a lock is one ``INSERT``: the primary key makes the database refuse a second holder, so there is no
  check-then-insert race.
- **Releasing** deletes the row, but only the holder's own row (holder, pid, host and ``acquired_at`` match).
- **An abandoned lock is taken over.** A holder on this host whose process is gone has abandoned it at once: the row
  records the holder's pid, the kernel's boot id and the process's start tick, and the holder is gone when the boot
  id changed, the pid does not run (or is a zombie), or the process at that pid started at another tick (the pid
  was reused; :func:`provenance.process.why_gone`). A holder anywhere whose heartbeat is older than ``stale_s``
  (10 minutes by default) has abandoned it too: that is how a lock from another host is freed. The takeover is one
  transaction that deletes the row *as it was read* (every column) and inserts the new one; of two processes taking
  over the same lock, the second deletes nothing and finds the lock held again. The caller's ``on_takeover`` runs in
  that transaction (the lineage store marks the abandoned holder's Runs ``interrupted`` there).
- **The heartbeat**: while a lock is held, a daemon thread refreshes ``heartbeat_at`` every ``heartbeat_s``
  (30 s by default), so a live holder is never stale. :meth:`HeldLock.heartbeat` refreshes it by hand.

Limits: a holder on another host is judged by its heartbeat alone, so it is freed ``stale_s`` after it died, and the
clocks of different hosts must agree to well within ``stale_s``. Two containers with one hostname on two kernels
differ in boot id, so each sees the other's holders as gone: they must not share a lineage store under one hostname.
On one kernel with separate pid namespaces, the other's holder passes here only if a process of this namespace has
its pid *and* started at the same clock tick (10 ms), which a reused pid almost never does. Where ``/proc`` is absent
(macOS) only the pid is checked, and a reused pid keeps a dead holder's lock until its heartbeat is stale; a row
written by a version that recorded no boot id or start tick is checked by its pid alone. A holder stopped (SIGSTOP)
or blocked longer than ``stale_s`` loses its lock, and its Runs are marked ``interrupted``; it finds out when its
heartbeat or its release touches no row, and the release logs a warning (a Run it finishes afterwards still records
its own end).
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields

import sqlalchemy as sa

from provenance.process import ProcessIdentity, process_alive, this_process, why_gone

__all__ = ["HEARTBEAT_S", "LOCK_STALE_S", "HeldLock", "LockHeld", "LockInfo", "Takeover", "acquire_lock", "hold_lock",
           "lock_metadata", "locks", "process_alive", "read_lock"]

LOCK_STALE_S = 600.0  # a heartbeat older than this frees the lock, wherever its holder runs
HEARTBEAT_S = 30.0  # how often a held lock's heartbeat is refreshed
_STAMP = "%Y-%m-%dT%H:%M:%S.%fZ"  # the store's timestamp format (sortable as text)

log = logging.getLogger(__name__)

lock_metadata = sa.MetaData()

locks = sa.Table(
    "locks", lock_metadata,
    sa.Column("name", sa.String(200), primary_key=True),
    sa.Column("holder", sa.String(64), nullable=False),  # the holding run's id
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("hostname", sa.String(255), nullable=False),
    sa.Column("acquired_at", sa.String(32), nullable=False),  # UTC, the store's format
    sa.Column("heartbeat_at", sa.String(32), nullable=False),
    # the holder's process beyond its pid (provenance.process), so a reused pid is not taken for the holder
    sa.Column("boot_id", sa.String(36)),
    sa.Column("process_start_ticks", sa.BigInteger),
)
#: Columns added to ``locks`` after its first release: a store made before them gains them on first open.
ADDED_LOCK_COLUMNS = ("boot_id", "process_start_ticks")


@dataclass(frozen=True)
class LockInfo:
    """One row of the ``locks`` table: who holds the lock ``name``, from which process, since when (UTC).

    ``boot_id`` and ``process_start_ticks`` identify the holder's process beyond its pid (see
    :class:`provenance.process.ProcessIdentity`); None in a row written where ``/proc`` is absent, or by an earlier
    version."""

    name: str
    holder: str
    pid: int
    hostname: str
    acquired_at: str
    heartbeat_at: str
    boot_id: str | None = None
    process_start_ticks: int | None = None

    @property
    def process(self) -> ProcessIdentity:
        return ProcessIdentity(self.pid, self.hostname, self.boot_id, self.process_start_ticks)

    def describe(self) -> str:
        return f"run {self.holder} (pid {self.pid} on {self.hostname} since {self.acquired_at})"


#: ``on_takeover(connection, abandoned, why)``: called in the takeover's transaction with the row taken over and why
#: it was abandoned (``"process 123 is gone"``, ``"no heartbeat for 612 s"``).
Takeover = Callable[[sa.Connection, LockInfo, str], None]


class LockHeld(RuntimeError):
    """The lock is held by another live holder (and waiting was not asked for, or timed out).

    Attributes:
        info: the holder as read from the store.
        waited_s: how long this process waited for it, or None when it did not wait.
    """

    def __init__(self, info: LockInfo, waited_s: float | None = None) -> None:
        self.info, self.waited_s = info, waited_s
        if waited_s is None:
            message = f"the {info.name} is in use by {info.describe()}: try again when it has finished (`linernotes run --wait` waits for it), or stop it"
        else:
            message = (f"the {info.name} is still in use by {info.describe()} after waiting {waited_s:.1f} s: "
                       f"wait longer, or stop it")
        super().__init__(message)


class HeldLock:
    """A lock this process holds (what :func:`hold_lock` yields)."""

    def __init__(self, engine: sa.Engine, info: LockInfo,
                 taken_over: tuple[LockInfo, str] | None = None) -> None:
        self.engine, self.info = engine, info
        #: the abandoned holder this lock was taken over from, and why it was abandoned; None when it was free
        self.taken_over = taken_over

    def heartbeat(self) -> bool:
        """Refresh ``heartbeat_at``; False when the lock is no longer this holder's (it was taken over)."""
        with self.engine.begin() as c:
            return c.execute(locks.update().where(self._mine()).values(heartbeat_at=_stamp())).rowcount == 1

    def release(self) -> None:
        """Delete this holder's row; a row taken over by another holder is left alone, with a warning."""
        with self.engine.begin() as c:
            released = c.execute(locks.delete().where(self._mine())).rowcount == 1
        if not released:
            log.warning("lock %r was taken over while %s held it (heartbeat older than the stale limit?)",
                        self.info.name, self.info.describe())

    def _mine(self) -> sa.ColumnElement[bool]:
        i = self.info
        return ((locks.c.name == i.name) & (locks.c.holder == i.holder) & (locks.c.pid == i.pid)
                & (locks.c.hostname == i.hostname) & (locks.c.acquired_at == i.acquired_at))


@contextmanager
def hold_lock(engine: sa.Engine, name: str, holder: str, *, wait: bool = False, timeout_s: float | None = None,
              poll_s: float = 0.5, stale_s: float = LOCK_STALE_S,
              heartbeat_s: float = HEARTBEAT_S, on_takeover: Takeover | None = None) -> Iterator[HeldLock]:
    """Hold the lock ``name`` for the ``with`` block, as ``holder`` (a run id); released on exit, also on an error.

    Args:
        engine: the lineage store's engine (the ``locks`` table exists).
        wait: poll every ``poll_s`` seconds until the lock is free (or abandoned), at most ``timeout_s`` seconds
            (None: no limit). False: refuse at once when it is held.
        stale_s: a heartbeat older than this many seconds marks the lock abandoned.
        heartbeat_s: seconds between the background heartbeats while held.
        on_takeover: called in the takeover's transaction when the lock is taken from an abandoned holder.

    Raises:
        LockHeld: the lock is held by a live holder (after ``timeout_s`` when waiting); the message names its run id,
            pid, host and since when.
    """
    held = acquire_lock(engine, name, holder, wait=wait, timeout_s=timeout_s, poll_s=poll_s, stale_s=stale_s,
                        on_takeover=on_takeover)
    stop = threading.Event()
    beat = threading.Thread(target=_beat, args=(held, stop, heartbeat_s), name=f"lock-heartbeat-{name}", daemon=True)
    beat.start()
    try:
        yield held
    finally:
        stop.set()
        beat.join()
        held.release()


def acquire_lock(engine: sa.Engine, name: str, holder: str, *, wait: bool = False, timeout_s: float | None = None,
                 poll_s: float = 0.5, stale_s: float = LOCK_STALE_S,
                 on_takeover: Takeover | None = None) -> HeldLock:
    """Take the lock ``name`` (see :func:`hold_lock`); the caller releases it with :meth:`HeldLock.release`.

    Raises:
        LockHeld: as :func:`hold_lock`.
    """
    started = time.monotonic()
    while True:
        held, current = _try_take(engine, name, holder, stale_s, on_takeover)
        if held is not None:
            return held
        waited_s = time.monotonic() - started
        if not wait:
            raise LockHeld(current)
        if timeout_s is not None and waited_s >= timeout_s:
            raise LockHeld(current, waited_s)
        time.sleep(poll_s if timeout_s is None else max(0.0, min(poll_s, timeout_s - waited_s)))


def read_lock(engine: sa.Engine, name: str) -> LockInfo | None:
    """Who holds the lock ``name`` now, or None when it is free."""
    with engine.connect() as c:
        row = c.execute(sa.select(locks).where(locks.c.name == name)).first()
    if row is None:
        return None
    return LockInfo(**{f.name: row._mapping[f.name] for f in fields(LockInfo) if f.name in row._mapping})


def _try_take(engine: sa.Engine, name: str, holder: str, stale_s: float, on_takeover: Takeover | None,
              attempts: int = 10) -> tuple[HeldLock | None, LockInfo | None]:
    """One attempt at the lock: ``(ours, None)`` when taken, ``(None, holder)`` when a live holder has it."""
    current = None
    me = this_process()
    for _ in range(attempts):
        now = _stamp()
        mine = LockInfo(name, holder, me.pid, me.hostname, now, now, me.boot_id, me.process_start_ticks)
        if _insert(engine, mine):
            return HeldLock(engine, mine), None
        current = read_lock(engine, name)
        if current is None:  # released between our insert and our read
            continue
        why = _abandoned(current, stale_s)
        if why is None:
            return None, current
        if _replace(engine, current, mine, why, on_takeover):
            log.warning("lock %r taken over from %s: %s", name, current.describe(), why)
            return HeldLock(engine, mine, (current, why)), None
    return None, current  # the lock changed hands under us every time: report the last holder seen


def _insert(engine: sa.Engine, info: LockInfo) -> bool:
    try:
        with engine.begin() as c:
            c.execute(locks.insert().values(**vars(info)))
    except sa.exc.IntegrityError:
        return False
    return True


def _replace(engine: sa.Engine, old: LockInfo, new: LockInfo, why: str, on_takeover: Takeover | None) -> bool:
    """Delete ``old`` exactly as read and insert ``new``, and call ``on_takeover``, in one transaction; False when
    ``old`` is no longer there (another process took it over first, or its holder released it or sent a
    heartbeat)."""
    as_read = sa.and_(*(locks.c[k] == v for k, v in vars(old).items()))  # == None is IS NULL
    try:
        with engine.begin() as c:
            if c.execute(locks.delete().where(as_read)).rowcount != 1:
                return False
            c.execute(locks.insert().values(**vars(new)))
            if on_takeover is not None:
                on_takeover(c, old, why)
    except sa.exc.IntegrityError:
        return False
    return True


def _abandoned(info: LockInfo, stale_s: float) -> str | None:
    """Why the holder ``info`` has abandoned the lock (its process is gone, or its heartbeat is stale); None while it
    holds it."""
    gone = why_gone(info.process)
    if gone is not None:
        return gone
    heartbeat = dt.datetime.strptime(info.heartbeat_at, _STAMP).replace(tzinfo=dt.UTC)
    age_s = (dt.datetime.now(dt.UTC) - heartbeat).total_seconds()
    return f"no heartbeat for {age_s:.0f} s" if age_s > stale_s else None


def _beat(held: HeldLock, stop: threading.Event, interval_s: float) -> None:
    """The heartbeat thread: refresh every ``interval_s`` until ``stop`` is set or the lock is lost. A database
    error is logged and retried at the next beat (the lock goes stale only after ``stale_s`` without one)."""
    while not stop.wait(interval_s):
        try:
            if not held.heartbeat():
                log.warning("lock %r is no longer held by %s", held.info.name, held.info.describe())
                return
        except sa.exc.DBAPIError as err:
            log.warning("lock %r heartbeat failed, retrying in %.0f s: %s", held.info.name, interval_s, err)


def _stamp(moment: dt.datetime | None = None) -> str:
    return (moment or dt.datetime.now(dt.UTC)).strftime(_STAMP)
