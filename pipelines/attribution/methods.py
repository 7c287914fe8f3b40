"""The three attribution methods behind one interface: ``embedding``, ``dtrak`` and ``unlearning``.

Each ``Attributor`` is loaded once (index, model, catalog) and answers queries with
``attribute(audio, sample_rate_hz, query_id, top_k, text)`` → ``provenance.attribution.AttributionResult``
(ranked segments; track and rights-holder shares that sum to 1, with licence and attribution text).
The white-box methods also answer ``attribute_mel`` for a log-mel query (a generation's own mel).

- ``embedding`` (``pipelines.attribution.index.EmbeddingAttributor``): cosine similarity of mel-stats
  embeddings; shares by a softmax of the cosines (τ = ``COSINE_TEMPERATURE``).
- ``dtrak`` (``DTrakAttributor``): the query's D-TRAK feature (the mean over its segment-length windows of
  the projected gradient, the same objective, timesteps, noise and projection as the index) scored with
  the TRAK kernel ``φ_q^T (Φ^TΦ + λI)^{-1} φ_i`` (``provenance.dtrak.DTrakScorer``).
- ``unlearning`` (``UnlearningAttributor``; Choi et al. 2025, arXiv 2506.18312): the top ``candidates`` of
  ``dtrak`` (or ``embedding``) are re-ranked by their loss increase after one Fisher-preconditioned
  gradient-ascent step on the query (``provenance.unlearning.unlearning_scores`` with the index's cached
  diagonal Fisher), with identical fixed timesteps and noise before and after and the query's silent
  frames masked. Scoring every segment this way costs two loss evaluations per segment per query, hence
  the re-ranking.

Share rule of ``dtrak`` and ``unlearning`` (``METHOD_TEMPERATURE``): a segment's share is proportional to its
positive score (``provenance.attribution.share_weights`` with ``temperature=None``): a TRAK score or a loss
increase ≤ 0 says the segment did not support the query and gets no share; if none is positive (but the scores
differ), the retrieved segments share equally.

Whatever the method, shares are money: retrieved scores that are all zero, all equal or undefined (NaN/inf) give
no ranking and no shares, and the result's ``no_attribution`` says why (``provenance.attribution.aggregate``).
A silent query is refused before any method runs, by the ``attribute`` stage (``silence_floor_dbfs``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import torch

from cleaning.audio import resample, to_mono
from cleaning.mel import log_mel
from pipelines.attribution.config import METHODS, AttributeConfig, UnlearningSettings  # noqa: F401 (this module's API)
from pipelines.attribution.index import (
    EmbeddingAttributor,
    read_segment_json_meta,
    read_shard_index,
)
from pipelines.attribution.loss import DiffusionLoss, MelBatch, silence_mask, windows
from pipelines.catalog import read_catalog_licenses, read_catalog_tracks
from pipelines.attribution.stage import (
    CheckpointIndex,
    DTrakFeaturizer,
    IndexConfig,
    build_checkpoint_index,
    checkpoint_index,
    iter_segment_mels,
    normalise,
)
from provenance import dtrak
from provenance.attribution import COSINE_TEMPERATURE, AttributionResult, ScoredSegment, aggregate
from provenance.workspace import Workspace

METHOD_TEMPERATURE: dict[str, float | None] = {"embedding": COSINE_TEMPERATURE, "dtrak": None, "unlearning": None}
"""The share rule of each method (``share_weights``' temperature): softmax of cosines for ``embedding``,
proportional to positive scores for ``dtrak`` and ``unlearning``."""


class Attributor(Protocol):
    """One attribution method, loaded once for a dataset (and, for white-box methods, a checkpoint)."""

    method: str
    dataset_id: str

    def attribute(self, audio: np.ndarray, sample_rate_hz: int, query_id: str, top_k: int = 10,
                  text: str = "") -> AttributionResult:
        """Rank training segments for float32 ``(channels, samples)`` audio at ``sample_rate_hz``; ``text``
        is the generation's prompt (``""``: unknown, the null condition). Scores that cannot be shared (all
        zero, all equal, NaN/inf) give a result with no segments and its ``no_attribution`` reason. Raises
        ValueError on empty or non-finite audio or ``top_k < 1``."""
        ...


class _WhiteBox:
    """What ``dtrak`` and ``unlearning`` share: the checkpoint's index, model, segment table and catalog."""

    def __init__(self, workspace: Workspace, index: CheckpointIndex) -> None:
        self.workspace, self.index, self.dataset_id = workspace, index, index.dataset_id
        config = index.config
        self.featurizer = DTrakFeaturizer(str(index.checkpoint_path), config.objective, config.num_timesteps,
                                          config.seed, config.projection_dim)
        self.loaded = self.featurizer.loaded
        self.scorer = dtrak.DTrakScorer.load(index.dtrak_dir)
        self.entries = {row["segment_id"]: row for row in read_shard_index(workspace, self.dataset_id)}
        self.catalog_tracks = read_catalog_tracks(workspace)
        self.catalog_licenses = read_catalog_licenses(workspace)
        first = self.entries[self.scorer.segment_ids[0]]
        self.segment_frames = self.loaded.mel_config.num_frames(int(first["num_samples"]))

    def query_mel(self, audio: np.ndarray, sample_rate_hz: int) -> np.ndarray:
        """float32 ``(n_mels, frames)`` log-mel of the query at the checkpoint's rate.

        Raises:
            ValueError: empty or non-finite audio.
        """
        audio = np.asarray(audio, dtype=np.float32)
        if audio.ndim != 2 or audio.shape[1] == 0 or not np.all(np.isfinite(audio)):
            raise ValueError(f"query audio must be finite float32 (channels, samples) with samples > 0; "
                             f"got shape {audio.shape}")
        mono = resample(to_mono(audio), sample_rate_hz, self.loaded.mel_config.sample_rate_hz)
        return log_mel(mono, self.loaded.mel_config)

    def query_feature(self, mel: np.ndarray, text: str) -> np.ndarray:
        """float32 ``(dim,)``: the mean D-TRAK feature of the query's segment-length windows."""
        spans = windows(mel, self.segment_frames)
        features = [self.featurizer.featurize([mel[:, a:b]], [text]) for a, b in spans]
        return np.concatenate(features).mean(axis=0)

    def result(self, method: str, hits: Sequence[tuple[str, float]], query_id: str) -> AttributionResult:
        ranked = [ScoredSegment(s, self.entries[s]["track_id"], score, rank)
                  for rank, (s, score) in enumerate(hits, start=1)]
        return aggregate(ranked, self._track_meta(ranked), method=method, query_id=query_id,
                         dataset_id=self.dataset_id, temperature=METHOD_TEMPERATURE[method])

    def _track_meta(self, ranked: Sequence[ScoredSegment]) -> dict[str, dict[str, Any]]:
        meta = {}
        for segment in ranked:
            if segment.track_id not in meta:
                meta[segment.track_id] = self.catalog_tracks.get(segment.track_id) or self._shard_meta(segment)
        return meta

    def _shard_meta(self, segment: ScoredSegment) -> dict[str, Any]:
        return read_segment_json_meta(self.workspace, self.dataset_id, self.entries[segment.segment_id],
                                      self.catalog_licenses)


