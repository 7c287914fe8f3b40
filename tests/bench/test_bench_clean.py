"""Benchmark of blind cleaning (``make bench``): ``clean evaluate`` at a larger scale over 3 seeds.

Prints per method and contamination kind the AUROC and precision at the planted count, and the downstream
separator SDR of the cleaned sets against the contaminated-set baseline measured in the same run (the
difference in dB and the gap closed, next to the paper's 66.7%). Never gates on absolute times or figures.
"""

from __future__ import annotations

import os

import pytest

from pipelines.clean_evaluate import EvaluateConfig, run_evaluate

pytestmark = pytest.mark.bench


@pytest.mark.parametrize("source", ["synthetic", "slakh"])
def test_bench_clean_evaluate(tmp_path, corpus, source):
    steps = int(os.environ.get("LINERNOTES_BENCH_CLEAN_STEPS", "600"))
    # the scale of README's "Measured" row: 8 kHz, a 16-channel demucs, 20% bleeding + 20% label noise
    config = EvaluateConfig(source=source, delivery=str(corpus), num_songs=20, clip_s=3.0, excerpt_every=3,
                            sample_rate_hz=8000, separator_channels=16, seeds=[0, 1, 2], train_steps=steps,
                            max_windows_per_stem=3, contamination={"bleeding": 0.2, "label_noise": 0.2})
    summary = run_evaluate(config, tmp_path / source)
    print(f"\n== clean evaluate, {summary['description']} ({summary['elapsed_s']} s)")
    print(f"{'method':<12}{'contamination':<14}{'AUROC':>16}{'precision@k':>18}")
    for method, per_kind in summary["detection"].items():
        for kind, f in per_kind.items():
            print(f"{method:<12}{kind:<14}{f['auroc_mean']:>9.3f} ± {f['auroc_std']:.3f}"
                  f"{f['precision_at_k_mean']:>11.3f} ± {f['precision_at_k_std']:.3f}")
    base = summary["sdr_db"]["contaminated"]["mean"]
    print(f"{'training set':<22}{'SDR dB':>16}{'vs contaminated':>18}")
    for name, f in summary["sdr_db"].items():
        print(f"{name:<22}{f['mean']:>9.2f} ± {f['std']:.2f}{f['mean'] - base:>+15.2f} dB")
    for method, f in summary["gap_closed_percent"].items():
        print(f"gap closed by {method}: {f['mean']:.1f} ± {f['std']:.1f} % (paper: 66.7 %)")
    assert summary["num_seeds"] == 3 and (tmp_path / source / "report.html").is_file()
