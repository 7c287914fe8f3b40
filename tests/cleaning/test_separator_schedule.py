"""The separator's cosine learning-rate schedule (clean evaluate's downstream separators): the last steps move
the weights far less than with a constant rate, so the final model depends less on its last batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cleaning.separator import RandomMixer, SeparatorSpec, build_separator, train_separator


def _step_sizes(schedule: str, steps: int = 8) -> list[float]:
    rng = np.random.default_rng(0)
    pools = [rng.standard_normal((4, 1024)).astype(np.float32) * 0.1 for _ in range(2)]
    model = build_separator(SeparatorSpec(sources=("a", "b"), sample_rate_hz=8000, channels=4, depth=2), seed=0)
    previous = [torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()]
    sizes = []

    def progress(_label, _step, _total):
        now = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
        sizes.append(float((now - previous[0]).norm()))
        previous[0] = now

    train_separator(model, RandomMixer(pools, seed=0), steps=steps, batch_size=2, progress=progress,
                    lr_schedule=schedule)
    return sizes


def test_cosine_schedule_shrinks_the_last_steps():
    constant, cosine = _step_sizes("constant"), _step_sizes("cosine")
    assert len(constant) == len(cosine) == 8
    # the first step has the same rate in both; Adam's step scales with the rate, (1 + cos(π·7/8))/2 ≈ 0.04
    assert abs(cosine[0] - constant[0]) < 1e-6 * max(constant[0], 1e-12) + 1e-9
    assert cosine[-1] < 0.2 * constant[-1]


def test_unknown_schedule_is_rejected():
    with pytest.raises(ValueError, match="lr_schedule"):
        _step_sizes("linear")
