"""Ingest throughput (issue: catalog ingest at production depth), in seconds of audio per CPU-second on
44.1 kHz stereo FLAC, against two baselines measured in the same run:

- floor: only decoding the files with soundfile, to float32 (the strict floor: no dtype decodes cheaper, the
  last line of the output shows int16, int32, float32 and float64), and ``floor, float64``: a user's plain
  ``soundfile.read(path)``, whose default dtype is float64; every ratio is printed against both;
- naive: what a user would write instead, a loop of librosa.load + pyloudnorm + hashlib.

``ours`` is ingest's per-file work on a mixture (``pipelines.stages.ingest.steps._measure_outcome``: decode, the
AudioFile measurements, true peak, DC offset, fingerprint); ``ours, stem`` the same without the fingerprint
(ingest fingerprints only mixtures). Each runs in a process pool of 1 and 2 workers; CPU time is summed
inside the workers, over ``ROUNDS`` passes over the files in which the methods take turns (a shared
machine's load then falls on every method alike). The compiled kernels (``cleaning.kernels``) are loaded once per worker before timing, as
ingest's Beam ``DoFn.setup`` does; their one-off cost is reported on its own (compiling from scratch, and
loading numba's on-disk cache in a fresh process), and the row ``ours + kernel load`` charges the cache
load of every worker to this small batch. ``beam`` is the whole ingest on the DirectRunner, wall-clock (pipeline start, the Great
Expectations checkpoints and their data docs included). A second table splits one file's CPU time by step.
"""

from __future__ import annotations

import concurrent.futures as cf
import csv
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

pytestmark = pytest.mark.bench

NUM_FILES = 8
ROUNDS = 3
FILE_S = 30.0
SAMPLE_RATE_HZ = 44100


def _floor(path: str) -> float:
    """The strict floor: decoding to float32, soundfile's cheapest dtype here (int16 and int32 cost the same:
    libFLAC's own decoding dominates, see the breakdown), which is also what ingest decodes to."""
    start = time.process_time()
    sf.read(path, dtype="float32", always_2d=True)
    return time.process_time() - start


def _floor_float64(path: str) -> float:
    """A user's plain ``soundfile.read(path)``: float64, soundfile's default dtype."""
    start = time.process_time()
    sf.read(path)
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
    from pipelines.stages.ingest.steps import _measure_outcome

    start = time.process_time()
    outcome = _measure_outcome(path)
    assert outcome["status"] == "accepted"
    return time.process_time() - start


def _ours_stem(path: str) -> float:
    from pipelines.stages.ingest.steps import _measure_outcome

    start = time.process_time()
    outcome = _measure_outcome(path, with_fingerprint=False)
    assert outcome["status"] == "accepted"
    return time.process_time() - start


def _breakdown(path: str, repeats: int = 3) -> list[tuple[str, float]]:
    """CPU ms per step of ``_measure_outcome`` on one file (BLAS and OpenMP on one thread, as ingest runs it)."""
    from threadpoolctl import threadpool_limits

    from cleaning.audio import read_audio
    from cleaning.fingerprint import fingerprint
    from cleaning.measure import measure_levels, measure_pcm_sha256
    from cleaning.quality import measure_true_peak_dbtp

    audio, rate = read_audio(path, contiguous=False)
    mono = measure_levels(audio, rate, with_mono=True).mono
    steps = [("decode (soundfile, float32)", lambda: read_audio(path, contiguous=False)),
             ("sha256 of the PCM", lambda: measure_pcm_sha256(audio)),
             ("one pass: loudness, peak, clipping, silence, DC, channel mean",
              lambda: measure_levels(audio, rate, with_mono=True)),
             ("true peak (Annex 2)", lambda: measure_true_peak_dbtp(audio, rate)),
             ("fingerprint (from the channel mean)", lambda: fingerprint(audio, rate, mono=mono))]
    out = []
    with threadpool_limits(1):
        for name, step in steps:
            step()
            start = time.process_time()
            for _ in range(repeats):
                step()
            out.append((name, (time.process_time() - start) / repeats * 1000))
    return out


def _decode_costs(path: str, repeats: int = 3) -> list[tuple[str, float]]:
    """CPU ms to decode one file with soundfile to each dtype: is any cheaper than float32?"""
    out = []
    for dtype in ("int16", "int32", "float32", "float64"):
        sf.read(path, dtype=dtype)
        start = time.process_time()
        for _ in range(repeats):
            sf.read(path, dtype=dtype)
        out.append((f"decode to {dtype}", (time.process_time() - start) / repeats * 1000))
    return out


_WARM = ("import json, time; t = time.process_time(); import cleaning.fingerprint, cleaning.kernels, "
         "cleaning.measure, cleaning.quality, cleaning.warmup; t1 = time.process_time(); "
         "wall = cleaning.warmup.warm_kernels(); "
         "print(json.dumps({'import_cpu_s': t1 - t, 'cpu_s': time.process_time() - t1, 'wall_s': wall}))")


