"""Data-quality expectations (Great Expectations 1.x) for a delivery's tables and the curated catalog.

Two suite families, each one GX suite per table (a GX suite validates one batch, i.e. one DataFrame):

- ``linernotes.delivery.{tracks,files,licenses}``: the delivery tables as read by
  ``pipelines.stages.ingest.delivery.read_delivery`` (see ``delivery_frames``), before any audio is read;
- ``linernotes.curated.{audio_files,counts}``: the curated ``audio_files`` table and the run's counts.

``validate_delivery`` and ``validate_curated`` run them as GX Checkpoints, then build the local HTML Data Docs
site in ``run_dir / "data_docs"`` once for all of a call's tables (the pages of this call's results and the
index; GX's ``UpdateDataDocsAction`` would rebuild the site once per table), and return a ``ValidationReport``:

- ``failed_rows[table][row_index]``: the names of the row-level expectations a row failed (from GX's
  ``unexpected_index_list``, ``result_format="COMPLETE"``), for the integrator to turn into Rejections;
- ``table_errors``: table-level failures (a missing column, counts that do not reconcile), each naming
  the table and the column, for the integrator to stop the run before any audio is read.

An expectation is named ``{expectation type}({column})``, e.g. ``expect_column_values_to_be_unique(track_id)``.

Values are normalised the way ingest parses them before they are checked (see ``prepare_delivery``):
cells are stripped and empty cells become nulls, ISRCs are upper-cased without hyphens or spaces,
``ai_training``/``commercial_use``/``attribution_required`` are lower-cased. Row-level expectations skip
nulls, so "empty or well-formed" is a format expectation alone and "required" adds a not-null one.

Cost (2 cores): importing GX takes 4–5 s of one core, once per process (the ingest stage pays it in its GX worker,
``pipelines.stages.ingest.expectations_worker``, beside its own start); one ephemeral GX context holds the suites,
the pandas data source and the checkpoints, built on first use and reused after. Then ~1,000 rows per
table take about 0.8 s for the delivery (three tables) and 0.6 s for the curated catalog, half of it rendering
the Data Docs (``_Validator.check`` and ``_Validator.build_docs`` apart: the worker answers before rendering).
Analytics and progress bars are off and GX's logger is quiet (errors only).

The context keeps validation results in memory, because a Data Docs index lists only the results its
store still holds; the results of the 16 most recently used ``data_docs`` folders are kept, older ones
dropped (validating again into an evicted folder rebuilds its index without the evicted results).
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import math
import os
import tempfile
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Hashable, Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from pipelines.stages.ingest.delivery import FILE_COLUMNS, LICENSE_COLUMNS, TRACK_COLUMNS, Delivery
from pipelines.stages.ingest.expectations_report import (
    ExpectationResult,
    ValidationReport,
    expectation_result,
    route_failures,
)
from provenance.policy import ISRC_PATTERN, normalize_isrc
from provenance.records import Role

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")  # read when GX is imported; must precede the import

import great_expectations as gx  # noqa: E402
from great_expectations.core.run_identifier import RunIdentifier  # noqa: E402
from great_expectations.data_context.types.resource_identifiers import ExpectationSuiteIdentifier  # noqa: E402
from great_expectations.data_context.types.base import (  # noqa: E402
    DataContextConfig, InMemoryStoreBackendDefaults, ProgressBarsConfig)

DELIVERY_SUITE = "linernotes.delivery"
CURATED_SUITE = "linernotes.curated"
DELIVERY_TABLES = ("tracks", "files", "licenses")
CURATED_TABLES = ("audio_files", "counts")

ISO_DATE_PATTERN = r"^\d{4}-\d{2}-\d{2}$"
ROLES = tuple(r.value for r in Role)
AI_TRAINING_VALUES = ("allowed", "denied")
BOOL_VALUES = ("true", "false")

STANDARD_SAMPLE_RATES_HZ = (8000, 11025, 16000, 22050, 24000, 32000, 44100, 48000, 88200, 96000, 176400, 192000)
MAX_DURATION_S = 3 * 3600.0
MAX_CHANNELS = 8  # up to 7.1; more is a decoder misreading interleaved samples as channels
MAX_PEAK_DBFS = 0.5
MIN_LOUDNESS_LUFS = -70.0  # the BS.1770 absolute gate: nothing gated in can be quieter
MAX_LOUDNESS_LUFS = 5.0
SHA256_PATTERN = r"^[0-9a-f]{64}$"
MEASUREMENT_COLUMNS = ("sha256", "sample_rate_hz", "num_channels", "num_samples", "duration_s", "peak_dbfs",
                       "loudness_lufs")
# the AUDIO_FILE columns the curated suite needs; not all of AUDIO_FILE, so that a field added to the
# record does not fail catalogs written before it
AUDIO_FILE_COLUMNS = ("track_id", "role", "instrument", "uri", *MEASUREMENT_COLUMNS)

_DOCS_SITE = "linernotes"
_KEEP_RESULTS_OF_SITES = 16  # validation results kept in memory per data docs site, oldest site evicted first


# suites -----------------------------------------------------------------------------------------------

def delivery_suite() -> dict[str, gx.ExpectationSuite]:
    """The delivery expectations, one suite per table (``tracks``, ``files``, ``licenses``).

    They mirror what ``pipelines.stages.ingest.delivery.parse_track``, ``parse_license`` and ``check_file_row`` accept,
    on values normalised by ``prepare_delivery``:

    - tracks: the ``TRACK_COLUMNS`` exist; ``track_id`` not null and unique; ``isrc`` null or ISO 3901
      (``CCXXXYYNNNNN``); ``license_id`` and ``rights_holder`` not null;
    - files: the ``FILE_COLUMNS`` exist; ``track_id`` and ``path`` not null; ``role`` one of the roles;
    - licenses: the ``LICENSE_COLUMNS`` exist; ``license_id`` not null and unique; ``valid_from`` and
      ``valid_until`` null or ``YYYY-MM-DD`` calendar dates; ``ai_training`` ``allowed`` or ``denied``;
      ``commercial_use`` and ``attribution_required`` ``true`` or ``false``.

    Note: ``provenance.policy.parse_bool`` also takes yes/no/1/0; this suite asks for true/false.
    """
    E = gx.expectations
    tracks = [
        *_columns_exist(TRACK_COLUMNS),
        E.ExpectColumnValuesToNotBeNull(column="track_id"),
        E.ExpectColumnValuesToBeUnique(column="track_id"),
        E.ExpectColumnValuesToMatchRegex(column="isrc", regex=ISRC_PATTERN,
                                         notes="ISO 3901, after upper-casing and removing hyphens and spaces"),
        E.ExpectColumnValuesToNotBeNull(column="license_id"),
        E.ExpectColumnValuesToNotBeNull(column="rights_holder"),
    ]
    files = [
        *_columns_exist(FILE_COLUMNS),
        E.ExpectColumnValuesToNotBeNull(column="track_id"),
        E.ExpectColumnValuesToBeInSet(column="role", value_set=list(ROLES)),
        E.ExpectColumnValuesToNotBeNull(column="path"),
    ]
    licenses = [
        *_columns_exist(LICENSE_COLUMNS),
        E.ExpectColumnValuesToNotBeNull(column="license_id"),
        E.ExpectColumnValuesToBeUnique(column="license_id"),
        *(expectation for column in ("valid_from", "valid_until") for expectation in (
            E.ExpectColumnValuesToMatchRegex(column=column, regex=ISO_DATE_PATTERN),
            E.ExpectColumnValuesToMatchStrftimeFormat(column=column, strftime_format="%Y-%m-%d",
                                                      notes="a real calendar date (no 2024-02-30)"))),
        E.ExpectColumnValuesToNotBeNull(column="ai_training"),
        E.ExpectColumnValuesToBeInSet(column="ai_training", value_set=list(AI_TRAINING_VALUES)),
        *(expectation for column in ("commercial_use", "attribution_required") for expectation in (
            E.ExpectColumnValuesToNotBeNull(column=column),
            E.ExpectColumnValuesToBeInSet(column=column, value_set=list(BOOL_VALUES)))),
    ]
    return {table: gx.ExpectationSuite(name=f"{DELIVERY_SUITE}.{table}", expectations=expectations)
            for table, expectations in (("tracks", tracks), ("files", files), ("licenses", licenses))}


def curated_suite() -> dict[str, gx.ExpectationSuite]:
    """The curated-catalog expectations: ``audio_files`` (an ``AUDIO_FILE`` table) and ``counts``.

    audio_files (on values prepared by ``prepare_audio_files``):

    - the ``AUDIO_FILE_COLUMNS`` exist; the measurements are not null (NaN is a measuring bug);
    - ``0 < duration_s ≤ 3 h``; ``sample_rate_hz`` a standard rate (8 kHz … 192 kHz);
    - ``1 ≤ num_channels ≤ 8``: up to 7.1 is a real delivery (the shard stage downmixes); more means a
      decoder read interleaved samples as channels;
    - ``peak_dbfs ≤ +0.5``: delivered files are at most full scale, but a mixture built as the float32 sum
      of its stems is kept unclipped and may peak a little above 0 dBFS; half a dB leaves room for that
      and still flags stems that do not add up to a mixture (``-inf``, digital silence, passes);
    - ``-70 ≤ loudness_lufs ≤ +5`` or ``-inf``: ``-inf`` (nothing above the BS.1770 absolute gate, or
      shorter than one 400 ms block) is checked as -70;
    - ``sha256`` is 64 lower-case hex digits.

    counts (from ``counts_frame``): for each input table, ``accepted + rejected = input``; no count negative.
    """
    E = gx.expectations
    audio_files = [
        *_columns_exist(AUDIO_FILE_COLUMNS),
        *(E.ExpectColumnValuesToNotBeNull(column=column) for column in MEASUREMENT_COLUMNS),
        E.ExpectColumnValuesToBeBetween(column="duration_s", min_value=0, max_value=MAX_DURATION_S,
                                        strict_min=True, notes="longer than 3 h is not one recording"),
        E.ExpectColumnValuesToBeInSet(column="sample_rate_hz", value_set=list(STANDARD_SAMPLE_RATES_HZ)),
        E.ExpectColumnValuesToBeBetween(column="num_channels", min_value=1, max_value=MAX_CHANNELS,
                                        notes="up to 7.1; more is a decoder misreading interleaved samples"),
        E.ExpectColumnValuesToBeBetween(column="peak_dbfs", max_value=MAX_PEAK_DBFS,
                                        notes="float32 sums of stems may exceed 0 dBFS slightly"),
        E.ExpectColumnValuesToBeBetween(column="loudness_lufs", min_value=MIN_LOUDNESS_LUFS,
                                        max_value=MAX_LOUDNESS_LUFS,
                                        notes="-inf (fully gated) is checked as -70 LUFS"),
        E.ExpectColumnValuesToMatchRegex(column="sha256", regex=SHA256_PATTERN),
    ]
    counts = [
        *_columns_exist(("input", "accepted", "rejected", "accounted")),
        E.ExpectColumnPairValuesToBeEqual(column_A="input", column_B="accounted",
                                          notes="accounted = accepted + rejected: nothing dropped silently"),
        *(E.ExpectColumnValuesToBeBetween(column=column, min_value=0)
          for column in ("input", "accepted", "rejected")),
    ]
    return {"audio_files": gx.ExpectationSuite(name=f"{CURATED_SUITE}.audio_files", expectations=audio_files),
            "counts": gx.ExpectationSuite(name=f"{CURATED_SUITE}.counts", expectations=counts)}


def _columns_exist(columns: Iterable[str]) -> list[Any]:
    return [gx.expectations.ExpectColumnToExist(column=column) for column in columns]


# frames -----------------------------------------------------------------------------------------------

def delivery_frames(delivery: Delivery) -> dict[str, pd.DataFrame]:
    """A delivery's row dicts → one DataFrame per table, index = position in ``delivery.tracks`` etc.

    Columns are the table's columns in delivery order (plus ``_row``, the CSV data row number), so a
    ``failed_rows`` index ``i`` is ``delivery.tracks[i]``.
    """
    return delivery_rows_frames({"tracks": delivery.tracks, "files": delivery.files, "licenses": delivery.licenses})


def delivery_rows_frames(rows: Mapping[str, list[Mapping[str, Any]]]) -> dict[str, pd.DataFrame]:
    """``delivery_frames`` of the row dicts of each table in ``rows`` (``tracks``, ``files``, ``licenses``)."""
    columns = {"tracks": TRACK_COLUMNS, "files": FILE_COLUMNS, "licenses": LICENSE_COLUMNS}
    return {table: _frame(table_rows, columns[table]) for table, table_rows in rows.items()}


def _frame(rows: list[Mapping[str, Any]], columns: tuple[str, ...]) -> pd.DataFrame:
    frame = pd.DataFrame(list(rows), dtype=object)
    if frame.empty:
        frame = pd.DataFrame(columns=[*columns, "_row"], dtype=object)
    return frame


def prepare_delivery(tables: Mapping[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """Copies of the delivery tables normalised as ingest parses them; index and columns unchanged.

    Every text cell is stripped and an empty one becomes null; ``isrc`` is upper-cased without hyphens
    or spaces (``provenance.policy.normalize_isrc``); ``ai_training``, ``commercial_use`` and
    ``attribution_required`` are lower-cased.
    """
    prepared = {}
    for table, frame in tables.items():
        out = frame.astype(object).copy()
        for column in out.columns:
            if column == "_row":
                continue
            out[column] = out[column].map(_clean_cell).astype(object)
        if table == "tracks" and "isrc" in out.columns:
            out["isrc"] = out["isrc"].map(lambda v: _none_if_empty(normalize_isrc(v)) if isinstance(v, str) else v)
        if table == "licenses":
            for column in ("ai_training", "commercial_use", "attribution_required"):
                if column in out.columns:
                    out[column] = out[column].map(lambda v: v.lower() if isinstance(v, str) else v)
        prepared[table] = out
    return prepared


def prepare_audio_files(audio_files: pd.DataFrame) -> pd.DataFrame:
    """A copy of an ``audio_files`` table with ``loudness_lufs = -inf`` (fully gated) set to -70 LUFS."""
    out = audio_files.copy()
    if "loudness_lufs" in out.columns:
        loudness = pd.to_numeric(out["loudness_lufs"], errors="coerce")
        out["loudness_lufs"] = loudness.where(loudness != -math.inf, MIN_LOUDNESS_LUFS)
    return out


def counts_frame(counts: Mapping[str, Any]) -> pd.DataFrame:
    """``IngestResult.counts`` (``{table: {"input", "accepted", "rejected", ...}}``) → a frame indexed by
    table with ``input, accepted, rejected, accounted = accepted + rejected``. Entries that are not a
    table's counts (``mixtures_built``) are left out."""
    rows = {table: {key: int(value[key]) for key in ("input", "accepted", "rejected")}
            for table, value in counts.items() if isinstance(value, Mapping) and "input" in value}
    frame = pd.DataFrame.from_dict(rows, orient="index", columns=["input", "accepted", "rejected"]).astype("int64")
    frame["accounted"] = frame["accepted"] + frame["rejected"]
    return frame


