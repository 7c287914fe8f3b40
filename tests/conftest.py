"""Shared fixtures: a local Ray for the whole session, the real corpus, synthetic audio."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]
CORPUS = REPO_ROOT.parent / "shared" / "corpus"


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray on 2 CPUs, no dashboard, modest object store; shut down at the end of the session."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=512 * 1024 * 1024,
                 log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def one_torch_thread():
    """Tiny models on a shared 2-core machine run far faster on one intra-op thread than on two.

    Use as ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``; the thread count is restored afterwards.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def corpus() -> Path:
    """The real delivery in ../shared/corpus. CI has it; elsewhere the test fails saying why."""
    if not (CORPUS / "tracks.csv").exists():
        pytest.fail(f"the real corpus is not at {CORPUS}: end-to-end tests need ../shared/corpus beside the repo")
    return CORPUS


def sine(frequency_hz: float, duration_s: float, sample_rate_hz: int, amplitude: float = 0.5,
         num_channels: int = 1) -> np.ndarray:
    """float32 ``(num_channels, samples)`` sine at ``amplitude`` full scale."""
    t = np.arange(int(round(duration_s * sample_rate_hz))) / sample_rate_hz
    wave = (amplitude * np.sin(2 * np.pi * frequency_hz * t)).astype(np.float32)
    return np.repeat(wave[None], num_channels, axis=0)


pytest_plugins = ("tests.postgres",)  # postgres_server, postgres_url, store_url (SQLite and PostgreSQL)
