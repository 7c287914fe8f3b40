"""The ``clean`` stage: score every stem of the curated catalog, decide keep or drop, delete nothing.

Order of work:

1. **Explicit checks** (Ray, one task per track): decode the track's stems and mixture; silence, clipping and
   the stem's gain in its mixture (``cleaning.checks``), each a StemScore with its reason. The same task
   embeds every stem for FAD and cuts its unlearning windows, so each file is decoded once.
2. **Blind methods** on the stems that passed the checks, against the trusted reference set (the stems of
   ``reference_tracks``): per-stem FAD (``cleaning.blind.fad_stem_scores``) on the driver from the
   embeddings, and unlearning (``cleaning.blind.unlearning_stem_scores``) in one Ray task (a GPU task when
   the cluster has a GPU). Scores are cached in ``clean/scores/`` by a key over the method's settings and
   the sha256 of every candidate and reference stem, so a run that only changes a drop rule re-decides
   without scoring again.
3. **Decide** (``cleaning.decision.decide``): per method by ``*_drop_ratio`` or ``*_threshold``; a stem is
   dropped when a check fails or any method drops it.

Outputs: ``runs/<run_id>/stem_scores.parquet`` (StemScore rows: one per stem and method, plus a ``final``
row with the decision and every reason; the reference stems as ``reference``/keep), the same table as
``catalog/stem_scores.parquet`` (the latest decisions), ``config.json`` and ``summary.json``. Dropped stems
stay in ``audio_files.parquet``: the decision is a separate, replaceable table, and a later run with another
rule restores them.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, model_validator

from cleaning import blind_settings as methods
from cleaning.contamination import StemItem
from cleaning.decision import DROP, KEEP, decide
from pipelines.catalog import (
    CatalogVersion,
    catalog_id,
    derive_catalog,
    latest_catalog,
    read_stem_decisions,
    resolve_catalog,
)
from pipelines.engines import Engine
from pipelines.stage import Resources, Stage, StageContext, StageOutput, StageResult, run_stage
from provenance import records
from provenance.records import Role
from provenance.workspace import Workspace

STAGE = "clean"
FINAL = "final"
REFERENCE = "reference"
METHODS = (methods.FAD, methods.UNLEARNING)
REASON_BY_METHOD = {methods.FAD: "fad_outlier", methods.UNLEARNING: "low_unlearning_contribution"}

Progress = Callable[[str, int, int], None]


_UNLEARNING = methods.UnlearningSettings()


class CleanConfig(BaseModel):
    """Config of the clean stage. Frozen; unknown keys are rejected.

    A method's rule is its ``*_threshold`` when set, else its ``*_drop_ratio`` (the worst fraction of the
    scored candidates). FAD scores are per-item FAD (higher = worse); unlearning scores are separation-loss
    changes after unlearning the reference set, standardised within each role (z-scores, lower = worse), so
    ``unlearning_threshold`` is in standard deviations.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    reference_tracks: list[str] = []
    methods: list[str] = [methods.FAD]
    # explicit checks
    max_silent_fraction: float = 0.95
    silence_floor_dbfs: float = -60.0
    max_clipped_fraction: float = 1e-3
    min_mixture_gain: float = 0.5
    # decision rules
    fad_drop_ratio: float = 0.1
    fad_threshold: float | None = None
    unlearning_drop_ratio: float = 0.1
    unlearning_threshold: float | None = None
    # FAD
    embedder: str = "mel-stats"
    # unlearning: cleaning.blind_settings.UnlearningSettings, whose defaults these are (one source of truth)
    sources: list[str] = list(_UNLEARNING.sources)
    sample_rate_hz: int = _UNLEARNING.sample_rate_hz
    separator_channels: int = _UNLEARNING.channels
    separator_depth: int = _UNLEARNING.depth
    window_s: float = _UNLEARNING.window_s
    max_windows_per_stem: int = _UNLEARNING.max_windows_per_stem
    train_steps: int = _UNLEARNING.train_steps
    batch_size: int = _UNLEARNING.batch_size
    learning_rate: float = _UNLEARNING.learning_rate
    step_size: float = _UNLEARNING.step_size
    damping: float = _UNLEARNING.damping
    contrast_weight: float = _UNLEARNING.contrast_weight
    seed: int = _UNLEARNING.seed
    # Ray
    num_cpus: int | None = None
    address: str | None = None

    @model_validator(mode="after")
    def _check(self) -> "CleanConfig":
        unknown = set(self.methods) - set(METHODS)
        if unknown:
            raise ValueError(f"clean.methods: unknown {sorted(unknown)}; known: {', '.join(METHODS)}")
        if self.methods and not self.reference_tracks:
            raise ValueError("clean.reference_tracks: the blind methods need a trusted clean reference set "
                             "(catalog track ids); give one, or set methods=[] for the explicit checks only")
        for name in ("fad_drop_ratio", "unlearning_drop_ratio", "max_silent_fraction", "max_clipped_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"clean.{name} must be in [0, 1], got {value}")
        if self.contrast_weight < 0:
            raise ValueError(f"clean.contrast_weight must be ≥ 0, got {self.contrast_weight}")
        positive = ("sample_rate_hz", "separator_channels", "separator_depth", "window_s", "max_windows_per_stem",
                    "train_steps", "batch_size", "learning_rate", "step_size", "damping")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"clean.{name} must be > 0, got {getattr(self, name)}")
        kind, sep, path = self.embedder.partition(":")
        if sep and kind in ("clap", "panns", "panns-cnn14"):
            if not Path(path).exists():
                raise ValueError(f"clean.embedder: {kind} needs a local checkpoint; {path!r} does not exist")
        elif not self.embedder.startswith("mel-stats"):
            raise ValueError(f"clean.embedder must be mel-stats, clap:DIR or panns:FILE.pth; got {self.embedder!r}")
        bad_sources = set(self.sources) - {r.value for r in Role if r != Role.MIXTURE}
        if bad_sources or not self.sources:
            raise ValueError(f"clean.sources must be stem roles (vocals, drums, bass, other), got {self.sources}")
        return self

    def limits(self) -> "checks.CheckLimits":  # noqa: F821
        from cleaning import checks

        return checks.CheckLimits(max_silent_fraction=self.max_silent_fraction,
                                  silence_floor_dbfs=self.silence_floor_dbfs,
                                  max_clipped_fraction=self.max_clipped_fraction,
                                  min_mixture_gain=self.min_mixture_gain)

    def unlearning_settings(self) -> methods.UnlearningSettings:
        return methods.UnlearningSettings(
            sources=tuple(self.sources), sample_rate_hz=self.sample_rate_hz, channels=self.separator_channels,
            depth=self.separator_depth, window_s=self.window_s, max_windows_per_stem=self.max_windows_per_stem,
            train_steps=self.train_steps, batch_size=self.batch_size, learning_rate=self.learning_rate,
            step_size=self.step_size, damping=self.damping, contrast_weight=self.contrast_weight, seed=self.seed)

    def rule(self, method: str) -> dict[str, float | None]:
        threshold = getattr(self, f"{method}_threshold")
        if threshold is not None:
            return {"threshold": threshold, "drop_ratio": None}
        return {"threshold": None, "drop_ratio": getattr(self, f"{method}_drop_ratio")}

    def sha256(self) -> str:
        return records.sha256_hex(records.canonical_json(self.model_dump()))


