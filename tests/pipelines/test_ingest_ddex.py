"""Ingest of a DDEX ERN delivery: the real sample messages (copied into a temporary delivery at test time),
synthetic audio for some of the files they name, a licence agreement, and one hostile message."""

import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from pipelines.stages.ingest.stage import IngestConfig, run_ingest
from provenance.workspace import Workspace

LICENSES = ("license_id,licensor,license_name,license_url,territories,valid_from,valid_until,ai_training,"
            "commercial_use,attribution_required\nAGR-1,EMI Music Japan,AI training agreement,,Worldwide,"
            "2020-01-01,,allowed,true,true\n")
BOMB = """<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]>
<ern:NewReleaseMessage xmlns:ern="http://ddex.net/xml/ern/43">&lol3;</ern:NewReleaseMessage>"""


@pytest.fixture()
def ddex_delivery(corpus, tmp_path):
    root = tmp_path / "ddex-delivery"
    shutil.copytree(corpus / "ddex" / "ern411", root / "ern411")
    (root / "licenses.csv").write_text(LICENSES)
    (root / "zz-bomb.xml").write_text(BOMB)
    t = np.arange(2 * 44100) / 44100
    for number in (1, 2, 3):
        sf.write(root / "ern411" / f"0094631432057_01_00{number}.wav",
                 (0.3 * np.sin(2 * np.pi * 220 * number * t)).astype(np.float32), 44100)
    return root


def test_ddex_delivery_with_a_licence_agreement(ddex_delivery, tmp_path):
    result = run_ingest(ddex_delivery, Workspace.at(tmp_path / "w"),
                        IngestConfig(license_id="AGR-1", as_of="2026-11-21"))
    counts = result.counts
    assert counts["messages"] == {"input": 2, "accepted": 1, "rejected": 1, "rejected_by_reason": {"xml_unsafe": 1}}
    assert counts["tracks"]["input"] == 21 and counts["tracks"]["accepted"] == 3  # the 3 with audio
    assert counts["tracks"]["rejected_by_reason"] == {"no_audio": 18}
    assert counts["files"]["rejected_by_reason"] == {"missing_file": 18}
    for table in ("messages", "tracks", "files", "licenses"):
        assert counts[table]["accepted"] + counts[table]["rejected"] == counts[table]["input"]
    bomb = [r for r in result.rejections if r["record_kind"] == "message"]
    assert bomb[0]["record_id"] == "zz-bomb.xml" and bomb[0]["detail"]
    # the album's releases (1 Album + 21 TrackReleases) and its 3 deals are kept, in the run and the catalog
    assert counts["ddex"] == {"releases": 22, "deals": 3, "deals_granting_ai_training": 0}
    run_dir = Workspace.at(tmp_path / "w").run_dir(result.run_id)
    for name in ("releases", "deals"):
        assert pq.read_table(run_dir / f"{name}.parquet").equals(pq.read_table(result.outputs[name]))
    releases = pq.read_table(result.outputs["releases"]).to_pylist()
    album = next(r for r in releases if r["kind"] == "Release")
    assert (album["icpn"], album["release_type"], len(album["track_ids"])) == ("00094631432057", "Album", 21)
    assert {r["delivery_id"] for r in releases} == {result.delivery_id}
    assert {r["run_id"] for r in releases} == {result.run_id}
    deals = pq.read_table(result.outputs["deals"]).to_pylist()
    assert len(deals) == 3 and not any(d["grants_ai_training"] for d in deals)
    assert all(set(d["release_ids"]) <= {r["release_id"] for r in releases} for d in deals)


def test_ddex_deals_alone_admit_nothing(ddex_delivery, tmp_path):
    """The sample deals grant streaming and download; without a licence agreement no recording is admitted."""
    result = run_ingest(ddex_delivery, Workspace.at(tmp_path / "w"), IngestConfig(as_of="2026-11-21"))
    assert result.counts["tracks"]["accepted"] == 0
    assert result.counts["tracks"]["rejected_by_reason"] == {"missing_field": 21}
    assert all("--license" in r["detail"] for r in result.rejections if r["record_kind"] == "track")
