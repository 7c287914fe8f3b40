"""The Great Expectations worker process: the same reports as in-process, Data Docs written, errors raised with the
worker's message, a dead worker named and replaced, one idle worker kept per process, none left after a CLI run."""

import dataclasses
import os
import select
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.stages.ingest import expectations_worker
from pipelines.stages.ingest.delivery import read_delivery
from pipelines.stages.ingest.expectations import (
    CURATED_SUITE,
    DELIVERY_SUITE,
    delivery_frames,
    validate_curated,
    validate_delivery,
)
from pipelines.stages.ingest.expectations_worker import ExpectationsWorker, ExpectationsWorkerError
from tests.pipelines.test_expectations import COUNTS, CORPUS, good_audio_files

LINERNOTES = str(Path(sys.executable).with_name("linernotes"))


@pytest.fixture(scope="module")
def worker():
    started = ExpectationsWorker()
    yield started
    started.close()


def _broken_delivery_rows():
    delivery = read_delivery(CORPUS)
    tracks = [dict(row) for row in delivery.tracks]
    tracks[1]["track_id"] = tracks[0]["track_id"]  # a repeated id
    tracks[2]["isrc"] = "NOT-AN-ISRC"
    licenses = [dict(row) for row in delivery.licenses]
    licenses[0]["valid_from"] = "2024-02-30"  # no such day
    return {"tracks": tracks, "files": delivery.files, "licenses": licenses}


def _same(a, b):
    assert a.success == b.success
    assert a.failed_rows == b.failed_rows
    assert a.table_errors == b.table_errors
    assert [(r.table, r.name, r.success, r.unexpected_count) for r in a.results] == \
        [(r.table, r.name, r.success, r.unexpected_count) for r in b.results]


def test_the_worker_reports_what_the_in_process_suites_report_and_writes_the_data_docs(worker, tmp_path):
    import pandas as pd

    rows = _broken_delivery_rows()
    run_dir = tmp_path / "run-worker"
    number = worker.submit("delivery", {"tables": rows, "run_dir": str(run_dir)})
    audio_files = good_audio_files()
    audio_files.loc[1, "sample_rate_hz"] = 12345
    curated = worker.submit("curated", {"audio_files": audio_files.to_dict("records"), "counts": COUNTS,
                                        "run_dir": str(run_dir)})
    in_worker, curated_in_worker = worker.report(number), worker.report(curated)

    in_process = validate_delivery(delivery_frames(dataclasses.replace(read_delivery(CORPUS), **rows)),
                                   tmp_path / "run-here")
    _same(in_worker, in_process)
    assert set(in_worker.failed_rows) == {"tracks", "licenses"}  # the broken rows are named, by position
    assert 1 in in_worker.failed_rows["tracks"] and 2 in in_worker.failed_rows["tracks"]
    _same(curated_in_worker, validate_curated(pd.DataFrame(audio_files), COUNTS, tmp_path / "run-here"))
    assert not curated_in_worker.success

    worker.wait_docs()
    index = (run_dir / "data_docs" / "index.html").read_text(encoding="utf-8")
    assert in_worker.data_docs_index == (run_dir / "data_docs" / "index.html").resolve()
    for name in (f"{DELIVERY_SUITE}.tracks", f"{DELIVERY_SUITE}.licenses", f"{CURATED_SUITE}.audio_files"):
        assert name in index
    assert len(list((run_dir / "data_docs" / "validations").rglob("*.html"))) == 5
    assert worker.idle


def test_a_failed_request_raises_the_workers_error_and_the_worker_goes_on(worker, tmp_path):
    number = worker.submit("catalogue", {"run_dir": str(tmp_path)})
    with pytest.raises(ExpectationsWorkerError, match="unknown validation 'catalogue'"):
        worker.report(number)
    number = worker.submit("curated", {"audio_files": good_audio_files().to_dict("records"), "counts": COUNTS,
                                       "run_dir": str(tmp_path)})
    assert worker.report(number).success
    worker.wait_docs()


