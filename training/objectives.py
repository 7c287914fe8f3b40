"""The training objective a ``TrainConfig`` names: ``build_parameterization``.

The interface is ``training.parameterization.Parameterization``; its implementations are
``training.diffusion.GaussianDiffusion`` (``prediction`` ``epsilon`` or ``v``) and
``training.flow.FlowMatching`` (``flow``). This module sits above all three, so that the base class does not
import its subclasses.
"""

from __future__ import annotations

from typing import Any

from training.diffusion import GaussianDiffusion
from training.flow import FlowMatching
from training.parameterization import Parameterization

__all__ = ["build_parameterization"]


def build_parameterization(config: Any) -> Parameterization:
    """The parameterization a ``TrainConfig`` asks for (``prediction``: ``epsilon``, ``v`` or ``flow``).

    Raises:
        ValueError: unknown ``prediction``.
    """
    if config.prediction == "flow":
        return FlowMatching(config.diffusion_steps)
    return GaussianDiffusion(config.diffusion_steps, config.beta_schedule, config.beta_start, config.beta_end,
                             config.prediction)
