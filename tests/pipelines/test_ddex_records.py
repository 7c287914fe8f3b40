"""DDEX releases and deals kept as records (``records.RELEASE``, ``records.DEAL``), from the real samples in
../shared/corpus/ddex. Expected counts are read from the XML text with regular expressions, independently
of the lxml mapping under test, and checked against what reading the messages by eye gives."""

from __future__ import annotations

import datetime as dt
import re
import shutil
from pathlib import Path

import pytest

from pipelines.stages.ingest.ddex import deal_rows, parse_ern, read_ern_records, release_rows
from provenance.records import DEAL, RELEASE, to_table

DDEX = Path(__file__).resolve().parents[2].parent / "shared" / "corpus" / "ddex"

# sample → (Release + TrackRelease elements, DealTerms elements) as read in the XML
EXPECTED = {
    "ern411/1_Audio.xml": (22, 3),
    "ern43/1_Audio.xml": (22, 3),
    "ern43/4_SimpleAudioSingle.xml": (1, 747),
    "ern43/8_DjMix.xml": (1, 1),
}


@pytest.fixture(scope="module", autouse=True)
def ddex_corpus() -> Path:
    if not DDEX.is_dir():
        pytest.fail(f"the DDEX samples are not at {DDEX}: these tests need ../shared/corpus beside the repo")
    return DDEX


def _count(pattern: str, text: str) -> int:
    return len(re.findall(pattern, text))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_release_and_deal_of_a_sample_becomes_a_record(name: str) -> None:
    text = (DDEX / name).read_text(encoding="utf-8")
    num_releases, num_deals = EXPECTED[name]
    assert _count(r"<(?:Release|TrackRelease)[\s>]", text) == num_releases  # the table above is the XML's
    assert _count(r"<DealTerms[\s>]", text) == num_deals
    message = parse_ern(DDEX / name, DDEX)
    releases, deals = release_rows(message, DDEX), deal_rows(message, DDEX)
    assert len(releases) == num_releases and len(deals) == num_deals
    assert len({r["release_id"] for r in releases}) == num_releases  # unique keys
    assert len({d["deal_id"] for d in deals}) == num_deals
    assert all(r["message"] == name and d["message"] == name for r in releases for d in deals[:1])
    # every deal names releases of its own message, and none grants AI training (streaming/download only)
    ids = {r["release_id"] for r in releases}
    assert all(d["release_ids"] and set(d["release_ids"]) <= ids for d in deals)
    assert not any(d["grants_ai_training"] for d in deals)
    uses = {u for d in deals for u in d["use_types"]}
    assert uses and uses <= {"Stream", "OnDemandStream", "NonInteractiveStream", "ConditionalDownload",
                             "PermanentDownload"}
    assert sorted(re.findall(r"<TerritoryCode>\s*([^<\s]*)\s*</TerritoryCode>", text)) == sorted(
        t for d in deals for t in d["territories"])
    # a release's own ICPN, not that of a RelatedRelease (the album's physical equivalent)
    related = re.findall(r"<RelatedRelease>.*?<ICPN[^>]*>\s*([^<\s]*)\s*</ICPN>.*?</RelatedRelease>", text, re.S)
    icpns = re.findall(r"<ICPN[^>]*>\s*([^<\s]*)\s*</ICPN>", text)
    assert sorted(icpns) == sorted([r["icpn"] for r in releases if r["icpn"]] + related)
    # the rows fit the Arrow schemas
    assert to_table([{**r, "delivery_id": "d", "run_id": "r"} for r in releases], RELEASE).num_rows == num_releases
    assert to_table([{**d, "delivery_id": "d", "run_id": "r"} for d in deals], DEAL).num_rows == num_deals


def test_the_album_release_its_tracks_and_deals() -> None:
    """ERN 4.1.1 "Yume no Hajmari": one Album (ICPN 00094631432057) of 21 SoundRecordings, each also a
    TrackRelease; three deals in Japan from 2004-04-01, open-ended."""
    message = parse_ern(DDEX / "ern411" / "1_Audio.xml", DDEX)
    releases = {r["release_reference"]: r for r in release_rows(message, DDEX)}
    album = releases["R0"]
    assert (album["kind"], album["release_type"], album["icpn"]) == ("Release", "Album", "00094631432057")
    assert (album["title"], album["display_artist"], album["message_id"]) == ("Yume no Hajmari", "Saeko Shu",
                                                                              "Test1.1")
    assert album["track_ids"] == [t["track_id"] for t in message.tracks]  # all 21, in order
    assert album["track_ids"][0] == "isrc-JPTO09404900"
    assert releases["R1"]["kind"] == "TrackRelease" and releases["R1"]["track_ids"] == ["isrc-JPTO09404900"]
    deals = deal_rows(message, DDEX)
    assert [d["deal_id"] for d in deals] == [f"ern411/1_Audio.xml#deal-{n}" for n in (1, 2, 3)]
    assert {tuple(d["territories"]) for d in deals} == {("JP",)}
    assert {d["valid_from"] for d in deals} == {dt.date(2004, 4, 1)} and {d["valid_until"] for d in deals} == {None}
    assert set(deals[0]["release_references"]) == {f"R{n}" for n in range(1, 22)}


def test_the_single_has_a_grid_and_a_deal_per_territory_and_model() -> None:
    message = parse_ern(DDEX / "ern43" / "4_SimpleAudioSingle.xml", DDEX)
    (release,) = release_rows(message, DDEX)
    assert (release["grid"], release["release_type"], release["title"]) == (
        "A10302B0003989564F", "SingleResourceRelease", "RIOPY: I Love You")
    assert release["track_ids"] == ["isrc-GBAYC1700598"] and release["proprietary_ids"] == ["GBAYC1700598"]
    deals = deal_rows(message, DDEX)
    models = {m for d in deals for m in d["commercial_model_types"]}
    assert models == {"AdvertisementSupportedModel", "SubscriptionModel", "PayAsYouGoModel"}
    assert len({t for d in deals for t in d["territories"]}) == 249  # 3 deals (one per model) per territory


def test_read_ern_records_over_a_delivery(tmp_path: Path) -> None:
    """Two messages of the same album (4.1.1 and 4.3) keep distinct release ids; a broken message adds none."""
    for name in ("ern411/1_Audio.xml", "ern43/1_Audio.xml"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(DDEX / name, tmp_path / name)
    (tmp_path / "broken.xml").write_text("<not closed")
    records = read_ern_records(tmp_path)
    assert len(records.releases) == 44 and len(records.deals) == 6 and len(records.errors) == 1
    assert [r["icpn"] for r in records.releases if r["kind"] == "Release"] == ["00094631432057"] * 2
    assert len({r["release_id"] for r in records.releases}) == 44
