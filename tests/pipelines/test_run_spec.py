"""Declared curation runs: `linernotes run SPEC` runs each stage through the runner, caches by content, re-runs a
changed stage and what follows it (never what precedes it), plans with --dry-run, and refuses a bad spec before any
work with one line naming the key."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf
import sqlalchemy as sa
import yaml

from pipelines.config import ConfigError
from pipelines.runspec import RUN_CHAIN, load_spec
from provenance.store import LineageStore
from tests.conftest import sine
from tests.pipelines.test_ingest import LICENSES, track, write_csv

ROOT = Path(__file__).resolve().parents[2]
LINERNOTES = Path(sys.executable).with_name("linernotes")
SHARD = {"segment_s": 0.5, "sample_rate_hz": 16000, "n_fft": 256, "hop_length": 128, "validation_fraction": 0.0}


def linernotes(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The installed console script in its own process (its own Ray), as a user runs it."""
    full = {**os.environ, **(env or {}),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    full.pop("RAY_ADDRESS", None)
    return subprocess.run([str(LINERNOTES), *args], capture_output=True, text=True, env=full, timeout=900)


def payload(done: subprocess.CompletedProcess) -> dict:
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def delivery(tmp_path_factory) -> Path:
    """Two licensed tracks of 2 s mixtures (22.05 kHz)."""
    root = tmp_path_factory.mktemp("delivery")
    for i, name in enumerate(("a", "b")):
        sf.write(root / f"{name}.wav", sine(220 * (i + 2), 2.0, 22050, 0.5).T, 22050)
    write_csv(root / "licenses.csv", LICENSES[:1], list(LICENSES[0]))
    write_csv(root / "tracks.csv", [track("a", "L-open"), track("b", "L-open")], list(track("a", "L-open")))
    write_csv(root / "files.csv", [{"track_id": t, "role": "mixture", "instrument": "", "path": f"{t}.wav"}
                                   for t in ("a", "b")], ["track_id", "role", "instrument", "path"])
    return root


def write_spec(path: Path, delivery: Path, **extra) -> Path:
    spec = {"delivery": str(delivery), "purpose": {"commercial": True, "territory": "Worldwide",
                                                   "as_of": "2026-11-21"},
            "stages": {"ingest": {}, "shard": dict(SHARD)}, "engine": {"num_cpus": 1}, **extra}
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def stage_runs(store_url: str) -> list[dict]:
    with LineageStore(store_url) as store:
        return [run for run in store.list_runs() if run["kind"] != "run"]


def test_a_rerun_is_cached_and_a_changed_key_reruns_that_stage_and_later(tmp_path, delivery, store_url):
    spec = write_spec(tmp_path / "spec.yaml", delivery)
    work = tmp_path / "work"
    env = {"LINERNOTES_STORE_URL": store_url}
    first = payload(linernotes("run", str(spec), "--workdir", str(work), "--json", env=env))
    assert first["status"] == "succeeded" and [s["stage"] for s in first["stages"]] == ["ingest", "shard"]
    assert [s["status"] for s in first["stages"]] == ["ran", "ran"]
    assert first["stages"][1]["inputs"]["catalog"] == first["stages"][0]["output_ids"]["catalog"]
    dataset_id = first["stages"][1]["output_ids"]["dataset"]
    runs = stage_runs(store_url)
    assert {r["kind"] for r in runs} == {"ingest", "shard"} and all(r["parent_run_id"] == first["run_id"] for r in runs)

    again = payload(linernotes("run", str(spec), "--workdir", str(work), "--json", env=env))
    assert [s["status"] for s in again["stages"]] == ["cached", "cached"]
    assert again["stages"][1]["output_ids"]["dataset"] == dataset_id
    assert len(stage_runs(store_url)) == len(runs), "a cached re-run adds no stage Run"

    plan = payload(linernotes("run", str(spec), "--workdir", str(work), "--dry-run", "--json",
                              "--set", "shard.segment_s=0.25", env=env))
    assert [(s["stage"], s["status"]) for s in plan["stages"]] == [("ingest", "cached"), ("shard", "run")]
    assert "segment_s" in plan["stages"][1]["why"]
    assert len(stage_runs(store_url)) == len(runs), "--dry-run does nothing"

    changed = payload(linernotes("run", str(spec), "--workdir", str(work), "--json", "--set", "shard.segment_s=0.25",
                                 env=env))
    assert [s["status"] for s in changed["stages"]] == ["cached", "ran"]
    assert changed["stages"][1]["output_ids"]["dataset"] != dataset_id
    kinds = [r["kind"] for r in stage_runs(store_url)]
    assert kinds.count("ingest") == 1 and kinds.count("shard") == 2

    listed = linernotes("runs", "--workdir", str(work), env=env)
    assert listed.returncode == 0 and "└" in listed.stdout  # stage Runs under their whole run


def test_the_example_specs_are_valid(tmp_path):
    corpus = load_spec(ROOT / "infra" / "runs" / "corpus.yaml")
    assert list(corpus.stages) == ["ingest", "clean", "shard", "train"] and corpus.delivery.name == "corpus"
    assert corpus.stages["ingest"].as_of.isoformat() == "2026-11-21"
    for name in ("demo.yaml", "gpu-multinode.yaml", "inbox.yaml"):
        spec = load_spec(ROOT / "infra" / "runs" / name, [f"delivery={tmp_path}"])
        assert list(spec.stages) == [s for s in RUN_CHAIN if s in spec.stages]


BAD_SPECS = {
    "unknown stage": ({"stages": {"ingest": {}, "mix": {}}}, r"stages\.mix: no such stage .* in chain order"),
    "unknown key": ({"stages": {"ingest": {}, "shard": {"segment_sx": 5}}},
                    r"stages\.shard\.segment_sx: unknown key .*linernotes stages"),
    "unknown top-level key": ({"stages": {"ingest": {}}, "workspce": "x"}, r"workspce: unknown key"),
    "stage before its input": ({"stages": {"shard": {}, "ingest": {}}},
                               r"stages\.ingest is listed after stages\.shard.*chain order"),
    "missing delivery": ({"delivery": "nowhere", "stages": {"ingest": {}}}, r"delivery: no folder at .*nowhere"),
    "a stage that is not a mapping": ({"stages": {"ingest": {}, "shard": 5}}, r"stages\.shard: Input should be"),
    "an engine key in a stage": ({"stages": {"ingest": {}, "clean": {"num_cpus": 2}}},
                                 r"stages\.clean\.num_cpus: an engine setting; .* under `engine:`"),
}


@pytest.mark.parametrize("case", list(BAD_SPECS))
def test_a_bad_spec_fails_before_any_work_naming_the_key(tmp_path, delivery, case):
    body, message = BAD_SPECS[case]
    spec = tmp_path / "bad.yaml"
    spec.write_text(yaml.safe_dump({"delivery": str(delivery), **body}, sort_keys=False))
    with pytest.raises(ConfigError, match=message):
        load_spec(spec)
    done = linernotes("run", str(spec), "--workdir", str(tmp_path / "work"))
    assert done.returncode == 2 and not done.stdout
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), done.stderr
    assert not (tmp_path / "work").exists(), "nothing was made"


