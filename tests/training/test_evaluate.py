"""Run evaluation: FAD per checkpoint against the validation split, loss read from the checkpoints, and a
report (Parquet, JSON, PNG plot, HTML)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from cleaning.embed import load_embedder
from cleaning.fad import embed_stats, frechet_distance
from tests.training.checkpoints import write_run
from training.data import read_dataset_info
from training.evaluate import (EVALUATION_SCHEMA, evaluate_checkpoint, evaluate_run, find_checkpoints,
                               read_loss_curve, read_reference_clips)
from training.generate import load_checkpoint


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def run_dir(tiny_dataset, tmp_path_factory):
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("eval-run")
    write_run(tiny_dataset, folder, "flow", steps=20, checkpoint_steps=(2, 20))
    return folder


def test_checkpoints_and_loss_curve_come_from_the_trainers_files(run_dir):
    checkpoints = find_checkpoints(run_dir)
    assert [step for step, _ in checkpoints] == [2, 20]  # final/ duplicates step 20 and is dropped
    steps, losses = read_loss_curve(run_dir, checkpoints)
    state = torch.load(checkpoints[-1][1], weights_only=True)
    assert steps.tolist() == list(range(1, 21)) and np.allclose(losses, state["losses"])
    with pytest.raises(FileNotFoundError, match="no checkpoint.pt"):
        find_checkpoints(run_dir / "nothing")


def test_reference_clips_are_the_validation_segments(tiny_dataset):
    info = read_dataset_info(tiny_dataset)
    clips = read_reference_clips(info.shards["validation"])
    assert len(clips) == 2 and all(c.meta["track_id"] == "t-val" for c in clips)
    assert clips[0].audio.shape == (1, 32000) and clips[0].sample_rate_hz == 16000
    assert clips[0].mel.shape[0] == info.mel_config.n_mels


def test_fad_of_the_references_to_themselves_is_zero_and_generations_are_further(tiny_dataset, run_dir):
    info = read_dataset_info(tiny_dataset)
    clips = read_reference_clips(info.shards["validation"])
    embedder = load_embedder("mel-stats")
    same = frechet_distance(embed_stats(embedder, [(c.audio, c.sample_rate_hz) for c in clips]),
                            embed_stats(embedder, [(c.audio, c.sample_rate_hz) for c in clips]))
    assert same == pytest.approx(0.0, abs=1e-6)
    value, sampler = evaluate_checkpoint(load_checkpoint(find_checkpoints(run_dir)[-1][1]), clips, embedder,
                                         num_steps=4)
    assert value > 0 and np.isfinite(value) and sampler == "heun-4-cfg2.0"


def test_evaluate_run_writes_table_plot_and_report(tiny_dataset, run_dir, tmp_path):
    notes = []
    evaluation = evaluate_run(run_dir, tiny_dataset, load_embedder("mel-stats"), tmp_path / "eval", num_steps=4,
                              progress=lambda *note: notes.append(note))
    assert [row["step"] for row in evaluation.rows] == [2, 20]
    assert notes[-1] == ("evaluating checkpoints", 2, 2)
    table = pq.read_table(evaluation.outputs["parquet"])
    assert table.schema.equals(EVALUATION_SCHEMA) and table.num_rows == 2
    assert all(np.isfinite(table.column("fad").to_numpy()))
    assert np.isfinite(evaluation.vocoder_floor_fad) and evaluation.vocoder_floor_fad >= 0
    png = (tmp_path / "eval" / "loss_fad.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    page = (tmp_path / "eval" / "report.html").read_text()
    assert 'src="loss_fad.png"' in page and page.count("<tr>") == 3
    saved = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert saved["final_loss"] == pytest.approx(float(evaluation.losses[-1]))
    with pytest.raises(ValueError, match="no validation shards"):
        manifest = json.loads((tiny_dataset / "dataset.json").read_text())
        broken = tmp_path / "broken"
        broken.mkdir()
        (broken / "dataset.json").write_text(json.dumps({**manifest, "shards": {**manifest["shards"],
                                                                                  "validation": []}}))
        for name in manifest["shards"]["train"]:
            (broken / name).symlink_to(tiny_dataset / name)
        evaluate_run(run_dir, broken, load_embedder("mel-stats"), tmp_path / "never")