@dataclass
class CleanResult:
    """What a clean run decided. ``num_stems == num_kept + num_dropped`` (reference stems count as kept).

    ``status`` is ``ran`` or ``cached`` (an earlier run with the same cache key; ``run_id`` is that run's).
    """

    run_id: str
    num_stems: int
    num_reference: int
    num_kept: int
    num_dropped: int
    dropped_by_reason: dict[str, int]
    scored: dict[str, int]  # method → stems scored
    reused_scores: list[str]  # methods whose scores came from the cache
    outputs: dict[str, str] = field(default_factory=dict)
    unlearning: dict[str, Any] = field(default_factory=dict)
    status: str = "ran"
    inputs: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The stage contract's result shape with the clean details beside it."""
        return {"stage": STAGE, **dataclasses.asdict(self), "counts": _run_counts(self)}

    @classmethod
    def from_stage(cls, result: StageResult) -> "CleanResult":
        fields = {f.name for f in dataclasses.fields(cls)} - {"run_id", "outputs", "status", "inputs"}
        return cls(run_id=result.run_id, outputs=result.outputs, status=result.status, inputs=result.inputs,
                   **{k: v for k, v in result.details.items() if k in fields})


def run_clean(workspace: Workspace, config: CleanConfig, progress: Progress | None = None, *,
              engine: Engine | None = None) -> CleanResult:
    """Score, decide and record every stem of the workspace's catalog (see the module docstring), through the
    stage runner: an unchanged catalog and config give the earlier run's result (``status == "cached"``).

    Raises:
        FileNotFoundError: no catalog (run ``linernotes ingest`` first).
        ValueError: a reference track is not in the catalog or has no stems, or the catalog has no stems.
    """
    return CleanResult.from_stage(run_stage(CLEAN, workspace, config, engine=engine, progress=progress))


