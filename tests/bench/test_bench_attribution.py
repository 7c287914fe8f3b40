"""Attribution query latency (`make bench`): ``embedding`` and ``dtrak`` at 10k, 100k and 1M indexed segments
against brute-force NumPy in the same run, and the cost of one ``unlearning`` query against one ``dtrak`` query
on the same checkpoint, and D-TRAK's linear datamodeling score on the attribution test dataset. Prints tables
and ratios; gates nothing on absolute times (only on recall/overlap: a fast wrong answer is not a result).

Features are synthetic at scale: embeddings are a seeded mixture of 2,000 Gaussian clusters on the unit
sphere (dim 192, as the mel-stats embedder), D-TRAK features standard normal (dim 512, the smallest
projection the index allows). Issue 6's targets on 2 cores: p95 ≤ 50 ms (embedding) and ≤ 1 s (dtrak) at 1M.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

import torch

from pipelines.attribution.index import read_shard_index
from pipelines.attribution.stage import iter_segment_mels, train_entries
from provenance import dtrak
from provenance.attribution import EmbeddingIndex
from provenance.store import LineageStore
from provenance.workspace import Workspace
from tests.pipelines.attribution_support import write_dataset

pytestmark = pytest.mark.bench
SIZES = [10_000, 100_000, 1_000_000]
QUERIES = 30


def _percentiles_ms(times: list[float]) -> tuple[float, float]:
    return float(np.percentile(times, 50)) * 1e3, float(np.percentile(times, 95)) * 1e3


def _clustered(num: int, dim: int, rng: np.random.Generator, centers: np.ndarray) -> np.ndarray:
    out = np.empty((num, dim), dtype=np.float32)
    for start in range(0, num, 100_000):
        stop = min(num, start + 100_000)
        labels = rng.integers(0, len(centers), stop - start)
        block = centers[labels] + 0.35 * rng.standard_normal((stop - start, dim)).astype(np.float32) / np.sqrt(dim)
        out[start:stop] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


@pytest.mark.parametrize("num_segments", SIZES)
def test_embedding_query_latency(num_segments, tmp_path):
    rng = np.random.default_rng(0)
    dim = 192
    centers = rng.standard_normal((2000, dim)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    vectors = _clustered(num_segments, dim, rng, centers)
    queries = _clustered(QUERIES, dim, rng, centers)
    ids = [f"s{i}" for i in range(num_segments)]
    start = time.perf_counter()
    index = EmbeddingIndex(ids, vectors)  # ann="auto": flat below 200k, IVF above
    build_s = time.perf_counter() - start
    directory = index.save(tmp_path / "index")
    start = time.perf_counter()
    index = EmbeddingIndex.load(directory)  # what `linernotes attribute` does once per process
    load_s = time.perf_counter() - start

    def numpy_top10(query):
        scores = vectors @ query  # brute force: every row, then the 10 best
        best = np.argpartition(-scores, 10)[:10]
        return best[np.argsort(-scores[best])]

    base, ours, recall = [], [], []
    for query in queries:
        t0 = time.perf_counter()
        exact = numpy_top10(query)
        base.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        hits = index.search(query, 10)
        ours.append(time.perf_counter() - t0)
        recall.append(len({ids[i] for i in exact} & {s for s, _ in hits}) / 10)
    (b50, b95), (o50, o95) = _percentiles_ms(base), _percentiles_ms(ours)
    print(f"\nembedding @ {num_segments:>9,} × {dim} ({index.ann}, built in {build_s:.1f} s, loaded in {load_s:.1f} s)"
          f"\n  {'':<22}{'p50 ms':>9}{'p95 ms':>9}{'× numpy p95':>13}"
          f"\n  {'numpy brute force':<22}{b50:>9.2f}{b95:>9.2f}{1.0:>13.2f}"
          f"\n  {'EmbeddingIndex':<22}{o50:>9.2f}{o95:>9.2f}{o95 / b95:>13.3f}   recall@10 {np.mean(recall):.3f}")
    assert np.mean(recall) >= 0.9  # a fast wrong answer is not a result


@pytest.mark.parametrize("num_segments", SIZES)
def test_dtrak_query_latency(num_segments, tmp_path):
    rng = np.random.default_rng(1)
    dim = 512
    ids = [f"s{i}" for i in range(num_segments)]
    store = dtrak.FeatureStore.open(tmp_path / "dtrak", ids, dim, {"bench": num_segments})
    for start in range(0, num_segments, 50_000):
        rows = np.arange(start, min(num_segments, start + 50_000))
        store.write(rows, rng.standard_normal((len(rows), dim)).astype(np.float32))
    start = time.perf_counter()
    scorer = dtrak.DTrakScorer.finalize(store)
    finalize_s = time.perf_counter() - start
    del store
    features = np.load(tmp_path / "dtrak" / "features.npy")  # the baseline holds float32 in RAM
    queries = rng.standard_normal((QUERIES, dim)).astype(np.float32)

    def numpy_top10(query):
        scores = features @ (scorer.kernel_inverse @ query)
        best = np.argpartition(-scores, 10)[:10]
        return best[np.argsort(-scores[best])]

    base, ours, agree = [], [], []
    for query in queries:
        t0 = time.perf_counter()
        exact = numpy_top10(query)
        base.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        hits = scorer.search(query, 10)
        ours.append(time.perf_counter() - t0)
        agree.append(len({ids[i] for i in exact} & {s for s, _ in hits}) / 10)
    (b50, b95), (o50, o95) = _percentiles_ms(base), _percentiles_ms(ours)
    print(f"\ndtrak @ {num_segments:>9,} × {dim} (finalize + load {finalize_s:.1f} s)"
          f"\n  {'':<26}{'p50 ms':>9}{'p95 ms':>9}{'× numpy p95':>13}"
          f"\n  {'numpy float32 brute force':<26}{b50:>9.1f}{b95:>9.1f}{1.0:>13.2f}"
          f"\n  {'DTrakScorer (' + scorer.serving + ')':<26}{o50:>9.1f}{o95:>9.1f}{o95 / b95:>13.3f}"
          f"   top-10 overlap {np.mean(agree):.3f}")
    assert np.mean(agree) >= 0.9


def test_unlearning_query_cost(ray_local, tmp_path):
    """One ``unlearning`` query (50 candidates) against one ``dtrak`` query on the test checkpoint."""
    from pipelines.attribution.methods import DTrakAttributor, UnlearningAttributor, UnlearningSettings
    from pipelines.attribution.stage import IndexConfig, build_checkpoint_index
    from tests.pipelines.attribution_support import make_workspace

    workspace, _, decoded, checkpoint = make_workspace(tmp_path / "ws")
    config = IndexConfig(projection_dim=512, num_timesteps=4, batch_size=8, fisher_segments=21,
                         unlearning_timesteps=4)
    build_checkpoint_index(workspace, checkpoint, config)
    dtrak_method = DTrakAttributor.from_workspace(workspace, checkpoint, config)
    unlearning = UnlearningAttributor.from_workspace(workspace, checkpoint, config,
                                                     settings=UnlearningSettings(candidates=21))
    queries = list(decoded.items())[:5]
    timings = {}
    for name, attributor in (("dtrak", dtrak_method), ("unlearning", unlearning)):
        attributor.attribute(queries[0][1], 8000, "warm-up", top_k=10)
        times = []
        for segment_id, audio in queries:
            t0 = time.perf_counter()
            attributor.attribute(audio, 8000, segment_id, top_k=10)
            times.append(time.perf_counter() - t0)
        timings[name] = float(np.median(times))
    print(f"\none query on the test checkpoint (73k parameters, 21 segments, 1.5 s query)"
          f"\n  {'dtrak (baseline)':<34}{timings['dtrak']:>8.2f} s{1.0:>8.2f}"
          f"\n  {'unlearning, 21 candidates re-ranked':<34}{timings['unlearning']:>8.2f} s"
          f"{timings['unlearning'] / timings['dtrak']:>8.2f}")
    assert timings["unlearning"] > 0


# ---------------------------------------------------------------------------------------------------
# Linear datamodeling score of D-TRAK on the attribution test dataset's mels (no Ray: a tiny denoiser trained
# in-process; ``tests/pipelines/lds_support.py``): 16 half-subsets of the 21 train segments, the 3 validation
# segments as queries. Reported, not gated: with 3 queries the random baseline's spread is wide (± 0.25);
# tests/pipelines/test_attribution_lds.py gates the synthetic version with 12 queries.

LDS_SUBSETS = 16
LDS_STEPS = 100


def test_linear_datamodeling_score(tmp_path):
    from tests.pipelines.lds_support import linear_datamodeling_score
    from training.diffusion import GaussianDiffusion

    workspace = Workspace.at(tmp_path).ensure()
    store = LineageStore(workspace.store_url)
    try:
        dataset_id, _ = write_dataset(workspace, store)
    finally:
        store.close()
    train = train_entries(workspace, dataset_id)
    validation = sorted((r for r in read_shard_index(workspace, dataset_id) if r["split"] == "validation"),
                        key=lambda r: (r["shard"], r["key"]))
    train_mels = np.stack([m for _, m, _ in iter_segment_mels(workspace.dataset_dir(dataset_id), train)])
    query_mels = np.stack([m for _, m, _ in iter_segment_mels(workspace.dataset_dir(dataset_id), validation)])
    mean, std = float(train_mels.mean()), float(train_mels.std())
    x_train = torch.from_numpy((train_mels - mean) / std)
    x_query = torch.from_numpy((query_mels - mean) / std)
    result = linear_datamodeling_score(GaussianDiffusion(100), x_train, x_query, num_subsets=LDS_SUBSETS,
                                       steps=LDS_STEPS)
    print("\n" + result.summary(LDS_SUBSETS, len(x_query)))
    assert np.isfinite(result.dtrak_square) and np.isfinite(result.trak_loss)
