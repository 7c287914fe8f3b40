"""The Dagster UI of pipelines/orchestration.py as a user opens it, for the page test and the README's screenshot
(docs/screenshots/dagster_asset_graph.py): a delivery made in code in an inbox, a Dagster instance on SQLite
(infra/dagster/dev.yaml, what `make dagster` uses) where partitions are materialized in-process, `dagster-webserver`
started from the repository root (it finds the definitions through pyproject's ``[tool.dagster]``, as `dagster dev`
does) on a free loopback port, and Debian's headless Chromium driven by Playwright."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import soundfile as sf
import yaml

from pipelines.orchestration import INBOX_ENV, READY_MARKER, SPEC_ENV
from tests.conftest import sine
from tests.pipelines.test_ingest import LICENSES, track, write_csv

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
WEBSERVER = Path(sys.executable).with_name("dagster-webserver")
#: the code location pyproject's [tool.dagster] names, and the asset group of the curation assets
LOCATION, GROUP = "linernotes", "curation"
GRAPH_ROUTE = f"/locations/{LOCATION}/asset-groups/{GROUP}"
#: licences of the deliveries: L-open grants commercial AI training, L-stream (streaming only) denies it
DELIVERY_LICENSES = [row for row in LICENSES if row["license_id"] in ("L-open", "L-stream")]
SHARD = {"segment_s": 0.5, "sample_rate_hz": 16000, "n_fft": 256, "hop_length": 128, "validation_fraction": 0.0}


def make_delivery(root: Path, tracks: dict[str, tuple[str, float, str]]) -> Path:
    """A complete CSV delivery: ``tracks`` maps track id → (ISRC, sine frequency in Hz, licence id); one 2 s mono
    22.05 kHz mixture per track, then the ``_READY`` marker, written last as an uploader does."""
    root.mkdir(parents=True)
    for track_id, (_, frequency_hz, _) in tracks.items():
        sf.write(root / f"{track_id}.wav", sine(frequency_hz, 2.0, 22050, 0.5).T, 22050)
    write_csv(root / "licenses.csv", DELIVERY_LICENSES, list(LICENSES[0]))
    rows = [{**track(t, license_id), "isrc": isrc} for t, (isrc, _, license_id) in tracks.items()]
    write_csv(root / "tracks.csv", rows, list(rows[0]))
    write_csv(root / "files.csv", [{"track_id": t, "role": "mixture", "instrument": "", "path": f"{t}.wav"}
                                   for t in tracks], ["track_id", "role", "instrument", "path"])
    (root / READY_MARKER).write_text("")
    return root


def write_spec(path: Path, stages: dict[str, dict]) -> Path:
    """A run spec with ``delivery`` left to the partitions; rights judged on a fixed day."""
    spec = {"delivery": None, "purpose": {"commercial": True, "territory": "Worldwide", "as_of": "2026-11-21"},
            "stages": stages, "engine": {"num_cpus": 1}}
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def instance_home(path: Path) -> Path:
    """A ``DAGSTER_HOME``: `make dagster`'s instance config (infra/dagster/dev.yaml: SQLite under DAGSTER_HOME,
    telemetry off) and no first-visit newsletter dialog over the page."""
    path.mkdir(parents=True, exist_ok=True)
    config = yaml.safe_load((ROOT / "infra" / "dagster" / "dev.yaml").read_text())
    (path / "dagster.yaml").write_text(yaml.safe_dump({**config, "nux": {"enabled": False}}, sort_keys=False))
    return path


def environment(home: Path, spec: Path, inbox: Path, workdir: Path) -> dict[str, str]:
    """The environment `make dagster` gives the webserver, pointed at temporary folders."""
    env = {**os.environ, "DAGSTER_HOME": str(home), SPEC_ENV: str(spec), INBOX_ENV: str(inbox),
           "LINERNOTES_WORKDIR": str(workdir), "DAGSTER_DISABLE_TELEMETRY": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.pop("LINERNOTES_STORE_URL", None)
    return env


def materialize(env: dict[str, str], deliveries: Sequence[str], stages: Sequence[str]) -> dict[str, dict[str, dict]]:
    """Materialize ``stages`` of each delivery's partition in-process, in the instance of ``env["DAGSTER_HOME"]``
    (its partition added first, as the inbox sensor does), with the resources ``env`` names.

    Returns:
        {delivery: {stage: its materialization's metadata values}}.
    """
    import dagster as dg

    from pipelines.orchestration import DELIVERIES, DeliveryInbox, LinernotesWorkspace, RayCluster, build_definitions

    saved = {key: os.environ.get(key) for key in ("DAGSTER_HOME", "DAGSTER_DISABLE_TELEMETRY")}
    os.environ.update({key: env[key] for key in saved})  # dev.yaml's base_dir reads DAGSTER_HOME
    try:
        (assets,) = build_definitions(env[SPEC_ENV]).assets
        resources = {"inbox": DeliveryInbox(path=env[INBOX_ENV]),
                     "workspace": LinernotesWorkspace(root=env["LINERNOTES_WORKDIR"]), "ray": RayCluster()}
        found: dict[str, dict[str, dict]] = {}
        with dg.DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
            instance.add_dynamic_partitions(DELIVERIES.name, list(deliveries))
            for delivery in deliveries:
                result = dg.materialize([assets], selection=list(stages), partition_key=delivery, instance=instance,
                                        resources=resources)
                assert result.success, delivery
                found[delivery] = {
                    event.asset_key.to_user_string(): {k: v.value for k, v in event.materialization.metadata.items()}
                    for event in result.get_asset_materialization_events()}
        return found
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def webserver(env: dict[str, str], log: Path, timeout_s: float = 120.0) -> Iterator[str]:
    """`dagster-webserver` on a free loopback port, from the repository root; yields its base URL once
    ``/server_info`` answers. Stopped on exit: SIGTERM to its process group (it and its code server), SIGKILL
    after 10 s.

    Raises:
        RuntimeError: it exited, or did not answer within ``timeout_s`` (the message holds its log's tail).
    """
    url = f"http://127.0.0.1:{free_port()}"
    port = url.rsplit(":", 1)[1]
    with open(log, "wb") as output:
        process = subprocess.Popen([str(WEBSERVER), "--host", "127.0.0.1", "--port", port], cwd=ROOT, env=env,
                                   stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"dagster-webserver exited {process.returncode}: {log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/server_info", timeout=5) as answer:
                    info = json.load(answer)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"dagster-webserver did not answer on {url} in {timeout_s:.0f} s: "
                                       f"{log.read_text()[-3000:]}") from None
                time.sleep(0.5)
        assert info["dagster_webserver_version"] == info["dagster_version"], info
        yield url
    finally:
        stop(process)


def stop(process: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM to the process group ``process`` leads, SIGKILL after ``grace_s``."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)  # its code server, should it outlive it
    except ProcessLookupError:
        pass
    process.wait(timeout=grace_s)


@contextmanager
def chromium() -> Iterator[Any]:
    """Debian's headless Chromium (``apt-get install -y chromium``, as .ci/run does) through Playwright."""
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).is_file():
        raise FileNotFoundError(f"the Dagster page needs Debian's chromium at {CHROMIUM}: apt-get install -y chromium")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM,
                                             args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"])
        try:
            yield browser
        finally:
            browser.close()


def watch(page: Any) -> list[str]:
    """Every console error, page error and HTTP error response of ``page`` from now on."""
    problems: list[str] = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("response", lambda r: problems.append(f"HTTP {r.status}: {r.url}") if r.status >= 400 else None)
    return problems


def graph_nodes(page: Any, names: Sequence[str], timeout_ms: float = 60_000) -> dict[str, str]:
    """The text of each named asset's node on the asset graph, once every node has loaded its status."""
    page.wait_for_function(
        """names => names.every(name => [...document.querySelectorAll('foreignObject')].some(node =>
             node.textContent.startsWith(name) && node.textContent.includes('Latest event')
             && !node.textContent.includes('Loading')))""", arg=list(names), timeout=timeout_ms)
    texts = page.evaluate("() => [...document.querySelectorAll('foreignObject')].map(node => node.textContent)")
    return {name: next(t for t in texts if t.startswith(name) and "Latest event" in t) for name in names}


def metadata_table(page: Any) -> dict[str, str]:
    """The asset page's metadata table (its latest materialization's entries, then the definition's): key → value
    text."""
    rows = page.evaluate("""() => [...document.querySelectorAll('table tr')]
        .map(tr => [...tr.querySelectorAll('td')].map(td => td.innerText.trim())).filter(r => r.length === 3)""")
    table: dict[str, str] = {}
    for key, _, value in rows:
        table.setdefault(key, value)
    return table
