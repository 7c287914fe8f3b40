"""DDEX ERN 4.x messages: the real samples in ../shared/corpus/ddex, their XSD, and hostile XML built here."""

from __future__ import annotations

import re
import resource
import time
from pathlib import Path

import pytest

from pipelines.stages.ingest.ddex import (
    INVALID_FIELD,
    SCHEMA_INVALID,
    XML_UNSAFE,
    Deal,
    ErnError,
    ErnLimits,
    deal_grants_training,
    parse_ern,
    read_ern_delivery,
    validate_ern,
)
from pipelines.stages.ingest.delivery import TRACK_COLUMNS, check_file_row, parse_track
from provenance.policy import check_isrc, normalize_isrc
from provenance.records import RejectionReason

CORPUS = Path(__file__).resolve().parents[2].parent / "shared" / "corpus"
DDEX = CORPUS / "ddex"
XSD = DDEX / "xsd" / "ern411" / "release-notification.xsd"
ERN411 = DDEX / "ern411" / "1_Audio.xml"

# sample → (ISRC elements, SoundRecordings, deals, version)
SAMPLES = {
    "ern411/1_Audio.xml": (21, 21, 3, "4.1.1"),
    "ern43/1_Audio.xml": (21, 21, 3, "4.3"),
    "ern43/4_SimpleAudioSingle.xml": (1, 1, 747, "4.3"),
    "ern43/8_DjMix.xml": (1, 9, 1, "4.3"),
}
FAST_S = 1.0


@pytest.fixture(scope="module", autouse=True)
def ddex_corpus() -> Path:
    if not DDEX.is_dir():
        pytest.fail(f"the DDEX samples are not at {DDEX}: these tests need ../shared/corpus beside the repo")
    return DDEX


def _isrc_elements(path: Path) -> list[str]:
    return re.findall(r"<ISRC>\s*([^<]*?)\s*</ISRC>", path.read_text(encoding="utf-8"))


# the real samples -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_sample_parses_with_every_isrc(name: str) -> None:
    isrc_count, recording_count, deal_count, version = SAMPLES[name]
    path = DDEX / name
    raw_isrcs = _isrc_elements(path)
    assert len(raw_isrcs) == isrc_count
    assert len(re.findall(r"<SoundRecording[\s>]", path.read_text(encoding="utf-8"))) == recording_count

    message = parse_ern(path, DDEX)
    assert message.version == version
    assert message.schema_checked == (version == "4.1.1")
    assert len(message.tracks) == recording_count
    assert len(message.deals) == deal_count
    found = {normalize_isrc(t["isrc"]) for t in message.tracks if t["isrc"]}
    assert found == {normalize_isrc(i) for i in raw_isrcs}
    for isrc in found:
        assert len(isrc) == 12 and isrc == isrc.upper() and check_isrc(isrc) is None
    for track in message.tracks:
        assert set(TRACK_COLUMNS) | {"iswc"} <= set(track)
        assert track["title"] and track["artist"]
        assert track["license_id"] == ""  # deals never grant training; the licence comes from an agreement
        expected_id = f"isrc-{normalize_isrc(track['isrc'])}" if track["isrc"] else None
        assert expected_id is None or track["track_id"] == expected_id
    assert len({t["track_id"] for t in message.tracks}) == len(message.tracks)
    # one mixture per recording that names an audio file; cover images are not audio
    assert len(message.files) == isrc_count
    for row in message.files:
        assert row["role"] == "mixture" and row["instrument"] == ""
        assert row["path"].startswith(f"{Path(name).parent.as_posix()}/")
        assert row["path"].endswith((".wav", ".flac"))
        assert row["track_id"] in {t["track_id"] for t in message.tracks}


def test_sample_fields_map_as_in_the_message() -> None:
    album = parse_ern(ERN411, DDEX)
    first = album.tracks[0]
    assert (first["isrc"], first["title"], first["artist"]) == ("JPTO09404900", "Yume no Lullaby", "Saeko Shu")
    assert first["rights_holder"] == "EMI Music Japan Inc."  # from "(P) 1994 EMI Music Japan Inc."
    assert first["genre"] == "J-Pop"
    assert album.files[0]["path"] == "ern411/0094631432057_01_001.wav"
    release = album.releases[0]
    assert (release.kind, release.icpn, release.title) == ("Release", "00094631432057", "Yume no Hajmari")
    assert len(release.resource_references) == 21

    single = parse_ern(DDEX / "ern43" / "4_SimpleAudioSingle.xml", DDEX)
    assert single.releases[0].grid == "A10302B0003989564F"
    assert single.files[0]["path"] == "ern43/resources/190295810726_00001_LL.flac"
    assert single.tracks[0]["genre"] == "Classical"

    mix = parse_ern(DDEX / "ern43" / "8_DjMix.xml", DDEX)
    assert mix.message_id == "" and mix.tracks[0]["track_id"] == "isrc-USWE34255410"
    sources = mix.tracks[1:]  # supplemental recordings with proprietary ids only, no file, no rights line
    assert [t["track_id"] for t in sources] == [f"ddex-ern43_8_DjMix-A{i}" for i in range(2, 10)]
    assert all(t["isrc"] == "" and t["rights_holder"] == "" for t in sources)  # not credited to the mix's label


