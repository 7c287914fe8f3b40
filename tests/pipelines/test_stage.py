"""The stage contract: one runner registers every Run (never left ``running``), caches by content, keeps engine
settings out of the cache key; and the commands on it, run as a user runs them (the console script, a fresh
workspace, no Ray running beforehand)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa

from pipelines.stages.clean import CleanConfig
from pipelines.stages.separate import SeparateConfig
from pipelines.engines import Engine
from pipelines.stages.shard.stage import ShardConfig
from pipelines.stage import CACHED, RAN, STAGES, StageContext, cache_key, get_stage, run_stage
from provenance import records
from provenance.store import LineageStore
from provenance.workspace import Workspace
from tests.pipelines.test_clean import _catalog as clean_catalog
from tests.pipelines.test_clean_separate import _checkpoint as tiny_separator
from tests.pipelines.test_ingest import LICENSES, track, write_csv
from tests.pipelines.test_shard import make_catalog as shard_catalog

ROOT = Path(__file__).resolve().parents[2]
LINERNOTES = Path(sys.executable).with_name("linernotes")


UPSTREAM = {"index": {"checkpoint": "ckpt-0", "dataset": "ds-0"}, "train": {"dataset": "ds-0"},
            "generate": {"checkpoint": "ckpt-0", "dataset": "ds-0", "catalog": "none"},
            "attribute": {"query": "sha256:0", "query_id": "pcm-0", "dataset": "ds-0", "catalog": "none"},
            "evaluate": {"train_run": "train-0", "dataset": "ds-0", "checkpoints": "sha256:0"},
            "variations": {"checkpoint": "ckpt-0"}}


def stage_config(name: str, tmp_path: Path):
    """A config per stage on the contract, for the tests that run each stage (no downloads: a tiny separator)."""
    if name == "separate":
        return SeparateConfig(model=str(tiny_separator(tmp_path)))
    if name == "index":
        from pipelines.attribution.stage import IndexConfig

        return IndexConfig()
    if name == "train":
        from training.config import TrainConfig

        return TrainConfig()
    if name == "ingest":
        from pipelines.stages.ingest.stage import IngestConfig

        return IngestConfig(as_of="2026-11-21")
    if name == "generate":
        from pipelines.stages.generate import GenerateConfig

        return GenerateConfig(prompt="x")
    if name == "attribute":
        from pipelines.attribution.attribute import attribute_config

        return attribute_config()
    if name in ("evaluate", "variations"):
        from pipelines.stages.evaluate import EvaluateConfig, VariationsConfig

        return EvaluateConfig() if name == "evaluate" else VariationsConfig(prompt="x", seeds=[1])
    if name == "takedown":  # its inputs (the opt-out registry, the catalog) are the minimal catalog's
        from pipelines.stages.takedown import TakedownConfig

        return TakedownConfig(kind="track_id", value="t1")
    return {"shard": ShardConfig(segment_s=0.5, sample_rate_hz=16000, n_fft=256, hop_length=128),
            "clean": CleanConfig(methods=[])}[name]


def linernotes(*args: str, workdir: Path) -> subprocess.CompletedProcess:
    """The installed console script, as a user runs it (its own process, so its own Ray or none)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([str(LINERNOTES), *args, "--workdir", str(workdir)], capture_output=True, text=True,
                          env=env, timeout=900)


def _payload(done: subprocess.CompletedProcess) -> dict:
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def tiny_delivery(root: Path) -> Path:
    """A CSV delivery of one licensed track whose file is missing (enough to resolve ingest's inputs)."""
    root.mkdir(parents=True)
    write_csv(root / "licenses.csv", LICENSES[:1], list(LICENSES[0]))
    write_csv(root / "tracks.csv", [track("a", "L-open")], list(track("a", "L-open")))
    write_csv(root / "files.csv", [{"track_id": "a", "role": "mixture", "instrument": "", "path": "a.wav"}],
              ["track_id", "role", "instrument", "path"])
    return root