class CleanStage(Stage):
    """The clean stage on the contract: the catalog's stems → keep/drop decisions (StemScore rows)."""

    name = STAGE
    version = "1"
    config_model = CleanConfig
    resources = Resources(engine="ray", cpus=1.0, gpus=1.0)
    engine_keys = ("num_cpus", "address")
    key_inputs = ("audio_files",)  # the only catalog table clean reads
    reads = ("catalog", "audio_files")
    writes = ("stem_scores", "catalog", "catalog_stem_scores")

    def inputs(self, ctx: StageContext, config: CleanConfig) -> dict[str, str]:
        version = ctx.prepared["catalog"] = resolve_catalog(ctx.workspace, ctx.select.get("catalog"))
        stems, _ = read_stems(ctx.workspace, version)
        missing = sorted(set(config.reference_tracks) - {row["track_id"] for row in stems})
        if missing:
            raise ValueError(f"clean.reference_tracks: {missing} have no stems in the catalog "
                             f"({version.table('audio_files')})")
        return {"catalog": version.catalog_id, "audio_files": catalog_id(ctx.workspace, ("audio_files",), version)}

    def run(self, ctx: StageContext, config: CleanConfig) -> StageOutput:
        version = ctx.prepared["catalog"]
        stems, mixtures = read_stems(ctx.workspace, version)
        ctx.engine.ray()
        measured = _measure_tracks(stems, mixtures, config, ctx.progress)
        result = _score_and_decide(ctx, config, stems, set(config.reference_tracks), measured)
        details = {k: v for k, v in dataclasses.asdict(result).items()
                   if k not in {"run_id", "outputs", "status", "inputs"}}
        table = records.read_table(result.outputs["stem_scores"])
        derived = derive_catalog(ctx.workspace, version, {"stem_scores": table}, stage=STAGE, run_id=ctx.run_id)
        outputs = {**result.outputs, "catalog_stem_scores": str(derived.table("stem_scores"))}
        details["catalog_id"] = derived.catalog_id
        return StageOutput(outputs=outputs, counts=_run_counts(result), output_ids={"catalog": derived.catalog_id},
                           details=details)


def _run_counts(result: CleanResult) -> dict[str, Any]:
    return {"stems": result.num_stems, "kept": result.num_kept, "dropped": result.num_dropped,
            "dropped_by_reason": result.dropped_by_reason, "scored": result.scored}


CLEAN = CleanStage()


