"""``linernotes submit SPEC --wait`` on a real two-node Ray cluster started by the test: a head (1 CPU, the dashboard
and the Jobs API on 127.0.0.1) and a worker node (1 CPU and a ``worker_node`` custom resource), each a ``ray start
--block`` in its own process group and temp dir, so no other Ray on this machine sees them and stopping them stops
nothing else. The whole run (ingest → shard → train) runs as one Ray job; Ray's state API shows where its tasks and
actors ran: the stages' Ray work on both nodes, not pinned to the driver's. The dataset is the one ``linernotes run``
makes here from the same spec."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from pipelines.engines.submit import auth_headers
from provenance.store import LineageStore
from tests.e2e.test_every_command import make_delivery

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
LINERNOTES = BIN / "linernotes"
TINY_TRAIN = {"steps": 2, "batch_size": 2, "crop_frames": 8, "warmup_steps": 1, "log_every": 1, "base_channels": 8,
              "channel_mults": [1, 2], "text_dim": 8, "text_buckets": 16, "diffusion_steps": 50, "num_workers": 2,
              "tensorboard": False}
SHARD = {"segment_s": 0.5, "sample_rate_hz": 16000, "n_fft": 256, "hop_length": 128, "n_mels": 16,
         "validation_fraction": 0.0, "samples_per_shard": 3}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_env() -> dict[str, str]:
    """The nodes' environment: this venv's ``ray`` and ``linernotes`` first on PATH, and no PYTHONPATH, so the job
    imports the code ``submit --working-dir`` ships, not a checkout the node happens to see."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "token"}  # as a new Ray >= 2.52 head has it; the nodes share ~/.ray/auth_token
    for name in ("RAY_ADDRESS", "PYTHONPATH", "LINERNOTES_STORE_URL", "LINERNOTES_WORKDIR"):
        env.pop(name, None)
    return env


def _node_ports() -> list[str]:
    """Free ports for a node's agents: the defaults (52365, 10001, …) may be held by another Ray on this machine."""
    return [f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
            f"--metrics-export-port={_free_port()}", f"--runtime-env-agent-port={_free_port()}",
            f"--node-manager-port={_free_port()}", f"--object-manager-port={_free_port()}",
            f"--object-store-memory={200 * 1000 * 1000}", "--num-cpus=1", "--disable-usage-stats", "--block"]


