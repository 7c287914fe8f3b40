"""Starting or joining Ray for the stages that run on it (separate, clean, shard, index).

The default is a local Ray started in this process with an explicit CPU count, no dashboard and a modest
object store; ``address`` joins a running cluster instead (``ray://HEAD:10001``, or ``auto``). A Ray that
is already initialized (by a test fixture, a notebook, a Ray Job's entrypoint) is always left as it is.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import ray

DEFAULT_OBJECT_STORE_MEMORY_BYTES = 512 * 1024 * 1024

# The repository root, so that Ray workers import ``provenance``/``cleaning``/``pipelines`` from the same
# tree as the driver even when the package is not installed (a local Ray only).
_REPO_ROOT = Path(__file__).resolve().parents[1]


def ensure_ray(address: str | None = None, num_cpus: int | None = None,
               object_store_memory_bytes: int = DEFAULT_OBJECT_STORE_MEMORY_BYTES) -> bool:
    """Initialize Ray unless it already is; returns True when this call started (or joined) it.

    Args:
        address: a cluster to join (``ray://HEAD:10001`` or ``auto``); None: ``$RAY_ADDRESS`` when set (as in a
            Ray Job's entrypoint), else a local Ray.
        num_cpus: CPUs a local Ray may use; None means ``os.cpu_count()``. Ignored with ``address``.
        object_store_memory_bytes: object store size of a local Ray, in bytes. Ignored with ``address``.

    Raises:
        ValueError: ``num_cpus`` or ``object_store_memory_bytes`` is not positive.
        ConnectionError: (from Ray) ``address`` cannot be reached.
    """
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")  # set for a Ray Job's entrypoint (`linernotes submit`)
    if address:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
        return True
    num_cpus = (os.cpu_count() or 1) if num_cpus is None else num_cpus
    if num_cpus < 1:
        raise ValueError(f"num_cpus must be ≥ 1, got {num_cpus}")
    if object_store_memory_bytes <= 0:
        raise ValueError(f"object_store_memory_bytes must be > 0, got {object_store_memory_bytes}")
    python_path = os.pathsep.join(p for p in (str(_REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=False,
        object_store_memory=object_store_memory_bytes,
        log_to_driver=False,
        configure_logging=True,
        logging_level=logging.WARNING,
        runtime_env={"env_vars": {"PYTHONPATH": python_path}},
    )
    return True


@contextmanager
def local_ray(address: str | None = None, num_cpus: int | None = None,
              object_store_memory_bytes: int = DEFAULT_OBJECT_STORE_MEMORY_BYTES) -> Iterator[None]:
    """``ensure_ray(...)`` for the ``with`` block; shuts Ray down afterwards only if the block started it."""
    started = ensure_ray(address=address, num_cpus=num_cpus, object_store_memory_bytes=object_store_memory_bytes)
    try:
        yield
    finally:
        if started:
            ray.shutdown()