def read_stems(workspace: Workspace, version: CatalogVersion | None = None
               ) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """A catalog version's (default: the latest's) stem rows (sorted by key) and its mixture row per track.

    Raises:
        FileNotFoundError: no ``audio_files.parquet``.
        ValueError: the catalog has no stems.
    """
    path = version.table("audio_files") if version else workspace.catalog_table("audio_files")
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run `linernotes ingest DELIVERY` first")
    rows = pq.read_table(path).to_pylist()
    stems = sorted((r for r in rows if r["role"] != Role.MIXTURE.value),
                   key=lambda r: (r["track_id"], r["role"], r["instrument"]))
    if not stems:
        raise ValueError(f"the catalog {path} has no stems (only mixtures): nothing to clean; "
                         "`linernotes clean separate` makes stems from mixtures")
    mixtures = {r["track_id"]: r for r in rows if r["role"] == Role.MIXTURE.value}
    return stems, mixtures


def read_decisions(workspace: Workspace, version: CatalogVersion | None = None) -> list[dict[str, Any]]:
    """The ``final`` (or ``reference``) decision per stem of a catalog version (default: the latest): rows with
    track_id, role, instrument, decision and reason. Empty when no clean run has finished."""
    version = version or latest_catalog(workspace)
    return read_stem_decisions(version) if version is not None else []


# measuring (Ray) ------------------------------------------------------------------------------------------

@dataclass
class _Measured:
    """One stem after its track's task: the check results, FAD window embeddings, unlearning windows."""

    key: tuple[str, str, str]
    sha256: str
    checks: list["CheckResult"]  # noqa: F821  (cleaning.checks.CheckResult)
    embeddings: np.ndarray | None
    windows: np.ndarray | None  # float32 (1, n * window_samples) at the separator rate: the kept windows


def _measure_track(track_rows: list[dict[str, Any]], mixture_row: dict[str, Any] | None,
                   config: CleanConfig) -> list[_Measured]:
    """The per-track task: decode once; checks, embeddings and unlearning windows for every stem."""
    from cleaning import blind, checks
    from cleaning.audio import read_audio
    from cleaning.embed import load_embedder

    embedder = load_embedder(config.embedder) if methods.FAD in config.methods else None
    settings = config.unlearning_settings()
    mixture = read_audio(mixture_row["uri"])[0] if mixture_row and mixture_row.get("uri") else None
    limits = config.limits()
    out = []
    for row in track_rows:
        audio, rate = read_audio(row["uri"])
        results = checks.run_checks(audio, rate, mixture, limits)
        passed = all(r.passed for r in results)
        embeddings = windows = None
        if passed and embedder is not None:
            embeddings = np.asarray(embedder.embed(audio, rate), dtype=np.float32)
        if passed and methods.UNLEARNING in config.methods and row["role"] in config.sources:
            item = StemItem(row["track_id"], row["role"], row["instrument"], audio, rate)
            try:
                windows = blind.stem_windows(item, settings).reshape(1, -1)
            except ValueError:
                windows = None  # shorter than one window: the method cannot score it (NaN, kept)
        out.append(_Measured((row["track_id"], row["role"], row["instrument"]), row.get("sha256") or "",
                             results, embeddings, windows))
    return out


def _measure_tracks(stems: Sequence[dict[str, Any]], mixtures: Mapping[str, dict[str, Any]], config: CleanConfig,
                    progress: Progress | None) -> dict[tuple[str, str, str], _Measured]:
    import ray

    by_track: dict[str, list[dict[str, Any]]] = {}
    for row in stems:
        by_track.setdefault(row["track_id"], []).append(row)
    task = ray.remote(num_cpus=1)(_measure_track)
    pending = {task.remote(rows, mixtures.get(track_id), config): track_id for track_id, rows in by_track.items()}
    measured: dict[tuple[str, str, str], _Measured] = {}
    done = 0
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            pending.pop(ref)
            for m in ray.get(ref):
                measured[m.key] = m
            done += 1
            if progress is not None:
                progress("checks", done, len(by_track))
    return measured


