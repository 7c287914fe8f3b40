"""The schedules of a training run: the learning rate per step and the EMA of the weights.

Pure functions of the step and the config (no state), so a resumed run follows the same curve.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from training.config import TrainConfig


def learning_rate_at(step: int, config: TrainConfig) -> float:
    """Linear warm-up to ``learning_rate`` over ``warmup_steps``, then half-cosine decay to
    ``min_learning_rate`` at ``steps`` (Loshchilov & Hutter 2017, SGDR; as in nanoGPT)."""
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / (config.warmup_steps + 1)
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    coefficient = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return config.min_learning_rate + coefficient * (config.learning_rate - config.min_learning_rate)


def ema_decay_at(step: int, ceiling: float) -> float:
    """EMA decay at ``step``: ``min(ceiling, (1 + step) / (10 + step))``, the ``num_updates`` warm-up
    of TensorFlow's ``ExponentialMovingAverage``, so short runs do not keep mostly initial weights."""
    return min(ceiling, (1.0 + step) / (10.0 + step))


@torch.no_grad()
def update_ema(ema_model: nn.Module, model: nn.Module, decay: float) -> None:
    """``ema ← decay · ema + (1 − decay) · θ`` for every parameter; buffers are copied."""
    for ema_param, param in zip(ema_model.parameters(), model.parameters(), strict=True):
        ema_param.lerp_(param.detach(), 1.0 - decay)
    for ema_buffer, buffer in zip(ema_model.buffers(), model.buffers(), strict=True):
        ema_buffer.copy_(buffer)
