"""``linernotes clean evaluate``: plant contamination into clean stems, score them with both blind methods,
and measure what cleaning buys a separator.

Per seed:

1. **Material**: songs cut into ``clip_s`` excerpts — the Slakh tracks of a delivery (``source="slakh"``,
   real stems from ../shared/corpus; excerpts with a silent stem are skipped) or synthetic multitracks
   (``source="synthetic"``, ``cleaning.synthetic_stems``). Excerpts are split by song-excerpt into a trusted
   reference set, the candidate (training) set and a held-out clean test set.
2. **Plant** contamination into the candidates (``cleaning.contamination``), remembering what was planted.
3. **Score** with FAD and unlearning (``cleaning.blind``); **detection**: AUROC and precision at the
   planted count, over all kinds and per kind (``cleaning.evaluate.detection_metrics``).
4. **Downstream**: separators trained for the same steps on five training sets — ``uncontaminated`` (the
   candidates before planting: the paper's reference), ``contaminated``, each method's ``cleaned_<method>``
   set (the worst ``drop_ratio`` dropped; default: the planted fraction) and ``drop_planted`` (exactly the
   planted stems dropped: an oracle cleaner, with less data than ``uncontaminated``); SDR (BSS Eval) on the
   held-out songs. The comparison is paired within a seed (common random numbers): every separator of a seed
   starts from the same initialisation, draws its random mixes from the same seed and is scored on the same
   test songs, so ``sdr_gain_db`` (a set's SDR − the contaminated set's) cancels most of the seed's luck.
   The gap closed is the paper's (Gui et al., ICASSP 2026, 66.7% for unlearning on MUSDB18): the share of
   the gap between the contaminated and the *uncontaminated* training set that cleaning recovers.

Figures are aggregated over seeds (mean ± std) into ``summary.json`` and ``report.html`` with PNG plots.
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, model_validator

from cleaning import blind, evaluate
from cleaning.contamination import KINDS, StemItem, plant_contamination
from cleaning.decision import decide

Progress = Callable[[str, int, int], None]


class EvaluateConfig(BaseModel):
    """Config of ``clean evaluate``. Frozen; unknown keys are rejected."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    source: str = "slakh"  # "slakh" (a delivery's Slakh stems) | "synthetic"
    delivery: str = "../shared/corpus"
    num_songs: int = 24  # synthetic songs
    clip_s: float = 4.0
    sample_rate_hz: int = 16000
    excerpt_every: int = 2  # slakh: take every n-th excerpt of each song
    reference_fraction: float = 0.2
    test_fraction: float = 0.15
    # held-out clean test songs per seed; synthetic: rendered apart from the num_songs (never trained on nor
    # used as reference), slakh: taken from the excerpts; None = test_fraction of the material
    num_test_songs: int | None = None
    contamination: dict[str, float] = {"bleeding": 0.1, "label_noise": 0.1}
    methods: list[str] = [blind.FAD, blind.UNLEARNING]
    drop_ratio: float | None = None  # None = the planted fraction
    seeds: list[int] = [0, 1, 2]
    train_steps: int = 300  # unlearning separator and every downstream separator
    lr_schedule: str = "cosine"  # downstream separators: cosine decay to 0 ("constant": Adam at a fixed rate)
    replicates: int = 1  # downstream separators per training set and seed (seeds seed + 1000·r), SDRs averaged
    separator_channels: int = 8
    separator_depth: int = 3
    window_s: float = 1.0
    max_windows_per_stem: int = 4
    step_size: float = blind.UnlearningSettings().step_size
    damping: float = blind.UnlearningSettings().damping
    contrast_weight: float = blind.UnlearningSettings().contrast_weight
    downstream: bool = True

    @model_validator(mode="after")
    def _check(self) -> "EvaluateConfig":
        if self.source not in ("slakh", "synthetic"):
            raise ValueError(f"evaluate.source must be slakh or synthetic, got {self.source!r}")
        unknown = set(self.contamination) - set(KINDS)
        if unknown:
            raise ValueError(f"evaluate.contamination: unknown kinds {sorted(unknown)}; known: {', '.join(KINDS)}")
        if set(self.methods) - {blind.FAD, blind.UNLEARNING} or not self.methods:
            raise ValueError(f"evaluate.methods must be among fad, unlearning; got {self.methods}")
        if not self.seeds:
            raise ValueError("evaluate.seeds must name at least one seed")
        if not 0 < self.reference_fraction < 1 or not 0 < self.test_fraction < 1:
            raise ValueError("evaluate.reference_fraction and evaluate.test_fraction must be in (0, 1)")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"evaluate.lr_schedule must be constant or cosine, got {self.lr_schedule!r}")
        if self.replicates < 1:
            raise ValueError(f"evaluate.replicates must be ≥ 1, got {self.replicates}")
        if self.contrast_weight < 0:
            raise ValueError(f"evaluate.contrast_weight must be ≥ 0, got {self.contrast_weight}")
        if self.num_test_songs is not None and self.num_test_songs < 1:
            raise ValueError(f"evaluate.num_test_songs must be ≥ 1, got {self.num_test_songs}")
        if self.clip_s < self.window_s:
            raise ValueError(f"evaluate.clip_s ({self.clip_s}) must be ≥ evaluate.window_s ({self.window_s})")
        return self