def _minimal_catalog(root: Path) -> Workspace:
    """Catalog tables with one licensed track (a mixture and a stem) — enough for every stage's inputs."""
    workspace = Workspace.at(root).ensure()
    track = {"track_id": "t1", "isrc": "", "title": "T", "artist": "A", "rights_holder": "R", "license_id": "lic-1",
             "attribution": "", "genre": "", "tags": "", "description": ""}
    audio = {"track_id": "t1", "instrument": "", "uri": str(root / "missing.wav"), "sha256": "0" * 64,
             "sample_rate_hz": 16000, "num_channels": 1, "num_samples": 16000, "duration_s": 1.0}
    records.write_table(records.to_table([track], records.TRACK), workspace.catalog_table("tracks"))
    records.write_table(records.to_table([{**audio, "role": "mixture"}, {**audio, "role": "vocals"}],
                                         records.AUDIO_FILE), workspace.catalog_table("audio_files"))
    records.write_table(records.to_table([{"license_id": "lic-1", "ai_training": "allowed"}], records.LICENSE),
                        workspace.catalog_table("licenses"))
    return workspace


@pytest.mark.parametrize("name", list(STAGES))
def test_a_stage_that_raises_leaves_its_run_failed_with_the_error(tmp_path, monkeypatch, name):
    stage = get_stage(name)
    workspace = _minimal_catalog(tmp_path / "w")

    def fail(ctx, config):
        assert (ctx.run_dir / "config.json").is_file()  # written before the stage starts
        raise RuntimeError(f"{name} broke")

    monkeypatch.setattr(stage, "run", fail)
    if name in UPSTREAM:  # stages that read a model: their input is named, not made (the runner is under test)
        monkeypatch.setattr(stage, "inputs", lambda ctx, config: dict(UPSTREAM[name]))
    select = {"delivery": str(tiny_delivery(tmp_path / "delivery"))} if name == "ingest" else None
    with pytest.raises(RuntimeError, match="broke"):
        run_stage(stage, workspace, stage_config(name, tmp_path), select=select)
    with LineageStore(workspace.store_url) as store:
        (run,) = store.list_runs(name)
    assert run["status"] == "failed" and run["error"] == f"RuntimeError: {name} broke" and run["finished_at"]


def test_bad_inputs_fail_before_any_run(tmp_path):
    workspace = Workspace.at(tmp_path / "empty").ensure()
    with pytest.raises(FileNotFoundError, match="linernotes ingest"):
        run_stage(get_stage("shard"), workspace, stage_config("shard", tmp_path))
    workspace = _minimal_catalog(tmp_path / "w")
    with pytest.raises(ValueError, match="reference_tracks"):
        run_stage(get_stage("clean"), workspace, CleanConfig(reference_tracks=["nope"]))
    for root in (tmp_path / "empty", tmp_path / "w"):
        with LineageStore(Workspace.at(root).store_url) as store:
            assert store.list_runs() == []


def test_cache_key_names_config_and_inputs_but_not_the_engine():
    clean = get_stage("clean")
    base = CleanConfig(methods=[])
    key = cache_key(clean, base, {"audio_files": "cat-1"})
    assert key == cache_key(clean, base.model_copy(update={"num_cpus": 7, "address": "ray://x:1"}),
                            {"audio_files": "cat-1"})
    assert key != cache_key(clean, base.model_copy(update={"max_clipped_fraction": 0.5}), {"audio_files": "cat-1"})
    assert key != cache_key(clean, base, {"audio_files": "cat-2"})


