"""The CLI contract: one JSON object with --json, one-line reasons and non-zero exits on bad input."""

import json

import pytest
from typer.testing import CliRunner

from pipelines.cli import app
from tests.pipelines.test_ingest import LICENSES, track, write_csv

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, list(args), catch_exceptions=False)


@pytest.mark.parametrize("args, needle", [
    (["ingest", "/no/such/delivery"], "does not exist"),
    (["ingest", ".", "--purpose", "charity"], "purpose"),
    (["ingest", ".", "--as-of", "21/11/2026"], "--as-of"),
    (["ingest", ".", "--set", "purpse=commercial"], "purpse"),
    (["shard", "--segment-s", "-1"], "segment_s"),
    (["train", "--set", "stepz=3"], "stepz"),
    (["generate", "--prompt", "x", "--duration-s", "0"], "--duration-s"),
    (["attribute", "/no/such.wav"], "no audio file"),
])
def test_bad_arguments_exit_2_with_one_line(tmp_path, args, needle):
    result = invoke(*args, "--workdir", str(tmp_path / "w"))
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "error" in lines[0] and needle in lines[0], result.output


@pytest.mark.parametrize("command", [["shard"], ["train"], ["generate", "--prompt", "x"]])
def test_missing_upstream_outputs_say_which_command_to_run(tmp_path, command):
    result = invoke(*command, "--workdir", str(tmp_path / "empty"))
    assert result.exit_code == 2
    assert "linernotes" in result.output and "first" in result.output


def test_bad_config_file_fails_naming_the_key(tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text("steps: 10\nlearning_rat: 0.1\n")
    result = invoke("train", "--config", str(config), "--workdir", str(tmp_path / "w"))
    assert result.exit_code == 2 and "learning_rat" in result.output


def test_ingest_json_is_one_object_with_counts(tmp_path):
    delivery = tmp_path / "d"
    delivery.mkdir()
    write_csv(delivery / "licenses.csv", LICENSES[:1], list(LICENSES[0]))
    rows = [track("a", "L-open"), track("b", "L-unknown")]
    write_csv(delivery / "tracks.csv", rows, list(rows[0]))
    write_csv(delivery / "files.csv", [{"track_id": "a", "role": "mixture", "instrument": "", "path": "nope.wav"}],
              ["track_id", "role", "instrument", "path"])
    result = runner.invoke(app, ["ingest", str(delivery), "--workdir", str(tmp_path / "w"), "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    tracks = payload["counts"]["tracks"]
    assert (tracks["input"], tracks["accepted"], tracks["rejected"]) == (2, 0, 2)
    assert tracks["rejected_by_reason"] == {"no_audio": 1, "unknown_license": 1}
    assert payload["counts"]["files"]["rejected_by_reason"] == {"missing_file": 1}
    assert payload["run_id"].startswith("ingest-")
