"""``clean evaluate`` end to end at a toy scale: planted items scored by both methods, detection metrics per
kind, downstream SDR for contaminated / cleaned / oracle sets over two seeds, an HTML report with plots."""

from __future__ import annotations

import json

import numpy as np
from typer.testing import CliRunner

from cleaning.contamination import Planted
from cleaning.evaluate import detection_metrics, gap_closed_percent
from pipelines.cli import app
from pipelines.clean_evaluate import EvaluateConfig, run_evaluate


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
                            max_windows_per_stem=2, contamination={"bleeding": 0.15, "label_noise": 0.15})
    summary = run_evaluate(config, tmp_path / "eval")
    assert summary["num_seeds"] == 2
    assert set(summary["detection"]) == {"fad", "unlearning"}
    for per_kind in summary["detection"].values():
        assert {"all", "bleeding", "label_noise"} <= set(per_kind)
        assert all(0.0 <= f["auroc_mean"] <= 1.0 for f in per_kind.values())
    assert set(summary["sdr_db"]) == {"contaminated", "oracle_clean", "cleaned_fad", "cleaned_unlearning"}
    assert all(np.isfinite(f["mean"]) for f in summary["sdr_db"].values())
    assert len(summary["per_seed"]) == 2 and summary["per_seed"][0]["num_planted"] > 0
    for name in ("report.html", "summary.json", "scores_fad.png", "roc_unlearning.png"):
        assert (tmp_path / "eval" / name).stat().st_size > 0
    assert "66.7" in (tmp_path / "eval" / "report.html").read_text()
    assert json.loads((tmp_path / "eval" / "summary.json").read_text())["num_seeds"] == 2


def test_clean_evaluate_cli_rejects_a_bad_key_before_work(tmp_path):
    result = CliRunner().invoke(app, ["clean", "evaluate", "--out", str(tmp_path), "--set", "seedz=[1]", "--json"])
    assert result.exit_code == 2 and "seedz" in result.output
