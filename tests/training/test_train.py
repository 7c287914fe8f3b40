"""Training on Ray Train (V2): the checkpoint file, its contents, the schedules; bad inputs fail early."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from tests.training.conftest import MEL_CONFIG, TRAIN_PROGRESS
from training.config import TrainConfig
from training.data import measure_mel_stats, read_dataset_info
from training.model import MelUNet
from training.train import CHECKPOINT_FILE, ema_decay_at, learning_rate_at, train

CHECKPOINT_KEYS = {"model_kwargs", "model_state", "ema_state", "optimizer_state", "step", "config", "mel_config",
                   "dataset_id", "mel_mean", "mel_std", "losses"}


def test_train_reports_progress_to_the_last_step(trained):
    result, config, _ = trained
    steps = [step for _, step, _ in TRAIN_PROGRESS]
    assert TRAIN_PROGRESS[0] == ("training steps", 0, config.steps)
    assert steps[-1] == config.steps == result.step and steps == sorted(steps)


def test_train_writes_a_complete_checkpoint(trained, tiny_dataset):
    result, config, storage = trained
    info = read_dataset_info(tiny_dataset)
    assert result.checkpoint_path == storage / "tiny-run" / "final" / CHECKPOINT_FILE
    assert result.checkpoint_path.is_file()
    state = torch.load(result.checkpoint_path, map_location="cpu", weights_only=True)
    assert CHECKPOINT_KEYS <= set(state)
    assert state["step"] == result.step == config.steps
    assert state["dataset_id"] == info.dataset_id
    assert TrainConfig(**state["config"]) == config and state["config_sha256"] == config.sha256()
    assert state["mel_config"] == MEL_CONFIG.to_dict()
    mean, std = measure_mel_stats(info.shards["train"])
    assert (state["mel_mean"], state["mel_std"]) == (result.mel_mean, result.mel_std) == pytest.approx((mean, std))
    assert len(result.losses) == config.steps and result.losses == state["losses"]
    assert all(math.isfinite(loss) and 0 < loss < 5 for loss in result.losses)
    # the saved constructor arguments rebuild the model; both weight sets load strictly
    model = MelUNet(**state["model_kwargs"])
    model.load_state_dict(state["model_state"])
    model.load_state_dict(state["ema_state"])
    assert state["model_kwargs"]["n_mels"] == MEL_CONFIG.n_mels
    # the EMA moved away from the initial weights but lags the trained ones
    out_model, out_ema = state["model_state"]["out_conv.weight"], state["ema_state"]["out_conv.weight"]
    assert out_ema.abs().sum() > 0 and not torch.equal(out_ema, out_model)


def test_learning_rate_warms_up_then_decays_to_the_floor():
    config = TrainConfig(steps=100, warmup_steps=10, learning_rate=1e-3, min_learning_rate=1e-4)
    rates = [learning_rate_at(step, config) for step in range(101)]
    assert rates[0] == pytest.approx(1e-3 / 11) and rates[9] == pytest.approx(1e-3 * 10 / 11)
    assert rates[10] == pytest.approx(1e-3) and max(rates) == pytest.approx(1e-3)
    assert all(a >= b for a, b in itertools.pairwise(rates[10:]))
    assert rates[100] == pytest.approx(1e-4) and rates[55] == pytest.approx(5.5e-4)


def test_ema_decay_warms_up_to_its_ceiling():
    assert ema_decay_at(0, 0.999) == pytest.approx(0.1)
    assert ema_decay_at(90, 0.999) == pytest.approx(0.91)
    assert ema_decay_at(100_000, 0.999) == 0.999


def test_bad_inputs_fail_before_any_cluster_work(tmp_path, tiny_dataset):
    info = read_dataset_info(tiny_dataset)
    config = TrainConfig(steps=1, warmup_steps=0)
    with pytest.raises(FileNotFoundError, match="do not exist"):
        train([str(tmp_path / "nope.tar")], "ds", info.mel_config, config, str(tmp_path), "run")
    with pytest.raises(ValueError, match="cannot be opened by pyarrow.fs"):
        train(info.shards["train"], "ds", info.mel_config, config, "nosuchscheme://bucket/runs", "run")
    with pytest.raises(ValueError, match="stop_after_steps"):
        train(info.shards["train"], "ds", info.mel_config, config, str(tmp_path), "run", stop_after_steps=0)
    with pytest.raises(ValueError, match="empty"):
        train([], "ds", info.mel_config, config, str(tmp_path), "run")


def test_rerunning_a_finished_run_does_no_new_work(trained, tiny_dataset):
    result, config, storage = trained
    info = read_dataset_info(tiny_dataset)
    before = result.checkpoint_path.stat().st_mtime_ns
    again = train(info.shards["train"], info.dataset_id, info.mel_config, config, str(storage), "tiny-run")
    assert again == result and result.checkpoint_path.stat().st_mtime_ns == before
    other = config.model_copy(update={"seed": 1})
    with pytest.raises(ValueError, match="choose a new run_name"):
        train(info.shards["train"], info.dataset_id, info.mel_config, other, str(storage), "tiny-run")
    with pytest.raises(ValueError, match="choose a new run_name"):
        train(info.shards["train"], "another-dataset", info.mel_config, config, str(storage), "tiny-run")
