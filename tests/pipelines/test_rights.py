"""`linernotes rights explain` and `rights opt-out` against a real ingest of a small delivery."""

import json

from typer.testing import CliRunner

from pipelines.cli import app
from tests.pipelines.test_ingest import LICENSES, track, write_csv
from tests.conftest import sine

runner = CliRunner()


def make_delivery(root):
    import soundfile as sf

    (root / "audio").mkdir(parents=True)
    for name in ("a", "b", "c"):
        sf.write(root / "audio" / f"{name}.wav", sine(440, 1.0, 16000).T, 16000)
    tracks = [track("a", "L-open", "Holder A"), track("b", "L-nc", "Holder B"), track("c", "L-open", "Holder C")]
    tracks[0]["isrc"] = "us-s1z-99-00001"
    tracks[2]["isrc"] = "XX123"  # junk ISRC
    write_csv(root / "licenses.csv", LICENSES[:2], list(LICENSES[0]))
    write_csv(root / "tracks.csv", tracks, list(tracks[0]))
    write_csv(root / "files.csv", [{"track_id": t, "role": "mixture", "instrument": "", "path": f"audio/{t}.wav"}
                                   for t in "abc"], ["track_id", "role", "instrument", "path"])


def cli(*args):
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_explain_and_opt_out(tmp_path):
    delivery, work = tmp_path / "d", str(tmp_path / "w")
    make_delivery(delivery)
    first = cli("ingest", str(delivery), "--as-of", "2026-11-21", "--workdir", work)
    assert first["counts"]["tracks"]["accepted"] == 1
    assert first["counts"]["tracks"]["rejected_by_reason"] == {"invalid_field": 1, "license_not_commercial": 1}

    explained = cli("rights", "explain", "b", "--workdir", work)
    failed = [c["name"] for c in explained["checks"] if not c["passed"]]
    assert failed == ["commercial use"] and explained["recorded"]["status"] == "rejected"
    assert explained["recorded"]["rejections"][0]["reason"] == "license_not_commercial"
    junk = cli("rights", "explain", "c", "--workdir", work)
    assert "XX123" in junk["field_check"] and junk["recorded"]["status"] == "rejected"
    assert cli("rights", "explain", "a", "--workdir", work)["recorded"]["status"] == "accepted"

    added = cli("rights", "opt-out", "--isrc", "USS1Z9900001", "--reason", "label request", "--workdir", work)
    assert added == {"kind": "isrc", "value": "USS1Z9900001", "added": True, "opt_outs": 1}
    second = cli("ingest", str(delivery), "--as-of", "2026-11-21", "--workdir", work)
    assert second["counts"]["tracks"]["accepted"] == 0
    assert second["counts"]["tracks"]["rejected_by_reason"]["opted_out"] == 1
    after = cli("rights", "explain", "a", "--workdir", work)
    assert after["checks"][0] == {"name": "opt-out registry", "passed": False, "detail": "ISRC USS1Z9900001 is opted out",
                                  "reason": "opted_out"}


def test_explain_unknown_track_is_a_one_line_error(tmp_path):
    delivery, work = tmp_path / "d", str(tmp_path / "w")
    make_delivery(delivery)
    cli("ingest", str(delivery), "--workdir", work)
    result = runner.invoke(app, ["rights", "explain", "nope", "--workdir", work])
    assert result.exit_code == 2 and "nope" in result.output and len(result.output.strip().splitlines()) == 1