class DTrakAttributor(_WhiteBox):
    """The ``dtrak`` method for one checkpoint (build with ``from_workspace``)."""

    method = "dtrak"

    @classmethod
    def from_workspace(cls, workspace: Workspace, checkpoint: Mapping[str, Any], config: IndexConfig | None = None,
                       progress: Any = None) -> "DTrakAttributor":
        """Load the checkpoint's index, building (or finishing) it first when needed (``build_checkpoint_index``)."""
        return cls(workspace, _ensure_index(workspace, checkpoint, config or IndexConfig(), progress))

    def rank_mel(self, mel: np.ndarray, text: str, top_k: int) -> list[tuple[str, float]]:
        return self.scorer.search(self.query_feature(mel, text), top_k)

    def attribute_mel(self, mel: np.ndarray, query_id: str, top_k: int = 10, text: str = "") -> AttributionResult:
        """Attribute a natural-log magnitude mel ``(n_mels, frames)`` at the checkpoint's mel config."""
        return self.result(self.method, self.rank_mel(np.asarray(mel, dtype=np.float32), text, top_k), query_id)

    def attribute(self, audio: np.ndarray, sample_rate_hz: int, query_id: str, top_k: int = 10,
                  text: str = "") -> AttributionResult:
        return self.attribute_mel(self.query_mel(audio, sample_rate_hz), query_id, top_k, text)