def test_a_worker_that_dies_is_named_and_the_pool_replaces_it(tmp_path):
    dying = expectations_worker.acquire()
    os.kill(dying.process.pid, signal.SIGKILL)
    dying.process.wait()
    with pytest.raises(ExpectationsWorkerError, match=rf"pid {dying.process.pid}\) exited with code -9"):
        dying.report(dying.submit("curated", {"audio_files": [], "counts": COUNTS, "run_dir": str(tmp_path)}))
    expectations_worker.release(dying)  # dead: closed, not kept

    fresh = expectations_worker.acquire()
    try:
        assert fresh is not dying and fresh.alive
        number = fresh.submit("curated", {"audio_files": good_audio_files().to_dict("records"), "counts": COUNTS,
                                          "run_dir": str(tmp_path)})
        assert fresh.report(number).success
        fresh.wait_docs()
    finally:
        expectations_worker.release(fresh)


def test_one_idle_worker_is_kept_and_a_second_caller_gets_its_own():
    first = expectations_worker.acquire()
    second = expectations_worker.acquire()  # the first is out: a new one
    assert second is not first
    expectations_worker.release(first)
    expectations_worker.release(second)  # one idle worker is enough: closed
    assert first.alive and not second.alive
    assert expectations_worker.acquire() is first
    expectations_worker.release(first)


def _workers_of(workdir: Path) -> list[int]:
    """Live worker processes started by a run whose LINERNOTES_WORKDIR is ``workdir``."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if "expectations_worker" not in (proc / "cmdline").read_bytes().decode(errors="replace"):
                continue
            if f"LINERNOTES_WORKDIR={workdir}".encode() in (proc / "environ").read_bytes().split(b"\0"):
                found.append(int(proc.name))
        except (OSError, ValueError):
            continue
    return found


def test_the_cli_leaves_no_worker_behind_whether_it_ingests_or_finds_the_run_cached(tmp_path):
    """From a folder holding another `pipelines` package, as a user project may."""
    import soundfile as sf

    from tests.bench.catalog import write_tables
    from tests.conftest import sine

    delivery = tmp_path / "delivery"
    delivery.mkdir()
    sf.write(delivery / "a.wav", sine(440.0, 2.0, 22050).T, 22050)
    write_tables(delivery, [("a", "a.wav")])
    env = {**os.environ, "LINERNOTES_WORKDIR": str(tmp_path / "work")}
    decoy = tmp_path / "project"  # a user's own `pipelines` package in the working directory is not imported
    (decoy / "pipelines").mkdir(parents=True)
    (decoy / "pipelines" / "__init__.py").write_text("raise SystemExit('the wrong pipelines package')\n")
    for expected in ("ran", "cached"):
        done = subprocess.run([LINERNOTES, "ingest", str(delivery), "--json"], env=env, capture_output=True,
                              text=True, timeout=300, cwd=decoy)
        assert done.returncode == 0, done.stderr
        assert f'"status": "{expected}"' in done.stdout
        assert _workers_of(tmp_path / "work") == []


def test_a_request_larger_than_a_pipe_is_taken_while_the_worker_imports_gx(tmp_path):
    delivery = read_delivery(CORPUS)
    tracks = [{**row, "track_id": f"{row['track_id']}-{i}"} for i in range(400) for row in delivery.tracks]
    fresh = ExpectationsWorker()  # still importing GX: it reads nothing for seconds
    try:
        number = fresh.submit("delivery", {"tables": {"tracks": tracks, "files": delivery.files,
                                                      "licenses": delivery.licenses}, "run_dir": str(tmp_path)})
        writer = fresh._writer  # the frame goes out from a thread of its own, and the worker takes it at once:
        writer.join(timeout=60)  # its reader runs while GX is imported, so nothing is answered yet
        assert not writer.is_alive() and fresh._send_error is None
        assert select.select([fresh.process.stdout], [], [], 0)[0] == []
        report = fresh.report(number)
        assert report.row_counts["tracks"] == len(tracks) > 2000 and report.failed_rows == {}
        fresh.wait_docs()
    finally:
        fresh.close()
