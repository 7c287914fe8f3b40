"""`linernotes submit SPEC` pins the spec here: every stage config with its defaults, absolute paths, the Beam options
file read in; the pinned spec parses back to the same configs and sha256; a spec with only `train:` pins the config
training's submit pins; a bad spec or option is one line, before any cluster is contacted. (The job itself on a
two-node Ray cluster: tests/e2e/test_submit_cluster.py.)"""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipelines.config import ConfigError, load_config, parse_overrides
from pipelines.engines.submit import PINNED_SPEC_NAME, run_entrypoint, train_entrypoint
from pipelines.runspec import PATH_KEYS, load_spec, parse_spec, pin_spec
from pipelines.stage import get_stage
from training.config import TrainConfig

ROOT = Path(__file__).resolve().parents[2]
LINERNOTES = Path(sys.executable).with_name("linernotes")


def _roundtrip(pinned: dict) -> object:
    """The pinned spec as the job reads it: YAML text, parsed from another folder."""
    return parse_spec(yaml.safe_load(yaml.safe_dump(pinned, sort_keys=False)), base_dir=Path("/"), source="job")


@pytest.mark.parametrize("name", ["corpus.yaml", "demo.yaml", "gpu-multinode.yaml"])
def test_a_pinned_spec_parses_back_to_the_same_configs_and_sha256(tmp_path, name):
    spec = load_spec(ROOT / "infra" / "runs" / name, [] if name == "corpus.yaml" else [f"delivery={tmp_path}"])
    pinned = pin_spec(spec)
    again = _roundtrip(pinned)
    assert again.stages == spec.stages and again.sha256 == spec.sha256 and again.workspace == spec.workspace
    assert Path(pinned["delivery"]).is_absolute() and Path(pinned["workspace"]).is_absolute()
    for name_, values in pinned["stages"].items():  # every field explicit: the cluster's defaults cannot differ
        assert set(values) == set(get_stage(name_).config_model.model_fields) - {"address", "num_cpus", "beam_options"}
    assert pinned["stages"]["ingest"]["as_of"]  # "today" is resolved here, not when the job starts


def test_relative_paths_and_the_beam_options_file_are_pinned(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "optouts.csv").write_text("kind,value\n")
    (tmp_path / "runner.yaml").write_text(yaml.safe_dump({"beam_options": ["--direct_num_workers=2"]}))
    (tmp_path / "delivery").mkdir()
    raw = {"delivery": "delivery", "workspace": "work",
           "stages": {"ingest": {"opt_out_csv": "optouts.csv"}, "train": {"storage_path": "s3://bucket/runs"}},
           "engine": {"beam_options_file": "runner.yaml", "beam_options": ["--direct_running_mode=in_memory"]}}
    spec = parse_spec(raw, base_dir=tmp_path)
    pinned = pin_spec(spec, workspace="/mnt/shared/work")
    assert pinned["stages"]["ingest"]["opt_out_csv"] == str(tmp_path / "optouts.csv")
    assert pinned["stages"]["train"]["storage_path"] == "s3://bucket/runs"  # a URI stays as it is
    assert pinned["workspace"] == "/mnt/shared/work" and pinned["delivery"] == str(tmp_path / "delivery")
    assert pinned["engine"]["beam_options_file"] is None
    from pipelines.engines import Engine

    flags = Engine(spec.engine).beam_flags()
    monkeypatch.chdir(ROOT)  # the job's working directory is elsewhere: nothing relative is left to resolve
    again = _roundtrip(pinned)
    assert Engine(again.engine).beam_flags() == flags == [
        "--runner=DirectRunner", "--direct_num_workers=2", "--direct_running_mode=in_memory"]
    assert again.stages["ingest"] == spec.stages["ingest"].model_copy(update={"opt_out_csv": str(tmp_path / "optouts.csv")})


def test_the_path_keys_name_fields_of_their_stages():
    for stage, keys in PATH_KEYS.items():
        assert set(keys) <= set(get_stage(stage).config_model.model_fields), stage


def test_a_spec_with_only_train_pins_the_config_training_submit_pins(tmp_path):
    tiny = {"steps": 3, "batch_size": 2, "channel_mults": [1, 2], "num_workers": 2, "storage_path": "s3://b/runs"}
    spec = parse_spec({"stages": {"train": tiny}}, base_dir=tmp_path, workspace=str(tmp_path / "work"))
    pinned = _roundtrip(pin_spec(spec))
    config = load_config(TrainConfig, None, {k: v for k, v in tiny.items()})
    argv = shlex.split(train_entrypoint(config, str(tmp_path / "work")))
    pairs = [argv[i + 1] for i, arg in enumerate(argv) if arg == "--set"]
    assert pinned.stages["train"] == config == load_config(TrainConfig, None, parse_overrides(pairs))
    assert shlex.split(run_entrypoint()) == ["linernotes", "run", PINNED_SPEC_NAME, "--json"]
    assert shlex.split(run_entrypoint("python -m pipelines.cli"))[:4] == ["python", "-m", "pipelines.cli", "run"]