def _clean_cell(value: Any) -> Any:
    if isinstance(value, str):
        return _none_if_empty(value.strip())
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return value


def _none_if_empty(text: str) -> str | None:
    return text or None


# validation -------------------------------------------------------------------------------------------

def validate_delivery(tables: Mapping[str, pd.DataFrame], run_dir: Path) -> ValidationReport:
    """Check the delivery tables (``tracks``, ``files``, ``licenses``; raw, as from ``delivery_frames``).

    Runs ``delivery_suite`` as one GX Checkpoint per table and writes the HTML Data Docs into
    ``run_dir / "data_docs"``. Normalisation (``prepare_delivery``) happens here, on copies.

    Raises:
        KeyError: a table other than ``tracks``, ``files``, ``licenses`` is given (a programming error).
        ValueError: a frame's index repeats a label (``failed_rows`` are keyed by index label).
    """
    return _validator().validate(DELIVERY_SUITE, _delivery_tables(tables), Path(run_dir))


def _delivery_tables(tables: Mapping[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    unknown = sorted(set(tables) - set(DELIVERY_TABLES))
    if unknown:
        raise KeyError(f"validate_delivery takes tables {', '.join(DELIVERY_TABLES)}; got {', '.join(unknown)}")
    return prepare_delivery(tables)


def validate_curated(audio_files: pd.DataFrame, counts: Mapping[str, Any], run_dir: Path) -> ValidationReport:
    """Check the curated ``audio_files`` table and that ``counts`` reconcile (``IngestResult.counts`` form).

    Runs ``curated_suite`` as GX Checkpoints and writes the HTML Data Docs into ``run_dir / "data_docs"``
    (the same site as ``validate_delivery``'s: its index lists both).

    Raises:
        ValueError: ``audio_files``'s index repeats a label (``failed_rows`` are keyed by index label).
    """
    return _validator().validate(CURATED_SUITE, _curated_tables(audio_files, counts), Path(run_dir))


def _curated_tables(audio_files: pd.DataFrame, counts: Mapping[str, Any]) -> dict[str, pd.DataFrame]:
    return {"audio_files": prepare_audio_files(audio_files), "counts": counts_frame(counts)}


def check_in_worker(kind: str, payload: Mapping[str, Any]) -> tuple[ValidationReport, Any]:
    """What ``pipelines.stages.ingest.expectations_worker`` runs for a request: the checkpoints of ``kind``
    (``delivery``: ``payload["tables"]``, the row dicts of each delivery table; ``curated``:
    ``payload["audio_files_path"]``, an ``AUDIO_FILE`` Parquet table, or ``payload["audio_files"]``, rows with
    the ``AUDIO_FILE_COLUMNS``, and ``payload["counts"]``) for the run folder ``payload["run_dir"]``, without the
    Data Docs.

    Returns:
        (the report, a callable that renders its Data Docs pages).

    Raises:
        ValueError: ``kind`` is neither.
    """
    run_dir = Path(payload["run_dir"])
    if kind == "delivery":
        family, tables = DELIVERY_SUITE, _delivery_tables(delivery_rows_frames(payload["tables"]))
    elif kind == "curated":
        if "audio_files_path" in payload:
            frame = pd.read_parquet(payload["audio_files_path"], columns=list(AUDIO_FILE_COLUMNS))
        else:
            frame = pd.DataFrame(payload["audio_files"], columns=list(AUDIO_FILE_COLUMNS))
        family, tables = CURATED_SUITE, _curated_tables(frame, payload["counts"])
    else:
        raise ValueError(f"unknown validation {kind!r}: delivery or curated")
    validator = _validator()
    report, rendered = validator.check(family, tables, run_dir)
    return report, functools.partial(validator.build_docs, run_dir, rendered)


_VALIDATOR_LOCK = threading.Lock()


def _validator() -> _Validator:
    """The process's one GX context and its checkpoints, built on first use (thread-safe)."""
    with _VALIDATOR_LOCK:
        return _cached_validator()


@functools.cache
def _cached_validator() -> _Validator:
    return _Validator()


class _Validator:
    """An ephemeral GX context holding both suite families, one pandas data source, one whole-DataFrame
    batch definition, validation definition and checkpoint per table, and one local Data Docs site whose
    folder is pointed at each run's ``data_docs`` in turn (under a lock: one validation at a time)."""

    def __init__(self) -> None:
        logging.getLogger("great_expectations").setLevel(logging.ERROR)
        config = DataContextConfig(
            store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
            analytics_enabled=False,
            progress_bars=ProgressBarsConfig(globally=False, metric_calculations=False),
        )
        self.lock = threading.Lock()
        self.context = gx.get_context(project_config=config, mode="ephemeral")
        # the site's folder is set to the run's data_docs before each validation; this one is never written
        self.context.add_data_docs_site(_DOCS_SITE, self._site_config(Path(tempfile.gettempdir()) / "linernotes-gx"))
        source = self.context.data_sources.add_pandas("linernotes")
        self.checkpoints: dict[str, dict[str, gx.Checkpoint]] = {}
        self.site_results: OrderedDict[Path, list[Any]] = OrderedDict()
        for family, suites in ((DELIVERY_SUITE, delivery_suite()), (CURATED_SUITE, curated_suite())):
            self.checkpoints[family] = {}
            for table, suite in suites.items():
                asset = source.add_dataframe_asset(f"{family}.{table}")
                batch = asset.add_batch_definition_whole_dataframe(table)
                definition = self.context.validation_definitions.add(
                    gx.ValidationDefinition(name=suite.name, data=batch, suite=self.context.suites.add(suite)))
                self.checkpoints[family][table] = self.context.checkpoints.add(gx.Checkpoint(
                    name=suite.name, validation_definitions=[definition],
                    result_format={"result_format": "COMPLETE"}))

    @staticmethod
    def _site_config(directory: Path) -> dict[str, Any]:
        return {"class_name": "SiteBuilder", "show_how_to_buttons": False,
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
                "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(directory)}}

    def validate(self, family: str, tables: Mapping[str, pd.DataFrame], run_dir: Path) -> ValidationReport:
        """Run ``family``'s checkpoints on ``tables`` and build their Data Docs pages."""
        report, rendered = self.check(family, tables, run_dir)
        self.build_docs(run_dir, rendered)
        return report

    def check(self, family: str, tables: Mapping[str, pd.DataFrame], run_dir: Path
              ) -> tuple[ValidationReport, list[Any]]:
        """Run ``family``'s checkpoints on ``tables`` and keep the results for ``run_dir``'s Data Docs.

        Returns:
            (the report, the result and suite identifiers whose pages :meth:`build_docs` renders).
        """
        for table, frame in tables.items():
            if not frame.index.is_unique:
                raise ValueError(f"the {table} frame's index repeats labels; failed_rows are keyed by index label: "
                                 "reset_index(drop=True) first")
        docs_dir = (run_dir / "data_docs").resolve()
        run_id = RunIdentifier(run_name=run_dir.name or "run", run_time=dt.datetime.now(dt.timezone.utc))
        results: list[ExpectationResult] = []
        failed_rows: dict[str, dict[Hashable, list[str]]] = {}
        table_errors: list[str] = []
        rendered: list[Any] = []  # this call's results and their suites: the pages to (re)build
        with self.lock, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # GX and pandas deprecation chatter; failures are in the results
            started = time.perf_counter()
            for table, frame in tables.items():
                outcome = self.checkpoints[family][table].run(batch_parameters={"dataframe": frame}, run_id=run_id)
                for key, suite_result in outcome.run_results.items():
                    self._remember(docs_dir, key)
                    rendered += [key, ExpectationSuiteIdentifier(name=suite_result.suite_name)]
                    table_results = [expectation_result(table, r, frame.index.name) for r in suite_result.results]
                    results.extend(table_results)
                    rows, errors = route_failures(table, frame, table_results)
                    if rows:
                        failed_rows[table] = rows
                    table_errors.extend(errors)
            elapsed_s = time.perf_counter() - started
        report = ValidationReport(
            suite_name=family, success=all(r.success for r in results), results=results,
            failed_rows=failed_rows, table_errors=table_errors, data_docs_index=docs_dir / "index.html",
            elapsed_s=elapsed_s, row_counts={table: len(frame) for table, frame in tables.items()})
        return report, rendered

    def build_docs(self, run_dir: Path, rendered: list[Any]) -> None:
        """Render the pages of ``rendered`` (from :meth:`check`) and the index of ``run_dir / "data_docs"``: one
        incremental build for a call's tables, not one per checkpoint (GX's ``UpdateDataDocsAction``)."""
        docs_dir = (run_dir / "data_docs").resolve()
        with self.lock, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.context.update_data_docs_site(_DOCS_SITE, self._site_config(docs_dir))
            self.context.build_data_docs(site_names=[_DOCS_SITE], resource_identifiers=rendered)

    def _remember(self, docs_dir: Path, key: Any) -> None:
        """Keep a site's validation results while its index may be rebuilt (a site's index lists only the
        results still in the in-memory store); forget the oldest site's beyond ``_KEEP_RESULTS_OF_SITES``."""
        self.site_results.setdefault(docs_dir, []).append(key)
        self.site_results.move_to_end(docs_dir)
        while len(self.site_results) > _KEEP_RESULTS_OF_SITES:
            _, stale = self.site_results.popitem(last=False)
            store = self.context.validation_results_store
            for old_key in stale:
                if store.has_key(old_key):
                    store.remove_key(old_key)
