"""EmbeddingIndex (exact cosine search, ties, save/load) and aggregate (scores → shares; no shares from scores
that are all zero, all equal or undefined)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from provenance import records
from provenance.attribution import (
    COSINE_TEMPERATURE,
    NO_ATTRIBUTION_REASONS,
    AttributionResult,
    Embedder,
    EmbeddingIndex,
    NoAttribution,
    ScoredSegment,
    aggregate,
    attribution_table,
    l2_normalize,
    no_shares_reason,
    read_index_meta,
    share_weights,
)
from provenance.store import LineageStore


def random_index(n: int = 200, dim: int = 16, seed: int = 0) -> tuple[EmbeddingIndex, np.ndarray]:
    vectors = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    ids = [f"track{i % 7}@{i * 1000}" for i in range(n)]
    return EmbeddingIndex(ids, vectors, embedder_name="test-embedder", dataset_id="ds1"), vectors


# --- EmbeddingIndex -------------------------------------------------------------------------------

def test_search_matches_brute_force_cosine():
    index, vectors = random_index()
    rng = np.random.default_rng(1)
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    for _ in range(10):
        query = rng.standard_normal(16).astype(np.float32) * 3.0  # not normalised: the index does it
        cosines = unit @ (query / np.linalg.norm(query))
        expected = np.argsort(-cosines)[:5]
        hits = index.search(query, top_k=5)
        assert [s for s, _ in hits] == [index.segment_ids[i] for i in expected]
        assert [score for _, score in hits] == pytest.approx(cosines[expected].tolist(), abs=1e-5)


def test_each_vector_retrieves_itself_first_with_cosine_one():
    index, vectors = random_index()
    for row in (0, 57, 199):
        segment_id, score = index.search(vectors[row], top_k=1)[0]
        assert segment_id == index.segment_ids[row]
        assert score == pytest.approx(1.0, abs=1e-5)


def test_batch_search_returns_one_list_per_query():
    index, vectors = random_index()
    batch = index.search(vectors[:3], top_k=4)
    assert len(batch) == 3
    assert batch[1] == index.search(vectors[1], top_k=4)


def test_ties_are_broken_by_segment_id_even_at_the_cut():
    # 30 identical vectors tie; the top 5 must be the 5 smallest ids, whatever FAISS's internal order.
    dim = 8
    same = np.ones((30, dim), dtype=np.float32)
    other = -np.ones((5, dim), dtype=np.float32)
    ids = [f"t@{i:03d}" for i in range(29, -1, -1)] + [f"u@{i}" for i in range(5)]
    index = EmbeddingIndex(ids, np.vstack([same, other]))
    hits = index.search(np.ones(dim, dtype=np.float32), top_k=5)
    assert [s for s, _ in hits] == [f"t@{i:03d}" for i in range(5)]
    assert all(score == pytest.approx(1.0, abs=1e-6) for _, score in hits)


def test_top_k_is_capped_at_the_index_size():
    index, _ = random_index(n=4)
    assert len(index.search(np.ones(16, dtype=np.float32), top_k=10)) == 4


def test_vectors_are_l2_normalised_and_zero_rows_stay_zero():
    vectors = np.array([[3.0, 4.0], [0.0, 0.0]], dtype=np.float32)
    index = EmbeddingIndex(["a@0", "b@0"], vectors)
    np.testing.assert_allclose(index.vectors, [[0.6, 0.8], [0.0, 0.0]], atol=1e-7)
    assert index.vectors.dtype == np.float32
    assert dict(index.search(np.array([1.0, 0.0]), top_k=2))["b@0"] == 0.0


@pytest.mark.parametrize(
    ("ids", "vectors", "match"),
    [
        (["a@0"], np.zeros((2, 4)), "segment ids"),
        (["a@0", "a@0"], np.ones((2, 4)), "unique"),
        (["a@0"], np.array([[np.nan, 1.0]]), "NaN"),
        ([], np.zeros((0, 4)), "n, dim"),
    ],
)
def test_index_rejects_bad_input(ids, vectors, match):
    with pytest.raises(ValueError, match=match):
        EmbeddingIndex(ids, vectors)


def test_search_rejects_wrong_dimension_and_bad_top_k():
    index, _ = random_index()
    with pytest.raises(ValueError, match="query must be"):
        index.search(np.ones(15), top_k=3)
    with pytest.raises(ValueError, match="top_k"):
        index.search(np.ones(16), top_k=0)


def test_save_load_round_trip_gives_identical_results(tmp_path):
    index, _ = random_index()
    directory = index.save(tmp_path / "idx")
    assert sorted(p.name for p in directory.iterdir()) == ["meta.json", "segment_ids.json", "vectors.npy"]
    meta = json.loads((directory / "meta.json").read_text())
    assert (meta["embedder"], meta["dim"], meta["dataset_id"], meta["count"]) == ("test-embedder", 16, "ds1", 200)
    loaded = EmbeddingIndex.load(directory)
    assert loaded.segment_ids == index.segment_ids
    assert (loaded.embedder_name, loaded.dataset_id) == ("test-embedder", "ds1")
    np.testing.assert_array_equal(loaded.vectors, index.vectors)
    queries = np.random.default_rng(2).standard_normal((20, 16)).astype(np.float32)
    assert loaded.search(queries, top_k=10) == index.search(queries, top_k=10)
    # saving again replaces the folder atomically and leaves no temporary folders behind
    EmbeddingIndex(["x@0"], np.ones((1, 16)), "other", "ds2").save(directory)
    assert EmbeddingIndex.load(directory).segment_ids == ["x@0"]
    assert [p.name for p in tmp_path.iterdir()] == ["idx"]


def test_load_of_missing_or_partial_index_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="meta.json"):
        EmbeddingIndex.load(tmp_path / "nothing")
    index, _ = random_index()
    directory = index.save(tmp_path / "idx")
    (directory / "vectors.npy").unlink()
    with pytest.raises(FileNotFoundError, match="vectors.npy"):
        read_index_meta(directory)


def test_l2_normalize_gives_unit_rows():
    rows = l2_normalize(np.random.default_rng(3).standard_normal((5, 7)) * 10)
    np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-6)


def test_embedder_protocol_is_structural():
    class Constant:
        name = "constant-v1"
        sample_rate_hz = 16000
        dim = 2

        def embed(self, audio, sample_rate_hz):
            return np.ones((1, 2), dtype=np.float32)

    assert isinstance(Constant(), Embedder)


# --- aggregate ------------------------------------------------------------------------------------

TRACKS = {
    "t1": {"title": "One", "artist": "A", "rights_holder": "Label X", "license_id": "L1",
           "license_name": "CC BY 4.0", "license_url": "https://creativecommons.org/licenses/by/4.0/",
           "attribution": "One by A (CC BY 4.0)"},
    "t2": {"title": "Two", "artist": "B", "rights_holder": "Label X", "license_id": "L1",
           "license_name": "CC BY 4.0", "license_url": "https://creativecommons.org/licenses/by/4.0/",
           "attribution": "Two by B (CC BY 4.0)"},
    "t3": {"title": "Three", "artist": "C", "rights_holder": "Label Y", "license_id": "L2",
           "license_name": "Direct", "license_url": None, "attribution": "Three by C, courtesy of Y"},
}


def scored(*items: tuple[str, str, float]) -> list[ScoredSegment]:
    return [ScoredSegment(segment_id, track_id, score) for segment_id, track_id, score in items]


def run_aggregate(ranked, **kwargs) -> AttributionResult:
    return aggregate(ranked, TRACKS, method="embedding", query_id="q1", dataset_id="ds1", **kwargs)


def test_shares_are_proportional_to_positive_scores_and_roll_up():
    ranked = scored(("t3@0", "t3", 0.2), ("t1@0", "t1", 0.5), ("t2@0", "t2", 0.2), ("t1@9", "t1", 0.1),
                    ("t2@5", "t2", -0.3))
    result = run_aggregate(ranked)
    segments = [(s.segment_id, s.rank, s.share) for s in result.segments]
    assert segments == [("t1@0", 1, pytest.approx(0.5)), ("t2@0", 2, pytest.approx(0.2)),
                        ("t3@0", 3, pytest.approx(0.2)), ("t1@9", 4, pytest.approx(0.1)),
                        ("t2@5", 5, 0.0)]  # equal scores ordered by segment id; negative gets nothing
    assert [(t.track_id, t.share) for t in result.tracks] == [
        ("t1", pytest.approx(0.6)), ("t2", pytest.approx(0.2)), ("t3", pytest.approx(0.2))]
    assert [(r.rights_holder, r.share, r.track_ids) for r in result.rights_holders] == [
        ("Label X", pytest.approx(0.8), ("t1", "t2")), ("Label Y", pytest.approx(0.2), ("t3",))]
    for parts in (result.segments, result.tracks, result.rights_holders):
        assert abs(math.fsum(p.share for p in parts) - 1.0) < 1e-9
        assert all(p.share >= 0 for p in parts)


def test_tracks_carry_licence_and_attribution_text():
    result = run_aggregate(scored(("t3@0", "t3", 0.9), ("t1@0", "t1", 0.4)))
    by_id = {t.track_id: t for t in result.tracks}
    assert by_id["t1"].license_name == "CC BY 4.0"
    assert by_id["t1"].license_url == "https://creativecommons.org/licenses/by/4.0/"
    assert by_id["t1"].attribution == "One by A (CC BY 4.0)"
    assert (by_id["t3"].license_id, by_id["t3"].license_url, by_id["t3"].rights_holder) == ("L2", "", "Label Y")


def test_no_positive_score_gives_uniform_shares():
    result = run_aggregate(scored(("t1@0", "t1", 0.0), ("t2@0", "t2", -0.5), ("t3@0", "t3", -0.1),
                                  ("t1@1", "t1", 0.0)))
    assert [s.share for s in result.segments] == [0.25] * 4
    assert [s.segment_id for s in result.segments] == ["t1@0", "t1@1", "t3@0", "t2@0"]


def test_softmax_rule_with_temperature():
    weights = share_weights([1.0, 0.9, 0.5], temperature=0.1)
    expected = np.exp(np.array([0.0, -1.0, -5.0]))
    np.testing.assert_allclose(weights, expected / expected.sum())
    assert share_weights([0.99, 0.98], temperature=0.01)[0] > share_weights([0.99, 0.98])[0]


@pytest.mark.parametrize(("ranked", "match"), [
    ([], "empty"),
    (scored(("t1@0", "t1", 0.5), ("t1@0", "t1", 0.4)), "repeat"),
    (scored(("t9@0", "t9", 0.5)), "t9"),
])
def test_aggregate_rejects_bad_input(ranked, match):
    with pytest.raises(ValueError, match=match):
        run_aggregate(ranked)


@pytest.mark.parametrize("temperature", [None, COSINE_TEMPERATURE])
@pytest.mark.parametrize(("scores", "reason"), [
    ([0.0] * 10, "scores_all_zero"),  # the cosines of a silent query: the 80 % / 20 % split of issue 17
    ([0.0], "scores_all_zero"),
    ([0.7, 0.7, 0.7, 0.7], "scores_all_equal"),
    ([-0.2, -0.2], "scores_all_equal"),
    ([float("nan")], "scores_undefined"),
    ([0.9, float("nan"), 0.1], "scores_undefined"),
    ([float("inf"), 0.5], "scores_undefined"),
    ([0.3, float("-inf")], "scores_undefined"),
])
def test_scores_that_tell_no_segment_apart_give_no_shares(scores, reason, temperature):
    """Shares are money: all-zero, all-equal or undefined scores give no ranking, no shares, no rows — and why."""
    tracks = ["t1", "t1", "t1", "t1", "t1", "t1", "t1", "t1", "t3", "t3"]  # 8 : 2, as the silent query was split
    ranked = [ScoredSegment(f"{tracks[i]}@{i}", tracks[i], score) for i, score in enumerate(scores)]
    result = run_aggregate(ranked, temperature=temperature)
    assert (result.segments, result.tracks, result.rights_holders) == ((), (), ())
    assert result.no_attribution is not None and result.no_attribution.reason == reason
    assert result.no_attribution.detail
    assert result.rows() == []
    data = json.loads(result.to_json())
    assert data["no_attribution"] == {"reason": reason, "detail": result.no_attribution.detail}
    assert data["segments"] == data["tracks"] == data["rights_holders"] == []
    assert no_shares_reason(scores).reason == reason


@pytest.mark.parametrize("temperature", [None, COSINE_TEMPERATURE])
@pytest.mark.parametrize("scores", [[0.9, 0.5, 0.5, 0.1], [0.2, 0.0, 0.0], [0.4], [0.3, -0.1]])
def test_scores_that_differ_give_shares_summing_to_one(scores, temperature):
    ranked = [ScoredSegment(f"t{1 + i % 3}@{i}", f"t{1 + i % 3}", score) for i, score in enumerate(scores)]
    result = run_aggregate(ranked, temperature=temperature)
    assert result.no_attribution is None and no_shares_reason(scores) is None
    assert len(result.segments) == len(scores)
    for parts in (result.segments, result.tracks, result.rights_holders):
        assert abs(math.fsum(p.share for p in parts) - 1.0) < 1e-9
    assert result.segments[0].share == max(s.share for s in result.segments)
    assert json.loads(result.to_json())["no_attribution"] is None


def test_no_attribution_reasons_are_a_closed_set():
    assert set(NO_ATTRIBUTION_REASONS) == {"silent_query", "scores_undefined", "scores_all_zero", "scores_all_equal"}
    with pytest.raises(ValueError, match="no_such_reason"):
        NoAttribution("no_such_reason", "x")


def test_rows_match_the_attribution_record_and_fit_the_lineage_store(tmp_path):
    result = run_aggregate(scored(("t1@0", "t1", 0.5), ("t3@0", "t3", 0.25), ("t2@0", "t2", 0.25)))
    rows = result.rows()
    assert all(set(row) == set(records.ATTRIBUTION.names) for row in rows)
    assert [(r["segment_id"], r["rank"], r["rights_holder"], r["generation_id"]) for r in rows] == [
        ("t1@0", 1, "Label X", "q1"), ("t2@0", 2, "Label X", "q1"), ("t3@0", 3, "Label Y", "q1")]
    table = attribution_table(result)
    assert table.schema.equals(records.ATTRIBUTION, check_metadata=False)
    assert table.num_rows == 3

    store = LineageStore(f"sqlite:///{tmp_path / 'lineage.sqlite'}")
    run_id = store.start_run("attribute", {"method": "embedding"})
    store.add_attributions(result.query_id, result.method, run_id, result.dataset_id, rows)
    stored = store.get_attributions("q1", "embedding")
    assert [(r["segment_id"], r["share"]) for r in stored] == [(r["segment_id"], r["share"]) for r in rows]
    store.close()


def test_to_json_is_complete_and_deterministic():
    ranked = scored(("t1@0", "t1", 0.5), ("t3@0", "t3", 0.25))
    text = run_aggregate(ranked).to_json()
    assert text == run_aggregate(list(reversed(ranked))).to_json()
    data = json.loads(text)
    assert (data["method"], data["query_id"], data["dataset_id"]) == ("embedding", "q1", "ds1")
    assert data["tracks"][0]["attribution"] == "One by A (CC BY 4.0)"
    assert data["rights_holders"][1] == {"rights_holder": "Label Y", "share": pytest.approx(1 / 3),
                                         "track_ids": ["t3"]}


def test_few_queries_search_on_one_faiss_thread_and_restore_the_count():
    import faiss

    from provenance.attribution import FEW_QUERIES, search_threads

    faiss.omp_set_num_threads(2)
    seen = []
    with search_threads(1):
        seen.append(faiss.omp_get_max_threads())
    with search_threads(FEW_QUERIES):
        seen.append(faiss.omp_get_max_threads())
    with pytest.raises(RuntimeError), search_threads(1):
        raise RuntimeError("a failed search restores the count too")
    assert seen == [1, 2] and faiss.omp_get_max_threads() == 2


def test_an_ivf_index_is_saved_trained_and_loaded_without_k_means(tmp_path, monkeypatch):
    import provenance.attribution as attribution

    rng = np.random.default_rng(5)
    vectors = rng.standard_normal((2000, 16)).astype(np.float32)
    ids = [f"s{i}" for i in range(2000)]
    index = EmbeddingIndex(ids, vectors, "e", "ds", ann="ivf")
    directory = index.save(tmp_path / "idx")
    assert (directory / "ivf.faiss").is_file()

    def no_k_means(vectors):
        raise AssertionError("load retrained the IVF index")

    monkeypatch.setattr(attribution, "_ivf_index", no_k_means)
    loaded = EmbeddingIndex.load(directory)
    assert loaded.ann == "ivf" and loaded._faiss.nprobe == index._faiss.nprobe
    queries = rng.standard_normal((20, 16)).astype(np.float32)
    assert loaded.search(queries, top_k=10) == index.search(queries, top_k=10)
