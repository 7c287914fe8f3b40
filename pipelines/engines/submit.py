"""``linernotes submit``: send the same training job ``linernotes train`` runs here to a Ray cluster, through the
Ray Jobs API (``ray.job_submission.JobSubmissionClient``, the cluster's dashboard address).

The job's entrypoint is ``linernotes train --workdir W --json --set key=value ...`` with every field of the
resolved ``TrainConfig``, so the cluster trains exactly the config validated here (readable in the Ray
dashboard's job view). Inside the job Ray sets ``RAY_ADDRESS``, so the entrypoint joins the cluster
(``pipelines.engines.Engine.ray``) and Ray Train places its workers there. The workspace ``W`` must be
a path the cluster's nodes share (an NFS / PVC mount), and ``storage_path`` a folder or bucket every
worker reaches (``s3://``, ``gs://``).

Token authentication (Ray >= 2.52 enables it on new clusters) is answered with a bearer token: the
``token`` argument, else ``$RAY_AUTH_TOKEN``, else Ray's default token file ``~/.ray/auth_token``.
"""

from __future__ import annotations

import json
import os
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.config import config_dict

TERMINAL_STATUSES = ("SUCCEEDED", "FAILED", "STOPPED")
WORKING_DIR_EXCLUDES = [".venv", ".git", "linernotes-work", "**/__pycache__", "*.tar", "*.pt", "*.wav", "*.flac"]


@dataclass
class SubmitResult:
    """What was submitted and, with ``wait``, how it ended.

    Attributes:
        job_id: the Ray job's submission id.
        address: the dashboard address it went to.
        entrypoint: the shell command the cluster runs.
        status: the job status when ``submit_train`` returned (``PENDING``/``RUNNING`` unless waited for).
        result: the train command's ``--json`` object, parsed from the job's logs (``wait`` and success only).
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
    from ray.job_submission import JobSubmissionClient

    say = status or (lambda message: None)
    entrypoint = train_entrypoint(config, workdir, dataset_id, command)
    runtime_env: dict[str, Any] = {"env_vars": {"RAY_DEDUP_LOGS": "0", "GX_ANALYTICS_ENABLED": "false",
                                                **(env_vars or {})}}
    if working_dir:
        runtime_env.update({"working_dir": str(Path(working_dir).resolve()), "excludes": WORKING_DIR_EXCLUDES})
    try:
        client = JobSubmissionClient(address, headers=auth_headers(token))
    except Exception as err:  # the SDK raises ConnectionError, RuntimeError or requests' errors
        raise ConnectionError(f"cannot reach the Ray Jobs API at {address}: {err}") from err
    agent_deadline = time.monotonic() + agent_wait_s
    while True:  # a cluster that has just started may not have its job agent yet
        try:
            job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, submission_id=submission_id,
                                       metadata={"linernotes": "train", "config_sha256": config.sha256()})
            break
        except RuntimeError as err:
            if "No available agent" not in str(err) or time.monotonic() > agent_deadline:
                raise
            say("the cluster's job agent is not up yet; retrying")
            time.sleep(poll_s)
    say(f"submitted {job_id} to {address}")
    result = SubmitResult(job_id, address, entrypoint, str(client.get_job_status(job_id).value))
    if not wait:
        return result
    deadline = time.monotonic() + timeout_s
    while (state := str(client.get_job_status(job_id).value)) not in TERMINAL_STATUSES:
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {state} after {timeout_s:g} s (it keeps running)")
        time.sleep(poll_s)
    logs = client.get_job_logs(job_id).splitlines()
    result.status, result.logs_tail = state, logs[-20:]
    if state != "SUCCEEDED":
        raise RuntimeError(f"job {job_id} {state}: " + " | ".join(logs[-5:]))
    result.result = _last_json_object(logs)
    return result


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