def test_rows_feed_the_csv_track_parser_which_wants_a_licence() -> None:
    track = parse_ern(ERN411, DDEX).tracks[0]
    record, rejected = parse_track(track, "ddex-test")
    assert record is None and rejected["reason"] == RejectionReason.MISSING_FIELD
    assert "license_id" in rejected["detail"]
    record, rejected = parse_track({**track, "license_id": "lic-1"}, "ddex-test")
    assert rejected is None and record["isrc"] == "JPTO09404900" and record["rights_holder"]


def test_sample_deals_grant_no_training() -> None:
    use_types: set[str] = set()
    for name in SAMPLES:
        for deal in parse_ern(DDEX / name, DDEX).deals:
            assert deal_grants_training(deal) is False
            use_types.update(deal.use_types)
    assert {"OnDemandStream", "PermanentDownload"} <= use_types
    granting = Deal(("R0",), ("AsPerContract",), ("UserDefined",), ("AI Training",), ("US",), (), "2024-01-01", "")
    assert deal_grants_training(granting) is True
    vague = Deal(("R0",), ("AsPerContract",), ("Use", "AsPerContract", "UserDefined"), ("Sync",), ("US",), (), "", "")
    assert deal_grants_training(vague) is False


# the 4.1.1 XSD ----------------------------------------------------------------------------------------

def test_ern411_sample_is_schema_valid() -> None:
    assert validate_ern(ERN411, xsd_path=XSD) == []
    assert validate_ern(DDEX / "ern43" / "1_Audio.xml") == []  # no 4.3 XSD: nothing checked


def test_a_missing_required_element_fails_the_xsd(tmp_path: Path) -> None:
    text = ERN411.read_text(encoding="utf-8")
    broken, count = re.subn(r"<Duration>PT2M28S</Duration>", "", text, count=1)
    assert count == 1
    path = tmp_path / "no_duration.xml"
    path.write_text(broken, encoding="utf-8")
    errors = validate_ern(path, xsd_path=XSD)
    assert errors and any("Duration" in e for e in errors)
    with pytest.raises(ErnError) as caught:
        parse_ern(path, tmp_path)
    assert caught.value.reason == SCHEMA_INVALID and "Duration" in caught.value.detail
    assert parse_ern(path, tmp_path, validate=False).tracks[0]["isrc"] == "JPTO09404900"


def test_a_junk_isrc_is_kept_raw_for_the_policy(tmp_path: Path) -> None:
    path = tmp_path / "junk_isrc.xml"
    path.write_text(ERN411.read_text(encoding="utf-8").replace("JPTO09404900", "not-an ISRC!"), encoding="utf-8")
    assert validate_ern(path, xsd_path=XSD) == []  # the XSD types ISRC as xs:string
    track = parse_ern(path, tmp_path).tracks[0]
    assert track["isrc"] == "not-an ISRC!"
    assert check_isrc(normalize_isrc(track["isrc"])) is not None
    assert track["track_id"] == "ddex-junk_isrc-A1"  # not ISRC-based: the ISRC is not well formed


# hostile XML ------------------------------------------------------------------------------------------

BILLION_LAUGHS = """<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
 <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
 <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
 <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
 <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
 <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<ern:NewReleaseMessage xmlns:ern="http://ddex.net/xml/ern/43"><MessageHeader><MessageId>&lol9;</MessageId>
</MessageHeader></ern:NewReleaseMessage>
"""


def _xxe(system_id: str) -> str:
    return (f'<?xml version="1.0"?>\n<!DOCTYPE m [ <!ENTITY xxe SYSTEM "{system_id}"> ]>\n'
            '<ern:NewReleaseMessage xmlns:ern="http://ddex.net/xml/ern/43"><MessageHeader>'
            "<MessageId>&xxe;</MessageId></MessageHeader></ern:NewReleaseMessage>\n")


def _nested(depth: int) -> str:
    return ('<ern:NewReleaseMessage xmlns:ern="http://ddex.net/xml/ern/43">' + "<a>" * depth + "x"
            + "</a>" * depth + "</ern:NewReleaseMessage>")


