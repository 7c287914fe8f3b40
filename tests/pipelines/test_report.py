"""The HTML report of a generation, loaded in headless Chromium (Debian's ``chromium``, driven by Playwright):
every player's audio loads, every image decodes, the shares chart renders, no console errors — from the file
system and served by the API over HTTP."""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipelines.cli import app
from pipelines.lineage.report import ReportError, build_report, report_path
from provenance.store import LineageStore
from provenance.workspace import STORE_URL_ENV
from tests.pipelines.attributed_workspace import HOLDERS, make_attributed_workspace

CHROMIUM = "/usr/bin/chromium"
TOP_K = 5
runner = CliRunner()

INSPECT = """async () => {
  const audios = [...document.querySelectorAll('audio')];
  const audio = await Promise.all(audios.map(a => new Promise(resolve => {
    const done = () => resolve({src: a.currentSrc, ready: a.readyState, duration: a.duration,
                                error: a.error ? a.error.code : null});
    if (a.readyState >= 1 || a.error) return done();
    a.addEventListener('loadedmetadata', done);
    a.addEventListener('error', done);
    setTimeout(done, 15000);
  })));
  await Promise.all([...document.images].map(i => i.decode().catch(() => null)));
  const images = [...document.images].map(i => ({id: i.id, src: i.src, width: i.naturalWidth, height: i.naturalHeight}));
  const chart = document.getElementById('shares-chart').getBoundingClientRect();
  const bars = [...document.querySelectorAll('#shares-table .bar')].map(b => b.getBoundingClientRect().width);
  const shares = [...document.querySelectorAll('#shares-table td.num')].map(td => parseFloat(td.textContent));
  const holders = [...document.querySelectorAll('#shares-table tr td:first-child')].map(td => td.textContent);
  const ranks = [...document.querySelectorAll('tr.segment td:first-child')].map(td => parseInt(td.textContent));
  return {audio, images, chart: {width: chart.width, height: chart.height}, bars, shares, holders, ranks,
          injected: document.querySelectorAll('publishing').length};
}"""


@pytest.fixture(scope="module")
def attributed(tmp_path_factory):
    return make_attributed_workspace(tmp_path_factory.mktemp("report") / "work")


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).is_file():
        pytest.fail(f"the report test needs Debian's chromium at {CHROMIUM}: apt-get install -y chromium (.ci/run does)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM,
                                             args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"])
        yield browser
        browser.close()


def load(browser, url: str) -> tuple[dict, list[str]]:
    """Open ``url``; returns the page's inspection and every console error, page error and failed request."""
    page = browser.new_page()
    problems: list[str] = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url} {r.failure}"))
    page.on("response", lambda r: problems.append(f"HTTP {r.status}: {r.url}") if r.status >= 400 else None)
    response = page.goto(url, wait_until="load")
    assert response is None or response.ok, url
    result = page.evaluate(INSPECT)
    page.close()
    return result, problems


def assert_complete(result: dict, problems: list[str], stored: list[dict]) -> None:
    assert problems == []
    assert len(result["audio"]) == 1 + TOP_K
    for player in result["audio"]:
        assert player["error"] is None and player["ready"] >= 1, player
        assert player["duration"] == pytest.approx(2.0, abs=0.01), player
    assert result["audio"][0]["src"].endswith("/generation.wav")
    assert len(result["images"]) == 2 + TOP_K  # generation mel, shares chart, one mel per segment
    assert all(image["width"] > 0 and image["height"] > 0 for image in result["images"]), result["images"]
    assert result["chart"]["width"] > 100 and result["chart"]["height"] > 20
    assert result["bars"] and all(width > 0 for width in result["bars"])
    assert sum(result["shares"]) == pytest.approx(100.0, abs=0.2)
    holder_share: dict[str, float] = {}
    for row in stored:
        holder_share[row["rights_holder"]] = holder_share.get(row["rights_holder"], 0.0) + 100 * row["share"]
    assert dict(zip(result["holders"], result["shares"])) == pytest.approx(
        {h: round(s, 1) for h, s in holder_share.items()}, abs=0.051)
    assert result["ranks"] == [row["rank"] for row in stored]
    assert result["injected"] == 0  # "Mid & Co <Publishing>" is text, not markup


def stored_rows(attributed) -> list[dict]:
    store = LineageStore(attributed.workspace.store_url)
    try:
        return store.get_attributions(attributed.generation_id, "embedding")
    finally:
        store.close()


def test_cli_report_loads_completely_in_chromium(attributed, browser, monkeypatch):
    monkeypatch.delenv(STORE_URL_ENV, raising=False)
    result = runner.invoke(app, ["report", attributed.generation_id, "--top-k", str(TOP_K), "--workdir",
                                 str(attributed.workspace.root), "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    path = report_path(attributed.workspace, attributed.generation_id)
    assert payload["report"] == str(path) and payload["players"] == 1 + TOP_K
    html = path.read_text()
    assert "Mid &amp; Co &lt;Publishing&gt;" in html and "Test Training Licence" in html
    assert str(attributed.workspace.root) not in html  # relative links only: the folder can be moved
    inspection, problems = load(browser, path.as_uri())
    assert_complete(inspection, problems, stored_rows(attributed))
    assert set(HOLDERS.values()) >= set(inspection["holders"])


def test_report_served_by_the_api_loads_completely(attributed, browser):
    import uvicorn

    from pipelines.api.app import create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(attributed.workspace, token="t"), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
            time.sleep(0.05)
        # the API builds the report and redirects to the generation's folder, where its relative links resolve
        url = f"http://127.0.0.1:{port}/generations/{attributed.generation_id}/report?rebuild=true"
        inspection, problems = load(browser, url)
        assert_complete(inspection, problems, stored_rows(attributed))
        assert all(p["src"].startswith(f"http://127.0.0.1:{port}/") for p in inspection["audio"])
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_report_errors_name_what_is_missing(attributed, monkeypatch):
    monkeypatch.delenv(STORE_URL_ENV, raising=False)
    with pytest.raises(ReportError, match="no generation 'gen-nope'"):
        build_report(attributed.workspace, "gen-nope")
    with pytest.raises(ReportError, match=r"no dtrak attribution \(stored: embedding\)"):
        build_report(attributed.workspace, attributed.generation_id, method="dtrak")
    result = runner.invoke(app, ["report", "gen-nope", "--workdir", str(attributed.workspace.root)])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1 and "gen-nope" in result.output


def test_report_without_the_dataset_says_so_and_still_loads(attributed, browser, tmp_path):
    dataset_dir = attributed.workspace.dataset_dir(attributed.dataset_id)
    moved = tmp_path / "moved"
    shutil.move(str(dataset_dir), moved)
    try:
        payload = build_report(attributed.workspace, attributed.generation_id, top_k=2)
    finally:
        shutil.move(str(moved), dataset_dir)
    assert payload["players"] == 1
    html = report_path(attributed.workspace, attributed.generation_id).read_text()
    assert html.count("audio unavailable") == 2
    inspection, problems = load(browser, report_path(attributed.workspace, attributed.generation_id).as_uri())
    assert problems == [] and len(inspection["audio"]) == 1 and inspection["audio"][0]["ready"] >= 1