def test_a_spec_that_names_another_cluster_is_refused(tmp_path):
    spec = parse_spec({"stages": {"train": {}}, "engine": {"ray_address": "ray://elsewhere:10001"}}, base_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"engine\.ray_address: .*--set engine\.ray_address=null"):
        pin_spec(spec)
    assert pin_spec(parse_spec({"stages": {"train": {}}, "engine": {"ray_address": "auto"}},
                               base_dir=tmp_path))["engine"]["ray_address"] == "auto"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _submit(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([str(LINERNOTES), "submit", *args, "--address", f"http://127.0.0.1:{_free_port()}",
                           "--timeout-s", "1"], capture_output=True, text=True, env=env, cwd=cwd, timeout=120)


@pytest.mark.parametrize("case, args, needle", [
    ("an unknown stage key", ["--set", "shard.segment_sx=5"], "stages.shard.segment_sx: unknown key"),
    ("a train option", ["--steps", "5"], "--steps is a train option; with a run spec set the stage's key"),
    ("another cluster", ["--set", "engine.ray_address=ray://x:10001"], "engine.ray_address"),
])
def test_a_bad_spec_or_option_is_one_line_before_the_cluster_is_contacted(tmp_path, case, args, needle):
    (tmp_path / "delivery").mkdir()
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"delivery": "delivery", "stages": {"ingest": {}, "shard": {}}}))
    done = _submit(str(spec), *args, cwd=tmp_path)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1 and needle in lines[0], done.stderr[-2000:]
    assert "Ray Jobs API" not in done.stderr  # refused before any connection
    # a good spec gets as far as the (absent) cluster: the one line names it
    reached = _submit(str(spec), cwd=tmp_path)
    assert reached.returncode == 2 and "cannot reach the Ray Jobs API" in reached.stderr, reached.stderr[-2000:]


def test_a_waited_run_prints_the_job_the_run_id_and_the_stage_table(tmp_path, capsys):
    from pipelines.cli.run import _render_submitted_run

    stages = [{"stage": "ingest", "status": "ran", "run_id": "ingest-1", "output_ids": {"catalog": "cat-1"},
               "counts": {"accepted": 3}},
              {"stage": "shard", "status": "cached", "run_id": "shard-1", "output_ids": {"dataset": "ds-1"},
               "counts": {"segments": 18}}]
    payload = {"job_id": "raysubmit_abc", "status": "SUCCEEDED", "address": "http://head:8265",
               "spec_sha256": "f" * 64, "run_id": "run-1",
               "result": {"run_id": "run-1", "status": "succeeded", "stages": stages}}
    _render_submitted_run(payload)
    lines = capsys.readouterr().out.splitlines()
    assert "job raysubmit_abc SUCCEEDED at http://head:8265" in lines[0]
    assert any("run run-1 (succeeded)" in line for line in lines)
    for row in stages:
        assert any(row["stage"] in line and row["status"] in line and row["run_id"] in line for line in lines), row
    _render_submitted_run({**payload, "status": "PENDING", "result": None, "run_id": None})
    assert "ray job logs --follow --address http://head:8265 raysubmit_abc" in capsys.readouterr().out


def test_shipped_code_keeps_its_commit_in_the_cache_keys(tmp_path):
    """Packages uploaded to a Ray job (or installed in an image) are no git checkout: ``code_version`` takes the
    commit from ``LINERNOTES_GIT_COMMIT``, which ``submit --working-dir`` sets to the shipped checkout's."""
    from pipelines.engines.submit import _runtime_env
    from provenance.store import GIT_COMMIT_ENV, code_version

    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                            text=True, check=True).stdout.strip()
    assert _runtime_env(None, str(ROOT))["env_vars"][GIT_COMMIT_ENV] == commit
    assert GIT_COMMIT_ENV not in _runtime_env(None)["env_vars"]
    assert code_version().endswith(f"+g{commit}")  # a checkout: git says
    shutil.copytree(ROOT / "provenance", tmp_path / "provenance")  # a copy outside any checkout, as Ray unpacks it
    probe = [sys.executable, "-c", "from provenance.store import code_version; print(code_version())"]
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    env.pop(GIT_COMMIT_ENV, None)
    bare = subprocess.run(probe, capture_output=True, text=True, env=env, cwd=tmp_path, check=True).stdout.strip()
    shipped = subprocess.run(probe, capture_output=True, text=True, env={**env, GIT_COMMIT_ENV: commit}, cwd=tmp_path,
                             check=True).stdout.strip()
    assert "+g" not in bare and shipped == f"{bare}+g{commit}" == code_version()