@contextmanager
def two_node_cluster(logs: Path) -> Iterator[str]:
    """A head and a worker node; yields the dashboard address ``http://127.0.0.1:PORT``. Both stopped after."""
    from ray.job_submission import JobSubmissionClient

    gcs_port, dashboard_port = _free_port(), _free_port()
    temp_dirs = [Path(f"/tmp/lnr-submit-{os.getpid()}-{role}") for role in ("head", "worker")]
    nodes: list[subprocess.Popen] = []
    address = f"http://127.0.0.1:{dashboard_port}"
    try:
        with open(logs / "head.log", "w") as log:
            nodes.append(subprocess.Popen(
                [str(BIN / "ray"), "start", "--head", f"--port={gcs_port}", "--node-ip-address=127.0.0.1",
                 "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
                 f"--ray-client-server-port={_free_port()}", f"--temp-dir={temp_dirs[0]}", *_node_ports()],
                env=_ray_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        deadline = time.monotonic() + 180
        while True:  # the Jobs API answers once the head's dashboard is up
            try:
                JobSubmissionClient(address, headers=auth_headers()).list_jobs()
                break
            except Exception:
                if nodes[0].poll() is not None or time.monotonic() > deadline:
                    raise
                time.sleep(1)
        worker_cmd = [str(BIN / "ray"), "start", f"--address=127.0.0.1:{gcs_port}", "--node-ip-address=127.0.0.1",
                      '--resources={"worker_node": 1}', f"--temp-dir={temp_dirs[1]}", *_node_ports()]
        for attempt in range(3):  # on a loaded machine a raylet may miss `ray start`'s fixed 30 s to register
            if attempt:
                _stop(nodes.pop())
            with open(logs / f"worker-{attempt}.log", "w") as log:
                nodes.append(subprocess.Popen(worker_cmd, env=_ray_env(), stdout=log, stderr=subprocess.STDOUT,
                                              start_new_session=True))
            deadline = time.monotonic() + 120
            while nodes[-1].poll() is None and time.monotonic() < deadline and \
                    len([n for n in _state(address, "nodes") if n.state == "ALIVE"]) < 2:
                time.sleep(1)
            if len([n for n in _state(address, "nodes") if n.state == "ALIVE"]) == 2:
                break
        else:
            raise RuntimeError("the worker node did not join: " + (logs / "worker-2.log").read_text()[-2000:])
        yield address
    finally:
        for node in reversed(nodes):  # the worker first, then the head
            _stop(node)
        for temp_dir in temp_dirs:
            shutil.rmtree(temp_dir, ignore_errors=True)


def _stop(node: subprocess.Popen) -> None:
    """Stop a ``ray start --block`` and every process of its node: its process group, and nothing else."""
    for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(node.pid, sig)
        except ProcessLookupError:
            return
        try:
            node.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            pass


def _state(address: str, resource: str, filters: list | None = None) -> list:
    """Ray's state API (``ray.util.state``) with the cluster's auth token: ``nodes``, ``tasks`` or ``actors``."""
    from ray.util.state.api import StateApiClient
    from ray.util.state.common import ListApiOptions, StateResource

    client = StateApiClient(address, headers={"Content-Type": "application/json", **auth_headers()})
    return client.list(StateResource(resource), ListApiOptions(limit=10_000, filters=filters or [], detail=True),
                       raise_on_missing_output=False)


def _linernotes(*args: str) -> subprocess.Popen:
    """The installed console script in its own process, as a user runs it (this checkout's code)."""
    env = {**os.environ, "COLUMNS": "200",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    for name in ("RAY_ADDRESS", "LINERNOTES_STORE_URL", "LINERNOTES_WORKDIR"):
        env.pop(name, None)
    return subprocess.Popen([str(LINERNOTES), *args], stdout=subprocess.PIPE, stderr=tempfile.TemporaryFile("w+"),
                            text=True, env=env)  # stderr to a file: a full pipe would stall the process


def _payload(process: subprocess.Popen, timeout_s: float = 600) -> dict:
    """The one JSON object a ``--json`` command printed, once it exited 0."""
    stdout, _ = process.communicate(timeout=timeout_s)
    if process.returncode != 0:
        process.stderr.seek(0)
        pytest.fail(f"{' '.join(process.args)} → {process.returncode}\n{process.stderr.read()[-4000:]}")
    lines = [line for line in stdout.splitlines() if line.strip()]
    assert len(lines) == 1, stdout[-2000:]
    return json.loads(lines[0])


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_submit_runs_a_whole_spec_on_both_nodes_of_a_ray_cluster(tmp_path):
    from ray.job_submission import JobSubmissionClient

    delivery = make_delivery(tmp_path / "delivery")
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({
        "delivery": str(delivery), "workspace": str(tmp_path / "cluster-work"),
        "purpose": {"commercial": True, "territory": "Worldwide", "as_of": "2026-11-21"},
        "stages": {"ingest": {}, "shard": SHARD, "train": TINY_TRAIN}, "engine": {"num_cpus": 1}}))
    started = time.monotonic()
    # the reference: `linernotes run` of the same spec here, while the cluster starts
    local_run = _linernotes("run", str(spec), "--until", "shard", "--workdir", str(tmp_path / "local-work"), "--json")
    logs = tmp_path / "ray-logs"
    logs.mkdir()
    try:
        with two_node_cluster(logs) as address:
            cluster_up = time.monotonic()
            local = _payload(local_run)
            local_done = time.monotonic()
            submitted = _payload(_linernotes("submit", str(spec), "--address", address, "--wait", "--timeout-s", "480",
                                             "--working-dir", str(ROOT), "--json"))
            job_done = time.monotonic()
            job = JobSubmissionClient(address, headers=auth_headers()).get_job_info(submitted["job_id"])
            nodes = {n.node_id: n for n in _state(address, "nodes")}
            tasks = _state(address, "tasks", [("job_id", "=", job.job_id)])
            actors = _state(address, "actors", [("job_id", "=", job.job_id)])
    finally:
        local_run.kill()  # a no-op once it has exited
    print(f"\ncluster up after {cluster_up - started:.0f} s, local ingest+shard done after {local_done - started:.0f} s, "
          f"submit --wait {job_done - local_done:.0f} s")

    run = submitted["result"]
    assert submitted["status"] == "SUCCEEDED" and run["status"] == "succeeded"
    assert run["spec_sha256"] == submitted["spec_sha256"]  # the job ran the spec pinned and validated here
    assert [(s["stage"], s["status"]) for s in run["stages"]] == [("ingest", "ran"), ("shard", "ran"), ("train", "ran")]
    assert run["workspace"] == str(tmp_path / "cluster-work")
    # the same dataset as `linernotes run` here: the cluster ran the same configs on the same delivery
    assert run["stages"][1]["output_ids"]["dataset"] == local["stages"][1]["output_ids"]["dataset"]
    assert run["stages"][2]["counts"]["steps"] == TINY_TRAIN["steps"]
    with LineageStore(f"sqlite:///{tmp_path / 'cluster-work' / 'lineage.sqlite'}") as store:
        children = [r for r in store.list_runs() if r.get("parent_run_id") == run["run_id"]]
    assert sorted(r["kind"] for r in children) == ["ingest", "shard", "train"]
    with LineageStore(f"sqlite:///{tmp_path / 'local-work' / 'lineage.sqlite'}") as store:
        here = {r["code_version"] for r in store.list_runs() if r["kind"] != "run"}
    # the job ran this checkout, shipped by --working-dir (not the nodes' installed linernotes), and its cache keys
    # name this checkout's commit although the shipped copy is no git checkout
    assert {r["code_version"] for r in children} == here and len(here) == 1 and "+g" in here.pop()

    # where the stages' Ray work ran: both nodes, read from Ray's state API
    worker = next(node_id for node_id, n in nodes.items() if "worker_node" in (n.resources_total or {}))
    head = next(node_id for node_id, n in nodes.items() if n.is_head_node)
    shard_tasks = {t.node_id for t in tasks if "_encode_row" in (t.name or "")}  # FlatMap(_encode_row)
    train_workers = {a.node_id for a in actors if a.class_name == "RayTrainWorker"}
    print(f"shard's Ray Data tasks: {sum(t.node_id == head for t in tasks if t.name == 'FlatMap(_encode_row)')} on "
          f"the head, {sum(t.node_id == worker for t in tasks if t.name == 'FlatMap(_encode_row)')} on the worker")
    assert train_workers == {head, worker}, "Ray Train's two workers ran one on each node"
    assert shard_tasks == {head, worker}, "shard's Ray Data tasks ran on both nodes"