class UnlearningAttributor(DTrakAttributor):
    """The ``unlearning`` method for one checkpoint: re-ranks ``settings.candidates`` segments of ``dtrak``
    (or ``embedding``) by their loss increase after unlearning the query (see the module docstring)."""

    method = "unlearning"

    def __init__(self, workspace: Workspace, index: CheckpointIndex,
                 settings: UnlearningSettings | None = None) -> None:
        super().__init__(workspace, index)
        self.settings = settings or UnlearningSettings()
        config = index.config
        state = torch.load(index.fisher_path, map_location="cpu", weights_only=True)
        self.fisher = state["fisher"]
        self.loss = DiffusionLoss(self.loaded.diffusion, "loss", config.unlearning_timesteps, noise_seed=config.seed)
        self.embedding = (EmbeddingAttributor.from_workspace(workspace, self.dataset_id)
                          if self.settings.rerank_from == "embedding" else None)
        self.last_scores: Any = None  # the core's UnlearningScores of the latest query (forget-loss rise etc.)

    @classmethod
    def from_workspace(cls, workspace: Workspace, checkpoint: Mapping[str, Any], config: IndexConfig | None = None,
                       progress: Any = None, settings: UnlearningSettings | None = None) -> "UnlearningAttributor":
        return cls(workspace, _ensure_index(workspace, checkpoint, config or IndexConfig(), progress), settings)

    def rank_mel(self, mel: np.ndarray, text: str, top_k: int, audio: tuple[np.ndarray, int] | None = None
                 ) -> list[tuple[str, float]]:
        from provenance.unlearning import unlearning_scores

        settings = self.settings
        if self.embedding is not None and audio is not None:
            candidates = [s for s, _ in self.embedding.index.search(
                _embed(self.embedding, *audio), settings.candidates)]
        else:
            candidates = [s for s, _ in super().rank_mel(mel, text, settings.candidates)]
        forget = self.forget_batches(mel, text)
        score = self.score_batches(candidates)
        scores = unlearning_scores(self.loaded.model, self.loss, forget_batches=forget, score_batches=score,
                                   fisher=self.fisher, step_size=settings.step_size, damping=settings.damping,
                                   num_steps=settings.num_steps, seed=self.index.config.seed)
        self.last_scores = scores
        ordered = [candidates[i] for i in self._score_order]
        values = scores.deltas
        if settings.normalize:
            values = values / np.sqrt(self.self_influence(score))
        return dtrak.top_k_of(values, ordered, top_k)

    def self_influence(self, batches: Sequence[MelBatch]) -> np.ndarray:
        """float64 ``(N,)``: ``g_i^T P g_i`` of each example, with ``P = (F + damping·mean F)^{-1}`` as in
        ``provenance.unlearning.unlearn`` and ``g_i`` the gradient of its loss (floored at 1e-30)."""
        from provenance.unlearning import per_example_gradients

        flat = torch.cat([f.reshape(-1).double() for f in self.fisher])
        inverse = 1.0 / (flat + self.settings.damping * float(flat.mean()))
        out = [((per_example_gradients(self.loaded.model, self.loss, batch).double() ** 2) * inverse).sum(dim=1)
               for batch in batches]
        return np.maximum(torch.cat(out).numpy(), 1e-30)

    def attribute(self, audio: np.ndarray, sample_rate_hz: int, query_id: str, top_k: int = 10,
                  text: str = "") -> AttributionResult:
        mel = self.query_mel(audio, sample_rate_hz)
        hits = self.rank_mel(mel, text, top_k, audio=(audio, sample_rate_hz))
        return self.result(self.method, hits, query_id)

    def forget_batches(self, mel: np.ndarray, text: str) -> list[MelBatch]:
        """The query's segment-length windows (one batch per window length), silent frames masked."""
        mask = silence_mask(mel)
        normalised = normalise(mel, self.loaded)
        groups: dict[int, list[tuple[int, int]]] = {}
        for a, b in windows(mel, self.segment_frames):
            groups.setdefault(b - a, []).append((a, b))
        return [MelBatch(torch.from_numpy(np.stack([normalised[:, a:b] for a, b in spans])), (text,) * len(spans),
                         torch.from_numpy(np.stack([mask[a:b] for a, b in spans])))
                for spans in groups.values()]

    def score_batches(self, segment_ids: Sequence[str]) -> list[MelBatch]:
        """The candidates' normalised mels and texts, in batches of the index's ``batch_size``; sets
        ``_score_order`` (candidate positions in batch order: shard order)."""
        rows = sorted(range(len(segment_ids)), key=lambda i: (self.entries[segment_ids[i]]["shard"],
                                                              self.entries[segment_ids[i]]["key"]))
        entries = [self.entries[segment_ids[i]] for i in rows]
        items = list(iter_segment_mels(self.workspace.dataset_dir(self.dataset_id), entries))
        self._score_order = rows
        size = self.index.config.batch_size
        return [MelBatch(torch.from_numpy(np.stack([normalise(m, self.loaded) for _, m, _ in items[s:s + size]])),
                         tuple(t for _, _, t in items[s:s + size])) for s in range(0, len(items), size)]