HOSTILE = {
    "billion_laughs": (BILLION_LAUGHS.encode(), "ENTITY"),
    "xxe_file": (_xxe("file:///etc/passwd").encode(), "ENTITY"),
    "xxe_http": (_xxe("http://169.254.169.254/latest/meta-data/").encode(), "ENTITY"),
    "external_dtd": (b'<?xml version="1.0"?>\n<!DOCTYPE m SYSTEM "http://example.com/evil.dtd">\n<m/>', "DOCTYPE"),
    "xxe_utf16": (_xxe("file:///etc/passwd").replace('"1.0"?>', '"1.0" encoding="UTF-16"?>').encode("utf-16"),
                  "ENTITY"),
    "nested_10000": (_nested(10_000).encode(), "deep"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_xml_is_refused_fast(tmp_path: Path, name: str) -> None:
    data, words = HOSTILE[name]
    path = tmp_path / f"{name}.xml"
    path.write_bytes(data)
    peak_before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    with pytest.raises(ErnError) as caught:
        parse_ern(path, tmp_path)
    elapsed_s = time.perf_counter() - started
    assert elapsed_s < FAST_S
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before_kib < 100 * 1024
    assert caught.value.reason == XML_UNSAFE
    assert words in caught.value.detail
    assert "root:" not in caught.value.detail  # nothing of /etc/passwd leaks into the message


def test_nesting_past_a_configured_depth_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "nested_40.xml"
    path.write_text(_nested(40), encoding="utf-8")
    with pytest.raises(ErnError) as caught:
        parse_ern(path, tmp_path, limits=ErnLimits(max_depth=32))
    assert caught.value.reason == XML_UNSAFE and "deeper than 32" in caught.value.detail
    parse_ern(ERN411, DDEX, limits=ErnLimits(max_depth=32))  # the real album nests less than that


def test_oversize_files_are_refused_before_reading(tmp_path: Path) -> None:
    sparse = tmp_path / "huge.xml"
    with sparse.open("wb") as stream:
        stream.truncate(60 * 1024 * 1024)  # sparse: 60 MB on paper, nothing written
    started = time.perf_counter()
    with pytest.raises(ErnError) as caught:
        parse_ern(sparse, tmp_path)
    assert time.perf_counter() - started < FAST_S
    assert caught.value.reason == XML_UNSAFE and "limit" in caught.value.detail
    with pytest.raises(ErnError) as caught:
        parse_ern(ERN411, DDEX, limits=ErnLimits(max_bytes=10_000))
    assert caught.value.reason == XML_UNSAFE and "10000-byte limit" in caught.value.detail


def test_malformed_and_foreign_messages_say_why(tmp_path: Path) -> None:
    malformed = tmp_path / "malformed.xml"
    malformed.write_text('<ern:NewReleaseMessage xmlns:ern="http://ddex.net/xml/ern/43"><MessageHeader>')
    with pytest.raises(ErnError) as caught:
        parse_ern(malformed, tmp_path)
    assert caught.value.reason == INVALID_FIELD == RejectionReason.INVALID_FIELD
    foreign = tmp_path / "ern382.xml"
    foreign.write_text('<ern:NewReleaseMessage xmlns:ern="http://ddex.net/xml/ern/382"/>')
    with pytest.raises(ErnError) as caught:
        parse_ern(foreign, tmp_path)
    assert caught.value.reason == SCHEMA_INVALID and "ERN 4.x" in caught.value.detail


# a delivery folder of messages ------------------------------------------------------------------------

def test_read_ern_delivery_keeps_going_past_bad_messages(tmp_path: Path) -> None:
    (tmp_path / "album").mkdir()
    (tmp_path / "album" / "1_Audio.xml").write_bytes(ERN411.read_bytes())
    (tmp_path / "album" / "0094631432057_01_001.wav").write_bytes(b"RIFF")
    (tmp_path / "single.xml").write_bytes((DDEX / "ern43" / "4_SimpleAudioSingle.xml").read_bytes())
    (tmp_path / "bomb.xml").write_bytes(BILLION_LAUGHS.encode())
    (tmp_path / "broken.xml").write_text("<not closed")
    tracks, files, errors = read_ern_delivery(tmp_path)
    assert [(e["message"], e["reason"]) for e in errors] == [("bomb.xml", XML_UNSAFE), ("broken.xml", INVALID_FIELD)]
    assert len(tracks) == 22 and len(files) == 22
    assert [t["_row"] for t in tracks] == list(range(1, 23))
    assert {t["_message"] for t in tracks} == {"album/1_Audio.xml", "single.xml"}
    present, rejected = check_file_row(files[0], tmp_path)
    assert rejected is None and present == (tmp_path / "album" / "0094631432057_01_001.wav").resolve()
    _, rejected = check_file_row(files[1], tmp_path)
    assert rejected["reason"] == RejectionReason.MISSING_FILE  # the samples ship no audio
