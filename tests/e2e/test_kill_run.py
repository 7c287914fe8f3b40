"""kill -9 anywhere: SIGKILL `linernotes run` (its whole process group, Ray included) while each stage runs, run the
same command again: it finishes, no Run is left `running` (the killed one is `interrupted`), the store holds no
duplicate record, and the outputs of every deterministic stage equal those of a run that was never killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import soundfile as sf
import sqlalchemy as sa
import yaml

from tests.conftest import sine
from tests.pipelines.test_clean_separate import _checkpoint as tiny_separator
from tests.pipelines.test_ingest import LICENSES, track, write_csv

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
LINERNOTES = Path(sys.executable).with_name("linernotes")
STAGES = ("ingest", "separate", "clean", "shard", "train", "index")
TRAIN = dict(steps=40, batch_size=4, crop_frames=32, warmup_steps=1, log_every=10, base_channels=16,
             channel_mults=[1, 2], text_dim=16, text_buckets=64, diffusion_steps=100, checkpoint_every=10)
INDEX = dict(projection_dim=512, num_timesteps=2, fisher_segments=4, unlearning_timesteps=2, batch_size=2)


@pytest.fixture(scope="module")
def spec(tmp_path_factory) -> Path:
    """Three 4 s mixtures (no stems: separate makes them), and the whole chain ingest → index."""
    root = tmp_path_factory.mktemp("kill")
    delivery = root / "delivery"
    delivery.mkdir()
    names = ("a", "b", "c")
    for i, name in enumerate(names):
        mix = sine(220 * (i + 2), 4.0, 22050, 0.3) + sine(330 * (i + 1), 4.0, 22050, 0.2)
        sf.write(delivery / f"{name}.wav", mix.T, 22050)
    write_csv(delivery / "licenses.csv", LICENSES[:1], list(LICENSES[0]))
    write_csv(delivery / "tracks.csv", [track(n, "L-open") for n in names], list(track("a", "L-open")))
    write_csv(delivery / "files.csv", [{"track_id": n, "role": "mixture", "instrument": "", "path": f"{n}.wav"}
                                       for n in names], ["track_id", "role", "instrument", "path"])
    body = {"delivery": str(delivery), "purpose": {"as_of": "2026-11-21"},
            "stages": {"ingest": {}, "separate": {"model": str(tiny_separator(root))}, "clean": {"methods": []},
                       "shard": {"segment_s": 0.5, "sample_rate_hz": 16000, "n_fft": 256, "hop_length": 128,
                                 "validation_fraction": 0.0},
                       "train": TRAIN, "index": INDEX},
            "engine": {"num_cpus": 2}}
    path = root / "spec.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def start(spec: Path, work: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen([str(LINERNOTES), "run", str(spec), "--workdir", str(work), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)  # its own process group: kill -9 reaches its Ray too


def finish(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=1200)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def runs(work: Path) -> list[dict]:
    engine = sa.create_engine(f"sqlite:///{work / 'lineage.sqlite'}")
    try:
        with engine.connect() as c:
            return [dict(r._mapping) for r in c.execute(sa.text("select run_id, kind, status from runs"))]
    except sa.exc.OperationalError:  # not created yet
        return []
    finally:
        engine.dispose()


def outputs(payload: dict, work: Path) -> dict:
    """What a deterministic run must reproduce: the catalog's rows (without run ids), stem decisions, the dataset."""
    by_stage = {row["stage"]: row for row in payload["stages"]}
    catalog = work / "catalog"
    tables = {}
    for name in ("tracks", "audio_files", "licenses", "stem_scores"):
        rows = pq.read_table(catalog / f"{name}.parquet").to_pylist()
        tables[name] = sorted(json.dumps({k: v for k, v in row.items() if k not in ("run_id", "uri")}, sort_keys=True,
                                         default=str) for row in rows)
    return {"tables": tables, "dataset": by_stage["shard"]["output_ids"]["dataset"],
            "steps": by_stage["train"]["counts"]["steps"]}


@pytest.fixture(scope="module")
def reference(spec, tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("reference") / "work"
    return outputs(finish(start(spec, work)), work)


@pytest.mark.parametrize("stage", STAGES)
def test_a_run_killed_during_a_stage_finishes_when_run_again(spec, reference, tmp_path, stage):
    work = tmp_path / "work"
    proc = start(spec, work)
    killed = None
    deadline = time.monotonic() + 900
    while killed is None and proc.poll() is None and time.monotonic() < deadline:
        running = [r for r in runs(work) if r["kind"] == stage and r["status"] == "running"]
        if running:
            os.killpg(proc.pid, signal.SIGKILL)
            killed = running[0]["run_id"]
        time.sleep(0.05)
    proc.communicate(timeout=60)
    assert killed is not None, f"{stage} never showed a running Run before the process ended"
    assert proc.returncode == -signal.SIGKILL

    payload = finish(start(spec, work))
    assert payload["status"] == "succeeded"
    table = runs(work)
    assert not [r for r in table if r["status"] == "running"], "no Run left running"
    status = {r["run_id"]: r["status"] for r in table}
    assert status[killed] == "interrupted"
    ids = [r["run_id"] for r in table]
    assert len(ids) == len(set(ids))
    assert outputs(payload, work) == reference, "the same outputs as a run never killed"
    engine = sa.create_engine(f"sqlite:///{work / 'lineage.sqlite'}")
    with engine.connect() as c:
        datasets = [r[0] for r in c.execute(sa.text("select dataset_id from datasets"))]
        checkpoints = c.execute(sa.text("select count(*), count(distinct checkpoint_id) from checkpoints")).one()
    engine.dispose()
    assert datasets == [reference["dataset"]] and checkpoints[0] == checkpoints[1]
