"""The ``attribute`` stage: which training recordings a query (a generation, any audio file) draws on, and who
holds their rights, by one of the methods of ``pipelines.attribution.methods``; the result stored in the lineage
store under the query's id.

Inputs (content ids): the query's decoded PCM (``sha256:``), the id the result is stored under (``gen-…`` or
``pcm-…``), the dataset, the checkpoint (white-box methods) and the catalog tables the shares are credited from.
The same query against the same index, method and config is ``cached``: attribution is deterministic, and the
stored rows of the earlier Run are the result.

A query whose sample peak is below ``silence_floor_dbfs`` (default -60 dBFS, shard's floor) is not scored: the
Run succeeds with no ranking, no shares and no stored Attribution rows, and says why (``no_attribution``:
``{"reason": "silent_query", "detail": ...}``; ``counts["no_attribution"]`` counts it by reason). Scores that are all
zero, all equal or undefined give the same kind of answer (``provenance.attribution.aggregate``): shares are money.

The query comes as a file (``select={"query": path}``) or, for callers that hold decoded audio (the HTTP API's
upload, a test), as ``options={"query_audio": (audio, sample_rate_hz)}``; ``options["query_id"]`` names the
result (default ``pcm-`` + 16 hex of the PCM's sha256). Light at import: the attribution methods (torch) load
when the stage runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.attribution.config import AttributeConfig
from pipelines.inputs import resolve_checkpoint, resolve_dataset
from pipelines.stage import Resources, Stage, StageContext, StageOutput, StageResult, run_stage
from provenance.workspace import Workspace

STAGE = "attribute"


class AttributeStage(Stage):
    """The attribute stage on the contract: a query's audio (+ a dataset, a checkpoint) → stored attribution."""

    name = STAGE
    version = "2"  # 2: silent queries and all-zero / all-equal / undefined scores give no shares
    resources = Resources(engine="local", cpus=1.0)
    reads = ("query", "query_id", "dataset", "checkpoint", "catalog")
    writes = ("attribution",)

    config_model = AttributeConfig

    def inputs(self, ctx: StageContext, config: Any) -> dict[str, str]:
        """Decode the query (kept in ``ctx.prepared`` for ``run``), resolve the dataset and checkpoint.

        Raises:
            FileNotFoundError: no query file. cleaning.audio.AudioDecodeError: not decodable audio.
            MissingInputError: no dataset or checkpoint. ValueError: a checkpoint of another dataset.
        """
        from cleaning.measure import measure_pcm_sha256

        audio, sample_rate_hz = _query_audio(ctx)
        pcm_sha256 = measure_pcm_sha256(audio)
        query_id = ctx.options.get("query_id") or "pcm-" + pcm_sha256[:16]
        dataset_id = ctx.select.get("dataset")
        found: dict[str, str] = {"query": "sha256:" + pcm_sha256, "query_id": query_id}
        checkpoint = None
        if config.method != "embedding":
            checkpoint = resolve_checkpoint(ctx.store, ctx.workspace, ctx.select.get("checkpoint"))
            if dataset_id is not None and checkpoint["dataset_id"] != dataset_id:
                raise ValueError(f"checkpoint {checkpoint['checkpoint_id']} was trained on {checkpoint['dataset_id']}, "
                                 f"not {dataset_id}: pass --checkpoint with one trained on it")
            dataset_id = checkpoint["dataset_id"]
            found["checkpoint"] = checkpoint["checkpoint_id"]
        dataset = resolve_dataset(ctx.store, ctx.workspace, dataset_id)
        found.update(dataset=dataset["dataset_id"], catalog=credit_tables_id(ctx.workspace))
        ctx.prepared.update(audio=audio, sample_rate_hz=sample_rate_hz, checkpoint=checkpoint)
        return found

    def run(self, ctx: StageContext, config: Any) -> StageOutput:
        """Score the query with the method and store its ranked segments and shares — or, for a silent query or
        scores that cannot be shared (see the module docstring), store none (replacing any earlier result of the
        same query and method) and report why. Either way the Run succeeds."""
        from provenance.attribution import AttributionResult

        query_id, dataset_id = ctx.inputs["query_id"], ctx.inputs["dataset"]
        silent = silent_query_reason(ctx.prepared["audio"], config.silence_floor_dbfs)
        if silent is not None:
            ctx.say(f"attribute: nothing to attribute ({silent.detail})")
            result = AttributionResult.unattributed(config.method, query_id, dataset_id, silent)
        else:
            from pipelines.attribution.methods import load_attributor

            attributor = load_attributor(ctx.workspace, config.method, dataset_id=dataset_id,
                                         checkpoint=ctx.prepared["checkpoint"], config=config.index_config(),
                                         settings=config.unlearning_settings(), progress=ctx.progress)
            result = attributor.attribute(ctx.prepared["audio"], ctx.prepared["sample_rate_hz"], query_id,
                                          top_k=config.top_k, text=config.prompt)
        ctx.store.add_attributions(query_id, config.method, ctx.run_id, dataset_id, result.rows())
        path = ctx.workspace.run_dir(ctx.run_id) / "attribution.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(result.to_json() + "\n")
        why = result.no_attribution
        counts = {"segments": len(result.segments), "tracks": len(result.tracks),
                  "rights_holders": len(result.rights_holders),
                  "no_attribution": {why.reason: 1} if why is not None else {}}
        return StageOutput(outputs={"attribution": str(path)}, counts=counts, details=result.to_dict())


