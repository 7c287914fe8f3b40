"""Ingest throughput (issue: catalog ingest at production depth), in seconds of audio per CPU-second on
44.1 kHz stereo FLAC, against two baselines measured in the same run:

- floor: only decoding the files with soundfile;
- naive: what a user would write instead, a loop of librosa.load + pyloudnorm + hashlib.

``ours`` is ingest's per-file work on a mixture (``pipelines.ingest_steps._measure_outcome``: decode, the
AudioFile measurements, true peak, DC offset, fingerprint); ``ours, stem`` the same without the fingerprint
(ingest fingerprints only mixtures). Each runs in a process pool of 1 and 2 workers; CPU time is summed
inside the workers. ``beam`` is the whole ingest on the DirectRunner, wall-clock (pipeline start, the Great
Expectations checkpoints and their data docs included). A second table splits one file's CPU time by step.
"""

from __future__ import annotations

import concurrent.futures as cf
import csv
import hashlib
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

pytestmark = pytest.mark.bench

NUM_FILES = 8
FILE_S = 30.0
SAMPLE_RATE_HZ = 44100


def _floor(path: str) -> float:
    start = time.process_time()
    sf.read(path, dtype="float32", always_2d=True)
    return time.process_time() - start


def _naive(path: str) -> float:
    import librosa
    import pyloudnorm

    start = time.process_time()
    audio, rate = librosa.load(path, sr=None, mono=False)
    pyloudnorm.Meter(rate).integrated_loudness(np.atleast_2d(audio).T)
    hashlib.sha256(audio.tobytes()).hexdigest()
    return time.process_time() - start


def _ours(path: str) -> float:
    from pipelines.ingest_steps import _measure_outcome

    start = time.process_time()
    outcome = _measure_outcome(path)
    assert outcome["status"] == "accepted"
    return time.process_time() - start


def _ours_stem(path: str) -> float:
    from pipelines.ingest_steps import _measure_outcome

    start = time.process_time()
    outcome = _measure_outcome(path, with_fingerprint=False)
    assert outcome["status"] == "accepted"
    return time.process_time() - start


def _breakdown(path: str, repeats: int = 3) -> list[tuple[str, float]]:
    """CPU ms per step of ``_measure_outcome`` on one file (BLAS on one thread, as ingest runs it)."""
    from threadpoolctl import threadpool_limits

    from cleaning.audio import read_audio
    from cleaning.fingerprint import fingerprint
    from cleaning.measure import (measure_clipped_fraction, measure_loudness_lufs, measure_pcm_sha256,
                                  measure_peak_dbfs, measure_silent_fraction)
    from cleaning.quality import measure_dc_offset, measure_true_peak_dbtp

    audio, rate = read_audio(path, contiguous=False)
    steps = [("decode (soundfile)", lambda: read_audio(path, contiguous=False)),
             ("sha256 of the PCM", lambda: measure_pcm_sha256(audio)),
             ("loudness (BS.1770)", lambda: measure_loudness_lufs(audio, rate)),
             ("true peak (Annex 2)", lambda: measure_true_peak_dbtp(audio, rate)),
             ("fingerprint", lambda: fingerprint(audio, rate)),
             ("peak, clipping, silence, DC", lambda: (measure_peak_dbfs(audio), measure_clipped_fraction(audio),
                                                      measure_silent_fraction(audio, rate),
                                                      measure_dc_offset(audio)))]
    out = []
    with threadpool_limits(1, user_api="blas"):
        for name, step in steps:
            step()
            start = time.process_time()
            for _ in range(repeats):
                step()
            out.append((name, (time.process_time() - start) / repeats * 1000))
    return out


