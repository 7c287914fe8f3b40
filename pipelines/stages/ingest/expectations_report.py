"""What a data-quality validation found: ``ValidationReport`` and its ``ExpectationResult``s, read from
Great Expectations' results by ``pipelines.stages.ingest.expectations``.

``route_failures`` sorts failed expectations into row failures (for the integrator to turn into Rejections)
and table errors (for it to stop the run). Nothing here imports GX: the results are read by attribute.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd


@dataclass(frozen=True)
class ExpectationResult:
    """One expectation's outcome on one table.

    Attributes:
        table: the table (``tracks``, ``files``, ``licenses``, ``audio_files``, ``counts``).
        name: ``{expectation type}({column})``, the detail a Rejection carries.
        success: whether the expectation held.
        unexpected_count: rows that failed it (0 for table-level expectations).
        unexpected_index_list: the failing rows' index labels, all of them (``COMPLETE`` result format).
        observed_value: what a table-level expectation saw (e.g. ``False`` for a missing column), else None.
        exception: GX's message when the expectation could not run (e.g. its column is missing), else None.
    """

    table: str
    name: str
    success: bool
    unexpected_count: int = 0
    unexpected_index_list: tuple[Hashable, ...] = ()
    observed_value: Any = None
    exception: str | None = None


@dataclass(frozen=True)
class ValidationReport:
    """What a validation found.

    Attributes:
        suite_name: ``linernotes.delivery`` or ``linernotes.curated``.
        success: every expectation of every table held.
        results: every expectation's outcome, table by table (GX groups a table's expectations by kind).
        failed_rows: ``{table: {row index label: [expectation names]}}`` for row-level failures only.
            For ``expect_column_values_to_be_unique`` only the repeats are listed, not the first row with
            the value (ingest keeps the first row of a duplicated id and rejects the later ones).
        table_errors: table-level failures, e.g. ``"tracks: column license_id is missing"``; when not
            empty the table cannot be trusted row by row and the run should stop.
        data_docs_index: ``run_dir / "data_docs" / "index.html"``.
        elapsed_s: wall-clock seconds the validation took (GX import excluded).
    """

    suite_name: str
    success: bool
    results: list[ExpectationResult]
    failed_rows: dict[str, dict[Hashable, list[str]]]
    table_errors: list[str]
    data_docs_index: Path
    elapsed_s: float = 0.0
    row_counts: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable summary (row indices as they are; numpy scalars become Python ones)."""
        return {
            "suite_name": self.suite_name, "success": self.success, "table_errors": list(self.table_errors),
            "failed_rows": {t: {_plain(i): names for i, names in rows.items()} for t, rows in self.failed_rows.items()},
            "results": [{"table": r.table, "name": r.name, "success": r.success,
                         "unexpected_count": r.unexpected_count, "exception": r.exception} for r in self.results],
            "data_docs_index": str(self.data_docs_index), "row_counts": dict(self.row_counts),
        }


def expectation_result(table: str, result: Any, index_name: Hashable | None) -> ExpectationResult:
    """One GX ``ExpectationValidationResult`` of ``table`` → an ``ExpectationResult``, failing rows as index
    labels of the validated frame (whose index is named ``index_name``)."""
    config = result.expectation_config
    kwargs = config.kwargs
    columns = [kwargs[k] for k in ("column", "column_A", "column_B") if kwargs.get(k)] or list(kwargs.get("column_list") or [])
    details = result.result or {}
    messages = sorted(set(_exception_messages(result.exception_info)))
    return ExpectationResult(
        table=table, name=f"{config.type}({','.join(columns)})", success=bool(result.success),
        unexpected_count=int(details.get("unexpected_count") or 0),
        unexpected_index_list=tuple(_index_label(i, index_name) for i in details.get("unexpected_index_list") or ()),
        observed_value=details.get("observed_value"), exception="; ".join(messages) or None)


def route_failures(table: str, frame: pd.DataFrame, results: list[ExpectationResult]
                   ) -> tuple[dict[Hashable, list[str]], list[str]]:
    """Failed expectations → (row failures by index label, table errors).

    A missing column is one table error; the row-level expectations on that column, which cannot run,
    are not reported again. ``counts`` failures are table errors naming the table that lost records.
    """
    missing = {r.name[len("expect_column_to_exist("):-1] for r in results
               if not r.success and r.name.startswith("expect_column_to_exist(")}
    rows: dict[Hashable, list[str]] = {}
    errors: list[str] = []
    for r in results:
        if r.success:
            continue
        if r.name.startswith("expect_column_to_exist("):
            errors.append(f"{table}: column {r.name[len('expect_column_to_exist('):-1]} is missing")
            continue
        columns = set(r.name[r.name.index("(") + 1:-1].split(","))
        if r.exception is not None:
            if not columns & missing:
                errors.append(f"{table}: {r.name} could not run: {r.exception}")
            continue
        if table == "counts":
            for index in r.unexpected_index_list:
                values = {k: int(v) for k, v in frame.loc[index, ["input", "accepted", "rejected"]].items()}
                errors.append(f"counts: {index} fails {r.name}: {values}")
            continue
        indices = r.unexpected_index_list
        if r.name.startswith("expect_column_values_to_be_unique("):
            column = r.name[len("expect_column_values_to_be_unique("):-1]
            repeats = frame[column].notna() & frame[column].duplicated(keep="first")
            indices = tuple(i for i in indices if bool(repeats.loc[i]))
        if not indices:
            errors.append(f"{table}: {r.name} failed with no row to blame "
                          f"(observed {r.observed_value!r})")
        for index in indices:
            rows.setdefault(index, []).append(r.name)
    return rows, errors


def _exception_messages(info: Any) -> Iterable[str]:
    """GX's ``exception_info``: one ``{raised_exception, exception_message, ..}`` dict, or (when a metric
    failed) a dict of them keyed by metric id."""
    if not isinstance(info, Mapping):
        return
    if "raised_exception" in info:
        if info["raised_exception"]:
            yield str(info.get("exception_message") or "raised an exception")
        return
    for value in info.values():
        yield from _exception_messages(value)


def _index_label(entry: Any, index_name: Hashable | None) -> Hashable:
    """An ``unexpected_index_list`` entry → the row's index label. GX gives the label itself, or, for a
    named index on some expectations (column pairs), a dict of the row's values that holds the label."""
    if isinstance(entry, Mapping):
        return _plain(entry[index_name]) if index_name in entry else tuple(sorted(map(str, entry.items())))
    return _plain(entry)


def _plain(value: Any) -> Any:
    """numpy scalars → Python scalars (JSON- and dict-key-friendly)."""
    return value.item() if hasattr(value, "item") else value
