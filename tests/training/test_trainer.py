"""Ray Train (V2) trainer: 2 CPU workers with DDP over gloo and 2 loader workers each on 3 uneven shards;
a run stopped at step N and resumed gives exactly the losses and weights of 2N steps straight; checkpoints
through a ``file://`` pyarrow URI; TensorBoard scalars; the checkpoint still loads for generation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cleaning.mel import MelConfig
from tests.training.test_stream import write_shards
from training.config import TrainConfig
from training.generate import load_checkpoint
from training.train import CHECKPOINT_FILE, TENSORBOARD_DIR, train

MEL_CONFIG = MelConfig(sample_rate_hz=16000, n_fft=512, hop_length=160, n_mels=8)
N = 3
CONFIG = TrainConfig(steps=2 * N, batch_size=2, crop_frames=16, warmup_steps=1, log_every=1, checkpoint_every=2,
                     base_channels=16, channel_mults=(1, 2), text_dim=16, text_buckets=64, diffusion_steps=50,
                     num_workers=2, num_loader_workers=2, shuffle_buffer=4, num_checkpoints_kept=5)


@pytest.fixture(scope="module")
def runs(ray_local, tmp_path_factory):
    """2N steps straight (local folder), then N steps + a resume for N (``file://`` URI), same config."""
    shards = write_shards(tmp_path_factory.mktemp("uneven_shards"), [5, 3, 2])
    storage = tmp_path_factory.mktemp("trainer_storage")
    progress: list[tuple[str, int, int]] = []
    straight = train(shards, "ds-uneven", MEL_CONFIG, CONFIG, str(storage), "straight")
    uri = f"file://{storage}"
    partial = train(shards, "ds-uneven", MEL_CONFIG, CONFIG, uri, "split", stop_after_steps=N)
    # an interrupted run refuses another config before any cluster work
    with pytest.raises(ValueError, match="choose a new run_name"):
        train(shards, "ds-uneven", MEL_CONFIG, CONFIG.model_copy(update={"seed": 7}), uri, "split")
    resumed = train(shards, "ds-uneven", MEL_CONFIG, CONFIG, uri, "split",
                    progress=lambda *note: progress.append(note))
    return {"straight": straight, "partial": partial, "resumed": resumed, "storage": storage, "progress": progress}


def test_stop_then_resume_equals_straight_run_exactly(runs):
    straight, partial, resumed = runs["straight"], runs["partial"], runs["resumed"]
    assert (straight.step, partial.step, resumed.step) == (2 * N, N, 2 * N)
    assert straight.finished and resumed.finished and not partial.finished
    assert partial.losses == straight.losses[:N]
    assert resumed.losses == straight.losses  # exact float equality, every step
    assert len(set(straight.losses)) == 2 * N  # the losses differ step to step: real batches, real noise
    a = torch.load(straight.checkpoint_path, weights_only=True)
    b = torch.load(resumed.checkpoint_path, weights_only=True)
    for part in ("model_state", "ema_state"):
        assert all(torch.equal(a[part][name], b[part][name]) for name in a[part])
    moments = lambda s: [v for st in s["optimizer_state"]["state"].values() for v in st.values()]  # noqa: E731
    assert all(torch.equal(x, y) for x, y in zip(moments(a), moments(b), strict=True))
    assert a["data_position"] == b["data_position"] == {
        "batches_consumed_per_rank": 2 * N, "batch_size": 2, "world_size": 2, "num_loader_workers": 2,
        "samples_per_epoch": 10, "seed": 0}


def test_checkpoints_go_to_the_storage_uri_and_load_for_generation(runs):
    storage, partial, resumed = runs["storage"], runs["partial"], runs["resumed"]
    run_dir = storage / "split"
    assert partial.checkpoint_uri == f"file://{run_dir}/checkpoint_{N:09d}/{CHECKPOINT_FILE}"
    assert resumed.checkpoint_uri == f"file://{run_dir}/final/{CHECKPOINT_FILE}"
    steps = sorted(int(p.parent.name.split("_")[1]) for p in run_dir.glob(f"checkpoint_*/{CHECKPOINT_FILE}"))
    assert steps == [2, N, 4, 2 * N]  # every checkpoint_every steps, at the stop, at the end
    state = torch.load(run_dir / "checkpoint_000000003" / CHECKPOINT_FILE, weights_only=True)
    assert state["step"] == N and state["data_position"]["batches_consumed_per_rank"] == N
    assert state["dataset_id"] == "ds-uneven" and TrainConfig(**state["config"]) == CONFIG
    loaded = load_checkpoint(resumed.checkpoint_path)
    assert loaded.step == 2 * N and loaded.dataset_id == "ds-uneven" and loaded.config == CONFIG


def test_tensorboard_logs_loss_learning_rate_and_throughput(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for name, result in (("straight", runs["straight"]), ("split", runs["resumed"])):
        scalars: dict[str, dict[int, float]] = {}
        for events in sorted((runs["storage"] / name / TENSORBOARD_DIR).glob("events.out.tfevents.*")):
            accumulator = EventAccumulator(str(events))
            accumulator.Reload()
            for tag in accumulator.Tags()["scalars"]:
                scalars.setdefault(tag, {}).update({e.step: e.value for e in accumulator.Scalars(tag)})
        assert {"train/loss", "train/learning_rate", "train/samples_per_s", "train/grad_norm"} <= set(scalars)
        assert sorted(scalars["train/loss"]) == list(range(1, 2 * N + 1))  # the resumed run continues the curve
        assert [scalars["train/loss"][s] for s in range(1, 2 * N + 1)] == pytest.approx(result.losses, rel=1e-6)
        assert all(v > 0 for v in scalars["train/samples_per_s"].values())
        assert max(scalars["train/learning_rate"].values()) == pytest.approx(CONFIG.learning_rate, rel=0.2)


def test_resumed_run_reports_progress_from_its_resume_step(runs):
    steps = [step for _, step, _ in runs["progress"]]
    assert runs["progress"][0] == ("training steps", 0, 2 * N)
    assert steps[-1] == 2 * N and all(s == 0 or s > N for s in steps)
    note = json.loads((Path(runs["storage"]) / "split" / "progress.json").read_text())
    assert note["step"] == 2 * N
