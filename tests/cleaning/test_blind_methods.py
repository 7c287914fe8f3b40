"""The two blind methods on synthetic multitracks with planted contamination: detection by AUROC."""

from __future__ import annotations

import numpy as np
import pytest

from cleaning.blind import UnlearningSettings, fad_stem_scores, standardize_by_role, unlearning_stem_scores
from cleaning.contamination import BLEEDING, LABEL_NOISE, plant_contamination
from cleaning.embed import load_embedder
from cleaning.evaluate import detection_metrics
from cleaning.fad import gaussian_stats, per_item_fad, per_item_fads
from cleaning.synthetic_stems import render_songs


@pytest.fixture(scope="module")
def material():
    return render_songs(10, seed=1, duration_s=4.0), render_songs(4, seed=99, duration_s=4.0)


@pytest.mark.parametrize("kind", [BLEEDING, LABEL_NOISE])
def test_fad_detects_planted_contamination(material, kind):
    candidates, references = material
    planted_items, planted = plant_contamination(candidates, {kind: 0.2}, seed=1)
    assert len(planted) == 8
    scores = fad_stem_scores(load_embedder("mel-stats"), planted_items, references)
    metrics = detection_metrics(scores, planted, higher_is_worse=True)
    assert metrics[kind]["auroc"] >= 0.8, metrics
    clean_scores = fad_stem_scores(load_embedder("mel-stats"), candidates, references)
    assert np.mean(scores[[p.index for p in planted]]) > np.mean(clean_scores[[p.index for p in planted]])


def test_per_item_fads_equals_per_item_fad(material):
    candidates, references = material
    embedder = load_embedder("mel-stats")
    reference = gaussian_stats(np.concatenate([embedder.embed(s.audio, s.sample_rate_hz) for s in references]))
    items = [embedder.embed(s.audio, s.sample_rate_hz) for s in candidates[:5]]
    fast = per_item_fads(items, reference)
    slow = np.array([per_item_fad(x, reference) for x in items])
    assert np.allclose(fast, slow, rtol=1e-5, atol=1e-7) and np.all(fast > 0)


def test_unlearning_detects_planted_contamination(material):
    """One separator, trained on candidates with 20% bleeding and 20% label noise planted (8 stems each)."""
    candidates, references = material
    planted_items, planted = plant_contamination(candidates, {BLEEDING: 0.2, LABEL_NOISE: 0.2}, seed=1)
    assert len(planted) == 16
    result = unlearning_stem_scores(planted_items, references, UnlearningSettings(train_steps=400,
                                                                                  max_windows_per_stem=4))
    assert result.forget_loss_after > result.forget_loss_before  # the step unlearned the reference set
    assert np.mean(result.train_losses[-20:]) < 0.6 * result.train_losses[0]
    assert np.all(np.isfinite(result.scores)) and result.window_deltas.shape == (len(candidates) * 4,)
    for role in {c.role for c in candidates}:  # standardised within each role
        values = result.scores[[i for i, c in enumerate(candidates) if c.role == role]]
        assert abs(values.mean()) < 1e-9 and values.std() == pytest.approx(1.0)
    metrics = detection_metrics(result.scores, planted, higher_is_worse=False)  # lower = contributes less
    raw = detection_metrics(result.info["raw_scores"], planted, higher_is_worse=False)
    # measured (data seed 1, contrastive step): label noise 0.97 (raw mean loss change 0.88), bleeding 0.69
    # (raw 0.57). Over data seeds 1–5 label noise is 0.97/0.91/0.80/0.91/0.91, bleeding 0.69/0.32/0.64/0.65/0.45
    assert metrics[LABEL_NOISE]["auroc"] >= 0.8, metrics
    assert metrics[LABEL_NOISE]["auroc"] > raw[LABEL_NOISE]["auroc"] and metrics["all"]["auroc"] > raw["all"]["auroc"]
    # the target of 0.8 on bleeding is NOT met by this CPU-scale separator (README, "Measured");
    # this guards the level reached against regressions
    assert metrics[BLEEDING]["auroc"] >= 0.65, metrics


def test_standardize_by_role_keeps_nan_and_handles_a_single_stem():
    scores = np.array([1.0, 3.0, np.nan, 5.0, 2.0])
    out = standardize_by_role(scores, ["bass", "bass", "bass", "drums", "vocals"])
    assert np.allclose(out[:2], [-1.0, 1.0]) and np.isnan(out[2]) and out[3] == 0.0 and out[4] == 0.0
