"""Ingest of a DDEX ERN delivery: the real sample messages (copied into a temporary delivery at test time),
synthetic audio for some of the files they name, a licence agreement, and one hostile message."""

import shutil

import numpy as np
import pytest
import soundfile as sf

from pipelines.ingest import IngestConfig, run_ingest
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


def test_ddex_deals_alone_admit_nothing(ddex_delivery, tmp_path):
    """The sample deals grant streaming and download; without a licence agreement no recording is admitted."""
    result = run_ingest(ddex_delivery, Workspace.at(tmp_path / "w"), IngestConfig(as_of="2026-11-21"))
    assert result.counts["tracks"]["accepted"] == 0
    assert result.counts["tracks"]["rejected_by_reason"] == {"missing_field": 21}
    assert all("--license" in r["detail"] for r in result.rejections if r["record_kind"] == "track")