ATTRIBUTE = AttributeStage()


def silent_query_reason(audio: np.ndarray, floor_dbfs: float) -> Any:
    """A ``provenance.attribution.NoAttribution`` (``silent_query``) when the query's sample peak is below
    ``floor_dbfs``, else None.

    Args:
        audio: float32 ``(channels, samples)``, full scale 1.0.
        floor_dbfs: the silence floor, dBFS (``AttributeConfig.silence_floor_dbfs``).
    """
    from cleaning.measure import measure_peak_dbfs
    from provenance.attribution import NoAttribution

    peak_dbfs = measure_peak_dbfs(np.asarray(audio, dtype=np.float32))
    if peak_dbfs >= floor_dbfs:
        return None
    return NoAttribution("silent_query", f"peak {peak_dbfs:.1f} dBFS is below the floor of {floor_dbfs:g} dBFS")


def credit_tables_id(workspace: Workspace) -> str:
    """Content id of the catalog tables attribution credits from (tracks, licences); ``none`` without them."""
    from pipelines.catalog import catalog_id

    try:
        return catalog_id(workspace, ("tracks", "licenses"))
    except FileNotFoundError:
        return "none"


def _query_audio(ctx: StageContext) -> tuple[np.ndarray, int]:
    """float32 ``(channels, samples)`` query audio and its rate: ``options["query_audio"]`` or the file
    ``select["query"]``."""
    from cleaning.audio import read_audio

    given = ctx.options.get("query_audio")
    if given is not None:
        audio, sample_rate_hz = given
        return np.asarray(audio, dtype=np.float32), int(sample_rate_hz)
    path = ctx.select.get("query")
    if not path:
        raise ValueError("the attribute stage needs a query: an audio file (select query=PATH)")
    if not Path(path).is_file():
        raise FileNotFoundError(f"no audio file at {path}")
    return read_audio(path)


# callers' entry points ------------------------------------------------------------------------------------

@dataclass
class AttributeJobResult:
    """An attribute stage result with its ``provenance.attribution.AttributionResult`` (``result``)."""

    run_id: str
    query_id: str
    dataset_id: str
    result: Any  # provenance.attribution.AttributionResult
    stage_result: StageResult | None = field(default=None, repr=False)

    @property
    def status(self) -> str:
        return self.stage_result.status if self.stage_result is not None else "ran"

    def to_json(self) -> dict[str, Any]:
        """The stage contract's shape with the attribution (method, query_id, segments, tracks, rights_holders)."""
        if self.stage_result is not None:
            return self.stage_result.to_json()
        return {"stage": STAGE, "run_id": self.run_id, **self.result.to_dict()}

    @classmethod
    def from_stage(cls, stage_result: StageResult) -> "AttributeJobResult":
        result = attribution_from_dict(stage_result.details)
        return cls(stage_result.run_id, result.query_id, result.dataset_id, result, stage_result)