def test_a_bad_override_names_the_fix(tmp_path, delivery):
    spec = write_spec(tmp_path / "spec.yaml", delivery)
    with pytest.raises(ConfigError, match=r"--set train\.steps: the spec does not run train"):
        load_spec(spec, ["train.steps=3"])
    with pytest.raises(ConfigError, match=r"STAGE\.KEY=VALUE"):
        load_spec(spec, ["steps=3"])


def test_a_failed_stage_fails_the_whole_run(tmp_path, delivery):
    spec = write_spec(tmp_path / "spec.yaml", delivery, stages={"ingest": {}, "shard": dict(SHARD), "train": {}})
    work = tmp_path / "work"
    done = linernotes("run", str(spec), "--workdir", str(work), "--json", "--from", "train")
    assert done.returncode == 1, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert [(s["stage"], s["status"]) for s in result["stages"]] == [("ingest", "skipped"), ("shard", "skipped"),
                                                                     ("train", "failed")]
    assert "linernotes shard" in result["stages"][2]["error"] or "dataset" in result["stages"][2]["error"]
    engine = sa.create_engine(f"sqlite:///{work / 'lineage.sqlite'}")
    with engine.connect() as c:
        statuses = dict(c.execute(sa.text("select kind, status from runs")).fetchall())
    assert statuses["run"] == "failed" and "running" not in statuses.values()


def test_one_run_at_a_time_per_workspace_and_two_deliveries_keep_both_catalogs(tmp_path, delivery, store_url):
    from pipelines.catalog import list_catalogs
    from pipelines.runner import workspace_lock
    from provenance.workspace import Workspace

    spec = write_spec(tmp_path / "spec.yaml", delivery, stages={"ingest": {}})
    work = Workspace.at(tmp_path / "work", store_url).ensure()
    env = {"LINERNOTES_STORE_URL": store_url}
    with LineageStore(store_url) as store, store.lock(workspace_lock(work), "run-holder-in-the-test"):
        refused = linernotes("run", str(spec), "--workdir", str(work.root), env=env)
        assert refused.returncode == 75 and "in use by run run-holder-in-the-test" in refused.stderr
        waited = linernotes("run", str(spec), "--workdir", str(work.root), "--wait", "--wait-timeout-s", "1", env=env)
        assert waited.returncode == 75 and "after waiting" in waited.stderr
    assert stage_runs(store_url) == [], "a refused run does no work"

    first = payload(linernotes("run", str(spec), "--workdir", str(work.root), "--json", env=env))
    other = tmp_path / "delivery-2"
    other.mkdir()
    sf.write(other / "c.wav", sine(880, 2.0, 22050, 0.5).T, 22050)
    write_csv(other / "licenses.csv", LICENSES[:1], list(LICENSES[0]))
    write_csv(other / "tracks.csv", [track("c", "L-open")], list(track("c", "L-open")))
    write_csv(other / "files.csv", [{"track_id": "c", "role": "mixture", "instrument": "", "path": "c.wav"}],
              ["track_id", "role", "instrument", "path"])
    second = payload(linernotes("run", str(spec), "--workdir", str(work.root), "--json", "--set", f"delivery={other}",
                                env=env))
    catalogs = {v.catalog_id for v in list_catalogs(work)}
    assert {first["stages"][0]["output_ids"]["catalog"], second["stages"][0]["output_ids"]["catalog"]} <= catalogs
    assert len(catalogs) == 2
