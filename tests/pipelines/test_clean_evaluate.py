"""``clean evaluate`` end to end at a toy scale: planted items scored by both methods, detection metrics per
kind, downstream SDR for uncontaminated / contaminated / cleaned / drop-planted sets over two seeds (paired
within a seed), an HTML report with plots; and the pieces of the paired SDR measurement."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from cleaning.contamination import Planted
from cleaning.evaluate import detection_metrics, gap_closed_percent, sdr_per_song, train_on
from cleaning.synthetic_stems import render_song
from pipelines.cli import app
from pipelines.experiments.clean_evaluate import (
    EvaluateConfig,
    _sdr_per_song,
    held_out_songs,
    paired_sdr_figures,
    run_evaluate,
)

SOURCES = ["bass", "drums", "other", "vocals"]


def test_detection_metrics_and_gap_closed_have_known_answers():
    scores = np.array([0.1, 0.9, 0.2, 0.8, 0.3, 0.05])
    planted = [Planted(1, "bleeding", ""), Planted(3, "label_noise", ""), Planted(4, "label_noise", "")]
    metrics = detection_metrics(scores, planted, higher_is_worse=True)
    assert metrics["bleeding"] == {"auroc": 1.0, "precision_at_k": 1.0, "planted": 1}
    # label noise: items 3 (0.8) and 4 (0.3) against clean 0.1, 0.2, 0.05 → perfectly separated
    assert metrics["label_noise"]["auroc"] == 1.0
    flipped = detection_metrics(scores, planted, higher_is_worse=False)
    assert flipped["all"]["auroc"] == 0.0 and flipped["all"]["precision_at_k"] == 0.0
    assert gap_closed_percent(2.0, 3.0, 4.0) == 50.0


def test_clean_evaluate_runs_both_methods_over_seeds_and_writes_a_report(tmp_path):
    config = EvaluateConfig(source="synthetic", num_songs=8, clip_s=2.0, seeds=[0, 1], train_steps=10,
                            max_windows_per_stem=2, contamination={"bleeding": 0.15, "label_noise": 0.15},
                            num_test_songs=3)
    summary = run_evaluate(config, tmp_path / "eval")
    assert summary["num_seeds"] == 2
    assert set(summary["detection"]) == {"fad", "unlearning"}
    for per_kind in summary["detection"].values():
        assert {"all", "bleeding", "label_noise"} <= set(per_kind)
        assert all(0.0 <= f["auroc_mean"] <= 1.0 for f in per_kind.values())
    sets = {"uncontaminated", "contaminated", "drop_planted", "cleaned_fad", "cleaned_unlearning"}
    assert set(summary["sdr_db"]) == sets and set(summary["sdr_gain_db"]) == sets - {"contaminated"}
    assert all(np.isfinite(f["mean"]) for f in summary["sdr_db"].values())
    assert summary["gap_reference"] == "uncontaminated"
    for r in summary["per_seed"]:
        assert r["num_test_songs"] == 3
        # the paired gain is the difference of the two sets' SDRs on the same songs
        for name, gain in r["sdr_gain_db"].items():
            assert abs(gain - (r["sdr_db"][name] - r["sdr_db"]["contaminated"])) < 1e-9
    assert len(summary["per_seed"]) == 2 and summary["per_seed"][0]["num_planted"] > 0
    for name in ("report.html", "summary.json", "scores_fad.png", "roc_unlearning.png"):
        assert (tmp_path / "eval" / name).stat().st_size > 0
    assert "66.7" in (tmp_path / "eval" / "report.html").read_text()
    assert json.loads((tmp_path / "eval" / "summary.json").read_text())["num_seeds"] == 2


def test_clean_evaluate_config_rejects_bad_downstream_settings():
    with pytest.raises(ValueError, match="lr_schedule"):
        EvaluateConfig(lr_schedule="linear")
    with pytest.raises(ValueError, match="replicates"):
        EvaluateConfig(replicates=0)
    with pytest.raises(ValueError, match="num_test_songs"):
        EvaluateConfig(num_test_songs=0)


def test_clean_evaluate_cli_rejects_a_bad_key_before_work(tmp_path):
    result = CliRunner().invoke(app, ["clean", "evaluate", "--out", str(tmp_path), "--set", "seedz=[1]", "--json"])
    assert result.exit_code == 2 and "seedz" in result.output


def test_paired_sdr_figures_have_known_answers():
    per_song = {"contaminated": np.array([1.0, 2.0, 3.0]), "uncontaminated": np.array([2.0, 3.0, 4.0]),
                "cleaned_fad": np.array([1.5, 2.5, 3.5]), "cleaned_unlearning": np.array([1.0, 2.0, 3.0]),
                "drop_planted": np.array([1.25, 2.25, 3.25])}
    figures = paired_sdr_figures(per_song, ["fad", "unlearning"])
    assert figures["sdr_db"]["uncontaminated"] == 3.0 and figures["sdr_gain_db"]["uncontaminated"] == 1.0
    assert figures["sdr_gain_sem_db"]["uncontaminated"] == 0.0  # the same +1 dB on every song
    # the gap is against the uncontaminated set (the paper's), not against dropping the planted stems
    assert figures["gap_closed_percent"] == {"fad": 50.0, "unlearning": 0.0}
    assert figures["gap_closed_vs_drop_planted_percent"]["fad"] == 200.0
    noisy = paired_sdr_figures({**per_song, "cleaned_fad": np.array([2.0, 2.0, 3.5])}, ["fad"])
    assert abs(noisy["sdr_gain_db"]["cleaned_fad"] - 0.5) < 1e-12
    assert abs(noisy["sdr_gain_sem_db"]["cleaned_fad"] - np.std([1.0, 0.0, 0.5], ddof=1) / np.sqrt(3)) < 1e-12


def test_downstream_sdr_is_paired_the_same_seed_and_data_give_the_same_sdr():
    train = [s for i in range(3) for s in render_song(f"t{i}", 11 + i, 1.0, 8000)]
    test = [render_song(f"q{i}", 900 + i, 1.0, 8000) for i in range(2)]

    def sdr(items, seed):
        model = train_on(items, SOURCES, window_samples=8000, steps=6, seed=seed, sample_rate_hz=8000, channels=4)
        return sdr_per_song(model, test, SOURCES)

    first = sdr(train, 0)
    assert first.shape == (2,) and np.isfinite(first).all()
    assert np.array_equal(first, sdr(train, 0))  # common random numbers: init, mixes and test songs repeat
    assert not np.array_equal(first, sdr(train, 1))
    assert not np.array_equal(first, sdr(train[4:], 0))  # the data matter (one song fewer)
    # replicates: the per-song mean over separators seeded seed + 1000·r, the same seeds for every set
    config = EvaluateConfig(source="synthetic", sample_rate_hz=8000, separator_channels=4, train_steps=6,
                            lr_schedule="constant", replicates=2)
    averaged = _sdr_per_song(train, test, SOURCES, config, 0)
    np.testing.assert_allclose(averaged, (first + sdr(train, 1000)) / 2, rtol=0, atol=1e-9)


def test_fast_bss_eval_sdr_agrees_with_mir_eval():
    import torch
    from mir_eval.separation import bss_eval_sources

    song = render_song("s", 5, 2.0, 8000)
    reference = np.stack([s.audio[0].astype(np.float64) for s in song])

    class Leaky(torch.nn.Module):  # a "separator" whose estimates are the references plus leakage and noise
        def forward(self, mixture):
            rng = np.random.default_rng(0)
            est = reference + 0.3 * np.roll(reference, 1, axis=0) + 0.05 * rng.standard_normal(reference.shape)
            return torch.from_numpy(est)[None, :, None].float()

    fast = sdr_per_song(Leaky(), [song], SOURCES)[0]
    estimate = Leaky()(None)[0, :, 0].double().numpy()
    slow = bss_eval_sources(reference, estimate, compute_permutation=False)[0].mean()
    assert abs(fast - slow) < 1e-3 and 0 < slow < 30


def test_held_out_songs_are_apart_from_the_material():
    config = EvaluateConfig(source="synthetic", num_songs=6, clip_s=1.0, sample_rate_hz=8000, num_test_songs=4)
    songs = [render_song(f"synth-{i:03d}", 7919 + i, 1.0, 8000) for i in range(6)]
    order = np.arange(6)
    test, taken = held_out_songs(config, 0, songs, order, 1)
    assert taken == 0 and len(test) == 4  # rendered: the material keeps all its songs for training
    material = {s.audio.tobytes() for song in songs for s in song}
    assert not any(s.audio.tobytes() in material for song in test for s in song)
    again, _ = held_out_songs(config, 0, songs, order, 1)
    assert all(np.array_equal(a.audio, b.audio) for x, y in zip(test, again) for a, b in zip(x, y))
    from_material = config.model_copy(update={"source": "slakh", "num_test_songs": 2})
    test, taken = held_out_songs(from_material, 0, songs, order, 1)
    assert taken == 2 and test == [songs[1], songs[2]]
    with pytest.raises(ValueError, match="num_test_songs"):
        held_out_songs(from_material.model_copy(update={"num_test_songs": 4}), 0, songs, order, 1)
