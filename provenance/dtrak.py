"""D-TRAK: attribution with randomly projected gradients of a diffusion objective, stored per checkpoint.

TRAK (Park et al., 2023, "TRAK: Attributing Model Behavior at Scale") featurizes every training example
by the gradient of a model output function at the final parameters, randomly projected to ``dim``
dimensions, and scores a query against training example ``i`` with the kernel of the projected
features, ``τ(q, i) = φ_q^T (Φ^T Φ + λI)^{-1} φ_i`` (the single-checkpoint TRAK estimator without the
classification-specific ``Q`` weighting). D-TRAK (Zheng et al., ICLR 2024, "Intriguing Properties of
Data Attribution on Diffusion Models") adapts it to diffusion models: the output function is a diffusion
objective averaged over ``K`` fixed timesteps with fixed noise, and the *squared L2 norm of the model
output* (``Square``) attributes better than the training loss itself (their Tables 1–2, LDS).

This module is the model-agnostic part, in TRAK's featurize → finalize → score shape:

- ``GradientProjector``: a seeded Rademacher projection ``(B, P) → (B, dim)`` generated in chunks of
  parameters so memory stays bounded (``chunk_params × dim`` floats at a time; a small projection is kept);
- ``project_gradients``: per-example gradients from the shared unlearning core
  (``provenance.unlearning.per_example_gradients``) through the projector;
- ``FeatureStore``: the memory-mapped ``(N, dim)`` float32 features with a done-mask, so a killed build
  resumes where it stopped;
- ``DTrakScorer``: finalize (the ridge-regularised kernel inverse) and blocked scoring of queries.

The diffusion objective itself is the per-example loss protocol (``provenance.unlearning.PerExampleLoss``);
``pipelines.attribution.loss`` implements it for linernotes checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # torch is imported where a projection runs: the store, the scorer and the limits need none
    import torch

FEATURES_FORMAT = "linernotes.dtrak_features"
FEATURES_FORMAT_VERSION = 1
MIN_DIM, MAX_DIM = 512, 32768
_FEATURES_FILE = "features.npy"
_DONE_FILE = "done.npy"
_IDS_FILE = "segment_ids.json"
_META_FILE = "meta.json"
_KERNEL_FILE = "kernel_inverse.npy"
_SERVE_FILE = "features_f16.npy"
_BLOCK_ROWS = 1024


class GradientProjector:
    """Seeded Rademacher random projection of flattened gradients: ``g ↦ g R / √dim`` with ``R`` a
    ``(num_params, dim)`` matrix of ±1 (Johnson–Lindenstrauss; inner products are preserved in
    expectation, as TRAK's projection is).

    ``R`` is never materialised whole unless it is small: rows ``[c·chunk, (c+1)·chunk)`` are drawn
    from a ``torch.Generator`` seeded with ``(seed, c)``, so any chunk can be regenerated alone and the
    projection is the same on every worker, device and run. Matrices of at most ``cache_bytes`` are
    kept after first use.

    Args:
        num_params: P, the length of a flattened gradient.
        dim: projected dimension, in ``[MIN_DIM, MAX_DIM]`` (512–32,768) for attribution indexes (smaller
            values are accepted for unit tests with ``check_dim=False``).
        seed: projection seed (part of the index's identity).
        chunk_params: parameters per chunk (rounded up to a multiple of 1,024; the matrix does not
            depend on it); peak memory ≈ ``chunk_params × dim × 4`` bytes.
        cache_bytes: keep the whole matrix when it is at most this big.

    Raises:
        ValueError: non-positive sizes, or ``dim`` outside ``[MIN_DIM, MAX_DIM]`` with ``check_dim``.
    """

    def __init__(self, num_params: int, dim: int, seed: int = 0, chunk_params: int = 1 << 15,
                 cache_bytes: int = 256 << 20, check_dim: bool = True) -> None:
        if num_params < 1 or dim < 1 or chunk_params < 1:
            raise ValueError(f"num_params, dim and chunk_params must be ≥ 1; got {num_params}, {dim}, {chunk_params}")
        if check_dim and not MIN_DIM <= dim <= MAX_DIM:
            raise ValueError(f"projection dim must be in [{MIN_DIM}, {MAX_DIM}]; got {dim}")
        chunk_params = -(-int(chunk_params) // _BLOCK_ROWS) * _BLOCK_ROWS  # a whole number of blocks
        self.num_params, self.dim, self.seed, self.chunk_params = int(num_params), int(dim), int(seed), chunk_params
        self._cache: torch.Tensor | None = None
        self._cacheable = num_params * dim * 4 <= cache_bytes

    def _chunk(self, index: int, device: torch.device) -> torch.Tensor:
        """Rows ``[index·chunk_params, (index+1)·chunk_params)`` of ``R``: blocks of ``_BLOCK_ROWS`` rows,
        block ``b`` drawn from a generator seeded with ``(seed, b)``, so ``R`` does not depend on the chunking."""
        import torch

        start = index * self.chunk_params
        stop = min(start + self.chunk_params, self.num_params)
        blocks = []
        for block in range(start // _BLOCK_ROWS, (stop + _BLOCK_ROWS - 1) // _BLOCK_ROWS):
            rows = min(_BLOCK_ROWS, self.num_params - block * _BLOCK_ROWS)
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + block)
            blocks.append(torch.randint(0, 2, (rows, self.dim), generator=generator, dtype=torch.int8))
        signs = torch.cat(blocks)
        return signs.to(device=device, dtype=torch.float32) * 2 - 1

    def project(self, gradients: torch.Tensor) -> torch.Tensor:
        """Project float ``(B, num_params)`` gradients to float32 ``(B, dim)`` (on their device).

        Raises:
            ValueError: the gradients are not ``(B, num_params)``.
        """
        import torch

        if gradients.ndim != 2 or gradients.shape[1] != self.num_params:
            raise ValueError(f"gradients must be (B, {self.num_params}); got {tuple(gradients.shape)}")
        gradients = gradients.to(torch.float32)
        scale = 1.0 / float(np.sqrt(self.dim))
        if self._cacheable:
            if self._cache is None or self._cache.device != gradients.device:
                chunks = range((self.num_params + self.chunk_params - 1) // self.chunk_params)
                self._cache = torch.cat([self._chunk(c, gradients.device) for c in chunks])
            return gradients @ self._cache * scale
        out = torch.zeros(gradients.shape[0], self.dim, dtype=torch.float32, device=gradients.device)
        for c in range((self.num_params + self.chunk_params - 1) // self.chunk_params):
            start = c * self.chunk_params
            block = gradients[:, start:start + self.chunk_params]
            out += block @ self._chunk(c, gradients.device)
        return out * scale


def project_gradients(model: torch.nn.Module, loss_fn: Any, batch: Any, projector: GradientProjector, *,
                      params: Sequence[torch.nn.Parameter] | None = None, seed: int = 0) -> np.ndarray:
    """D-TRAK features of one batch: per-example gradients of ``loss_fn`` (the output function, e.g. the
    ``Square`` objective averaged over K fixed timesteps), randomly projected.

    Args:
        model: the checkpoint's model (its parameters are not changed).
        loss_fn: a ``provenance.unlearning.PerExampleLoss`` returning float32 ``(B,)``.
        batch: what ``loss_fn`` takes.
        projector: a ``GradientProjector`` whose ``num_params`` equals the number of entries in ``params``.
        params: parameters to differentiate (default: ``trainable_parameters(model)``).
        seed: passed to the core, which seeds torch's global RNG with it for this batch.

    Returns:
        float32 ``(B, projector.dim)`` on the CPU.
    """
    from provenance.unlearning import per_example_gradients

    gradients = per_example_gradients(model, loss_fn, batch, params=params, seed=seed)
    return projector.project(gradients).detach().cpu().numpy().astype(np.float32)


def num_parameters(params: Sequence[torch.nn.Parameter]) -> int:
    """P: the number of scalars in ``params``."""
    return int(sum(p.numel() for p in params))


# ---------------------------------------------------------------------------------------------------
# The memory-mapped feature store


class FeatureStore:
    """Projected features of N training segments, memory-mapped, with a done-mask (TRAK's resumable
    featurize step). Create or reopen with ``open``; fill with ``write``; it is ``complete`` when every
    row is done.

    Files in ``directory``:
        ``features.npy``: float32 ``(N, dim)`` (``np.lib.format.open_memmap``), row i = segment i;
        ``done.npy``: bool ``(N,)``, set only after row i's features are flushed to disk;
        ``segment_ids.json``: the N ids in row order; ``meta.json``: format, dim, count, identity.

    A killed build leaves rows whose done flag is False; reopening with the same identity keeps every
    done row and recomputes only the rest.
    """

    def __init__(self, directory: Path, segment_ids: list[str], features: np.memmap, done: np.memmap,
                 meta: dict[str, Any]) -> None:
        self.directory, self.segment_ids, self.features, self.done, self.meta = (
            directory, segment_ids, features, done, meta)

    @classmethod
    def open(cls, directory: str | os.PathLike[str], segment_ids: Sequence[str], dim: int,
             identity: dict[str, Any]) -> "FeatureStore":
        """Reopen the store at ``directory`` if it was made for the same segments, dim and ``identity``
        (checkpoint, objective, timesteps, seed, ...); otherwise start a new one there (all rows pending).

        Raises:
            ValueError: no segments, repeated ids, or ``dim < 1``.
        """
        directory = Path(directory)
        segment_ids = [str(s) for s in segment_ids]
        if not segment_ids or len(set(segment_ids)) != len(segment_ids) or dim < 1:
            raise ValueError(f"need unique segment ids and dim ≥ 1; got {len(segment_ids)} ids, dim {dim}")
        meta = {"format": FEATURES_FORMAT, "format_version": FEATURES_FORMAT_VERSION, "dim": int(dim),
                "count": len(segment_ids), "segment_ids_sha256": _ids_sha256(segment_ids),
                "identity": json.loads(json.dumps(identity, sort_keys=True, default=str))}
        if directory.is_dir():
            try:
                existing = json.loads((directory / _META_FILE).read_text())
                if existing == meta:
                    features = np.load(directory / _FEATURES_FILE, mmap_mode="r+")
                    done = np.load(directory / _DONE_FILE, mmap_mode="r+")
                    if features.shape == (len(segment_ids), dim) and done.shape == (len(segment_ids),):
                        return cls(directory, segment_ids, features, done, meta)
            except (FileNotFoundError, ValueError, json.JSONDecodeError):
                pass
        directory.mkdir(parents=True, exist_ok=True)
        for name in (_META_FILE, _KERNEL_FILE, _SERVE_FILE, _DONE_FILE, _FEATURES_FILE, _IDS_FILE):
            (directory / name).unlink(missing_ok=True)
        features = np.lib.format.open_memmap(directory / _FEATURES_FILE, mode="w+", dtype=np.float32,
                                             shape=(len(segment_ids), dim))
        done = np.lib.format.open_memmap(directory / _DONE_FILE, mode="w+", dtype=np.bool_,
                                         shape=(len(segment_ids),))
        done.flush()
        (directory / _IDS_FILE).write_text(json.dumps(segment_ids))
        _atomic_write_text(directory / _META_FILE, json.dumps(meta, sort_keys=True, indent=2))
        return cls(directory, segment_ids, features, done, meta)

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> "FeatureStore":
        """Open an existing store read-only.

        Raises:
            FileNotFoundError: a file is missing. ValueError: the files disagree or the format is unknown.
        """
        directory = Path(directory)
        for name in (_META_FILE, _FEATURES_FILE, _DONE_FILE, _IDS_FILE):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"no D-TRAK features at {directory}: {name} is missing")
        meta = json.loads((directory / _META_FILE).read_text())
        if meta.get("format") != FEATURES_FORMAT or meta.get("format_version") != FEATURES_FORMAT_VERSION:
            raise ValueError(f"{directory / _META_FILE} is not {FEATURES_FORMAT} v{FEATURES_FORMAT_VERSION}")
        segment_ids = json.loads((directory / _IDS_FILE).read_text())
        features = np.load(directory / _FEATURES_FILE, mmap_mode="r")
        done = np.load(directory / _DONE_FILE, mmap_mode="r")
        if features.shape != (meta["count"], meta["dim"]) or len(segment_ids) != meta["count"]:
            raise ValueError(f"D-TRAK features at {directory} are inconsistent with their meta.json")
        return cls(directory, segment_ids, features, done, meta)

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    def __len__(self) -> int:
        return len(self.segment_ids)

    @property
    def complete(self) -> bool:
        return bool(np.all(self.done))

    def pending_rows(self) -> np.ndarray:
        """int64 indices of rows not done yet, ascending."""
        return np.flatnonzero(~np.asarray(self.done)).astype(np.int64)

    def write(self, rows: Sequence[int] | np.ndarray, features: np.ndarray) -> None:
        """Store float ``(len(rows), dim)`` finite features for ``rows``; flush them, then mark them done.

        Raises:
            ValueError: shapes disagree or a value is not finite.
        """
        rows = np.asarray(rows, dtype=np.int64)
        features = np.asarray(features, dtype=np.float32)
        if features.shape != (len(rows), self.dim):
            raise ValueError(f"features must be ({len(rows)}, {self.dim}); got {features.shape}")
        if not np.all(np.isfinite(features)):
            raise ValueError("D-TRAK features contain NaN or inf (a diverged checkpoint?)")
        self.features[rows] = features
        self.features.flush()
        self.done[rows] = True
        self.done.flush()


def _ids_sha256(segment_ids: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(segment_ids).encode("utf-8")).hexdigest()


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------
# Finalize and score

DEFAULT_RIDGE = 1e-3
"""λ of the kernel ``Φ^TΦ + λI`` relative to its mean eigenvalue: ``λ = ridge · trace(Φ^TΦ) / dim``.
TRAK inverts ``Φ^TΦ`` directly; a small relative ridge keeps the inverse finite when ``N < dim`` or the
features are collinear (it turns the hat matrix ``Φ(Φ^TΦ+λI)^{-1}Φ^T`` into a near-projection)."""


DEFAULT_MAX_RAM_BYTES = 4 << 30
"""``DTrakScorer.load`` serves queries from an in-memory FAISS float16 index up to this size (1M × 2,048);
past it, from the memory-mapped float16 copy block by block."""

EXACT_RAM_BYTES = 512 << 20
"""``DTrakScorer.load`` also keeps the float32 features in memory for exact ``scores`` up to this size
(256k × 512); past it ``scores`` reads the float16 copy."""


class DTrakScorer:
    """Scores queries against a complete ``FeatureStore`` with the TRAK kernel (Park et al. 2023, eq. for
    one checkpoint; D-TRAK, Zheng et al. 2024, eq. 7 without the output-derivative weighting):

    ``score_i(q) = φ_q^T (Φ^TΦ + λI)^{-1} φ_i``, computed as ``Φ · ((Φ^TΦ + λI)^{-1} φ_q)``: one
    ``(dim, dim)`` product per query, then a maximum-inner-product search over Φ for that direction.

    ``search`` uses a FAISS ``IndexScalarQuantizer`` with IEEE float16 codes (``QT_fp16``, inner product;
    the codes are the float16 copy's bytes, 2 bytes per value, decoded in SIMD registers and accumulated in
    float32) on one thread: 1M × 512 is 1 GiB and a query takes ≈ 0.1 s on one core, where NumPy's float32
    matrix–vector product reads twice the bytes. Past ``DEFAULT_MAX_RAM_BYTES`` it falls back to a blocked
    product over the memory-mapped float16 copy (memory bounded, slower). ``scores`` gives every segment's
    score: exact float32 when the features fit ``EXACT_RAM_BYTES``, else from the float16 copy.

    Build with ``finalize`` (computes and stores the kernel inverse and the float16 copy once) or ``load``.
    """

    def __init__(self, segment_ids: list[str], features: np.ndarray, kernel_inverse: np.ndarray,
                 block_rows: int = 1 << 16, features_f16: np.ndarray | None = None,
                 max_ram_bytes: int = DEFAULT_MAX_RAM_BYTES) -> None:
        self.segment_ids = segment_ids
        self.features = features  # float32 in memory, or the float16 memmap
        self.kernel_inverse = kernel_inverse.astype(np.float32)
        self.block_rows = int(block_rows)
        half = features_f16 if features_f16 is not None else features
        self._faiss = None
        if half.dtype == np.float16 and half.nbytes <= max_ram_bytes:
            import faiss

            self._faiss = faiss.IndexScalarQuantizer(self.dim, faiss.ScalarQuantizer.QT_fp16,
                                                     faiss.METRIC_INNER_PRODUCT)
            for start in range(0, len(half), 1 << 16):  # copy the float16 bytes as codes, block by block
                self._faiss.add_sa_codes(np.ascontiguousarray(half[start:start + (1 << 16)]).view(np.uint8))

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    @property
    def serving(self) -> str:
        """How ``search`` runs: ``"faiss-fp16"`` (in memory) or ``"memmap-fp16"``/``"float32"`` (blocked NumPy)."""
        if self._faiss is not None:
            return "faiss-fp16"
        return "float32" if self.features.dtype == np.float32 else "memmap-fp16"

    def __len__(self) -> int:
        return len(self.segment_ids)

    @classmethod
    def finalize(cls, store: FeatureStore, ridge: float = DEFAULT_RIDGE, block_rows: int = 1 << 16) -> "DTrakScorer":
        """Compute ``(Φ^TΦ + λI)^{-1}`` (float64 accumulation over row blocks) and a float16 copy of Φ,
        write both next to the features (``kernel_inverse.npy``, ``features_f16.npy``) and return the scorer.

        Raises:
            ValueError: the store is not complete (resume the build first), or ``ridge <= 0``.
        """
        if not store.complete:
            raise ValueError(f"D-TRAK features at {store.directory} are not complete "
                             f"({int(np.sum(store.done))}/{len(store)} rows); run `linernotes index` to finish them")
        if not ridge > 0:
            raise ValueError(f"ridge must be > 0; got {ridge}")
        kernel = np.zeros((store.dim, store.dim), dtype=np.float64)
        tmp = store.directory / f".{_SERVE_FILE}.tmp.npy"
        serve = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(len(store), store.dim))
        for start in range(0, len(store), block_rows):
            block = np.asarray(store.features[start:start + block_rows], dtype=np.float64)
            kernel += block.T @ block
            serve[start:start + block_rows] = block.astype(np.float16)
        serve.flush()
        del serve
        kernel_inverse = kernel_inverse_of(kernel, ridge)
        np.save(store.directory / _KERNEL_FILE, kernel_inverse.astype(np.float32), allow_pickle=False)
        os.replace(tmp, store.directory / _SERVE_FILE)
        return cls.load(store.directory, block_rows=block_rows)

    @classmethod
    def load(cls, directory: str | os.PathLike[str], block_rows: int = 1 << 16,
             max_ram_bytes: int = DEFAULT_MAX_RAM_BYTES) -> "DTrakScorer":
        """Open a finalized store: the FAISS float16 index built in memory from the float16 copy when it
        takes at most ``max_ram_bytes``; the float32 features read into memory for exact ``scores`` when they
        take at most ``min(max_ram_bytes, EXACT_RAM_BYTES)``, otherwise the float16 copy memory-mapped.

        Raises:
            FileNotFoundError: not finalized (no kernel inverse or float16 features).
        """
        directory = Path(directory)
        for name in (_KERNEL_FILE, _SERVE_FILE, _IDS_FILE):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"D-TRAK index at {directory} is not finalized: {name} is missing")
        segment_ids = json.loads((directory / _IDS_FILE).read_text())
        full = np.load(directory / _FEATURES_FILE, mmap_mode="r")
        half = np.load(directory / _SERVE_FILE, mmap_mode="r")
        if full.nbytes <= min(max_ram_bytes, EXACT_RAM_BYTES):
            features = np.ascontiguousarray(full, dtype=np.float32)
            block_rows = max(block_rows, len(features))
        else:
            features = half
        return cls(segment_ids, features, np.load(directory / _KERNEL_FILE), block_rows=block_rows,
                   features_f16=half, max_ram_bytes=max_ram_bytes)

    def _direction(self, query: np.ndarray) -> np.ndarray:
        query = np.asarray(query, dtype=np.float32)
        if query.shape != (self.dim,) or not np.all(np.isfinite(query)):
            raise ValueError(f"query must be a finite ({self.dim},) feature; got shape {query.shape}")
        return self.kernel_inverse @ query

    def scores(self, query: np.ndarray) -> np.ndarray:
        """float32 ``(N,)`` TRAK scores of every training segment for one query feature ``(dim,)``.

        Raises:
            ValueError: wrong shape or a non-finite query.
        """
        direction = self._direction(query)
        out = np.empty(len(self), dtype=np.float32)
        for start in range(0, len(self), self.block_rows):
            block = np.asarray(self.features[start:start + self.block_rows], dtype=np.float32)
            out[start:start + len(block)] = block @ direction
        return out

    def search(self, query: np.ndarray, top_k: int) -> list[tuple[str, float]]:
        """The ``top_k`` highest-scoring segments, best first (ties by segment id). Scores come from the
        float16 features when FAISS serves (relative error ≈ 1e-3 against float32).

        Raises:
            ValueError: as ``scores``, or ``top_k < 1``.
        """
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1; got {top_k}")
        if self._faiss is None:
            return top_k_of(self.scores(query), self.segment_ids, top_k)
        from provenance.attribution import search_threads

        direction = self._direction(query)[None]
        top_k = min(top_k, len(self))
        fetch = min(len(self), top_k + 8)
        with search_threads(1):
            while True:  # fetch past the cut while it ties, so that ties are broken by id, not FAISS's order
                values, rows = self._faiss.search(direction, fetch)
                pairs = [(self.segment_ids[r], float(v)) for v, r in zip(values[0], rows[0]) if r >= 0]
                if fetch == len(self) or pairs[-1][1] < pairs[top_k - 1][1]:
                    break
                fetch = min(len(self), fetch * 2)
        pairs.sort(key=lambda pair: (-pair[1], pair[0]))
        return pairs[:top_k]


def kernel_inverse_of(kernel: np.ndarray, ridge: float = DEFAULT_RIDGE) -> np.ndarray:
    """``(K + λI)^{-1}`` with ``λ = ridge · trace(K) / dim`` (float64 ``(dim, dim)``), via Cholesky.

    Raises:
        ValueError: ``kernel`` is not square, not finite, or all zero.
    """
    kernel = np.asarray(kernel, dtype=np.float64)
    if kernel.ndim != 2 or kernel.shape[0] != kernel.shape[1] or not np.all(np.isfinite(kernel)):
        raise ValueError(f"kernel must be a finite square matrix; got shape {kernel.shape}")
    scale = float(np.trace(kernel)) / kernel.shape[0]
    if not scale > 0:
        raise ValueError("the D-TRAK kernel is zero: every gradient vanished (an untrained or constant model?)")
    regularised = kernel + ridge * scale * np.eye(kernel.shape[0])
    factor = np.linalg.cholesky(regularised)
    identity = np.eye(kernel.shape[0])
    lower_inv = np.linalg.solve(factor, identity)
    return lower_inv.T @ lower_inv


def top_k_of(scores: np.ndarray, ids: Sequence[str], top_k: int) -> list[tuple[str, float]]:
    """``[(id, score), ...]`` of the ``top_k`` largest ``scores`` (float ``(N,)``), best first; ties at the
    cut and in the list are broken by id."""
    scores = np.asarray(scores)
    top_k = min(top_k, len(scores))
    if top_k < len(scores):
        cut = np.partition(scores, len(scores) - top_k)[len(scores) - top_k]
        candidates = np.flatnonzero(scores >= cut)
    else:
        candidates = np.arange(len(scores))
    pairs = sorted(((ids[i], float(scores[i])) for i in candidates), key=lambda p: (-p[1], p[0]))
    return pairs[:top_k]


