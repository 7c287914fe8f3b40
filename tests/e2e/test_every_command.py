"""Every subcommand, run as a user runs it: the installed ``linernotes`` console script, in its own process, on a
fresh workspace, with no Ray running beforehand (each Ray stage starts and stops its own). The lineage rows come
from the stages themselves. Then one bad argument per subcommand exits 2 with a one-line reason."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tests.pipelines.test_clean_separate import _checkpoint as tiny_separator
from tests.pipelines.test_ingest import LICENSES, track, write_csv

ROOT = Path(__file__).resolve().parents[2]
LINERNOTES = Path(sys.executable).with_name("linernotes")
TINY_TRAIN = {"steps": 4, "batch_size": 2, "crop_frames": 32, "warmup_steps": 1, "log_every": 1, "base_channels": 16,
              "channel_mults": "[1,2]", "text_dim": 16, "text_buckets": 64, "diffusion_steps": 50}
TINY_INDEX = {"projection_dim": 512, "num_timesteps": 2, "batch_size": 4, "fisher_segments": 4,
              "unlearning_timesteps": 2}


def _sets(values: dict) -> list[str]:
    return [arg for key, value in values.items() for arg in ("--set", f"{key}={value}")]


def _env(workdir: Path) -> dict[str, str]:
    env = {**os.environ, "LINERNOTES_WORKDIR": str(workdir), "COLUMNS": "200",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    for name in ("RAY_ADDRESS", "LINERNOTES_STORE_URL", "LINERNOTES_API_TOKEN"):
        env.pop(name, None)
    return env


def linernotes(workdir: Path, *args: str, expect: int = 0, timeout_s: float = 600) -> subprocess.CompletedProcess:
    done = subprocess.run([str(LINERNOTES), *args], capture_output=True, text=True, env=_env(workdir),
                          timeout=timeout_s)
    assert done.returncode == expect, f"linernotes {' '.join(args)} → {done.returncode}\n{done.stderr[-3000:]}"
    return done


def payload(done: subprocess.CompletedProcess) -> dict:
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, done.stdout[-2000:]  # --json prints exactly one object
    return json.loads(lines[0])


def make_delivery(root: Path) -> Path:
    """Three licensed tracks of two 3-second stems each (tonal, so they are not silent or alike)."""
    (root / "audio").mkdir(parents=True)
    rng = np.random.default_rng(1)
    tracks, files = [], []
    for i in range(3):
        tracks.append({**track(f"t{i}", "L-open"), "description": f"a test piece number {i}"})
        for j, stem in enumerate(("bass", "other")):
            t = np.arange(3 * 16000) / 16000
            audio = 0.3 * np.sin(2 * np.pi * (110 * (i + 1) * (j + 1)) * t) + 0.02 * rng.standard_normal(t.size)
            sf.write(root / "audio" / f"t{i}-{stem}.wav", audio.astype(np.float32), 16000, subtype="PCM_16")
            files.append({"track_id": f"t{i}", "role": stem, "instrument": "", "path": f"audio/t{i}-{stem}.wav"})
    write_csv(root / "licenses.csv", LICENSES[:1], list(LICENSES[0]))
    write_csv(root / "tracks.csv", tracks, list(tracks[0]))
    write_csv(root / "files.csv", files, ["track_id", "role", "instrument", "path"])
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.e2e
def test_every_subcommand_from_the_console_script(tmp_path):
    work = tmp_path / "work"
    delivery = make_delivery(tmp_path / "delivery")

    ingest = payload(linernotes(work, "ingest", str(delivery), "--as-of", "2026-11-21", "--json"))
    assert ingest["status"] == "ran" and ingest["counts"]["tracks"]["accepted"] == 3
    assert payload(linernotes(work, "ingest", str(delivery), "--as-of", "2026-11-21", "--json"))["status"] == "cached"
    explained = payload(linernotes(work, "rights", "explain", "t0", "--json"))
    assert explained["recorded"]["status"] == "accepted"

    separated = payload(linernotes(work, "clean", "separate", "--model", str(tiny_separator(tmp_path)), "--json"))
    assert separated["skipped_tracks"] == 3  # every track was delivered with stems
    cleaned = payload(linernotes(work, "clean", "run", "--reference-track", "t0", "--method", "fad", "--json"))
    assert cleaned["counts"]["stems"] == 6 and cleaned["status"] == "ran"

    shard_args = ["shard", "--segment-s", "1", "--sample-rate-hz", "16000", "--set", "n_mels=32", "--set",
                  "n_fft=512", "--set", "hop_length=160", "--set", "validation_fraction=0.34", "--json"]
    shard = payload(linernotes(work, *shard_args))
    assert shard["num_segments"] > 0 and shard["status"] == "ran"
    train = payload(linernotes(work, "train", *_sets(TINY_TRAIN), "--json"))
    assert train["counts"]["steps"] == 4 and train["checkpoint_id"].startswith("ckpt-")
    index = payload(linernotes(work, "index", *_sets(TINY_INDEX), "--json"))
    assert index["counts"]["segments"] == shard["segments_by_split"]["train"]

    generation = payload(linernotes(work, "generate", "--prompt", "a test piece", "--duration-s", "1", "--steps",
                                    "2", "--top-k", "3", "--json"))
    wav = generation["outputs"]["wav"]
    assert Path(wav).is_file() and generation["attribution"]["segments"]
    attributed = payload(linernotes(work, "attribute", wav, "--top-k", "3", "--json"))
    assert abs(sum(t["share"] for t in attributed["tracks"]) - 1.0) < 1e-6
    evaluated = payload(linernotes(work, "evaluate", "--num-references", "2", "--steps", "2", "--json"))
    assert evaluated["counts"]["checkpoints"] >= 1
    variations = payload(linernotes(work, "variations", "--prompt", "x", "--seed", "1", "--seed", "2",
                                    "--duration-s", "1", "--steps", "2", "--json"))
    assert len(variations["outputs"]["wavs"]) == 2
    report = payload(linernotes(work, "report", generation["generation_id"], "--top-k", "2", "--json"))
    assert Path(report["report"]).is_file()
    walk = payload(linernotes(work, "lineage", generation["generation_id"], "--json"))
    assert walk["dataset"]["dataset_id"] == shard["dataset_id"]

    opted = payload(linernotes(work, "rights", "opt-out", "--track", "t2", "--reason", "test", "--json"))
    assert opted["added"]
    taken = payload(linernotes(work, "takedown", "--track", "t1", "--reason", "test", "--json"))
    assert taken["counts"]["datasets"] == 1 and taken["rebuilt"][0]["dataset_id"] != shard["dataset_id"]
    stages = payload(linernotes(work, "stages", "--json"))
    assert {"ingest", "separate", "clean", "shard", "train", "index"} <= {s["stage"] for s in stages["stages"]}
    runs = payload(linernotes(work, "runs", "--json"))["runs"]
    assert runs and all(r["status"] in ("succeeded", "stopped") for r in runs)
    assert "shard" in linernotes(work, "runs").stdout

    port = _free_port()
    server = subprocess.Popen([str(LINERNOTES), "serve", "--port", str(port)], env=_env(work),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                    assert json.load(response)["status"] == "ok"
                break
            except OSError:
                time.sleep(0.2)
        else:
            pytest.fail("linernotes serve did not answer /health")
    finally:
        server.terminate()
        server.wait(timeout=30)

    evaluation = payload(linernotes(tmp_path / "eval-work", "clean", "evaluate", "--source", "synthetic", "--out",
                                    str(tmp_path / "clean-eval"), "--set", "num_songs=6", "--set", "clip_s=2.0",
                                    "--set", "seeds=[0]", "--set", "train_steps=4", "--set", "num_test_songs=2",
                                    "--set", "max_windows_per_stem=2", "--set", "downstream=false", "--json"))
    assert Path(evaluation["outputs"]["report"]).is_file()
    demo = payload(linernotes(tmp_path / "demo-work", "demo", "--num-tracks", "2", "--track-duration-s", "6",
                              "--steps", "4", "--json"))
    assert Path(demo["outputs"]["generation"]).is_file()
    # submit: a cluster that is not there is a one-line error, not a traceback
    refused = linernotes(work, "submit", "--address", f"http://127.0.0.1:{_free_port()}", "--timeout-s", "1",
                         expect=2)
    assert len([line for line in refused.stderr.splitlines() if line.strip()]) == 1


BAD_ARGUMENTS = {
    "ingest": (["ingest", "/no/such/delivery"], "does not exist"),
    "shard": (["shard", "--segment-s", "-1"], "segment_s"),
    "train": (["train", "--set", "stepz=3"], "stepz"),
    "submit": (["submit", "--address", "http://127.0.0.1:9", "--set", "stepz=3"], "stepz"),
    "submit SPEC": (["submit", "/no/such/spec.yaml", "--address", "http://127.0.0.1:9"], "does not exist"),
    "generate": (["generate", "--prompt", "x", "--duration-s", "0"], "--duration-s"),
    "attribute": (["attribute", "/no/such.wav"], "no audio file"),
    "index": (["index", "--set", "projection_dim=3"], "projection_dim"),
    "demo": (["demo", "--steps", "0"], "steps"),
    "stages": (["stages", "--set", "x=1"], "No such option"),
    "rights explain": (["rights", "explain", "no-such-track"], "linernotes ingest"),
    "rights opt-out": (["rights", "opt-out"], "exactly one"),
    "runs": (["runs", "--jsn"], "No such option"),
    "run": (["run", "/no/such/spec.yaml"], "does not exist"),
    "lineage": (["lineage", "no-such-id"], "no-such-id"),
    "takedown": (["takedown"], "exactly one"),
    "report": (["report", "gen-none"], "gen-none"),
    "serve": (["serve", "--port", "0"], "--port"),
    "evaluate": (["evaluate", "--num-references", "0"], "--num-references"),
    "variations": (["variations", "--prompt", "x", "--seed", "1", "--duration-s", "0"], "--duration-s"),
    "clean run": (["clean", "run", "--method", "fad"], "reference_tracks"),
    "clean separate": (["clean", "separate", "--set", "overlap=2"], "overlap"),
    "clean evaluate": (["clean", "evaluate", "--set", "seedz=[1]"], "seedz"),
}


@pytest.mark.parametrize("name", sorted(BAD_ARGUMENTS))
def test_a_bad_argument_exits_2_with_one_line(tmp_path, name):
    args, needle = BAD_ARGUMENTS[name]
    done = linernotes(tmp_path / "w", *args, expect=2, timeout_s=120)
    lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip() and "─" not in line]
    assert any(needle in line for line in lines), done.stderr[-2000:]
    assert not any("Traceback" in line for line in lines), done.stderr[-2000:]
