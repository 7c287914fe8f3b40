"""The README's screenshot of the Dagster UI (docs/img/dagster-asset-graph.png): two deliveries made in code land in a
temporary inbox, both partitions of ingest and shard are materialized in a SQLite instance (infra/dagster/dev.yaml),
`dagster-webserver` serves them from the repository root, and headless Chromium photographs the asset graph with
ingest selected: both stages with their partitions and checks, and ingest's counts plotted per delivery.

    PYTHONPATH=. .venv/bin/python docs/screenshots/dagster_asset_graph.py [OUT.png]

Takes about a minute (Ray starts for shard); needs Debian's chromium (``apt-get install -y chromium``)."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from tests.e2e.dagster_ui import (
    GRAPH_ROUTE,
    ROOT,
    SHARD,
    chromium,
    environment,
    graph_nodes,
    instance_home,
    make_delivery,
    materialize,
    webserver,
    write_spec,
)

#: delivery → {track id: (ISRC, sine frequency in Hz, licence)}; L-stream (streaming only) is rejected by ingest
DELIVERIES = {
    "open-label-2026-11": {"a": ("GBAAA2600001", 440.0, "L-open"), "b": ("GBAAA2600002", 550.0, "L-open"),
                           "c": ("GBAAA2600003", 660.0, "L-stream")},
    "open-label-2026-12": {"d": ("GBAAA2600004", 330.0, "L-open"), "e": ("GBAAA2600005", 495.0, "L-open"),
                           "f": ("GBAAA2600006", 587.0, "L-open"), "g": ("GBAAA2600007", 392.0, "L-stream")},
}
OUT = ROOT / "docs" / "img" / "dagster-asset-graph.png"


def main(out: Path = OUT) -> Path:
    with tempfile.TemporaryDirectory(prefix="dagster-screenshot-") as folder:
        tmp = Path(folder)
        for name, tracks in DELIVERIES.items():
            make_delivery(tmp / "inbox" / name, tracks)
        spec = write_spec(tmp / "spec.yaml", {"ingest": {}, "shard": dict(SHARD)})
        env = environment(instance_home(tmp / "dagster-home"), spec, tmp / "inbox", tmp / "work")
        materialize(env, list(DELIVERIES), ["ingest", "shard"])
        with webserver(env, tmp / "webserver.log") as url, chromium() as browser:
            page = browser.new_page(viewport={"width": 1440, "height": 900})
            page.goto(url + GRAPH_ROUTE, wait_until="load")
            graph_nodes(page, ["ingest", "shard"])
            page.get_by_text("Hide navigation").click()
            page.locator("button", has=page.get_by_role("img", name="settings", exact=True)).last.click()
            page.get_by_text("Change graph to vertical orientation").click()  # ingest above shard, beside the sidebar
            page.locator("foreignObject", has_text="Latest event").filter(has_text="ingest").first.click()
            plot = page.get_by_text("tracks.accepted", exact=True).first  # ingest's counts, plotted per delivery
            plot.wait_for()
            plot.evaluate("title => title.scrollIntoView({block: 'start'})")
            page.wait_for_timeout(1500)  # the plots' animation
            out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out))
    return out


if __name__ == "__main__":
    print(main(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT))
