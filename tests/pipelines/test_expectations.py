"""The Great Expectations suites: the real corpus passes, broken rows are named, Data Docs are written."""

import math
from pathlib import Path

import pandas as pd
import pytest

from cleaning.measure import measure_audio
from pipelines.stages.ingest.delivery import read_delivery
from pipelines.stages.ingest.expectations import (
    AUDIO_FILE_COLUMNS,
    CURATED_SUITE,
    DELIVERY_SUITE,
    ISRC_PATTERN,
    curated_suite,
    delivery_frames,
    delivery_suite,
    validate_curated,
    validate_delivery,
)
from provenance.policy import check_isrc
from provenance.records import AUDIO_FILE
from tests.conftest import sine

CORPUS = Path(__file__).resolve().parents[2].parent / "shared" / "corpus"

UNIQUE_TRACK_ID = "expect_column_values_to_be_unique(track_id)"
ISRC_FORMAT = "expect_column_values_to_match_regex(isrc)"
LICENSE_ID_PRESENT = "expect_column_values_to_not_be_null(license_id)"


@pytest.fixture(scope="module")
def corpus_frames():
    if not (CORPUS / "tracks.csv").exists():
        pytest.fail(f"the real corpus is not at {CORPUS}: these tests need ../shared/corpus beside the repo")
    return delivery_frames(read_delivery(CORPUS))


def test_suites_cover_every_table_and_name_their_family():
    assert {name: s.name for name, s in delivery_suite().items()} == {
        t: f"{DELIVERY_SUITE}.{t}" for t in ("tracks", "files", "licenses")}
    assert set(curated_suite()) == {"audio_files", "counts"}
    assert all(s.name.startswith(CURATED_SUITE) for s in curated_suite().values())
    assert set(AUDIO_FILE_COLUMNS) <= set(AUDIO_FILE.names)  # the suite checks fields of the record


def test_isrc_pattern_agrees_with_the_rights_policy():
    import re

    for isrc in ("USRC17607839", "GBAYE6800011", "usrc17607839", "USRC1760783", "US-RC1-76-07839", "U1RC17607839"):
        assert (re.fullmatch(ISRC_PATTERN, isrc) is not None) == (check_isrc(isrc) is None), isrc


def test_the_real_corpus_passes_the_delivery_suite(corpus_frames, tmp_path):
    report = validate_delivery(corpus_frames, tmp_path)

    assert report.table_errors == []
    assert report.failed_rows == {}
    assert report.success
    assert report.row_counts == {t: len(f) for t, f in corpus_frames.items()}
    assert {r.table for r in report.results} == {"tracks", "files", "licenses"}
    assert report.elapsed_s < 5.0


def test_broken_track_and_licence_rows_are_named(corpus_frames, tmp_path):
    tracks = corpus_frames["tracks"].copy()
    first = tracks.iloc[0].to_dict()
    tracks.loc[0, "isrc"] = "us-rc1-76-07839"  # lower case with hyphens: valid once normalised
    n = len(tracks)
    tracks.loc[n] = {**first, "isrc": "", "_row": n + 1}  # repeats row 0's track_id
    tracks.loc[n + 1] = {**first, "track_id": "junk-isrc", "isrc": "NOT-AN-ISRC", "_row": n + 2}
    tracks.loc[n + 2] = {**first, "track_id": "no-licence", "license_id": "   ", "_row": n + 3}
    licenses = corpus_frames["licenses"].copy()
    licenses.loc[1, "valid_from"] = "01/02/2020"  # not ISO
    licenses.loc[2, "valid_until"] = "2024-02-30"  # ISO-shaped, not a date
    licenses.loc[3, "ai_training"] = "ALLOWED"  # normalised to lower case: fine

    report = validate_delivery({**corpus_frames, "tracks": tracks, "licenses": licenses}, tmp_path)

    assert not report.success
    assert report.table_errors == []
    assert report.failed_rows["tracks"] == {n: [UNIQUE_TRACK_ID], n + 1: [ISRC_FORMAT], n + 2: [LICENSE_ID_PRESENT]}
    assert report.failed_rows["licenses"] == {
        1: ["expect_column_values_to_match_regex(valid_from)", "expect_column_values_to_match_strftime_format(valid_from)"],
        2: ["expect_column_values_to_match_strftime_format(valid_until)"],
    }
    assert "files" not in report.failed_rows
    # GX itself flags every row holding a repeated value; failed_rows keeps the first (ingest's rule)
    unique = next(r for r in report.results if r.table == "tracks" and r.name == UNIQUE_TRACK_ID)
    assert set(unique.unexpected_index_list) == {0, n}


