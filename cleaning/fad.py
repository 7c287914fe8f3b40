"""Fréchet Audio Distance over any ``Embedder``: set-level FAD and per-item FAD.

FAD (Kilgour et al. 2019, "Fréchet Audio Distance: A Reference-Free Metric for Evaluating Music Enhancement
Algorithms") fits a Gaussian to the embeddings of each audio set and measures the Fréchet (2-Wasserstein)
distance between them::

    FAD = ‖μ_a − μ_b‖² + Tr(Σ_a + Σ_b − 2 (Σ_a Σ_b)^½)

Per-item FAD follows fadtk's per-song scoring (Gui et al. 2024, "Adapting Fréchet Audio Distance for Generative
Music Evaluation"): one item's window embeddings against the reference set's Gaussian. One item has few windows,
so its covariance is shrunk toward the reference covariance (see ``per_item_fad``).

One implementation, used by blind cleaning (per-stem FAD against a trusted clean reference set) and by training
evaluation (generations against held-out validation segments). Embedders come in through the ``Embedder``
protocol of ``provenance.attribution`` (the default, ``cleaning.embed.load_embedder("mel-stats")``, needs no
downloaded weights).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import scipy.linalg

from provenance.attribution import Embedder


@dataclass(frozen=True)
class GaussianStats:
    """A Gaussian fitted to embeddings.

    Attributes:
        mean: float64 ``(D,)``.
        cov: float64 ``(D, D)``, the unbiased sample covariance (zeros when ``count`` is 1).
        count: number of embeddings it was fitted to.
    """

    mean: np.ndarray
    cov: np.ndarray
    count: int

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])


def gaussian_stats(embeddings: np.ndarray) -> GaussianStats:
    """Fit a Gaussian to embeddings.

    Args:
        embeddings: ``(N, D)`` vectors, N ≥ 1, finite.

    Returns:
        ``GaussianStats`` in float64.

    Raises:
        ValueError: not 2-D, empty, or not finite.
    """
    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"gaussian_stats needs (N >= 1, D) embeddings, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("gaussian_stats: embeddings contain NaN or infinity")
    cov = np.cov(x, rowvar=False) if x.shape[0] > 1 else np.zeros((x.shape[1], x.shape[1]))
    return GaussianStats(mean=x.mean(axis=0), cov=np.atleast_2d(cov), count=int(x.shape[0]))


def frechet_distance(a: GaussianStats, b: GaussianStats, *, eps: float = 1e-6) -> float:
    """Fréchet distance between two Gaussians (Dowson & Landau 1982; as computed by pytorch-fid and fadtk).

    The matrix square root is ``scipy.linalg.sqrtm``; when the product is near-singular and the root is not
    finite, ``eps`` is added to both diagonals (pytorch-fid's fallback); imaginary parts from round-off are dropped.

    Returns:
        The distance, ≥ 0 up to round-off (clamped at 0).

    Raises:
        ValueError: the dimensions differ.
    """
    if a.dim != b.dim:
        raise ValueError(f"frechet_distance: dimensions differ ({a.dim} vs {b.dim})")
    diff = a.mean - b.mean
    covmean = scipy.linalg.sqrtm(a.cov @ b.cov)
    if not np.isfinite(covmean).all():
        offset = np.eye(a.dim) * eps
        covmean = scipy.linalg.sqrtm((a.cov + offset) @ (b.cov + offset))
    covmean = np.real(covmean)
    value = float(diff @ diff + np.trace(a.cov) + np.trace(b.cov) - 2.0 * np.trace(covmean))
    return max(value, 0.0)


def embed_windows(embedder: Embedder, audios: Iterable[tuple[np.ndarray, int]]) -> np.ndarray:
    """Window embeddings of several clips, stacked.

    Args:
        embedder: any ``Embedder``.
        audios: ``(audio, sample_rate_hz)`` pairs, audio float32 ``(channels, samples)``.

    Returns:
        float32 ``(total_windows, embedder.dim)``.

    Raises:
        ValueError: no windows at all.
    """
    parts = [np.asarray(embedder.embed(audio, rate), dtype=np.float32) for audio, rate in audios]
    parts = [p for p in parts if p.size]
    if not parts:
        raise ValueError("embed_windows: the clips produced no embedding windows")
    return np.concatenate(parts, axis=0)


def embed_stats(embedder: Embedder, audios: Iterable[tuple[np.ndarray, int]]) -> GaussianStats:
    """``gaussian_stats`` of all window embeddings of ``audios``."""
    return gaussian_stats(embed_windows(embedder, audios))


def fad(embedder: Embedder, audios_a: Iterable[tuple[np.ndarray, int]],
        audios_b: Iterable[tuple[np.ndarray, int]]) -> float:
    """FAD between two sets of clips in ``embedder``'s space (Kilgour et al. 2019)."""
    return frechet_distance(embed_stats(embedder, audios_a), embed_stats(embedder, audios_b))


def per_item_fad(item_embeddings: np.ndarray, reference: GaussianStats, *,
                 shrinkage: float | None = None) -> float:
    """Per-item FAD: one item's window embeddings against a reference set's Gaussian (fadtk per-song scoring).

    An item has few windows (often fewer than the embedding dimension), so its sample covariance is singular and
    noisy. It is shrunk toward the reference covariance: ``Σ = (1 − α) Σ_item + α Σ_ref`` with
    ``α = D / (D + n)`` by default (n windows, D dimensions) — with many windows the item speaks for itself, with
    few the distance is dominated by the mean shift, which is what a contaminated stem changes most.

    Args:
        item_embeddings: ``(n, D)`` window embeddings of one item, n ≥ 1.
        reference: the reference set's Gaussian.
        shrinkage: α in [0, 1] to use instead of ``D / (D + n)``.

    Returns:
        The Fréchet distance (≥ 0); higher means further from the reference distribution.

    Raises:
        ValueError: bad shapes or shrinkage outside [0, 1].
    """
    return frechet_distance(_shrunk_item_stats(item_embeddings, reference, shrinkage, "per_item_fad"), reference)


def _shrunk_item_stats(item_embeddings: np.ndarray, reference: GaussianStats, shrinkage: float | None,
                       caller: str) -> GaussianStats:
    """The item's Gaussian with its covariance shrunk towards the reference's by ``shrinkage`` (default
    ``D / (D + n)``)."""
    item = gaussian_stats(item_embeddings)
    if item.dim != reference.dim:
        raise ValueError(f"{caller}: dimensions differ ({item.dim} vs {reference.dim})")
    alpha = item.dim / (item.dim + item.count) if shrinkage is None else float(shrinkage)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"{caller}: shrinkage must be in [0, 1], got {alpha}")
    return GaussianStats(mean=item.mean, cov=(1 - alpha) * item.cov + alpha * reference.cov, count=item.count)