# scoring and deciding -------------------------------------------------------------------------------------

def _score_and_decide(ctx: StageContext, config: CleanConfig, stems: Sequence[dict[str, Any]],
                      reference_ids: set[str], measured: Mapping[tuple[str, str, str], _Measured]) -> CleanResult:
    workspace, run_id = ctx.workspace, ctx.run_id
    keys = [(r["track_id"], r["role"], r["instrument"]) for r in stems]
    references = [k for k in keys if k[0] in reference_ids and all(c.passed for c in measured[k].checks)]
    candidates = [k for k in keys if k[0] not in reference_ids]
    blind_candidates = [k for k in candidates if all(c.passed for c in measured[k].checks)]
    rows: list[dict[str, Any]] = []
    reasons: dict[tuple[str, str, str], list[str]] = {k: [] for k in keys}
    for key in candidates:
        for result in measured[key].checks:
            rows.append(_score_row(key, result.method, result.score, KEEP if result.passed else DROP,
                                   result.reason and f"{result.reason}: {result.detail}", run_id))
            if not result.passed:
                reasons[key].append(result.reason)
    scored: dict[str, int] = {}
    reused: list[str] = []
    unlearning_info: dict[str, Any] = {}
    for method in config.methods:
        scores, was_cached, info = _method_scores(ctx, config, method, blind_candidates, references, measured)
        unlearning_info.update(info)
        if was_cached:
            reused.append(method)
        rule = config.rule(method)
        drop = decide(scores, higher_is_worse=methods.HIGHER_IS_WORSE[method], **rule)
        rule_text = (f"threshold {rule['threshold']}" if rule["threshold"] is not None
                     else f"drop ratio {rule['drop_ratio']}")
        scored[method] = int(np.isfinite(scores).sum())
        for key, score, dropped in zip(blind_candidates, scores, drop):
            reason = f"{REASON_BY_METHOD[method]}: {method} score {score:.4g} ({rule_text})" if dropped else ""
            rows.append(_score_row(key, method, float(score), DROP if dropped else KEEP, reason, run_id))
            if dropped:
                reasons[key].append(REASON_BY_METHOD[method])
    dropped_by_reason: Counter[str] = Counter()
    for key in keys:
        if key[0] in reference_ids:
            rows.append(_score_row(key, REFERENCE, math.nan, KEEP, "trusted reference stem", run_id))
            continue
        why = reasons[key]
        dropped_by_reason.update(why)
        rows.append(_score_row(key, FINAL, float(len(why)), DROP if why else KEEP, ";".join(why), run_id))
    table = records.to_table(rows, records.STEM_SCORE)
    run_path = records.write_table(table, workspace.run_dir(run_id) / "stem_scores.parquet")
    num_dropped = sum(1 for key in candidates if reasons[key])
    return CleanResult(run_id=run_id, num_stems=len(keys), num_reference=len(keys) - len(candidates),
                       num_kept=len(keys) - num_dropped, num_dropped=num_dropped,
                       dropped_by_reason=dict(sorted(dropped_by_reason.items())), scored=scored,
                       reused_scores=reused, unlearning=unlearning_info,
                       outputs={"stem_scores": str(run_path)})


def _score_row(key: tuple[str, str, str], method: str, score: float, decision: str, reason: str,
               run_id: str) -> dict[str, Any]:
    return {"track_id": key[0], "role": key[1], "instrument": key[2], "method": method, "score": score,
            "decision": decision, "reason": reason, "run_id": run_id}


