"""``linernotes evaluate`` and ``linernotes variations`` on a workspace holding a (small, in-process trained)
train run: registered runs, the report files, the WAVs, one-line errors."""

from __future__ import annotations

import json
import shutil

import pytest
import soundfile
import torch
from typer.testing import CliRunner

from pipelines.cli import app
from provenance.store import LineageStore
from provenance.workspace import Workspace
from tests.training.checkpoints import write_run
from tests.training.conftest import MEL_CONFIG, write_tiny_dataset
from training.data import read_dataset_info

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A workspace with the tiny dataset, a succeeded train run with two checkpoints, and its final checkpoint."""
    tiny_dataset = write_tiny_dataset(tmp_path_factory.mktemp("tiny_dataset"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    workspace = Workspace.at(tmp_path_factory.mktemp("ws")).ensure()
    info = read_dataset_info(tiny_dataset)
    shutil.copytree(tiny_dataset, workspace.dataset_dir(info.dataset_id))
    store = LineageStore(workspace.store_url)
    shard_run = store.start_run("shard", {})
    store.finish_run(shard_run, {})
    store.add_dataset({"dataset_id": info.dataset_id, "run_id": shard_run, "config_sha256": "0" * 64,
                       "uri": str(workspace.dataset_dir(info.dataset_id)), "num_tracks": 6, "num_segments": 12,
                       "num_train_segments": 10, "num_validation_segments": 2, "num_shards": 3}, {})
    run_id = store.start_run("train", {"dataset_id": info.dataset_id})
    paths = write_run(workspace.dataset_dir(info.dataset_id), workspace.root / "ray_results" / run_id, "v", steps=10,
                      checkpoint_steps=(5, 10))
    store.add_checkpoint({"checkpoint_id": "ckpt-test", "dataset_id": info.dataset_id, "run_id": run_id, "step": 10,
                          "config_sha256": "0" * 64, "uri": str(paths[-1])})
    store.finish_run(run_id, {"steps": 10})
    store.close()
    torch.set_num_threads(threads)
    return workspace, run_id


def test_evaluate_registers_a_run_and_writes_the_report(workspace):
    ws, train_run = workspace
    result = runner.invoke(app, ["evaluate", "--workdir", str(ws.root), "--steps", "3", "--num-references", "2",
                                 "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    assert payload["train_run_id"] == train_run and set(payload["fad_by_step"]) == {"5", "10"}
    assert payload["counts"]["checkpoints"] == 2 and payload["counts"]["best_fad"] >= 0
    for key in ("parquet", "plot", "report", "json"):
        assert (ws.root / payload["outputs"][key]).is_file()
    store = LineageStore(ws.store_url)
    run = store.get_run(payload["run_id"])
    store.close()
    assert run["kind"] == "evaluate" and run["status"] == "succeeded" and run["counts"]["checkpoints"] == 2


def test_evaluate_errors_are_one_line(workspace):
    ws, _ = workspace
    result = runner.invoke(app, ["evaluate", "--workdir", str(ws.root), "--run", "run-nope"])
    assert result.exit_code == 2 and "no train run run-nope" in result.output
    result = runner.invoke(app, ["evaluate", "--workdir", str(ws.root), "--embedder", "nonsense"])
    assert result.exit_code == 2


def test_variations_write_one_wav_per_combination(workspace, tmp_path):
    ws, _ = workspace
    result = runner.invoke(app, ["variations", "--prompt", "sine mid", "--seed", "1", "--seed", "2",
                                 "--guidance-scale", "1", "--guidance-scale", "3", "--duration-s", "0.5",
                                 "--steps", "3", "--out-dir", str(tmp_path / "vars"), "--workdir", str(ws.root),
                                 "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    assert payload["counts"]["generations"] == 4 and len(set(payload["outputs"]["wavs"])) == 4
    for wav in payload["outputs"]["wavs"]:
        audio, rate = soundfile.read(wav)
        assert rate == MEL_CONFIG.sample_rate_hz and audio.shape[0] == 8000
    listing = json.loads((tmp_path / "vars" / "variations.json").read_text())
    assert [item["seed"] for item in listing["items"]] == [1, 2, 1, 2]


def test_generate_twice_is_cached_and_still_writes_out(workspace, tmp_path):
    ws, _ = workspace
    args = ["generate", "--prompt", "sine mid", "--seed", "3", "--duration-s", "0.5", "--steps", "2", "--top-k", "2",
            "--workdir", str(ws.root), "--json"]
    runs = [json.loads(result.stdout.strip().splitlines()[-1]) for result in
            (runner.invoke(app, [*args, "--out", str(tmp_path / f"{n}.wav")]) for n in ("first", "again"))]
    first, again = runs
    assert first["status"] == "ran" and again["status"] == "cached" and again["run_id"] == first["run_id"]
    assert again["generation_id"] == first["generation_id"] and again["attribution"] == first["attribution"]
    assert first["inputs"]["checkpoint"] == "ckpt-test" and first["output_ids"] == {"generation": first["generation_id"]}
    assert soundfile.read(tmp_path / "again.wav")[0].tobytes() == soundfile.read(tmp_path / "first.wav")[0].tobytes()
    other = json.loads(runner.invoke(app, [*args[:4], "4", *args[5:]]).stdout.strip().splitlines()[-1])
    assert other["status"] == "ran" and other["generation_id"] != first["generation_id"]
    store = LineageStore(ws.store_url)
    attribute_run = store.get_run(first["attribution"]["run_id"])
    store.close()
    assert attribute_run["kind"] == "attribute" and attribute_run["parent_run_id"] == first["run_id"]