def _throughput(fn, paths: list[str], workers: int) -> tuple[float, float]:
    """(audio seconds per CPU-second, audio seconds per wall-second)."""
    with cf.ProcessPoolExecutor(max_workers=workers) as pool:
        list(pool.map(fn, paths[:workers]))  # warm the workers (imports)
        start = time.perf_counter()
        cpu = sum(pool.map(fn, paths))
        wall = time.perf_counter() - start
    audio_s = len(paths) * FILE_S
    return audio_s / cpu, audio_s / wall


@pytest.fixture(scope="module")
def delivery(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bench-delivery")
    (root / "audio").mkdir()
    rng = np.random.default_rng(0)
    t = np.arange(int(FILE_S * SAMPLE_RATE_HZ)) / SAMPLE_RATE_HZ
    tracks, files = [], []
    for i in range(NUM_FILES):
        tone = 0.2 * np.sin(2 * np.pi * (110 * (i + 1)) * t)
        audio = np.stack([tone + 0.05 * rng.standard_normal(t.size), tone + 0.05 * rng.standard_normal(t.size)], 1)
        sf.write(root / "audio" / f"t{i}.flac", audio.astype(np.float32), SAMPLE_RATE_HZ, subtype="PCM_16")
        tracks.append({"track_id": f"t{i}", "isrc": "", "title": f"T{i}", "artist": "A", "rights_holder": "H",
                       "license_id": "L", "attribution": "", "genre": "", "tags": "", "description": ""})
        files.append({"track_id": f"t{i}", "role": "mixture", "instrument": "", "path": f"audio/t{i}.flac"})
    for name, rows in (("tracks", tracks), ("files", files)):
        with open(root / f"{name}.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    (root / "licenses.csv").write_text(
        "license_id,licensor,license_name,license_url,territories,valid_from,valid_until,ai_training,"
        "commercial_use,attribution_required\nL,X,X,,Worldwide,2020-01-01,,allowed,true,false\n")
    return root


def test_ingest_throughput(delivery, tmp_path):
    from pipelines.ingest import IngestConfig, run_ingest
    from provenance.workspace import Workspace

    paths = sorted(str(p) for p in (delivery / "audio").glob("*.flac"))
    rows = []
    for workers in (1, 2):
        results = {name: _throughput(fn, paths, workers) for name, fn in (("floor", _floor), ("naive", _naive),
                                                                            ("ours", _ours),
                                                                            ("ours, stem", _ours_stem))}
        for name, (per_cpu, per_wall) in results.items():
            rows.append((name, workers, per_cpu, per_wall, per_cpu / results["floor"][0], per_cpu / results["naive"][0]))
    audio_s = NUM_FILES * FILE_S
    for workers, options in ((1, ()), (2, ("--direct_num_workers=2", "--direct_running_mode=multi_processing"))):
        start = time.perf_counter()
        run_ingest(delivery, Workspace.at(tmp_path / f"w{workers}"), IngestConfig(beam_options=options))
        rows.append(("beam ingest (wall)", workers, float("nan"), audio_s / (time.perf_counter() - start),
                     float("nan"), float("nan")))
    print(f"\n{NUM_FILES} × {FILE_S:g} s stereo 44.1 kHz FLAC")
    print(f"{'method':<20}{'workers':>8}{'audio s/CPU s':>15}{'audio s/wall s':>16}{'÷ floor':>9}{'÷ naive':>9}")
    for name, workers, per_cpu, per_wall, vs_floor, vs_naive in rows:
        print(f"{name:<20}{workers:>8}{per_cpu:>15.1f}{per_wall:>16.1f}{vs_floor:>9.2f}{vs_naive:>9.2f}")
    steps = _breakdown(paths[0])
    decode_ms = steps[0][1]
    print(f"\nCPU time per {FILE_S:g} s file, by step (÷ decode: the floor's whole cost)")
    for name, ms in steps:
        print(f"{name:<30}{ms:>8.1f} ms{ms / decode_ms:>8.2f}")
    ours = [r for r in rows if r[0].startswith("ours")]
    assert all(r[2] > 0 for r in ours)