def attribution_from_dict(payload: dict[str, Any]) -> Any:
    """``AttributionResult.to_dict()`` back into an ``AttributionResult`` (for a cached result's summary)."""
    from provenance.attribution import (
        AttributionResult,
        NoAttribution,
        RightsHolderShare,
        ScoredSegment,
        TrackShare,
    )

    why = payload.get("no_attribution")
    segment_fields = {f.name for f in dataclasses.fields(ScoredSegment)}
    track_fields = {f.name for f in dataclasses.fields(TrackShare)}
    return AttributionResult(
        method=payload["method"], query_id=payload["query_id"], dataset_id=payload["dataset_id"],
        segments=tuple(ScoredSegment(**{k: v for k, v in s.items() if k in segment_fields})
                       for s in payload["segments"]),
        tracks=tuple(TrackShare(**{k: v for k, v in t.items() if k in track_fields}) for t in payload["tracks"]),
        rights_holders=tuple(RightsHolderShare(r["rights_holder"], r["share"], tuple(r["track_ids"]))
                             for r in payload["rights_holders"]),
        no_attribution=NoAttribution(why["reason"], why["detail"]) if why else None)


def run_attribute(workspace: Workspace, audio: np.ndarray, sample_rate_hz: int, query_id: str,
                  dataset_id: str | None = None, top_k: int = 10, store: Any = None,
                  progress: Callable[[str, int, int], None] | None = None, method: str = "embedding",
                  checkpoint_id: str | None = None, text: str = "", index_config: Any = None,
                  unlearning: Any = None, *, engine: Any = None, parent_run_id: str | None = None,
                  force: bool = False, lock: Any = None) -> AttributeJobResult:
    """Attribute audio (float32 ``(channels, samples)``) with ``method`` through the stage runner; store the result
    under ``query_id``.

    ``embedding`` needs a dataset (default the newest); ``dtrak`` and ``unlearning`` need a checkpoint (default the
    newest, which must then be trained on ``dataset_id`` when that is given) and attribute to its dataset. A missing
    index is built first (cached in the workspace; ``progress`` is called as ``("indexing segments" | "D-TRAK
    features", done, total)``). See ``pipelines.attribution.methods``.

    Args:
        store: ignored (the runner opens the lineage store); kept for callers that pass theirs.
        text: the query's prompt (``""``: unknown), the condition of the white-box methods' losses.
        index_config: a ``pipelines.attribution.stage.IndexConfig`` (default ``IndexConfig()``).
        unlearning: ``pipelines.attribution.methods.UnlearningSettings`` (default settings).
        parent_run_id, lock: the Run this attribution belongs to and the workspace lock it holds (see
            :func:`pipelines.stage.run_stage`).

    Raises:
        ValueError: unknown method; a checkpoint of another dataset.
        MissingInputError: no dataset or checkpoint.
        provenance.locks.LockHeld: another run holds the workspace.
    """
    config = attribute_config(method=method, top_k=top_k, prompt=text, index_config=index_config,
                              unlearning=unlearning)
    result = run_stage(ATTRIBUTE, workspace, config, engine=engine, progress=progress, force=force,
                       select={"dataset": dataset_id, "checkpoint": checkpoint_id},
                       options={"query_audio": (audio, sample_rate_hz), "query_id": query_id},
                       parent_run_id=parent_run_id, lock=lock)
    return AttributeJobResult.from_stage(result)


def run_attribute_file(workspace: Workspace, path: str | Path, dataset_id: str | None = None,
                       top_k: int = 10, progress: Callable[[str, int, int], None] | None = None,
                       method: str = "embedding", checkpoint_id: str | None = None, text: str = "",
                       index_config: Any = None, unlearning: Any = None) -> AttributeJobResult:
    """Attribute any audio file with ``method`` (see ``run_attribute``); its query id is ``pcm-`` + 16 hex of the
    sha256 of its decoded PCM.

    Raises:
        FileNotFoundError: no such file. cleaning.audio.AudioDecodeError: not decodable audio.
    """
    config = attribute_config(method=method, top_k=top_k, prompt=text, index_config=index_config,
                              unlearning=unlearning)
    result = run_stage(ATTRIBUTE, workspace, config, progress=progress,
                       select={"query": str(path), "dataset": dataset_id, "checkpoint": checkpoint_id})
    return AttributeJobResult.from_stage(result)


def attribute_config(method: str = "embedding", top_k: int = 10, prompt: str = "", index_config: Any = None,
                     unlearning: Any = None) -> Any:
    """An ``AttributeConfig`` from the keyword form the callers use (an ``IndexConfig``, ``UnlearningSettings``).

    Raises:
        pydantic.ValidationError (a ValueError): an unknown method, ``top_k < 1``.
    """
    values: dict[str, Any] = {"method": method, "top_k": top_k, "prompt": prompt}
    if index_config is not None:
        values.update(index_config.model_dump())
    if unlearning is not None:
        values.update(dataclasses.asdict(unlearning))
    return AttributeConfig(**values)
