"""Ingest on Beam's PortableRunner with out-of-process SDK workers gives the DirectRunner's catalog (issue 19).

The test starts what a cluster would run: a Beam job service (``local_job_service_main``, the portable runner's
job server in Python, no Java) and an EXTERNAL worker pool (``worker_pool_main``) that starts every SDK worker as
its own ``python`` process. The DoFns, their arguments and every element therefore cross process boundaries
serialized (pickled DoFns, coded elements over the Fn API), as on Flink, Spark or Dataflow; the workers share
the delivery and the workspace with the driver through the file system (``infra/beam/README.md``).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipelines.engines import Engine, EngineConfig
from pipelines.stages.ingest.stage import IngestConfig, run_ingest
from provenance.workspace import Workspace
from tests.pipelines.test_ingest import delivery  # noqa: F401 (its fixture: a delivery with every rejection kind)

ROOT = Path(__file__).resolve().parents[2]
PORTABLE = ROOT / "infra" / "beam" / "portable.yaml"
STARTUP_TIMEOUT_S = 60.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(args: list[str], log: Path, cwd: Path, env: dict[str, str], port: int) -> subprocess.Popen:
    """Start a Beam service process and wait until it accepts connections on ``port``."""
    proc = subprocess.Popen([sys.executable, "-m", *args], cwd=cwd, env=env, stdout=log.open("wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{args[0]} exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            with socket.create_connection(("localhost", port), timeout=1.0):
                return proc
        except OSError:
            time.sleep(0.2)
    _stop(proc)
    raise RuntimeError(f"{args[0]} did not listen on port {port} within {STARTUP_TIMEOUT_S} s: "
                       f"{log.read_text()[-2000:]}")


def _stop(proc: subprocess.Popen | None) -> None:
    """SIGINT (both services stop their gRPC servers, and the pool's atexit stops its SDK workers), then SIGKILL
    to the process group this test started (the service and any SDK worker it left)."""
    if proc is None:
        return
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _rows(workspace: Workspace, table: str) -> list[dict]:
    """The catalog table's rows, sorted, without ``run_id`` (each run's own) and with the workspace's root in a
    built mixture's ``uri`` replaced by ``<workspace>`` (each run writes its mixtures into its own workspace)."""
    rows = []
    for row in pq.read_table(workspace.catalog_table(table)).to_pylist():
        row.pop("run_id")
        if isinstance(row.get("uri"), str):
            row["uri"] = row["uri"].replace(str(workspace.root), "<workspace>")
        rows.append(row)
    return sorted(rows, key=repr)


@pytest.mark.timeout(300)  # a job that cannot reach its workers waits forever; the finally stops the services
def test_portable_runner_with_out_of_process_workers_matches_the_direct_runner(delivery, tmp_path):  # noqa: F811
    config = IngestConfig(purpose="commercial", territory="Worldwide", as_of=dt.date(2026, 11, 21))
    direct_workspace = Workspace.at(tmp_path / "direct")
    direct = run_ingest(delivery, direct_workspace, config)

    job_port, pool_port = _free_port(), _free_port()
    # the SDK workers import linernotes from this tree only through PYTHONPATH (their cwd is elsewhere) and run
    # `python` from PATH (worker_pool_main starts `python -c ...`): this venv's interpreter
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PATH": os.pathsep.join([str(Path(sys.executable).parent),
                                                                          os.environ.get("PATH", "")])}
    services = tmp_path / "services"
    services.mkdir()
    job_service = pool = None
    try:
        pool = _start(["apache_beam.runners.worker.worker_pool_main", f"--service_port={pool_port}"],
                      services / "worker_pool.log", services, env, pool_port)
        job_service = _start(["apache_beam.runners.portability.local_job_service_main", f"--port={job_port}"],
                             services / "job_service.log", services, env, job_port)
        engine = Engine(EngineConfig(beam_runner="PortableRunner", beam_options_file=str(PORTABLE),
                                     beam_options=(f"--job_endpoint=localhost:{job_port}",
                                                   f"--environment_config=localhost:{pool_port}")))
        portable_workspace = Workspace.at(tmp_path / "portable")
        with engine:
            portable = run_ingest(delivery, portable_workspace, config, engine=engine)
    finally:
        _stop(job_service)
        _stop(pool)
    pool_log = (services / "worker_pool.log").read_text()

    # the run went through the job service to SDK worker processes the pool started, which measured every file
    assert "Starting worker with command" in pool_log, pool_log[-2000:]
    assert portable.counts["work"]["audio_from_cache"] == 0
    assert portable.counts["work"] == direct.counts["work"] and direct.counts["work"]["audio_measured"] > 0
    assert portable.stage_result.status == "ran"
    recorded = {name: json.loads((workspace.run_dir(result.run_id) / "config.json").read_text())
                for name, workspace, result in (("direct", direct_workspace, direct),
                                                ("portable", portable_workspace, portable))}
    assert recorded["portable"]["engine"]["beam_runner"] == "PortableRunner"
    assert recorded["direct"]["engine"]["beam_runner"] == "DirectRunner"
    assert recorded["portable"]["cache_key"] == recorded["direct"]["cache_key"]  # the runner is no ingest input
    # the same catalog: accepted tracks, their audio files (built mixtures included), and every rejection
    assert portable.counts["tracks"] == direct.counts["tracks"] and direct.counts["tracks"]["accepted"] >= 2
    for table in ("tracks", "audio_files", "rejections"):
        assert _rows(portable_workspace, table) == _rows(direct_workspace, table), table
    built = [row for row in _rows(portable_workspace, "audio_files") if row["derived_from"] == "sum_of_stems"]
    assert built and all(row["uri"].startswith("<workspace>") for row in built)
    assert all(Path(row["uri"].replace("<workspace>", str(portable_workspace.root))).is_file() for row in built)
