"""What the child processes of tests/provenance/test_locks.py run (importable, for ``multiprocessing``'s spawn): hold
the workspace lock, append to a file under it, or sleep in a Run (holding the lock or not) until the test kills
them."""

from __future__ import annotations

import time
from typing import Any

from provenance.store import LineageStore

FOREVER_S = 600.0  # longer than any test: the test kills the process first


def hold(store_url: str, name: str, holder: str, acquired: Any, release: Any) -> None:
    """Take the lock, set ``acquired``, and hold it until ``release`` is set."""
    with LineageStore(store_url) as store, store.lock(name, holder):
        acquired.set()
        release.wait(FOREVER_S)


def hold_until_killed(store_url: str, name: str, holder: str, acquired: Any) -> None:
    """Take the lock, set ``acquired``, and sleep with it until killed."""
    with LineageStore(store_url) as store, store.lock(name, holder):
        acquired.set()
        time.sleep(FOREVER_S)


def append_under_lock(store_url: str, name: str, holder: str, path: str, times: int, ready: Any) -> None:
    """Once every worker is ``ready`` (a barrier), ``times`` times: wait for the lock, then append ``+holder:i`` and, a
    moment later, ``-holder:i`` to ``path``; then pause, so the other worker gets its turn. Two holders at once would
    interleave their lines."""
    with LineageStore(store_url) as store:
        ready.wait(FOREVER_S)
        for i in range(times):
            with store.lock(name, holder, wait=True, timeout_s=120, poll_s=0.002):
                with open(path, "a") as log:
                    log.write(f"+{holder}:{i}\n")
                    log.flush()
                    time.sleep(0.01)
                    log.write(f"-{holder}:{i}\n")
            time.sleep(0.02)


def run_until_killed(store_url: str, started: Any) -> None:
    """Open a Run (``ingest``, cache key ``k``), put its id on ``started``, and sleep in it until killed."""
    with LineageStore(store_url) as store, store.run("ingest", {}, cache_key="k") as run:
        started.put(run.run_id)
        time.sleep(FOREVER_S)



def run_holding_lock_until_killed(store_url: str, name: str, started: Any) -> None:
    """As a whole run does: take the lock as a Run's id, open that Run and a child Run under it, put both ids on
    ``started``, and sleep until killed."""
    from provenance.store import new_run_id

    run_id = new_run_id("run")
    with LineageStore(store_url) as store, store.lock(name, run_id), store.run("run", {}, run_id=run_id), \
            store.run("ingest", {}, parent_run_id=run_id) as child:
        started.put((run_id, child.run_id))
        time.sleep(FOREVER_S)
