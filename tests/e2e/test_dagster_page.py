"""The Dagster UI as a data engineer opens it: a delivery with its `_READY` marker in a temporary inbox, its partition
materialized (ingest, in-process) in a SQLite instance made from infra/dagster/dev.yaml, `dagster-webserver` started
from the repository root on a loopback port, and the asset graph and the ingest asset's page loaded in headless
Chromium: the delivery's partition, its check results and ingest's counts (accepted, rejected by reason) are on the
page, equal to the delivery's truth and to the materialization's metadata, with no page or console error."""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect

from tests.e2e.dagster_ui import (
    GRAPH_ROUTE,
    SHARD,
    chromium,
    environment,
    graph_nodes,
    instance_home,
    make_delivery,
    materialize,
    metadata_table,
    watch,
    webserver,
    write_spec,
)

pytestmark = pytest.mark.e2e

DELIVERY = "open-label-2026-11"
#: track id → (ISRC, sine frequency in Hz, licence): L-stream denies AI training, so ingest rejects track c
TRACKS = {"a": ("GBAAA2600001", 440.0, "L-open"), "b": ("GBAAA2600002", 550.0, "L-open"),
          "c": ("GBAAA2600003", 660.0, "L-stream")}
ACCEPTED = sum(license_id == "L-open" for _, _, license_id in TRACKS.values())


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The webserver on the instance where the delivery's ingest partition is materialized; shard is not."""
    tmp = tmp_path_factory.mktemp("dagster-page")
    make_delivery(tmp / "inbox" / DELIVERY, TRACKS)
    spec = write_spec(tmp / "spec.yaml", {"ingest": {}, "shard": dict(SHARD)})
    env = environment(instance_home(tmp / "dagster-home"), spec, tmp / "inbox", tmp / "work")
    ingest = materialize(env, [DELIVERY], ["ingest"])[DELIVERY]["ingest"]
    with webserver(env, tmp / "webserver.log") as url, chromium() as browser:
        yield {"url": url, "browser": browser, "ingest": ingest}


def test_the_asset_graph_shows_the_materialized_partition_and_its_checks(served):
    page = served["browser"].new_page(viewport={"width": 1400, "height": 900})
    problems = watch(page)
    page.goto(served["url"] + GRAPH_ROUTE, wait_until="load")
    nodes = graph_nodes(page, ["ingest", "shard"])
    assert "2 / 2 Passed" in nodes["ingest"], nodes  # the two Great Expectations suites, as asset checks
    # the share of the delivery partitions materialized: ingest's one, shard's none
    filled = {name: re.search(r"Partitions(\d+)% filled", text) for name, text in nodes.items()}
    assert {name: int(found[1]) for name, found in filled.items() if found} == {"ingest": 100, "shard": 0}, nodes

    page.locator("foreignObject", has_text="Latest event").filter(has_text="ingest").first.click()
    page.wait_for_url(f"**{GRAPH_ROUTE}/lineage/ingest")
    page.get_by_text("Metadata plots").first.wait_for()
    for key in ("tracks.accepted", "tracks.rejected"):  # the counts, plotted per partition in the sidebar
        page.get_by_text(key, exact=True).first.wait_for()
    page.close()
    assert problems == []


def test_the_ingest_asset_page_shows_the_partition_and_its_counts(served):
    ingest = served["ingest"]
    page = served["browser"].new_page(viewport={"width": 1400, "height": 900})
    problems = watch(page)
    page.goto(served["url"] + "/assets/ingest", wait_until="load")
    page.get_by_text("tracks.accepted", exact=True).first.wait_for(timeout=60_000)
    # the partition of the latest materialization (expect waits for the status box to load it)
    expect(page.get_by_text("Latest materialization").first.locator("xpath=../..")).to_contain_text(DELIVERY)

    table = metadata_table(page)
    (reason,) = ingest["counts"]["tracks"]["rejected_by_reason"]
    # the delivery's truth: every L-open track accepted, the streaming-only one rejected, with its reason
    assert (table["tracks.input"], table["tracks.accepted"], table["tracks.rejected"]) == (
        str(len(TRACKS)), str(ACCEPTED), str(len(TRACKS) - ACCEPTED))
    assert table[f"tracks.rejected_by_reason.{reason}"] == "1"
    # and what the materialization recorded: every count, the catalog version, the ingest Run
    for key, value in ingest.items():
        if isinstance(value, int) or key in ("catalog_id", "run_id", "status", "opt_out_registry"):
            assert table[key] == str(value), key
    page.close()
    assert problems == []
