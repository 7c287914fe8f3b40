"""D-TRAK's model-agnostic parts: the chunked projection, the resumable feature store, the TRAK kernel scorer."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from provenance import dtrak


def test_projection_preserves_inner_products_and_is_the_same_chunked_or_cached():
    rng = np.random.default_rng(0)
    gradients = torch.from_numpy(rng.standard_normal((6, 5000)).astype(np.float32))
    cached = dtrak.GradientProjector(5000, 2048, seed=3, chunk_params=700)
    chunked = dtrak.GradientProjector(5000, 2048, seed=3, chunk_params=700, cache_bytes=0)
    a, b = cached.project(gradients), chunked.project(gradients)
    assert a.shape == (6, 2048) and a.dtype == torch.float32
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-3)
    exact = (gradients @ gradients.T).numpy()
    approx = (a @ a.T).numpy()
    # Johnson–Lindenstrauss: relative error of the Gram matrix ~ 1/sqrt(dim) of the norms involved
    norms = np.sqrt(np.outer(np.diag(exact), np.diag(exact)))
    assert np.max(np.abs(approx - exact) / norms) < 0.12
    # the projection is a function of its seed
    again = dtrak.GradientProjector(5000, 2048, seed=3).project(gradients)
    other = dtrak.GradientProjector(5000, 2048, seed=4).project(gradients)
    assert torch.equal(a, again) and not torch.allclose(a, other)


def test_projection_rejects_bad_shapes_and_dims():
    with pytest.raises(ValueError, match="512"):
        dtrak.GradientProjector(100, 256)
    with pytest.raises(ValueError, match=r"\(B, 100\)"):
        dtrak.GradientProjector(100, 512).project(torch.zeros(2, 99))


def test_feature_store_resumes_keeps_done_rows_and_resets_on_a_new_identity(tmp_path):
    ids = [f"s{i}" for i in range(5)]
    store = dtrak.FeatureStore.open(tmp_path / "f", ids, 4, {"checkpoint_id": "c1"})
    assert store.pending_rows().tolist() == [0, 1, 2, 3, 4] and not store.complete
    store.write([1, 3], np.ones((2, 4)))
    del store  # "killed"
    reopened = dtrak.FeatureStore.open(tmp_path / "f", ids, 4, {"checkpoint_id": "c1"})
    assert reopened.pending_rows().tolist() == [0, 2, 4]
    np.testing.assert_array_equal(reopened.features[1], np.ones(4))
    with pytest.raises(ValueError, match="NaN"):
        reopened.write([0], np.full((1, 4), np.nan))
    assert reopened.pending_rows().tolist() == [0, 2, 4]  # a rejected write marks nothing done
    fresh = dtrak.FeatureStore.open(tmp_path / "f", ids, 4, {"checkpoint_id": "c2"})
    assert fresh.pending_rows().tolist() == [0, 1, 2, 3, 4]
    assert json.loads((tmp_path / "f" / "meta.json").read_text())["identity"] == {"checkpoint_id": "c2"}


def test_scorer_matches_the_trak_formula_and_needs_a_complete_store(tmp_path):
    rng = np.random.default_rng(1)
    features = rng.standard_normal((40, 8)).astype(np.float32)
    ids = [f"seg-{i:02d}" for i in range(40)]
    store = dtrak.FeatureStore.open(tmp_path / "f", ids, 8, {"k": 1})
    store.write(range(20), features[:20])
    with pytest.raises(ValueError, match="not complete"):
        dtrak.DTrakScorer.finalize(store)
    store.write(range(20, 40), features[20:])
    scorer = dtrak.DTrakScorer.finalize(store, ridge=1e-3, block_rows=7)
    phi = features.astype(np.float64)
    kernel = phi.T @ phi
    expected_inverse = np.linalg.inv(kernel + 1e-3 * np.trace(kernel) / 8 * np.eye(8))
    query = rng.standard_normal(8).astype(np.float32)
    expected = phi @ (expected_inverse @ query)
    np.testing.assert_allclose(scorer.scores(query), expected, rtol=1e-4, atol=1e-5)  # float32 in memory
    best = scorer.search(query, 3)  # FAISS over the float16 copy: the float32 ranking, scores to float16 precision
    assert scorer.serving == "faiss-fp16"
    assert [s for s, _ in best] == [ids[i] for i in np.argsort(-expected)[:3]]
    np.testing.assert_allclose([v for _, v in best], np.sort(expected)[::-1][:3], rtol=2e-2, atol=2e-3)
    # reload from disk: the same scores
    np.testing.assert_allclose(dtrak.DTrakScorer.load(tmp_path / "f").scores(query), scorer.scores(query),
                               rtol=1e-5, atol=1e-7)
    # past the RAM budget the float16 memmap serves, with the same ranking
    half = dtrak.DTrakScorer.load(tmp_path / "f", max_ram_bytes=0, block_rows=7)
    assert half.features.dtype == np.float16 and half.serving == "memmap-fp16"
    np.testing.assert_allclose(half.scores(query), expected, rtol=2e-2, atol=2e-3)
    assert [s for s, _ in half.search(query, 3)] == [s for s, _ in best]
    # self-retrieval: with N > dim a training feature as the query still ranks itself first for most rows
    hits = sum(scorer.search(features[i], 1)[0][0] == ids[i] for i in range(40))
    assert hits >= 30


def test_top_k_breaks_ties_by_id():
    scores = np.array([1.0, 3.0, 3.0, 2.0, 3.0])
    assert dtrak.top_k_of(scores, ["e", "d", "c", "b", "a"], 2) == [("a", 3.0), ("c", 3.0)]
    assert [s for s, _ in dtrak.top_k_of(scores, ["e", "d", "c", "b", "a"], 10)] == ["a", "c", "d", "b", "e"]


def test_kernel_inverse_rejects_a_zero_kernel():
    with pytest.raises(ValueError, match="vanished"):
        dtrak.kernel_inverse_of(np.zeros((4, 4)))


def test_embedding_index_switches_to_ivf_and_keeps_recall():
    from provenance.attribution import EmbeddingIndex

    rng = np.random.default_rng(2)
    centers = rng.standard_normal((200, 32))
    vectors = (centers[rng.integers(0, 200, 20_000)] + 0.3 * rng.standard_normal((20_000, 32))).astype(np.float32)
    ids = [f"s{i:05d}" for i in range(20_000)]
    flat = EmbeddingIndex(ids, vectors)
    ivf = EmbeddingIndex(ids, vectors, ann="ivf")
    assert flat.ann == "flat" and ivf.ann == "ivf"
    queries = vectors[rng.choice(20_000, 40, replace=False)]
    recall = np.mean([len({s for s, _ in flat.search(q, 10)} & {s for s, _ in ivf.search(q, 10)}) / 10
                      for q in queries])
    assert recall >= 0.9
    assert all(ivf.search(vectors[i], 1)[0][0] == ids[i] for i in range(0, 20_000, 2000))  # self-retrieval
    with pytest.raises(ValueError, match="ann"):
        EmbeddingIndex(ids[:3], vectors[:3], ann="hnsw")
