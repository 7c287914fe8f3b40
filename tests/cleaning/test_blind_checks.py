"""Explicit checks, contamination planting and drop rules on synthetic signals with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from cleaning import checks
from cleaning.contamination import (BAND_LIMIT, BLEEDING, CLIPPING, LABEL_NOISE, NOISE, SILENCE, StemItem,
                                    band_limit, bleed, plant_contamination)
from cleaning.decision import decide
from tests.conftest import sine

SR = 16000


def _stems(track: str, seed: int) -> list[StemItem]:
    rng = np.random.default_rng(seed)
    bass = sine(55.0 * (1 + seed % 3), 2.0, SR, 0.3)
    other = sine(880.0 + 40 * seed, 2.0, SR, 0.2)
    drums = (rng.standard_normal((1, 2 * SR)) * 0.05 * (np.arange(2 * SR) % 4000 < 400)).astype(np.float32)
    return [StemItem(track, "bass", "", bass, SR), StemItem(track, "other", "keys", other, SR),
            StemItem(track, "drums", "", drums, SR)]


def test_checks_catch_planted_silence_and_clipping_with_their_reasons():
    items = [s for t in range(6) for s in _stems(f"t{t}", t)]
    planted_items, planted = plant_contamination(items, {SILENCE: 2 / 18, CLIPPING: 2 / 18}, seed=3)
    assert sorted(p.kind for p in planted) == [CLIPPING, CLIPPING, SILENCE, SILENCE]
    by_index = {p.index: p.kind for p in planted}
    for index, item in enumerate(planted_items):
        mixture = sum(s.audio for s in planted_items if s.track_id == item.track_id)
        results = {r.method: r for r in checks.run_checks(item.audio, SR, mixture)}
        failed = {r.reason for r in results.values() if not r.passed}
        expected = {SILENCE: {checks.REASON_SILENT}, CLIPPING: {checks.REASON_CLIPPED}}.get(by_index.get(index), set())
        assert failed == expected, (index, by_index.get(index), failed, [r.detail for r in results.values()])
    silent = next(i for i, k in by_index.items() if k == SILENCE)
    assert checks.check_silence(planted_items[silent].audio, SR).score == 1.0


def test_mixture_check_flags_a_stem_from_another_recording():
    stems = _stems("a", 1)
    mixture = sum(s.audio for s in stems)
    assert checks.measure_mixture_gain(stems[1].audio, mixture) == pytest.approx(1.0, abs=0.05)
    foreign = sine(1234.5, 2.0, SR, 0.2)
    result = checks.check_mixture(foreign, mixture)
    assert not result.passed and result.reason == checks.REASON_NOT_IN_MIXTURE
    assert abs(result.score) < 0.1
    assert checks.check_mixture(stems[0].audio, mixture).passed


def test_contamination_is_deterministic_and_records_what_it_planted():
    items = [s for t in range(10) for s in _stems(f"t{t}", t)]
    fractions = {BLEEDING: 0.1, LABEL_NOISE: 0.1, NOISE: 0.1, BAND_LIMIT: 0.1}
    a, planted_a = plant_contamination(items, fractions, seed=7)
    b, planted_b = plant_contamination(items, fractions, seed=7)
    c, planted_c = plant_contamination(items, fractions, seed=8)
    assert planted_a == planted_b and planted_a != planted_c
    assert all(np.array_equal(x.audio, y.audio) for x, y in zip(a, b))
    assert len(planted_a) == 12 and len({p.index for p in planted_a}) == 12
    planted_set = {p.index for p in planted_a}
    for i, (before, after) in enumerate(zip(items, a)):
        assert np.array_equal(before.audio, after.audio) == (i not in planted_set)
        assert (before.track_id, before.role) == (after.track_id, after.role)
    for p in planted_a:
        if p.kind == LABEL_NOISE:  # the audio is another role's stem of the same track
            same_track = [s for s in items if s.track_id == items[p.index].track_id and s.role != items[p.index].role]
            assert any(np.array_equal(a[p.index].audio, s.audio) for s in same_track)


def test_bleed_level_and_band_limit_cutoff():
    stem, other = sine(100.0, 1.0, SR, 0.5), sine(3000.0, 1.0, SR, 0.1)
    mixed = bleed(stem, other, -12.0)
    leak = mixed - stem
    ratio_db = 20 * np.log10(np.sqrt(np.mean(leak ** 2)) / np.sqrt(np.mean(stem ** 2)))
    assert ratio_db == pytest.approx(-12.0, abs=0.01)
    low = band_limit(stem + other, SR, 1000.0)
    spectrum = np.abs(np.fft.rfft(low[0]))
    assert spectrum[3000] < 1e-3 * spectrum[100]  # 1 Hz bins: the 3 kHz tone is gone, 100 Hz stays


def test_decide_by_ratio_and_threshold_both_directions():
    scores = np.array([0.1, 5.0, 0.3, np.nan, 2.0])
    assert decide(scores, higher_is_worse=True, drop_ratio=0.5).tolist() == [False, True, False, False, True]
    assert decide(scores, higher_is_worse=False, drop_ratio=0.25).tolist() == [True, False, False, False, False]
    assert decide(scores, higher_is_worse=True, threshold=1.0).tolist() == [False, True, False, False, True]
    assert decide(scores, higher_is_worse=False, threshold=0.2).tolist() == [True, False, False, False, False]
    with pytest.raises(ValueError):
        decide(scores, higher_is_worse=True)