def load_material(config: EvaluateConfig) -> list[list[StemItem]]:
    """Songs (excerpts) as lists of stems, mono at ``config.sample_rate_hz``.

    Raises:
        FileNotFoundError: ``source="slakh"`` and the delivery has no ``files.csv``.
        ValueError: fewer than 4 usable excerpts.
    """
    if config.source == "synthetic":
        from cleaning.synthetic_stems import render_song

        return [render_song(f"synth-{i:03d}", 7919 + i, config.clip_s, config.sample_rate_hz)
                for i in range(config.num_songs)]
    from cleaning.audio import read_audio, resample, to_mono
    from cleaning.measure import measure_silent_fraction

    delivery = Path(config.delivery)
    files = delivery / "files.csv"
    if not files.is_file():
        raise FileNotFoundError(f"{files} does not exist: evaluate.delivery must be a delivery with Slakh stems")
    rows = [r for r in csv.DictReader(files.open()) if r["track_id"].startswith("slakh") and r["role"] != "mixture"]
    clip = round(config.clip_s * config.sample_rate_hz)
    songs: dict[str, list[StemItem]] = {}
    silent: set[str] = set()
    for row in rows:
        audio, rate = read_audio(delivery / row["path"])
        audio = resample(to_mono(audio), rate, config.sample_rate_hz)
        for k in range(0, audio.shape[1] // clip, config.excerpt_every):
            excerpt_id = f"{row['track_id']}#{k:03d}"
            part = audio[:, k * clip:(k + 1) * clip]
            if measure_silent_fraction(part, config.sample_rate_hz) > 0.5:
                silent.add(excerpt_id)
            songs.setdefault(excerpt_id, []).append(StemItem(excerpt_id, row["role"], row["instrument"], part,
                                                             config.sample_rate_hz))
    # an excerpt keeps only its non-silent stems; it needs two roles to be a separation example
    usable = []
    for excerpt_id in sorted(songs):
        stems = [s for s in songs[excerpt_id]
                 if measure_silent_fraction(s.audio, config.sample_rate_hz) <= 0.5]
        if len({s.role for s in stems}) >= 2:
            usable.append(stems)
    if len(usable) < 4:
        raise ValueError(f"only {len(usable)} usable excerpts in {delivery}: need ≥ 4")
    return usable


def run_evaluate(config: EvaluateConfig, out_dir: Path, progress: Progress | None = None) -> dict[str, Any]:
    """Run the evaluation (see the module docstring); writes ``summary.json`` and ``report.html`` to ``out_dir``.

    Returns:
        the summary (also in ``summary.json``): detection per method and kind; SDR per training set
        (``sdr_db``); the paired SDR gain of each set over the contaminated one (``sdr_gain_db``); the gap
        closed per method against the uncontaminated set (``gap_closed_percent``: the mean ± std of the
        per-seed ratios and ``of_mean_gains``, the ratio of the mean paired gains) and against
        ``drop_planted`` (``gap_closed_vs_drop_planted_percent``); each as mean ± std over seeds, plus the
        per-seed figures.

    Raises:
        ValueError: ``source="slakh"`` and too few excerpts for ``num_test_songs`` plus references and candidates.
    """
    started = time.monotonic()
    songs = load_material(config)
    sources = sorted({s.role for song in songs for s in song})
    per_seed, plot_runs = [], []
    for n, seed in enumerate(config.seeds):
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(songs))
        num_ref = max(1, round(config.reference_fraction * len(songs)))
        test_songs, num_test = held_out_songs(config, seed, songs, order, num_ref)
        references = [s for i in order[:num_ref] for s in songs[i]]
        candidates = [s for i in order[num_ref + num_test:] for s in songs[i]]
        planted_items, planted = plant_contamination(candidates, config.contamination, seed=seed)
        planted_index = {p.index for p in planted}
        kinds = ["" for _ in candidates]
        for p in planted:
            kinds[p.index] = p.kind
        drop_ratio = config.drop_ratio if config.drop_ratio is not None else len(planted) / len(candidates)
        scores: dict[str, np.ndarray] = {}
        if blind.FAD in config.methods:
            from cleaning.embed import load_embedder

            scores[blind.FAD] = blind.fad_stem_scores(load_embedder("mel-stats"), planted_items, references)
        settings = blind.UnlearningSettings(
            sources=tuple(sources), sample_rate_hz=config.sample_rate_hz, channels=config.separator_channels,
            depth=config.separator_depth, window_s=config.window_s, max_windows_per_stem=config.max_windows_per_stem,
            train_steps=config.train_steps, step_size=config.step_size, damping=config.damping,
            contrast_weight=config.contrast_weight, seed=seed)
        if blind.UNLEARNING in config.methods:
            scores[blind.UNLEARNING] = blind.unlearning_stem_scores(planted_items, references, settings).scores
        seed_result: dict[str, Any] = {"seed": seed, "num_candidates": len(candidates), "num_planted": len(planted),
                                       "num_reference_stems": len(references), "num_test_songs": len(test_songs),
                                       "detection": {}, "sdr_db": {}, "sdr_gain_db": {}, "sdr_gain_sem_db": {},
                                       "gap_closed_percent": {}, "gap_closed_vs_drop_planted_percent": {}}
        thresholds = {}
        training_sets: dict[str, list[StemItem]] = {UNCONTAMINATED: candidates, CONTAMINATED: planted_items}
        for method, values in scores.items():
            seed_result["detection"][method] = evaluate.detection_metrics(
                values, planted, higher_is_worse=blind.HIGHER_IS_WORSE[method])
            drop = decide(values, higher_is_worse=blind.HIGHER_IS_WORSE[method], drop_ratio=drop_ratio)
            kept_bad = values[~drop & np.isfinite(values)]
            thresholds[method] = float(kept_bad.max() if blind.HIGHER_IS_WORSE[method] else kept_bad.min())
            training_sets[f"cleaned_{method}"] = [item for item, d in zip(planted_items, drop) if not d]
        training_sets[DROP_PLANTED] = [item for i, item in enumerate(planted_items) if i not in planted_index]
        if config.downstream:
            per_song = {}
            for k, (name, items) in enumerate(training_sets.items()):
                per_song[name] = _sdr_per_song(items, test_songs, sources, config, seed)
                if progress is not None:
                    progress(f"seed {seed}: separators", k + 1, len(training_sets))
            seed_result.update(paired_sdr_figures(per_song, list(scores)))
            seed_result["sdr_per_song_db"] = {name: [float(v) for v in values] for name, values in per_song.items()}
        per_seed.append(seed_result)
        plot_runs.append({"seed": seed, "scores": scores, "kinds": kinds, "thresholds": thresholds,
                          "higher_is_worse": {m: blind.HIGHER_IS_WORSE[m] for m in scores}})
        if progress is not None:
            progress("seeds", n + 1, len(config.seeds))
    summary = _aggregate(config, per_seed, sources, len(songs))
    summary["elapsed_s"] = round(time.monotonic() - started, 1)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = evaluate.write_report(out_dir, summary, plot_runs)
    summary["outputs"] = {"report": str(report), "summary": str(out_dir / "summary.json")}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True, default=float) + "\n")
    return summary


UNCONTAMINATED = "uncontaminated"
CONTAMINATED = "contaminated"
DROP_PLANTED = "drop_planted"


def held_out_songs(config: EvaluateConfig, seed: int, songs: list[list[StemItem]], order: np.ndarray,
                   num_ref: int) -> tuple[list[list[StemItem]], int]:
    """The seed's held-out clean test songs and how many of ``songs`` (after the ``num_ref`` references in
    ``order``) they take.

    Synthetic material with ``num_test_songs`` set renders that many songs of its own (seeds far from the
    material's, different per seed), so testing on more songs costs no training data; otherwise the test
    songs are taken from ``songs`` (``num_test_songs``, else ``test_fraction`` of them).

    Raises:
        ValueError: fewer than 2 songs would remain as candidates.
    """
    if config.source == "synthetic" and config.num_test_songs is not None:
        from cleaning.synthetic_stems import render_song

        return [render_song(f"test-s{seed}-{i:03d}", 1_000_003 * (seed + 1) + i, config.clip_s,
                            config.sample_rate_hz) for i in range(config.num_test_songs)], 0
    num_test = config.num_test_songs or max(1, round(config.test_fraction * len(songs)))
    if len(songs) - num_ref - num_test < 2:
        raise ValueError(f"evaluate.num_test_songs: {num_test} test + {num_ref} reference songs leave "
                         f"{len(songs) - num_ref - num_test} of {len(songs)} for training; need ≥ 2")
    return [songs[i] for i in order[num_ref:num_ref + num_test]], num_test


def paired_sdr_figures(per_song: dict[str, np.ndarray], methods: list[str]) -> dict[str, dict[str, float]]:
    """One seed's downstream figures from per-test-song SDRs of separators trained on each set (same songs).

    Args:
        per_song: training-set name → float ``(songs,)`` SDR in dB, the same test songs in the same order;
            must hold ``contaminated`` and ``uncontaminated`` (and ``drop_planted``, ``cleaned_<method>``).
        methods: the cleaning methods (``cleaned_<method>`` keys).

    Returns:
        ``sdr_db`` (set → mean SDR), ``sdr_gain_db`` (set → mean over songs of its SDR − the contaminated
        set's on the same song), ``sdr_gain_sem_db`` (the standard error of that mean over songs),
        ``gap_closed_percent`` (method → ``gap_closed_percent(contaminated, cleaned, uncontaminated)``) and
        ``gap_closed_vs_drop_planted_percent`` (the same against ``drop_planted``).
    """
    base = per_song[CONTAMINATED]
    out: dict[str, dict[str, float]] = {"sdr_db": {}, "sdr_gain_db": {}, "sdr_gain_sem_db": {},
                                        "gap_closed_percent": {}, "gap_closed_vs_drop_planted_percent": {}}
    for name, values in per_song.items():
        out["sdr_db"][name] = float(np.nanmean(values))
        if name == CONTAMINATED:
            continue
        diff = np.asarray(values, np.float64) - base
        diff = diff[np.isfinite(diff)]
        out["sdr_gain_db"][name] = float(diff.mean()) if diff.size else float("nan")
        out["sdr_gain_sem_db"][name] = float(diff.std(ddof=1) / np.sqrt(diff.size)) if diff.size > 1 else float("nan")
    sdr = out["sdr_db"]
    for method in methods:
        cleaned = sdr[f"cleaned_{method}"]
        out["gap_closed_percent"][method] = evaluate.gap_closed_percent(sdr[CONTAMINATED], cleaned,
                                                                        sdr[UNCONTAMINATED])
        if DROP_PLANTED in sdr:
            out["gap_closed_vs_drop_planted_percent"][method] = evaluate.gap_closed_percent(
                sdr[CONTAMINATED], cleaned, sdr[DROP_PLANTED])
    return out


def _sdr_per_song(items: list[StemItem], test_songs: list[list[StemItem]], sources: list[str],
                  config: EvaluateConfig, seed: int) -> np.ndarray:
    """Per-test-song SDR of separators trained on ``items``, averaged over ``config.replicates`` trainings
    (replicate ``r`` seeded ``seed + 1000·r``, the same seeds for every training set)."""
    runs = []
    for r in range(config.replicates):
        model = evaluate.train_on(items, sources, window_samples=round(config.window_s * config.sample_rate_hz),
                                  steps=config.train_steps, seed=seed + 1000 * r, sample_rate_hz=config.sample_rate_hz,
                                  channels=config.separator_channels, depth=config.separator_depth,
                                  lr_schedule=config.lr_schedule)
        runs.append(evaluate.sdr_per_song(model, test_songs, sources))
    return np.mean(runs, axis=0)


def _mean_std(values: list[float]) -> dict[str, float]:
    array = np.asarray([v for v in values if v == v], dtype=np.float64)
    return {"mean": float(array.mean()) if array.size else float("nan"),
            "std": float(array.std()) if array.size else float("nan")}


def _aggregate(config: EvaluateConfig, per_seed: list[dict[str, Any]], sources: list[str],
               num_songs: int) -> dict[str, Any]:
    detection: dict[str, dict[str, dict[str, float]]] = {}
    for method in config.methods:
        kinds = sorted({k for r in per_seed for k in r["detection"].get(method, {})})
        detection[method] = {}
        for kind in kinds:
            auroc = _mean_std([r["detection"][method][kind]["auroc"] for r in per_seed
                               if kind in r["detection"][method]])
            precision = _mean_std([r["detection"][method][kind]["precision_at_k"] for r in per_seed
                                   if kind in r["detection"][method]])
            detection[method][kind] = {"auroc_mean": auroc["mean"], "auroc_std": auroc["std"],
                                       "precision_at_k_mean": precision["mean"], "precision_at_k_std": precision["std"]}
    downstream = bool(per_seed[0]["sdr_db"])
    sdr = {name: _mean_std([r["sdr_db"][name] for r in per_seed]) for name in per_seed[0]["sdr_db"]}
    gain = {}
    for name in per_seed[0]["sdr_gain_db"]:
        values = [r["sdr_gain_db"][name] for r in per_seed]
        gain[name] = {**_mean_std(values), "seeds_above_contaminated": int(sum(v > 0 for v in values))}
    gap = {}
    for method in per_seed[0]["gap_closed_percent"]:
        reference_gain = gain[UNCONTAMINATED]["mean"]
        gap[method] = {**_mean_std([r["gap_closed_percent"][method] for r in per_seed]),
                       "of_mean_gains": evaluate.gap_closed_percent(0.0, gain[f"cleaned_{method}"]["mean"],
                                                                    reference_gain)}
    gap_drop = {m: _mean_std([r["gap_closed_vs_drop_planted_percent"][m] for r in per_seed])
                for m in per_seed[0]["gap_closed_vs_drop_planted_percent"]}
    description = (f"{config.source} material: {num_songs} songs/excerpts of {config.clip_s} s at "
                   f"{config.sample_rate_hz} Hz, sources {', '.join(sources)}; contamination "
                   f"{json.dumps(config.contamination)}; separators: demucs, {config.separator_channels} channels, "
                   f"depth {config.separator_depth}, {config.train_steps} steps ({config.lr_schedule} learning rate), "
                   f"{config.replicates} per training set and seed; "
                   f"{per_seed[0]['num_test_songs']} held-out test songs per seed; seeds {config.seeds}.")
    return {"description": description, "num_seeds": len(per_seed), "config": config.model_dump(),
            "detection": detection, "sdr_db": sdr, "sdr_gain_db": gain, "gap_closed_percent": gap,
            "gap_reference": UNCONTAMINATED if downstream else None,
            "gap_closed_vs_drop_planted_percent": gap_drop,
            "paper_gap_closed_percent": evaluate.PAPER_GAP_CLOSED_PERCENT, "per_seed": per_seed}
