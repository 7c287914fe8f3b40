"""Keep or drop: turn one method's scores into decisions, by a drop ratio or a threshold.

The decision is a pure function of the scores and the rule, so a later run that changes the rule restores
(or drops) stems without scoring anything again.
"""

from __future__ import annotations

import math

import numpy as np

KEEP = "keep"
DROP = "drop"


def decide(scores: np.ndarray, *, higher_is_worse: bool, drop_ratio: float | None = None,
           threshold: float | None = None) -> np.ndarray:
    """Which items to drop.

    Exactly one of ``drop_ratio`` and ``threshold`` is given:

    - ``drop_ratio`` in [0, 1]: drop the ``floor(drop_ratio * n)`` worst finite scores (ties broken by
      position, so the result is deterministic);
    - ``threshold``: drop every score worse than it (``>`` when higher is worse, ``<`` otherwise).

    NaN scores (an item the method could not score) are always kept.

    Args:
        scores: float ``(n,)``.
        higher_is_worse: True for distances (FAD), False for contributions (unlearning loss change).

    Returns:
        bool ``(n,)``, True = drop.

    Raises:
        ValueError: both or neither rule given, or ``drop_ratio`` outside [0, 1].
    """
    scores = np.asarray(scores, dtype=np.float64)
    if (drop_ratio is None) == (threshold is None):
        raise ValueError("give exactly one of drop_ratio and threshold")
    finite = np.isfinite(scores)
    drop = np.zeros(scores.shape, dtype=bool)
    badness = scores if higher_is_worse else -scores
    if threshold is not None:
        limit = threshold if higher_is_worse else -threshold
        drop[finite] = badness[finite] > limit
        return drop
    if not 0.0 <= drop_ratio <= 1.0:
        raise ValueError(f"drop_ratio must be in [0, 1], got {drop_ratio}")
    count = math.floor(drop_ratio * int(finite.sum()) + 1e-9)
    if count:
        candidates = np.flatnonzero(finite)
        order = candidates[np.argsort(-badness[candidates], kind="stable")]
        drop[order[:count]] = True
    return drop