def _method_scores(ctx: StageContext, config: CleanConfig, method: str, candidates: Sequence[tuple],
                   references: Sequence[tuple], measured: Mapping[tuple, _Measured]
                   ) -> tuple[np.ndarray, bool, dict[str, Any]]:
    """Scores of ``candidates`` by ``method`` (float64, aligned), from the cache when the inputs match."""
    workspace = ctx.workspace
    if method == methods.FAD:
        settings: dict[str, Any] = {"embedder": config.embedder}
    else:
        settings = dataclasses.asdict(config.unlearning_settings())
    cache_key = records.sha256_hex(records.canonical_json({
        "method": method, "settings": settings,
        "candidates": [[*k, measured[k].sha256] for k in candidates],
        "references": [[*k, measured[k].sha256] for k in references]}))[:24]
    cache_path = workspace.root / "clean" / "scores" / f"{method}-{cache_key}.parquet"
    if cache_path.is_file():
        cached = pq.read_table(cache_path).to_pylist()
        by_key = {(r["track_id"], r["role"], r["instrument"]): r["score"] for r in cached}
        scores = np.array([by_key.get(k, math.nan) for k in candidates], dtype=np.float64)
        return scores, True, {}
    if not candidates:
        scores, info = np.zeros(0), {}
    elif method == methods.FAD:
        scores, info = _fad_scores(config, candidates, references, measured), {}
    else:
        scores, info = _unlearning_scores(config, candidates, references, measured, ctx)
    rows = [_score_row(k, method, float(s), "", "", "") for k, s in zip(candidates, scores)]
    records.write_table(records.to_table(rows, records.STEM_SCORE), cache_path)
    return scores, False, info


def _fad_scores(config: CleanConfig, candidates: Sequence[tuple], references: Sequence[tuple],
                measured: Mapping[tuple, _Measured]) -> np.ndarray:
    from cleaning import blind
    from cleaning.fad import gaussian_stats

    if not references:
        raise ValueError("clean: no reference stem passed the explicit checks; the FAD method has no reference")
    by_role: dict[str, list[np.ndarray]] = {}
    for key in references:
        by_role.setdefault(key[1], []).append(measured[key].embeddings)
    stats = {role: gaussian_stats(np.concatenate(parts)) for role, parts in by_role.items()}
    stats[methods.ALL_ROLES] = gaussian_stats(np.concatenate([p for parts in by_role.values() for p in parts]))
    return blind.fad_scores_from_embeddings([measured[k].embeddings for k in candidates],
                                            [k[1] for k in candidates], stats)


def _unlearning_scores(config: CleanConfig, candidates: Sequence[tuple], references: Sequence[tuple],
                       measured: Mapping[tuple, _Measured], ctx: StageContext) -> tuple[np.ndarray, dict[str, Any]]:
    import ray

    progress = ctx.progress
    settings = config.unlearning_settings()

    def items(keys: Sequence[tuple]) -> list[StemItem]:
        return [StemItem(k[0], k[1], k[2], measured[k].windows, settings.sample_rate_hz) for k in keys
                if measured[k].windows is not None]

    scorable = [k for k in candidates if measured[k].windows is not None]
    use_gpu = ctx.engine.num_gpus() > 0
    task = ray.remote(num_cpus=1, num_gpus=1 if use_gpu else 0)(_unlearning_task)
    if progress is not None:
        progress("unlearning", 0, 1)
    scores_scorable, info = ray.get(task.remote(items(scorable), items(references), settings))
    if progress is not None:
        progress("unlearning", 1, 1)
    by_key = dict(zip(scorable, scores_scorable))
    return np.array([by_key.get(k, math.nan) for k in candidates], dtype=np.float64), info


def _unlearning_task(candidates: list[StemItem], references: list[StemItem],
                     settings: methods.UnlearningSettings) -> tuple[np.ndarray, dict[str, Any]]:
    from cleaning import blind

    result = blind.unlearning_stem_scores(candidates, references, settings)
    return result.scores, {"forget_loss_before": result.forget_loss_before,
                           "forget_loss_after": result.forget_loss_after,
                           "train_loss_first": result.train_losses[0], "train_loss_last": result.train_losses[-1],
                           **result.info}

