"""``linernotes submit``: send a whole declared run (``linernotes run SPEC``), or the training job ``linernotes train``
runs here, to a Ray cluster through the Ray Jobs API (``ray.job_submission.JobSubmissionClient``, the cluster's
dashboard address).

- **A run** (:func:`submit_run`): the spec is validated and pinned here (``pipelines.runspec.pin_spec``: every stage
  config with its defaults filled, absolute delivery and workspace paths) and shipped as ``linernotes-run.yaml`` in
  the job's ``working_dir``; the entrypoint is ``linernotes run linernotes-run.yaml --json``. The job reports the
  spec's sha256, and a job that ran another spec (a cluster whose linernotes fills other defaults) is an error.
- **Training** (:func:`submit_train`): ``linernotes train --workdir W --json --set key=value ...`` with every field of
  the resolved ``TrainConfig`` (readable in the Ray dashboard's job view).

Inside the job Ray sets ``RAY_ADDRESS``, so the entrypoint joins the cluster (``pipelines.engines.Engine.ray``): the
stages' Ray work (Ray Data tasks of shard, the task and actor pools of separate, clean and index, Ray Train's
workers) is placed on the cluster's nodes by Ray's scheduler, none of it pinned to the driver's node; ingest's Beam
DirectRunner runs inside the job's driver unless the spec's engine names another Beam runner. The job's driver runs
on the head node unless the cluster reserves entrypoint resources.

**Shared storage.** The workspace (lineage store, catalog, datasets, checkpoints) and the delivery must be paths
every node of the cluster mounts, at the same path as here (an NFS / ReadWriteMany PVC mount, see
``infra/kuberay/``): the driver writes the store, Ray workers write shards and read them back, Ray Train's workers
read the shards. ``storage_path`` of training may instead be a bucket every worker reaches (``s3://``, ``gs://``).

Token authentication (Ray >= 2.52 enables it on new clusters) is answered with a bearer token: the
``token`` argument, else ``$RAY_AUTH_TOKEN``, else Ray's default token file ``~/.ray/auth_token``.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.config import config_dict

TERMINAL_STATUSES = ("SUCCEEDED", "FAILED", "STOPPED")
#: the name of the pinned spec in a submitted run's working directory
PINNED_SPEC_NAME = "linernotes-run.yaml"
#: the packages of a checkout that ``submit_run(code_dir=...)`` uploads
PACKAGES = ("provenance", "cleaning", "training", "pipelines")
WORKING_DIR_EXCLUDES = [".venv", ".git", "linernotes-work", "**/__pycache__", "*.tar", "*.pt", "*.wav", "*.flac"]


@dataclass
class SubmitResult:
    """What was submitted and, with ``wait``, how it ended.

    Attributes:
        job_id: the Ray job's submission id.
        address: the dashboard address it went to.
        entrypoint: the shell command the cluster runs.
        status: the job status when the submit returned (``PENDING``/``RUNNING`` unless waited for).
        result: the entrypoint's ``--json`` object (the train result, or the run's payload with its stage table),
            parsed from the job's logs (``wait`` and success only).
        logs_tail: the last lines of the job's logs (``wait`` only).
    """

    job_id: str
    address: str
    entrypoint: str
    status: str
    result: dict[str, Any] | None = None
    logs_tail: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"stage": "submit", "job_id": self.job_id, "address": self.address, "entrypoint": self.entrypoint,
                "status": self.status, "result": self.result}


def train_entrypoint(config: Any, workdir: str, dataset_id: str | None = None, command: str = "linernotes") -> str:
    """The shell command that trains ``config`` (a ``TrainConfig``) on the cluster, every field pinned.

    Values are passed as JSON (valid YAML for ``--set``); ``None`` becomes ``null``.
    """
    parts = [*shlex.split(command), "train", "--workdir", workdir, "--json"]
    if dataset_id:
        parts += ["--dataset", dataset_id]
    for key, value in sorted(config_dict(config).items()):
        parts += ["--set", f"{key}={json.dumps(value)}"]
    return shlex.join(parts)


def auth_headers(token: str | None = None) -> dict[str, str]:
    """``{"Authorization": "Bearer ..."}`` from ``token``, ``$RAY_AUTH_TOKEN`` or ``~/.ray/auth_token``; ``{}``
    when there is none (a cluster without token authentication)."""
    token = token or os.environ.get("RAY_AUTH_TOKEN")
    if not token:
        path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
        token = path.read_text().strip() if path.is_file() else None
    return {"Authorization": f"Bearer {token}"} if token else {}


def submit_train(address: str, config: Any, workdir: str, *, dataset_id: str | None = None,
                 working_dir: str | None = None, env_vars: dict[str, str] | None = None,
                 token: str | None = None, submission_id: str | None = None, command: str = "linernotes",
                 wait: bool = False, timeout_s: float = 3600.0, poll_s: float = 2.0, agent_wait_s: float = 120.0,
                 status: Callable[[str], None] | None = None) -> SubmitResult:
    """Submit ``linernotes train`` for ``config`` as a Ray job; optionally wait for it to end.

    Args:
        address: the cluster's dashboard, ``http://HEAD:8265``.
        config: a validated ``training.config.TrainConfig``.
        workdir: the workspace path as the cluster sees it.
        dataset_id: the dataset to train on; default the workspace's newest.
        working_dir: a local folder Ray uploads as the job's working directory (this repository, when
            the cluster's image lacks linernotes); ``WORKING_DIR_EXCLUDES`` are left out.
        env_vars: extra environment variables of the job.
        token: the cluster's auth token (see the module doc).
        submission_id: the job id to use; default Ray's.
        command: how the cluster invokes linernotes (``linernotes``, or ``python -m pipelines.cli``).
        wait: poll until the job ends; the train result is parsed from its logs.
        timeout_s: give up waiting after this long (the job keeps running).
        poll_s: seconds between status polls.
        agent_wait_s: how long to retry while a freshly started cluster has no job agent yet.

    Raises:
        ConnectionError: the dashboard cannot be reached (or refuses the token).
        TimeoutError: ``wait`` and the job did not end within ``timeout_s``.
        RuntimeError: ``wait`` and the job failed or was stopped (the message ends with its logs' tail).
    """
    entrypoint = train_entrypoint(config, workdir, dataset_id, command)
    runtime_env = _runtime_env(env_vars, working_dir)
    if working_dir:
        runtime_env.update({"working_dir": str(Path(working_dir).resolve()), "excludes": WORKING_DIR_EXCLUDES})
    job = _Job(address, token, status, poll_s)
    result = job.submit(entrypoint, runtime_env, submission_id, {"linernotes": "train", "config_sha256": config.sha256()},
                        agent_wait_s)
    if wait:
        result.result = job.wait(result, timeout_s)
    return result


def run_entrypoint(command: str = "linernotes") -> str:
    """The shell command a submitted run's job executes: ``linernotes run linernotes-run.yaml --json``, the pinned spec
    read from the job's working directory."""
    return shlex.join([*shlex.split(command), "run", PINNED_SPEC_NAME, "--json"])


def submit_run(address: str, spec_yaml: str, spec_sha256: str, *, code_dir: str | None = None,
               env_vars: dict[str, str] | None = None, token: str | None = None, submission_id: str | None = None,
               command: str = "linernotes", wait: bool = False, timeout_s: float = 3600.0, poll_s: float = 2.0,
               agent_wait_s: float = 120.0, status: Callable[[str], None] | None = None) -> SubmitResult:
    """Submit ``linernotes run`` of a pinned spec as a Ray job; optionally wait for it and read its stage table.

    Args:
        address: the cluster's dashboard, ``http://HEAD:8265``.
        spec_yaml: the pinned spec (``yaml.safe_dump(pin_spec(spec))``), shipped as ``linernotes-run.yaml`` in the
            job's ``working_dir``.
        spec_sha256: the sha256 of the pinned spec as validated here (``parse_spec(pinned).sha256``): with ``wait``,
            the job's whole-run Run must report the same.
        code_dir: a local checkout of linernotes whose packages Ray uploads as the job's ``py_modules`` (when the
            cluster's image lacks linernotes, or has another version); ``WORKING_DIR_EXCLUDES`` are left out. The
            entrypoint's ``command`` must then import them: ``python -m pipelines.cli``, or a ``linernotes``
            console script (``PYTHONPATH`` lists the uploaded packages first).
        env_vars, token, submission_id, command, wait, timeout_s, poll_s, agent_wait_s, status: as
            :func:`submit_train`.

    Returns:
        The job; with ``wait``, ``result`` is the run's ``--json`` payload (``run_id``, ``status``, ``stages``, …).

    Raises:
        ConnectionError: the dashboard cannot be reached (or refuses the token).
        TimeoutError: ``wait`` and the job did not end within ``timeout_s``.
        RuntimeError: ``wait`` and the job failed or was stopped (the failed stage and its error, else the logs'
            tail), or it ran a spec whose sha256 is not ``spec_sha256``.
    """
    runtime_env = _runtime_env(env_vars, code_dir)
    if code_dir:
        runtime_env.update({"py_modules": [str(Path(code_dir).resolve() / name) for name in PACKAGES],
                            "excludes": WORKING_DIR_EXCLUDES})
    job = _Job(address, token, status, poll_s)
    with tempfile.TemporaryDirectory(prefix="linernotes-submit-") as staging:  # uploaded by submit_job
        (Path(staging) / PINNED_SPEC_NAME).write_text(spec_yaml, encoding="utf-8")
        runtime_env["working_dir"] = staging
        result = job.submit(run_entrypoint(command), runtime_env, submission_id,
                            {"linernotes": "run", "spec_sha256": spec_sha256}, agent_wait_s)
    if not wait:
        return result
    payload = job.wait(result, timeout_s)
    if payload is None or payload.get("spec_sha256") != spec_sha256:
        ran = payload.get("spec_sha256") if payload else "no result"
        raise RuntimeError(f"job {result.job_id} ran spec {ran}, not the spec {spec_sha256} validated here: the "
                           "cluster's linernotes differs from this one (ship this checkout with --working-dir)")
    result.result = payload
    return result


def _runtime_env(env_vars: dict[str, str] | None, code_dir: str | None = None) -> dict[str, Any]:
    """The job's environment variables; with shipped code, its checkout's commit (``LINERNOTES_GIT_COMMIT``), so the
    stages' cache keys name that code although the uploaded copy is no git checkout."""
    shipped = {}
    if code_dir:
        done = subprocess.run(["git", "-C", str(code_dir), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        if done.returncode == 0 and done.stdout.strip():
            shipped = {"LINERNOTES_GIT_COMMIT": done.stdout.strip()}
    return {"env_vars": {"RAY_DEDUP_LOGS": "0", "GX_ANALYTICS_ENABLED": "false", **shipped, **(env_vars or {})}}


class _Job:
    """One submission to the Jobs API at ``address``: submit, then poll to the end and read the logs."""

    def __init__(self, address: str, token: str | None, status: Callable[[str], None] | None, poll_s: float) -> None:
        from ray.job_submission import JobSubmissionClient

        self.address, self.poll_s = address, poll_s
        self.say = status or (lambda message: None)
        try:
            self.client = JobSubmissionClient(address, headers=auth_headers(token))
        except Exception as err:  # the SDK raises ConnectionError, RuntimeError or requests' errors
            raise ConnectionError(f"cannot reach the Ray Jobs API at {address}: {err}") from err

    def submit(self, entrypoint: str, runtime_env: dict[str, Any], submission_id: str | None,
               metadata: dict[str, str], agent_wait_s: float) -> SubmitResult:
        agent_deadline = time.monotonic() + agent_wait_s
        while True:  # a cluster that has just started may not have its job agent yet
            try:
                job_id = self.client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env,
                                                submission_id=submission_id, metadata=metadata)
                break
            except RuntimeError as err:
                if "No available agent" not in str(err) or time.monotonic() > agent_deadline:
                    raise
                self.say("the cluster's job agent is not up yet; retrying")
                time.sleep(self.poll_s)
        self.say(f"submitted {job_id} to {self.address}")
        return SubmitResult(job_id, self.address, entrypoint, str(self.client.get_job_status(job_id).value))

    def wait(self, result: SubmitResult, timeout_s: float) -> dict[str, Any] | None:
        """Poll until the job ends; its status and logs' tail go into ``result``. Returns the entrypoint's ``--json``
        object (the last JSON line of the logs)."""
        job_id = result.job_id
        deadline = time.monotonic() + timeout_s
        while (state := str(self.client.get_job_status(job_id).value)) not in TERMINAL_STATUSES:
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {state} after {timeout_s:g} s (it keeps running)")
            time.sleep(self.poll_s)
        logs = self.client.get_job_logs(job_id).splitlines()
        result.status, result.logs_tail = state, logs[-20:]
        payload = _last_json_object(logs)
        if state != "SUCCEEDED":
            failed = [row for row in (payload or {}).get("stages", []) if row.get("status") == "failed"]
            why = (f"stage {failed[0]['stage']} failed: {failed[0].get('error')}" if failed
                   else " | ".join(logs[-5:]))
            raise RuntimeError(f"job {job_id} {state}: {why}")
        return payload


def _last_json_object(lines: list[str]) -> dict[str, Any] | None:
    """The last line of the logs that parses as a JSON object (the ``--json`` output of the entrypoint)."""
    for line in reversed(lines):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None