def per_item_fads(items_embeddings: Iterable[np.ndarray], reference: GaussianStats, *,
                  shrinkage: float | None = None) -> np.ndarray:
    """``per_item_fad`` of many items against one reference, with the reference's square root computed once.

    Same definition as ``per_item_fad`` (shrunk item covariance against the reference Gaussian). The trace term
    uses ``Tr((Σ_i Σ_r)^½) = Tr((Σ_r^½ Σ_i Σ_r^½)^½)`` (both PSD): one symmetric eigendecomposition of the
    reference covariance, then the eigenvalues of one symmetric ``(D, D)`` matrix per item — about two orders
    of magnitude faster than ``scipy.linalg.sqrtm`` of the non-symmetric product, equal to it up to round-off.

    Args:
        items_embeddings: per item, ``(n_i, D)`` window embeddings, n_i ≥ 1.
        reference: the reference set's Gaussian.
        shrinkage: as in ``per_item_fad``.

    Returns:
        float64 ``(num_items,)``, each ≥ 0.

    Raises:
        ValueError: bad shapes or shrinkage outside [0, 1].
    """
    values, vectors = np.linalg.eigh((reference.cov + reference.cov.T) / 2.0)
    root = (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T
    trace_ref = float(np.trace(reference.cov))
    out = []
    for embeddings in items_embeddings:
        item = _shrunk_item_stats(embeddings, reference, shrinkage, "per_item_fads")
        cov = item.cov
        inner = root @ cov @ root
        trace_sqrt = float(np.sum(np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2.0), 0.0, None))))
        diff = item.mean - reference.mean
        out.append(max(float(diff @ diff + np.trace(cov) + trace_ref - 2.0 * trace_sqrt), 0.0))
    return np.asarray(out, dtype=np.float64)
