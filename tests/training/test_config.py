"""TrainConfig: defaults, immutability, unknown keys, validation messages and its hash."""

from __future__ import annotations

import pydantic
import pytest

from training.config import TrainConfig


def test_defaults_are_the_cpu_demo():
    config = TrainConfig()
    assert (config.steps, config.batch_size, config.crop_frames, config.base_channels) == (200, 8, 128, 64)
    assert config.channel_mults == (1, 2, 2) and config.num_workers == 1 and config.use_gpu is False
    assert config.warmup_steps <= config.steps


def test_frozen_and_rejects_unknown_keys():
    config = TrainConfig()
    with pytest.raises(pydantic.ValidationError):
        config.steps = 3  # type: ignore[misc]
    with pytest.raises(pydantic.ValidationError, match="stepz"):
        TrainConfig(stepz=3)


@pytest.mark.parametrize(("overrides", "message"), [
    ({"steps": 0}, "steps must be >= 1"),
    ({"learning_rate": 0.0}, "learning_rate must be > 0"),
    ({"cond_dropout": 1.0}, r"cond_dropout must be in \[0, 1\)"),
    ({"ema_decay": -0.1}, r"ema_decay must be in \[0, 1\)"),
    ({"steps": 10, "warmup_steps": 11}, r"warmup_steps \(11\) must be <= steps \(10\)"),
    ({"channel_mults": ()}, "channel_mults must be a non-empty"),
    ({"base_channels": 12}, "base_channels must be a multiple of 8"),
    ({"beta_schedule": "linear", "beta_start": 0.1, "beta_end": 0.01}, "beta_start < beta_end"),
    ({"beta_schedule": "sigmoid"}, "beta_schedule"),
])
def test_invalid_values_name_the_key(overrides, message):
    with pytest.raises(pydantic.ValidationError, match=message):
        TrainConfig(**overrides)


def test_sha256_is_stable_and_sensitive():
    assert TrainConfig().sha256() == TrainConfig().sha256()
    assert TrainConfig(seed=1).sha256() != TrainConfig().sha256()
    assert len(TrainConfig().sha256()) == 64
    # the dict form round-trips (it is what checkpoints store)
    config = TrainConfig(channel_mults=(1, 2), steps=7, warmup_steps=2)
    assert TrainConfig(**config.to_dict()) == config
    assert TrainConfig(**config.to_dict()).sha256() == config.sha256()


def test_short_runs_get_a_proportional_warmup_unless_set():
    assert TrainConfig(steps=8).warmup_steps == 0
    assert TrainConfig(steps=50).warmup_steps == 5
    assert TrainConfig(steps=5000).warmup_steps == 20
    assert TrainConfig(steps=50, warmup_steps=7).warmup_steps == 7
