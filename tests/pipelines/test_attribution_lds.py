"""Issue 6's LDS check at CPU scale: D-TRAK's linear datamodeling score on a tiny denoiser trained on random
half-subsets of a synthetic dataset is far above what random attribution scores reach.

12 half-subsets of 24 training patches (6 prototypes × 4), 12 held-out queries (2 per prototype), a 10k-parameter
convolutional denoiser trained 80 full-batch steps per subset (``tests/pipelines/lds_support.py``). ``make bench``
runs the same check on the attribution test dataset's mels.
"""

from __future__ import annotations

import numpy as np

from tests.pipelines.lds_support import linear_datamodeling_score, synthetic_mels
from training.diffusion import GaussianDiffusion

SUBSETS, STEPS = 12, 80


def test_dtrak_lds_is_far_above_random_scores():
    x_train, x_query, _ = synthetic_mels(prototypes=6, train_per=4, query_per=2, seed=0)
    result = linear_datamodeling_score(GaussianDiffusion(100), x_train, x_query, num_subsets=SUBSETS, steps=STEPS)
    print(result.summary(SUBSETS, len(x_query)))
    chance = float(np.percentile(result.random, 99))
    assert abs(float(result.random.mean())) < 0.1  # the baseline is what chance gives
    assert result.dtrak_square > chance + 0.05, result.summary(SUBSETS, len(x_query))
    assert result.trak_loss > chance + 0.05, result.summary(SUBSETS, len(x_query))
