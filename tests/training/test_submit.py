"""Launch: ``linernotes train --resume`` continues an interrupted run under a new lineage Run; ``linernotes
submit`` sends the same train job to a real local Ray head (dashboard + Jobs API, token auth) and the
job's checkpoint lands in the workspace's lineage store; the KubeRay RayJob names the train entrypoint."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from pipelines.config import load_config, parse_overrides
from provenance.store import LineageStore
from provenance.workspace import Workspace
from tests.training.conftest import write_tiny_dataset
from training.config import TrainConfig

REPO = Path(__file__).resolve().parents[2]
TINY = dict(steps=4, batch_size=2, crop_frames=32, warmup_steps=1, log_every=1, base_channels=16,
            channel_mults=(1, 2), text_dim=16, text_buckets=64, diffusion_steps=50, num_workers=1)


def make_workspace(root: Path) -> tuple[Workspace, str]:
    """A workspace whose lineage store holds the tiny dataset (as the shard stage would leave it)."""
    workspace = Workspace.at(root).ensure()
    staging = write_tiny_dataset(_mkdir(root.parent / "staging"))
    dataset_id = json.loads((staging / "dataset.json").read_text())["dataset_id"]
    shutil.copytree(staging, workspace.dataset_dir(dataset_id))
    store = LineageStore(workspace.store_url)
    run_id = store.start_run("shard", {"test": True})
    store.finish_run(run_id, {"segments": 12})
    store.add_dataset({"dataset_id": dataset_id, "run_id": run_id, "config_sha256": "0" * 64,
                       "uri": str(workspace.dataset_dir(dataset_id)), "num_tracks": 6, "num_segments": 12,
                       "num_train_segments": 10, "num_validation_segments": 2, "num_shards": 3}, {})
    store.close()
    return workspace, dataset_id


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_train_entrypoint_pins_every_field_of_the_config():
    from pipelines.engines.submit import train_entrypoint

    config = TrainConfig(**TINY, storage_path="s3://bucket/runs")
    argv = shlex.split(train_entrypoint(config, "/mnt/ws", "ds-1"))
    assert argv[:6] == ["linernotes", "train", "--workdir", "/mnt/ws", "--json", "--dataset"] and argv[6] == "ds-1"
    pairs = [argv[i + 1] for i, arg in enumerate(argv) if arg == "--set"]
    assert len(pairs) == len(TrainConfig.model_fields)
    assert load_config(TrainConfig, None, parse_overrides(pairs)) == config  # the cluster trains this config


def test_auth_headers_prefer_argument_then_environment_then_token_file(tmp_path, monkeypatch):
    from pipelines.engines.submit import auth_headers

    token_file = tmp_path / "auth_token"
    token_file.write_text("from-file\n")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token_file))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    assert auth_headers() == {"Authorization": "Bearer from-file"}
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert auth_headers() == {"Authorization": "Bearer from-env"}
    assert auth_headers("given") == {"Authorization": "Bearer given"}
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "none"))
    assert auth_headers() == {}


def test_resume_continues_an_interrupted_run(ray_local, tmp_path):
    from pipelines.cli import app

    workspace, dataset_id = make_workspace(tmp_path / "ws")
    runner = CliRunner()
    args = ["--workdir", str(workspace.root), "--json"]
    sets = [x for k, v in TINY.items() if k != "steps" for x in ("--set", f"{k}={list(v) if isinstance(v, tuple) else v}")]
    stopped = runner.invoke(app, ["train", "--steps", "4", "--stop-after-steps", "2", *sets, *args])
    assert stopped.exit_code == 0, stopped.output
    refused = runner.invoke(app, ["train", "--resume", "--steps", "9", *args])
    assert refused.exit_code == 2 and "--resume continues a run" in refused.output
    resumed = runner.invoke(app, ["train", "--resume", *args])
    assert resumed.exit_code == 0, resumed.output
    payload = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert payload["counts"]["steps"] == 4 and payload["checkpoint_id"].startswith("ckpt-")
    store = LineageStore(workspace.store_url)
    runs = store.list_runs("train")
    store.close()
    assert [r["status"] for r in runs] == ["stopped", "succeeded"]
    assert runs[1]["config"]["resumes"] == runs[0]["run_id"]
    assert runs[1]["config"]["ray_run_name"] == runs[0]["config"]["ray_run_name"] == runs[0]["run_id"]
    state = torch.load(payload["outputs"]["checkpoint"], weights_only=True)
    assert state["step"] == 4 and len(state["losses"]) == 4 and state["dataset_id"] == dataset_id
    nothing = runner.invoke(app, ["train", "--resume", *args])
    assert nothing.exit_code == 2 and "no interrupted train run" in nothing.output


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A real Ray head (``ray start --head --include-dashboard=true``) in its own temp dir and process group,
    so neither other Ray sessions on this machine nor ``ray.init()`` elsewhere ever see it."""
    temp_dir = Path(f"/tmp/lnr-head-{os.getpid()}")
    dashboard_port = _free_port()
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    log = open(tmp_path_factory.mktemp("ray_head") / "head.log", "w")
    head = subprocess.Popen(
        [str(bin_dir / "ray"), "start", "--head", "--block", "--num-cpus", "1", "--include-dashboard=true",
         f"--port={_free_port()}", f"--dashboard-port={dashboard_port}", "--dashboard-host=127.0.0.1",
         # free ports for the agents too: the defaults (e.g. the job agent's 52365) may be held by another
         # Ray on this machine, such as the test session's local Ray
         f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
         f"--metrics-export-port={_free_port()}", f"--runtime-env-agent-port={_free_port()}",
         f"--temp-dir={temp_dir}", "--disable-usage-stats", f"--object-store-memory={200 * 1024 * 1024}"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard_port}"
    try:
        from ray.job_submission import JobSubmissionClient

        from pipelines.engines.submit import auth_headers

        deadline = time.monotonic() + 240
        while True:
            try:
                JobSubmissionClient(address, headers=auth_headers()).list_jobs()
                break
            except Exception:
                if head.poll() is not None or time.monotonic() > deadline:
                    raise
                time.sleep(2)
        yield address
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(head.pid, sig)
            except ProcessLookupError:
                break
            try:
                head.wait(timeout=30)
            except subprocess.TimeoutExpired:
                continue
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.timeout(900)
def test_submit_runs_the_train_job_on_a_ray_cluster(ray_head, tmp_path):
    from pipelines.cli import app

    workspace, dataset_id = make_workspace(tmp_path / "ws")
    sets = [x for k, v in TINY.items() if k != "steps" for x in ("--set", f"{k}={list(v) if isinstance(v, tuple) else v}")]
    out = CliRunner().invoke(app, ["submit", "--address", ray_head, "--steps", "2", *sets, "--wait",
                                   "--timeout-s", "600", "--workdir", str(workspace.root), "--json"])
    assert out.exit_code == 0, out.output
    payload = json.loads(out.stdout.strip().splitlines()[-1])
    assert payload["status"] == "SUCCEEDED" and shlex.split(payload["entrypoint"])[:2] == ["linernotes", "train"]
    train = payload["result"]
    assert train["stage"] == "train" and train["counts"]["steps"] == 2 and train["dataset_id"] == dataset_id
    store = LineageStore(workspace.store_url)
    checkpoint = store.get_checkpoint(train["checkpoint_id"])
    run = store.get_run(train["run_id"])
    store.close()
    assert checkpoint is not None and checkpoint["step"] == 2 and run["status"] == "succeeded"
    assert TrainConfig(**{k: v for k, v in run["config"].items() if k in TrainConfig.model_fields}) == \
        TrainConfig(**{**TINY, "steps": 2})
    # the job ran in the cluster: its Ray Train run folder is the workspace's, beside the checkpoint
    assert (workspace.root / "ray_results" / train["run_id"] / "final" / "checkpoint.pt").is_file()


def test_submit_to_an_unreachable_cluster_fails_in_one_line(tmp_path):
    from pipelines.cli import app

    out = CliRunner().invoke(app, ["submit", "--address", f"http://127.0.0.1:{_free_port()}", "--steps", "1",
                                   "--set", "warmup_steps=0", "--workdir", str(tmp_path)])
    assert out.exit_code == 2 and "cannot reach the Ray Jobs API" in out.output


def test_kuberay_rayjob_runs_linernotes_train_on_gpu_workers():
    manifest = yaml.safe_load((REPO / "infra" / "kuberay" / "rayjob-train.yaml").read_text())
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayJob"
    spec = manifest["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["linernotes", "train"] and "--json" in argv
    config_path = argv[argv.index("--config") + 1]
    assert config_path.startswith("/app/")  # the image holds the repository at /app
    config = load_config(TrainConfig, REPO / config_path.removeprefix("/app/"))
    assert config.use_gpu and config.storage_path and config.storage_path.startswith(("s3://", "gs://"))
    workers = spec["rayClusterSpec"]["workerGroupSpecs"]
    gpus = sum(int(g["replicas"]) * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
               for g in workers)
    assert config.num_workers == gpus  # one Ray Train worker per GPU of the worker group
    assert spec["shutdownAfterJobFinishes"] is True
