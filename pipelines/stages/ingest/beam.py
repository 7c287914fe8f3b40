"""The Beam adapters of the ingest stage: thin ``DoFn``s over the pure per-record steps of
``pipelines.stages.ingest.steps``, and the graph that wires them (``build_pipeline``). The driver
(``pipelines.stages.ingest.stage``) builds the pipeline on the engine's runner (``pipelines.engines.Engine.beam_pipeline``) and imports this module only when it runs.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from pipelines import quiet_beam_import_warnings

quiet_beam_import_warnings()

import apache_beam as beam  # noqa: E402

from cleaning.warmup import warm_kernels  # noqa: E402
from pipelines.stages.ingest.delivery import Delivery  # noqa: E402
from pipelines.stages.ingest.config import IngestConfig  # noqa: E402
from pipelines.stages.ingest.steps import decide_tracks, finalize_track, measure_file, route_files  # noqa: E402
from provenance.policy import OptOutRegistry  # noqa: E402

__all__ = ["ROWS_FILE", "build_pipeline"]


class _Tagged(beam.DoFn):
    """Runs a pure generator of ``(tag, value)`` and routes values to tagged outputs."""

    def __init__(self, fn: Callable[..., Iterable[tuple[str, Any]]], main_tag: str, **kwargs: Any) -> None:
        self.fn, self.main_tag, self.kwargs = fn, main_tag, kwargs

    def process(self, element: Any):  # noqa: ANN201 (Beam signature)
        for tag, value in self.fn(element, **self.kwargs):
            yield value if tag == self.main_tag else beam.pvalue.TaggedOutput(tag, value)


class _Measure(beam.DoFn):
    """``measure_file`` per ``(track_id, task)``; ``setup`` compiles (or loads from numba's cache) the
    measurement kernels once per worker, so no file pays for it."""

    def __init__(self, run_id: str, cache_dir: Path | None, fingerprints_dir: Path | None) -> None:
        self.run_id, self.cache_dir, self.fingerprints_dir = run_id, cache_dir, fingerprints_dir

    def setup(self) -> None:
        warm_kernels()

    def process(self, element: tuple[str, Mapping[str, Any]]):  # noqa: ANN201 (Beam signature)
        track_id, task = element
        yield track_id, measure_file(track_id, task, self.run_id, self.cache_dir, self.fingerprints_dir)


def _decide(element, **kw):
    track_id, rows = element
    yield from decide_tracks(track_id, list(rows), **kw)


def _route(element, **kw):
    track_id, grouped = element
    yield from route_files(track_id, list(grouped["decision"]), list(grouped["rows"]), **kw)


def _finalize(element, **kw):
    track_id, grouped = element
    decisions = list(grouped["decision"])
    yield from finalize_track(track_id, decisions[0] if decisions else None, list(grouped["measured"]), **kw)


ROWS_FILE = "rows"
"""The prefix of the pipeline's output files under ``staging``: JSON lines of every output table, each line
``<table>\t<row as JSON>`` (``tracks``, ``audio_files``, ``rejections``)."""


def _to_json_line(row: Mapping[str, Any], table: str) -> str:
    return table + "\t" + json.dumps(row, sort_keys=True, ensure_ascii=False, default=str)


def build_pipeline(pipeline: beam.Pipeline, delivery: Delivery, licenses: Mapping[str, Mapping[str, Any]],
                   config: IngestConfig, opt_outs: OptOutRegistry, mixtures_dir: Path, staging: Path,
                   run_id: str, measure_cache_dir: Path | None = None,
                   prerejected: Mapping[str, str] | None = None, fingerprints_dir: Path | None = None) -> None:
    """Wire the ingest graph into ``pipeline``; outputs go to JSON-lines files under ``staging`` (``ROWS_FILE``).

    ``fingerprints_dir``: where the mixtures' fingerprints are written (``steps.write_fingerprint``; shared storage
    on a distributed runner, like ``mixtures_dir``), so that the rows the pipeline moves carry a path, not the
    fingerprint.

    ``prerejected`` ({track id: reason}) names tracks rejected before the pipeline (by the expectation
    checks), so that their files are rejected ``track_rejected`` with that reason.
    """
    run = config.run_purpose()
    decided = (
        pipeline
        | "Tracks" >> beam.Create(delivery.tracks)
        | "KeyTracks" >> beam.Map(lambda r: (r.get("track_id", ""), r))
        | "GroupTracks" >> beam.GroupByKey()
        | "Decide" >> beam.ParDo(_Tagged(_decide, "decision", licenses=licenses, run=run, opt_outs=opt_outs,
                                         delivery_id=delivery.delivery_id, run_id=run_id))
        .with_outputs("rejection", main="decision")
    )
    early = (
        pipeline
        | "Prerejected" >> beam.Create(sorted((prerejected or {}).items()))
        | "AsDecisions" >> beam.MapTuple(lambda track_id, reason: (track_id, {"status": "rejected", "reason": reason}))
    )
    decisions = (decided.decision, early) | "AllDecisions" >> beam.Flatten()
    files = (
        pipeline
        | "Files" >> beam.Create(delivery.files)
        | "KeyFiles" >> beam.Map(lambda r: (r.get("track_id", ""), r))
    )
    routed = (
        {"decision": decisions, "rows": files}
        | "JoinFiles" >> beam.CoGroupByKey()
        | "Route" >> beam.ParDo(_Tagged(_route, "measure", root=delivery.root, run_id=run_id))
        .with_outputs("rejection", main="measure")
    )
    measured = (
        routed.measure
        | "Spread" >> beam.Reshuffle()
        | "Measure" >> beam.ParDo(_Measure(run_id, measure_cache_dir, fingerprints_dir))
    )
    final = (
        {"decision": decided.decision, "measured": measured}
        | "JoinMeasured" >> beam.CoGroupByKey()
        | "Finalize" >> beam.ParDo(_Tagged(_finalize, "track", mixtures_dir=mixtures_dir, run_id=run_id,
                                           stem_length_tolerance_samples=config.stem_length_tolerance_samples,
                                           max_stem_residual_db=config.max_stem_residual_db,
                                           fingerprints_dir=fingerprints_dir))
        .with_outputs("audio_file", "rejection", main="track")
    )
    # one sink for the three tables: a WriteToText is ~10 transforms and ~0.25 s of a small run's fixed cost
    rejections = (decided.rejection, routed.rejection, final.rejection) | "AllRejections" >> beam.Flatten()
    lines = [pcoll | f"Json{name}" >> beam.Map(_to_json_line, name)
             for name, pcoll in (("tracks", final.track), ("audio_files", final.audio_file), ("rejections", rejections))]
    (lines
     | "AllRows" >> beam.Flatten()
     | "Write" >> beam.io.WriteToText(str(staging / ROWS_FILE), file_name_suffix=".jsonl"))
