"""Which process this is, and whether a process recorded earlier (a lock's holder, a Run's) still runs.

A pid names a process only while it runs: the kernel hands the number to a later process, and a container restarted
under the same hostname starts its processes at the same low pids. So a process is recorded as a
:class:`ProcessIdentity`: its pid, the hostname, the kernel's boot id (``/proc/sys/kernel/random/boot_id``, new at
every boot) and the process's start time (``/proc/<pid>/stat`` field 22, ``starttime``: clock ticks after boot,
fixed for the process's life). A recorded process of this host still runs only when the boot id is this boot's, the
pid runs and is no zombie, and the process at that pid started at the recorded tick (:func:`why_gone`). Where
``/proc`` is absent (macOS), or a record predates these fields, only the pid is checked.

A process of another host cannot be checked from here: :func:`why_gone` says nothing about it (the lock's heartbeat
covers that case, :mod:`provenance.locks`).
"""

from __future__ import annotations

import functools
import os
import socket
from dataclasses import dataclass
from pathlib import Path

BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")


@dataclass(frozen=True)
class ProcessIdentity:
    """A process as recorded in the lineage store.

    Attributes:
        pid: its process id on ``hostname`` (in the pid namespace of the recording process).
        hostname: ``socket.gethostname()`` of the recording process.
        boot_id: the kernel's boot id (36-character UUID) when recorded; None where ``/proc`` is absent or the
            record predates it.
        process_start_ticks: ``/proc/<pid>/stat`` field 22, clock ticks (``SC_CLK_TCK``, usually 100 per second)
            after boot at which the process started; None where unknown.
    """

    pid: int
    hostname: str
    boot_id: str | None = None
    process_start_ticks: int | None = None


def this_process() -> ProcessIdentity:
    """The calling process's identity (what a lock row or a Run records)."""
    pid = os.getpid()
    return ProcessIdentity(pid, socket.gethostname(), boot_id(), process_start_ticks(pid))


@functools.cache
def boot_id() -> str | None:
    """This kernel's boot id (a UUID string, new at every boot; the same in every container of one kernel), or None
    where ``/proc`` does not offer it (macOS)."""
    try:
        return BOOT_ID_PATH.read_text().strip() or None
    except OSError:
        return None


def process_start_ticks(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks after boot (``/proc/<pid>/stat`` field 22); None when it does not
    run or ``/proc`` is absent."""
    fields = _stat_fields(pid)
    try:
        return int(fields[19]) if fields else None  # field 3 (state) is fields[0], so field 22 is fields[19]
    except (IndexError, ValueError):
        return None


def process_alive(pid: int) -> bool:
    """Whether *some* process ``pid`` runs on this host: ``os.kill(pid, 0)`` succeeds (or is refused, which means it
    exists) and, where ``/proc`` exists, it is not a zombie (a killed process its parent has not reaped yet). Whether it
    is the process a record names is :func:`why_gone`'s question."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    fields = _stat_fields(pid)
    return not fields or fields[0] not in ("Z", "X")


def why_gone(process: ProcessIdentity) -> str | None:
    """Why the recorded ``process`` no longer runs, as the end of a sentence (``"process 123 is gone"``, and what
    gave it away when the pid is in use again); None when it still runs, or when it ran on another host (it cannot be
    checked from here). Checks, in order: the boot id (where both are known), the pid, the start tick (where both are
    known)."""
    if process.hostname != socket.gethostname():
        return None
    now_boot = boot_id()
    if process.boot_id and now_boot and process.boot_id != now_boot:
        return f"process {process.pid} is gone (the host booted again since: boot id {process.boot_id} is now {now_boot})"
    if not process_alive(process.pid):
        return f"process {process.pid} is gone"
    if process.process_start_ticks is not None:
        started = process_start_ticks(process.pid)
        if started is not None and started != process.process_start_ticks:
            return (f"process {process.pid} is gone (pid {process.pid} is now a process started at tick {started}, "
                    f"not {process.process_start_ticks})")
    return None


def _stat_fields(pid: int) -> list[str]:
    """``/proc/<pid>/stat`` after the command name (field 3 onward); empty when unreadable."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []
