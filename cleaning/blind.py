"""The two blind cleaning methods of Gui et al., "Towards Blind Data Cleaning: A Case Study in Music Source
Separation" (ICASSP 2026, arXiv 2510.15409). Both need only a small trusted clean reference set, never a
model of the contamination; both return one score per candidate stem.

- **FAD** (``fad_stem_scores``): each stem's window embeddings against the reference set's embedding
  Gaussian *of the same role* — per-item FAD (Kilgour et al. 2019; fadtk's per-song scoring, via
  ``cleaning.fad``). Higher = further from clean stems of that role = worse.
- **unlearning** (``unlearning_stem_scores``): train a small demucs separator on the candidate stems
  (random mixing), unlearn the clean reference set with one Fisher-preconditioned ascent step
  (``provenance.unlearning``; contrastive: the candidates' mean gradient is subtracted), and score every
  candidate stem window by its separation-loss change; a stem's score is the mean over its windows,
  standardised among the stems of its role (``role_normalize``).
  Lower = the stem contributes less to clean outputs = worse.

Pure functions over ``StemItem`` lists; the ``clean`` stage (``pipelines/stages/clean.py``) runs them on Ray.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from cleaning.audio import resample, to_mono
from cleaning.blind_settings import (  # noqa: F401  (re-exported)
    ALL_ROLES,
    FAD,
    HIGHER_IS_WORSE,
    UNLEARNING,
    UnlearningSettings,
)
from cleaning.contamination import StemItem
from cleaning.fad import GaussianStats, gaussian_stats, per_item_fads
from cleaning.separator import (
    RandomMixer,
    SeparationLoss,
    batches,
    build_separator,
    cut_windows,
    mixture_example,
    stem_example,
    train_separator,
)
from provenance.attribution import Embedder
from provenance.unlearning import unlearning_scores

Progress = Callable[[str, int, int], None]


# FAD ------------------------------------------------------------------------------------------------------

def reference_stats(embedder: Embedder, references: Sequence[StemItem]) -> dict[str, GaussianStats]:
    """Embedding Gaussians of the reference stems: one per role, and ``"*"`` over all of them.

    Raises:
        ValueError: no reference stems.
    """
    if not references:
        raise ValueError("the FAD method needs at least one reference stem")
    by_role: dict[str, list[np.ndarray]] = {}
    for item in references:
        by_role.setdefault(item.role, []).append(np.asarray(embedder.embed(item.audio, item.sample_rate_hz)))
    stats = {role: gaussian_stats(np.concatenate(parts)) for role, parts in by_role.items()}
    stats[ALL_ROLES] = gaussian_stats(np.concatenate([p for parts in by_role.values() for p in parts]))
    return stats


def fad_scores_from_embeddings(embeddings: Sequence[np.ndarray], roles: Sequence[str],
                               stats: Mapping[str, GaussianStats]) -> np.ndarray:
    """Per-item FAD of stems given their window embeddings (``(n_i, D)`` each) against the reference Gaussian
    of their role (of all roles when the reference has none of that role): float64 ``(N,)``."""
    scores = np.empty(len(embeddings), dtype=np.float64)
    for role in sorted(set(roles)):
        index = [i for i, r in enumerate(roles) if r == role]
        values = per_item_fads([embeddings[i] for i in index], stats.get(role, stats[ALL_ROLES]))
        scores[index] = values
    return scores


def fad_stem_scores(embedder: Embedder, candidates: Sequence[StemItem], references: Sequence[StemItem],
                    progress: Progress | None = None) -> np.ndarray:
    """Per-item FAD of every candidate stem: float64 ``(N,)``, higher = worse (see module docstring)."""
    stats = reference_stats(embedder, references)
    embeddings = []
    for i, item in enumerate(candidates):
        embeddings.append(np.asarray(embedder.embed(item.audio, item.sample_rate_hz)))
        if progress is not None:
            progress("fad", i + 1, len(candidates))
    return fad_scores_from_embeddings(embeddings, [item.role for item in candidates], stats)


# unlearning -----------------------------------------------------------------------------------------------

@dataclass
class UnlearningResult:
    """Scores per candidate stem (float64 ``(N,)``, NaN for stems the separator has no source for) and what
    the run saw: the trained separator, its training losses and the core's ``UnlearningScores``."""

    scores: np.ndarray
    model: torch.nn.Module
    train_losses: list[float]
    window_stem: np.ndarray  # int (W,): candidate index of each scored window
    window_deltas: np.ndarray  # float64 (W,)
    forget_loss_before: float
    forget_loss_after: float
    info: dict[str, Any] = field(default_factory=dict)


def stem_windows(item: StemItem, settings: UnlearningSettings) -> np.ndarray:
    """Mono windows of a stem at the separator's rate: float32 ``(n, window_samples)``."""
    audio = resample(to_mono(item.audio), item.sample_rate_hz, settings.sample_rate_hz)
    return cut_windows(audio, settings.window_samples, settings.max_windows_per_stem)


def unlearning_stem_scores(candidates: Sequence[StemItem], references: Sequence[StemItem],
                           settings: UnlearningSettings = UnlearningSettings(),
                           progress: Progress | None = None) -> UnlearningResult:
    """Unlearning-based blind cleaning (Gui et al. 2026) over candidate stems.

    1. Cut every candidate stem into windows; train a tiny demucs on random mixes of them.
    2. Forget set: the reference tracks' real multitrack windows (the sum of a track's stems per role at the
       same window), loss over every present source.
    3. Scored set: each candidate window mixed with a fixed accompaniment (one reference window of every
       other source, drawn with ``seed``), loss on its own source only.
    4. ``provenance.unlearning.unlearning_scores`` (diagonal Fisher on the scored set, one preconditioned
       ascent step on the forget set's loss minus ``contrast_weight`` × the scored set's); a stem's score is
       the mean loss change of its windows.

    Args:
        candidates: the stems to score.
        references: the trusted clean stems, several per track (grouped by ``track_id``).
        settings: see ``UnlearningSettings``.

    Returns:
        ``UnlearningResult``.

    Raises:
        ValueError: no candidate of a separator source, or no reference window.
    """
    sources = list(settings.sources)
    rng = np.random.default_rng(settings.seed)
    windows = [stem_windows(item, settings) if item.role in sources else None for item in candidates]
    pools = [np.concatenate([w for w, item in zip(windows, candidates) if w is not None and item.role == source])
             if any(w is not None and item.role == source for w, item in zip(windows, candidates))
             else np.zeros((0, settings.window_samples), np.float32) for source in sources]
    if not any(len(p) for p in pools):
        raise ValueError(f"no candidate stem has a role among the separator's sources {sources}")
    forget_examples, reference_pools = _reference_examples(references, settings)
    if not forget_examples:
        raise ValueError("the unlearning method needs reference stems at least one window long")
    model = build_separator(settings.spec(), seed=settings.seed)
    train_losses = train_separator(model, RandomMixer(pools, seed=settings.seed), steps=settings.train_steps,
                                   batch_size=settings.batch_size, learning_rate=settings.learning_rate,
                                   seed=settings.seed, progress=progress)
    score_examples, window_stem = [], []
    for index, (item, item_windows) in enumerate(zip(candidates, windows)):
        if item_windows is None:
            continue
        source = sources.index(item.role)
        for window in item_windows:
            accompaniment = np.zeros((len(sources), settings.window_samples), np.float32)
            for s, pool in enumerate(reference_pools if any(len(p) for p in reference_pools) else pools):
                if s != source and len(pool):
                    accompaniment[s] = pool[int(rng.integers(len(pool)))]
            example = stem_example(window, source, accompaniment, len(sources))
            if settings.score_all_sources:
                example["mask"] = np.ones(len(sources), np.float32)
            score_examples.append(example)
            window_stem.append(index)
    if progress is not None:
        progress("unlearning", 0, 1)
    score_batches = batches(score_examples, settings.batch_size)
    result = unlearning_scores(model, SeparationLoss(), forget_batches=batches(forget_examples, settings.batch_size),
                               score_batches=score_batches, step_size=settings.step_size, damping=settings.damping,
                               num_steps=settings.num_steps, seed=settings.seed,
                               contrast_batches=score_batches if settings.contrast_weight > 0 else None,
                               contrast_weight=settings.contrast_weight)
    if progress is not None:
        progress("unlearning", 1, 1)
    window_stem_arr = np.asarray(window_stem, dtype=np.int64)
    scores = np.full(len(candidates), np.nan)
    for index in np.unique(window_stem_arr):
        scores[index] = float(result.deltas[window_stem_arr == index].mean())
    raw_scores = scores.copy()
    if settings.role_normalize:
        scores = standardize_by_role(scores, [item.role for item in candidates])
    return UnlearningResult(scores=scores, model=model, train_losses=train_losses, window_stem=window_stem_arr,
                            window_deltas=result.deltas, forget_loss_before=result.forget_loss_before,
                            forget_loss_after=result.forget_loss_after,
                            info={"num_windows": int(len(window_stem)), "num_forget_windows": len(forget_examples),
                                  "raw_scores": raw_scores})


def standardize_by_role(scores: np.ndarray, roles: Sequence[str]) -> np.ndarray:
    """Scores standardised within each role: ``(x − mean) / std`` over that role's finite scores.

    Args:
        scores: float ``(N,)``; NaN stays NaN.
        roles: the role of each item.

    Returns:
        float64 ``(N,)``; a role with one finite score (or no spread) gets 0 for it.
    """
    scores = np.asarray(scores, dtype=np.float64)
    out = np.full_like(scores, np.nan)
    roles_arr = np.asarray(roles)
    for role in set(roles):
        index = np.flatnonzero((roles_arr == role) & np.isfinite(scores))
        if len(index) == 0:
            continue
        values = scores[index]
        spread = values.std()
        out[index] = (values - values.mean()) / spread if spread > 0 else 0.0
    return out


def _reference_examples(references: Sequence[StemItem], settings: UnlearningSettings
                        ) -> tuple[list[dict[str, np.ndarray]], list[np.ndarray]]:
    """Forget-set examples (one real multitrack window per reference track and window) and the reference
    windows per source (the clean accompaniments of scored windows)."""
    sources = list(settings.sources)
    by_track: dict[str, list[StemItem]] = {}
    for item in references:
        if item.role in sources:
            by_track.setdefault(item.track_id, []).append(item)
    examples: list[dict[str, np.ndarray]] = []
    per_source: list[list[np.ndarray]] = [[] for _ in sources]
    for track_id in sorted(by_track):
        stems = [(sources.index(item.role), stem_windows(item, settings)) for item in by_track[track_id]]
        count = min(len(w) for _, w in stems)
        for k in range(count):
            mix = np.zeros((len(sources), settings.window_samples), np.float32)
            for s, w in stems:
                mix[s] += w[k]
                per_source[s].append(w[k])
            examples.append(mixture_example(mix))
    pools = [np.stack(p) if p else np.zeros((0, settings.window_samples), np.float32) for p in per_source]
    return examples, pools