def _kernel_load(cache_dir: Path) -> dict[str, float]:
    """Import, then warm the kernels in a fresh interpreter with numba's cache in ``cache_dir``: CPU seconds
    of the imports (``import_cpu_s``, paid by every method's workers alike) and of the warm-up alone."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache_dir)}
    done = subprocess.run([sys.executable, "-c", _WARM], env=env, capture_output=True, text=True, check=True,
                          cwd=Path(__file__).resolve().parents[2])
    return json.loads(done.stdout.strip().splitlines()[-1])


def _init_worker() -> None:
    from cleaning.warmup import warm_kernels

    warm_kernels()


def _throughputs(methods: dict, paths: list[str], workers: int, rounds: int = ROUNDS
                 ) -> dict[str, tuple[float, float]]:
    """{method: (audio seconds per CPU-second, audio seconds per wall-second)} over ``rounds`` passes over
    ``paths``, the methods taking turns in every round (so that a shared machine's load falls on all alike)."""
    cpu = dict.fromkeys(methods, 0.0)
    wall = dict.fromkeys(methods, 0.0)
    with cf.ProcessPoolExecutor(max_workers=workers, initializer=_init_worker) as pool:
        for fn in methods.values():
            list(pool.map(fn, paths[:workers]))  # warm the workers (imports, kernels)
        for _ in range(rounds):
            for name, fn in methods.items():
                start = time.perf_counter()
                cpu[name] += sum(pool.map(fn, paths))
                wall[name] += time.perf_counter() - start
    audio_s = rounds * len(paths) * FILE_S
    return {name: (audio_s / cpu[name], audio_s / wall[name]) for name in methods}


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
    from pipelines.stages.ingest.stage import IngestConfig, run_ingest
    from provenance.workspace import Workspace

    paths = sorted(str(p) for p in (delivery / "audio").glob("*.flac"))
    methods = {"floor": _floor, "floor, float64": _floor_float64, "naive": _naive, "ours": _ours,
               "ours, stem": _ours_stem}
    rows = []  # (method, workers, audio s per CPU s, audio s per wall s)
    for workers in (1, 2):
        results = _throughputs(methods, paths, workers)
        rows.extend((name, workers, per_cpu, per_wall) for name, (per_cpu, per_wall) in results.items())
    audio_s = NUM_FILES * FILE_S
    for workers, options in ((1, ()), (2, ("--direct_num_workers=2", "--direct_running_mode=multi_processing"))):
        start = time.perf_counter()
        run_ingest(delivery, Workspace.at(tmp_path / f"w{workers}"), IngestConfig(beam_options=options))
        rows.append(("beam ingest (wall)", workers, float("nan"), audio_s / (time.perf_counter() - start)))
    cold = _kernel_load(tmp_path / "numba-cache")  # empty cache: compiles every kernel
    cached = _kernel_load(tmp_path / "numba-cache")  # a fresh process loading what the first one cached
    for workers in (1, 2):  # this small batch pays the cache load once per worker
        ours = next(r for r in rows if r[0] == "ours" and r[1] == workers)
        per_cpu = 1.0 / (1.0 / ours[2] + workers * cached["cpu_s"] / audio_s)
        rows.append(("ours + kernel load", workers, per_cpu, float("nan")))

    def baseline(name: str, workers: int) -> float:
        return next(r[2] for r in rows if r[0] == name and r[1] == workers)

    print(f"\n{NUM_FILES} × {FILE_S:g} s stereo 44.1 kHz FLAC, {ROUNDS} rounds; floor: soundfile to float32 "
          f"(its cheapest dtype), floor64: soundfile's default float64")
    print(f"{'method':<20}{'workers':>8}{'audio s/CPU s':>15}{'audio s/wall s':>16}{'÷ floor':>9}{'÷ floor64':>11}"
          f"{'÷ naive':>9}")
    for name, workers, per_cpu, per_wall in rows:
        print(f"{name:<20}{workers:>8}{per_cpu:>15.1f}{per_wall:>16.1f}{per_cpu / baseline('floor', workers):>9.2f}"
              f"{per_cpu / baseline('floor, float64', workers):>11.2f}{per_cpu / baseline('naive', workers):>9.2f}")
    per_file_cpu_s = FILE_S / next(r for r in rows if r[0] == "ours" and r[1] == 1)[2]
    print(f"\nkernels (numba), once per process, not per file: compile from scratch {cold['cpu_s']:.2f} CPU s "
          f"({cold['wall_s']:.1f} s wall), load from the on-disk cache {cached['cpu_s']:.2f} CPU s "
          f"({cached['wall_s']:.1f} s wall) = the CPU time of {cached['cpu_s'] / per_file_cpu_s:.0f} files; "
          f"(imports {cached['import_cpu_s']:.1f} CPU s, as for every method)")
    steps = _breakdown(paths[0])
    decode_ms = steps[0][1]
    print(f"\nCPU time per {FILE_S:g} s file, by step (÷ decode: the floor's whole cost)")
    for name, ms in steps:
        print(f"{name:<62}{ms:>8.1f} ms{ms / decode_ms:>8.2f}")
    print(f"{'all steps':<62}{sum(ms for _, ms in steps):>8.1f} ms{sum(ms for _, ms in steps) / decode_ms:>8.2f}")
    decodes = ", ".join(f"{name[10:]} {ms:.1f} ms" for name, ms in _decode_costs(paths[0]))
    print(f"\nsoundfile's decode of the same file by output dtype: {decodes}")
    ours = [r for r in rows if r[0].startswith("ours")]
    assert all(r[2] > 0 for r in ours)
    assert cached["wall_s"] < cold["wall_s"]  # the on-disk cache is used