def test_beam_runner_options_are_engine_settings_outside_ingests_cache_key(tmp_path):
    from pipelines.config import load_config
    from pipelines.stages.ingest.delivery import read_delivery
    from pipelines.engines import Engine
    from pipelines.stages.ingest.stage import IngestConfig, run_fingerprint
    from provenance.policy import OptOutRegistry

    ingest = get_stage("ingest")
    direct = IngestConfig(as_of="2026-11-21")
    flink = direct.model_copy(update={"beam_options": ("--runner=FlinkRunner", "--flink_master=localhost:8081")})
    # `linernotes ingest --config infra/beam/portable.yaml`: the options file's flags become the config's
    portable = load_config(IngestConfig, Path(__file__).resolve().parents[2] / "infra" / "beam" / "portable.yaml",
                           as_of="2026-11-21")
    assert portable.beam_options[0] == "--runner=PortableRunner"
    delivery = read_delivery(tiny_delivery(tmp_path / "d"))
    # the input id (the delivery fingerprint) and the cache key are the same on any runner
    for other in (flink, portable):
        assert run_fingerprint(delivery, direct, OptOutRegistry()) == run_fingerprint(delivery, other, OptOutRegistry())
        assert cache_key(ingest, direct, {"delivery": "dlv-1"}) == cache_key(ingest, other, {"delivery": "dlv-1"})
    assert cache_key(ingest, direct, {"delivery": "dlv-1"}) != cache_key(
        ingest, direct.model_copy(update={"territory": "GB"}), {"delivery": "dlv-1"})
    # the runner options reach the engine, which builds the pipeline options from them
    assert Engine(ingest.engine_config(direct)).beam_flags() == ["--runner=DirectRunner"]
    assert Engine(ingest.engine_config(flink)).beam_flags()[-2:] == list(flink.beam_options)


def test_a_store_of_the_previous_layout_gains_the_contract_columns(tmp_path):
    url = f"sqlite:///{tmp_path / 'lineage.sqlite'}"
    engine = sa.create_engine(url)
    with engine.begin() as c:
        c.execute(sa.text("CREATE TABLE runs (run_id VARCHAR(64) PRIMARY KEY, kind VARCHAR(32) NOT NULL, "
                          "spec_sha256 VARCHAR(64) NOT NULL, config TEXT NOT NULL, code_version VARCHAR(32) NOT NULL, "
                          "status VARCHAR(16) NOT NULL, started_at VARCHAR(32) NOT NULL, finished_at VARCHAR(32), "
                          "counts TEXT, outputs TEXT, error TEXT)"))
        c.execute(sa.text("INSERT INTO runs VALUES ('shard-old', 'shard', 'x', '{}', '0.1.0', 'succeeded', "
                          "'2026-01-01', '2026-01-01', '{}', '{}', NULL)"))
    engine.dispose()
    with LineageStore(url) as store:
        assert store.get_run("shard-old")["cache_key"] is None
        with store.run("shard", {}, cache_key="k", inputs={"catalog": "cat-1"}) as run:
            run.counts = {"accepted": 1}
        assert store.find_cached_run("shard", "k")["inputs"] == {"catalog": "cat-1"}


