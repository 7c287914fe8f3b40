"""The attribute stage's config and the ``unlearning`` method's settings.

Light on purpose (pydantic and the index config, no torch): the config is read by commands that run no stage
(``linernotes stages``, ``--help``); the methods themselves are in ``pipelines.attribution.methods``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import Field, field_validator

from cleaning.measure import SILENCE_FLOOR_DBFS
from pipelines.attribution.stage import IndexConfig

METHODS = ("embedding", "dtrak", "unlearning")


@dataclass(frozen=True)
class UnlearningSettings:
    """Settings of the ``unlearning`` method (Choi et al. 2025).

    Attributes:
        candidates: segments re-ranked per query (from ``rerank_from``'s top list).
        rerank_from: ``"dtrak"`` or ``"embedding"``.
        step_size: relative parameter change of the ascent step, ‖Δθ‖/‖θ‖. Small enough that the loss change is
            first-order in the step (``Δℓ_i ≈ c · g_i^T P g_q``), where the RelatIF normalisation ranks a training
            segment used as the query first by Cauchy–Schwarz; a larger step adds the curvature term
            ``½ Δθ^T H_i Δθ``, which differs between candidates and is not normalised. On the test dataset
            (21 queries, 5 candidates) the smallest ratio of the query's own score to the best other candidate was
            1.019 at 1e-5, 1.018 at 3e-5, 1.001 at 1e-4 and 0.95 at 3e-4 (4 misses); float32 losses resolve the
            changes down to ≈ 1e-6, far below.
        damping: λ of the Fisher preconditioner, relative to the Fisher's mean.
        num_steps: ascent steps (the paper: one).
        normalize: divide each candidate's loss increase by ``√(g_i^T P g_i)``, its linearised
            self-influence under the same preconditioner ``P = (F + λ·mean F)^{-1}`` (``g_i``: its loss
            gradient), as RelatIF (Barshan et al., AISTATS 2020) normalises influence by self-influence.
            To first order the loss increase is ``c · g_i^T P g_q``; without the normalisation, segments with
            large gradients outrank the query's own material (on the test dataset a training segment ranked
            itself first in 15 of 21 queries raw, 21 of 21 normalised). False gives the raw increase.
    """

    candidates: int = 50
    rerank_from: str = "dtrak"
    step_size: float = 3e-5
    damping: float = 0.1
    num_steps: int = 1
    normalize: bool = True

    def __post_init__(self) -> None:
        if self.candidates < 1 or self.rerank_from not in ("dtrak", "embedding") or self.num_steps < 1:
            raise ValueError(f"unlearning settings: candidates ≥ 1, rerank_from dtrak|embedding, num_steps ≥ 1; "
                             f"got {self}")
        if not (self.step_size > 0 and self.damping > 0):
            raise ValueError(f"unlearning settings: step_size and damping must be > 0; got {self}")


class AttributeConfig(IndexConfig):
    """Config of the ``attribute`` stage (``linernotes attribute --config/--set``): the method, how many segments to
    rank and the query's prompt; every ``IndexConfig`` key (which index to use or build); the ``unlearning``
    method's settings (:class:`UnlearningSettings`); and ``silence_floor_dbfs``, the sample peak (dBFS) below
    which a query is silent and gets no ranking and no shares (``silent_query``)."""

    method: str = Field("embedding", description="Attribution method: embedding | dtrak | unlearning.")
    top_k: int = Field(10, ge=1, description="Training segments to rank (shares are over these).")
    prompt: str = Field("", description="The prompt the query was generated from ('' unknown: the null condition "
                                        "of the white-box methods' losses).")
    candidates: int = Field(50, ge=1, description="unlearning: segments re-ranked per query.")
    rerank_from: Literal["dtrak", "embedding"] = Field("dtrak", description="unlearning: whose top list is "
                                                                            "re-ranked.")
    step_size: float = Field(3e-5, gt=0, description="unlearning: relative parameter change of the ascent step.")
    damping: float = Field(0.1, gt=0, description="unlearning: λ of the Fisher preconditioner, relative to its "
                                                  "mean.")
    num_steps: int = Field(1, ge=1, description="unlearning: ascent steps.")
    normalize: bool = Field(True, description="unlearning: divide by the self-influence (RelatIF).")
    silence_floor_dbfs: float = Field(SILENCE_FLOOR_DBFS, le=0.0,
                                      description="A query whose sample peak is below this (dBFS) is silent: no "
                                                  "ranking and no shares (reason silent_query). The same floor as "
                                                  "shard's silent_segment.")

    @field_validator("method")
    @classmethod
    def _known_method(cls, method: str) -> str:
        if method not in METHODS:
            raise ValueError(f"unknown attribution method {method!r}; choose one of {', '.join(METHODS)}")
        return method

    def index_config(self) -> IndexConfig:
        return IndexConfig(**{k: getattr(self, k) for k in IndexConfig.model_fields})

    def unlearning_settings(self) -> UnlearningSettings:
        return UnlearningSettings(self.candidates, self.rerank_from, self.step_size, self.damping, self.num_steps,
                                  self.normalize)