def test_a_missing_column_is_a_table_error_naming_it(corpus_frames, tmp_path):
    tracks = corpus_frames["tracks"].drop(columns=["license_id"])

    report = validate_delivery({"tracks": tracks}, tmp_path)

    assert not report.success
    assert report.table_errors == ["tracks: column license_id is missing"]
    assert report.failed_rows == {}  # the not-null check on the absent column is not blamed on rows


def good_audio_files():
    rows = []
    signals = [("a", "mixture", sine(440.0, 2.0, 44100, amplitude=0.5, num_channels=2), 44100),
               ("a", "vocals", sine(220.0, 2.0, 44100, amplitude=0.25), 44100),
               ("b", "mixture", sine(1000.0, 1.0, 48000, amplitude=0.9), 48000),
               ("c", "other", 0.0 * sine(1000.0, 1.0, 16000), 16000)]  # digital silence: -inf peak and loudness
    for track_id, role, audio, sample_rate_hz in signals:
        rows.append({"track_id": track_id, "role": role, "instrument": "", "uri": f"/x/{track_id}-{role}.wav",
                     "derived_from": "", "run_id": "r1", **measure_audio(audio, sample_rate_hz)})
    frame = pd.DataFrame(rows)
    assert math.isinf(frame.loc[3, "loudness_lufs"]) and math.isinf(frame.loc[3, "peak_dbfs"])
    return frame


COUNTS = {"tracks": {"input": 8, "accepted": 6, "rejected": 2, "rejected_by_reason": {"x": 2}},
          "files": {"input": 25, "accepted": 20, "rejected": 5, "rejected_by_reason": {"y": 5}},
          "licenses": {"input": 4, "accepted": 4, "rejected": 0, "rejected_by_reason": {}},
          "mixtures_built": 2}


def test_curated_suite_passes_good_audio_files_and_flags_bad_rows(tmp_path):
    good = good_audio_files()
    report = validate_curated(good, COUNTS, tmp_path)
    assert report.success, report.table_errors or report.failed_rows

    bad = good.copy()
    bad.loc[1, "sample_rate_hz"] = 12345
    bad.loc[2, "peak_dbfs"] = 3.0
    report = validate_curated(bad, COUNTS, tmp_path)

    assert not report.success
    assert report.table_errors == []
    assert report.failed_rows == {"audio_files": {1: ["expect_column_values_to_be_in_set(sample_rate_hz)"],
                                                  2: ["expect_column_values_to_be_between(peak_dbfs)"]}}


def test_counts_that_do_not_reconcile_fail(tmp_path):
    counts = {**COUNTS, "files": {"input": 25, "accepted": 19, "rejected": 5}}

    report = validate_curated(good_audio_files(), counts, tmp_path)

    assert not report.success
    assert len(report.table_errors) == 1
    assert report.table_errors[0].startswith("counts: files fails expect_column_pair_values_to_be_equal")
    assert "'input': 25, 'accepted': 19, 'rejected': 5" in report.table_errors[0]


def test_data_docs_are_written_into_the_run_folder(corpus_frames, tmp_path):
    run_dir = tmp_path / "run-1"
    delivery = validate_delivery(corpus_frames, run_dir)
    curated = validate_curated(good_audio_files(), COUNTS, run_dir)

    assert delivery.data_docs_index == curated.data_docs_index == (run_dir / "data_docs" / "index.html").resolve()
    index = delivery.data_docs_index.read_text(encoding="utf-8")
    for name in (f"{DELIVERY_SUITE}.tracks", f"{DELIVERY_SUITE}.licenses", f"{CURATED_SUITE}.audio_files"):
        assert name in index
    pages = list((run_dir / "data_docs" / "validations").rglob("*.html"))
    assert len(pages) == 5  # one per table validated

    other = validate_delivery(corpus_frames, tmp_path / "run-2")  # another run's site lists only its own
    other_index = other.data_docs_index.read_text(encoding="utf-8")
    assert f"{DELIVERY_SUITE}.tracks" in other_index and f"{CURATED_SUITE}.audio_files" not in other_index