def test_an_engine_that_started_ray_shuts_it_down(tmp_path):
    code = ("import ray; from pipelines.engines import Engine, EngineConfig\n"
            "with Engine(EngineConfig(num_cpus=1)) as e:\n    e.ray(); assert ray.is_initialized()\n"
            "assert not ray.is_initialized(); print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.stdout.strip() == "ok", done.stderr[-2000:]


# --- as a user runs them ------------------------------------------------------------------------------------

def test_shard_twice_is_cached_the_second_time_and_a_changed_key_runs_again(tmp_path):
    workspace = shard_catalog(tmp_path / "w", tmp_path / "audio")
    settings = ["--segment-s", "1", "--sample-rate-hz", "16000", "--set", "n_mels=32", "--set", "n_fft=512",
                "--set", "hop_length=160", "--json"]
    first = _payload(linernotes("shard", *settings, workdir=workspace.root))
    again = _payload(linernotes("shard", *settings, workdir=workspace.root))
    assert first["status"] == RAN and again["status"] == CACHED
    assert again["run_id"] == first["run_id"] and again["dataset_id"] == first["dataset_id"]
    assert set(first) >= {"stage", "run_id", "status", "inputs", "outputs", "counts"}
    assert first["inputs"]["catalog"].startswith("cat-") and first["output_ids"]["dataset"] == first["dataset_id"]
    changed = _payload(linernotes("shard", *settings, "--set", "samples_per_shard=4", workdir=workspace.root))
    assert changed["status"] == RAN and changed["run_id"] != first["run_id"]
    assert changed["num_shards"] > first["num_shards"]
    with LineageStore(workspace.store_url) as store:
        runs = store.list_runs("shard")
    assert [r["run_id"] for r in runs] == [first["run_id"], changed["run_id"]]
    assert all(r["status"] == "succeeded" and r["cache_key"] for r in runs)


def test_clean_run_with_fad_and_unlearning_finishes_on_a_fresh_workspace(tmp_path):
    workspace = clean_catalog(tmp_path)
    done = linernotes("clean", "run", "--method", "fad", "--method", "unlearning",
                      "--reference-track", "ref-000", "--reference-track", "ref-001", "--reference-track", "ref-002",
                      "--set", "train_steps=20", "--set", "max_windows_per_stem=2", "--json", workdir=workspace.root)
    payload = _payload(done)
    assert payload["status"] == RAN and payload["scored"] == {"fad": 21, "unlearning": 21}
    assert payload["counts"]["kept"] + payload["counts"]["dropped"] == payload["counts"]["stems"] == 36
    with LineageStore(workspace.store_url) as store:
        assert store.get_run(payload["run_id"])["status"] == "succeeded"
    assert Path(payload["outputs"]["stem_scores"]).is_file()


def test_a_cached_dataset_missing_a_shard_is_built_again(ray_local, tmp_path):
    from pipelines.stages.shard.stage import run_shard

    workspace = shard_catalog(tmp_path / "w", tmp_path / "audio")
    config = ShardConfig(segment_s=1.0, sample_rate_hz=16000, n_mels=32, n_fft=512, hop_length=160,
                         samples_per_shard=4)
    first = run_shard(workspace, config)
    assert run_shard(workspace, config).status == CACHED
    lost = sorted(first.dataset_dir.glob("*.tar"))[0]
    digest = records.file_sha256(lost)
    lost.unlink()  # the dataset folder is there, one of its tars is not: not a valid cached result
    again = run_shard(workspace, config)
    assert again.status == RAN and again.run_id != first.run_id and again.dataset_id == first.dataset_id
    assert records.file_sha256(lost) == digest  # rebuilt, byte for byte


def test_every_stage_is_registered_in_chain_order_with_described_config_keys():
    from typer.testing import CliRunner

    from pipelines.cli import app

    assert list(STAGES) == ["ingest", "separate", "clean", "shard", "train", "index", "generate", "attribute",
                            "evaluate", "variations", "takedown"]
    done = CliRunner().invoke(app, ["stages", "--json"])
    assert done.exit_code == 0, done.output
    listed = {s["stage"]: s for s in json.loads(done.stdout.strip().splitlines()[-1])["stages"]}
    assert list(listed) == list(STAGES)
    for name in ("generate", "evaluate", "variations", "takedown"):  # every key says what it is
        properties = listed[name]["config_schema"]["properties"]
        assert all(spec.get("description") for spec in properties.values()), name
    assert {"method", "top_k", "prompt"} <= set(listed["attribute"]["config_schema"]["properties"])
    assert listed["takedown"]["reads"] == ["opt_outs", "catalog", "request"]


def test_a_takedown_key_never_repeats_and_a_bad_target_fails_at_config_time(tmp_path):
    from pipelines.stages.takedown import TakedownConfig

    workspace = _minimal_catalog(tmp_path / "w")
    stage, config = get_stage("takedown"), TakedownConfig(kind="isrc", value=" us-s1z-99-00001 ")
    assert config.value == "USS1Z9900001"
    with LineageStore(workspace.store_url) as store:
        ctx = StageContext(workspace, store, Engine())
        keys = {cache_key(stage, config, stage.inputs(ctx, config)) for _ in range(3)}
    assert len(keys) == 3
    with pytest.raises(ValueError, match="empty"):
        TakedownConfig(kind="track_id", value="  ")