def _embed(attributor: EmbeddingAttributor, audio: np.ndarray, sample_rate_hz: int) -> np.ndarray:
    from cleaning.embed import embed_clip

    return embed_clip(attributor.embedder, audio, sample_rate_hz)


def _ensure_index(workspace: Workspace, checkpoint: Mapping[str, Any], config: IndexConfig,
                  progress: Any) -> CheckpointIndex:
    index = checkpoint_index(workspace, checkpoint, config)
    if not ((index.dtrak_dir / "kernel_inverse.npy").is_file() and index.fisher_path.is_file()):
        build_checkpoint_index(workspace, checkpoint, config, progress=progress)
    return index


def load_attributor(workspace: Workspace, method: str, *, dataset_id: str,
                    checkpoint: Mapping[str, Any] | None = None, config: IndexConfig | None = None,
                    settings: UnlearningSettings | None = None, progress: Any = None) -> Attributor:
    """The attributor of ``method``: ``embedding`` needs only the dataset; ``dtrak`` and ``unlearning`` need
    a checkpoint (a lineage-store Checkpoint row) trained on it.

    Raises:
        ValueError: unknown method, or a white-box method without a checkpoint.
    """
    if method not in METHODS:
        raise ValueError(f"unknown attribution method {method!r}; choose one of {', '.join(METHODS)}")
    if method == "embedding":
        return _EmbeddingMethod(EmbeddingAttributor.from_workspace(workspace, dataset_id, progress=progress))
    if checkpoint is None:
        raise ValueError(f"method {method!r} needs a checkpoint (white-box); run `linernotes train` first")
    if method == "dtrak":
        return DTrakAttributor.from_workspace(workspace, checkpoint, config, progress)
    return UnlearningAttributor.from_workspace(workspace, checkpoint, config, progress, settings)


class _EmbeddingMethod:
    """``EmbeddingAttributor`` under the ``Attributor`` interface (the text is not used)."""

    method = "embedding"

    def __init__(self, inner: EmbeddingAttributor) -> None:
        self.inner, self.dataset_id = inner, inner.dataset_id

    def attribute(self, audio: np.ndarray, sample_rate_hz: int, query_id: str, top_k: int = 10,
                  text: str = "") -> AttributionResult:
        return self.inner.attribute(audio, sample_rate_hz, query_id, top_k)
