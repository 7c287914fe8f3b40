"""Spine benchmarks (`make bench`). Each prints a table of ratios against a baseline measured in the same
run; nothing here gates on absolute times."""

from __future__ import annotations

import statistics
import time

import numpy as np
import pytest

from cleaning.audio import read_audio, write_audio
from cleaning.measure import measure_audio
from provenance.attribution import EmbeddingIndex
from tests.conftest import sine

pytestmark = pytest.mark.bench


def _timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def test_measure_cost_against_decode(tmp_path):
    """Ingest's per-file work (decode + all AudioFile measurements) against decoding alone."""
    rng = np.random.default_rng(0)
    audio = (sine(440, 30.0, 44100, 0.3, 2) + 0.05 * rng.standard_normal((2, 30 * 44100))).astype(np.float32)
    path = write_audio(tmp_path / "a.flac", audio, 44100)
    decode = _timed(lambda: read_audio(path), 5)
    full = _timed(lambda: measure_audio(*read_audio(path)), 5)
    ratio = statistics.median(full) / statistics.median(decode)
    print(f"\n{'30 s stereo FLAC':<28}{'median s':>10}{'ratio':>8}")
    print(f"{'decode (baseline)':<28}{statistics.median(decode):>10.3f}{1.0:>8.2f}")
    print(f"{'decode + measure':<28}{statistics.median(full):>10.3f}{ratio:>8.2f}")
    assert ratio >= 1.0


@pytest.mark.parametrize("num_segments", [10_000, 100_000])
def test_embedding_search_against_numpy(num_segments):
    """FAISS exact inner-product search against a brute-force NumPy matmul + argpartition, top-10."""
    rng = np.random.default_rng(0)
    dim = 192
    vectors = rng.standard_normal((num_segments, dim)).astype(np.float32)
    index = EmbeddingIndex([f"s{i}" for i in range(num_segments)], vectors)
    normalized = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    queries = rng.standard_normal((50, dim)).astype(np.float32)

    def numpy_search(q):
        scores = normalized @ (q / np.linalg.norm(q))
        top = np.argpartition(-scores, 10)[:10]
        return top[np.argsort(-scores[top])]

    base = [_timed(lambda q=q: numpy_search(q), 1)[0] for q in queries]
    ours = [_timed(lambda q=q: index.search(q, 10), 1)[0] for q in queries]
    p = lambda xs, pct: float(np.percentile(xs, pct)) * 1e3  # noqa: E731
    print(f"\n{num_segments:,} segments × {dim}   {'p50 ms':>8}{'p95 ms':>8}{'p50 ratio':>11}")
    print(f"{'numpy brute force (baseline)':<28}{p(base, 50):>8.2f}{p(base, 95):>8.2f}{1.0:>11.2f}")
    print(f"{'EmbeddingIndex (FAISS flat)':<28}{p(ours, 50):>8.2f}{p(ours, 95):>8.2f}{p(ours, 50) / p(base, 50):>11.2f}")
    top_ours = [sid for sid, _ in index.search(queries[0], 10)]
    assert top_ours == [f"s{i}" for i in numpy_search(queries[0])]
