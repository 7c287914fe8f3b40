"""The ``shard`` stage: curated catalog → WebDataset tars, a Parquet shard index and ``dataset.json``.

Three parts, in the order they run:

1. **Plan** (pure, on the driver): each track's mixture is cut into whole segments of
   ``segment_samples = round(segment_s * sample_rate_hz)`` samples at the dataset rate, starting at 0;
   the track's length at the dataset rate is ``floor(num_samples * sample_rate_hz / source_rate_hz)``
   (whole samples, integer arithmetic; the resampler returns at least that many). A track goes to
   ``validation`` or ``train`` by a hash of its id, so no recording straddles splits. Within a split,
   segments sorted by ``segment_id`` are chunked into ``{split}-{000000}.tar`` shards of
   ``samples_per_shard``. Clean's decisions in the catalog version are read here: a track whose mixture was
   dropped is rejected, and with ``stems: true`` its kept stems are planned with it (none left: rejected).
   Tracks that cannot be sharded become Rejections with a reason.
2. **Encode** (``pipelines.stages.shard.write``; Ray Data, one row per track): decode the mixture (and the
   planned stems), downmix to mono, resample, cut the planned segments; a segment whose peak is below
   ``silence_floor_dbfs`` becomes a ``silent_segment`` Rejection; the others get their members: ``KEY.flac``
   (PCM_16 mono at the dataset rate), ``KEY.mel.npy`` (float16 log-mel ``(n_mels, segment_samples // hop_length +
   1)``), ``KEY.json`` and, with stems, ``KEY.<role>[.<instrument>].flac``.
3. **Commit** (``pipelines.stages.shard.write``; on the driver): the kept samples fill the shards in the planned
   order and each tar is written with members sorted by name and fixed headers (GNU format, ``mtime=0``, uid/gid
   0, no owner names, mode 0o444), so the bytes do not depend on Ray's ordering. Everything goes into a temporary
   folder under ``datasets/``, ``index.parquet`` last, and the folder is renamed to ``datasets/<dataset_id>``.

``dataset_id = "ds-" + sha256(canonical JSON of {"index": index rows, "shard_sha256": {tar: sha256}})[:16]``:
the index rows pin every segment and its flac bytes, the tar digests pin the mel and json members too
(a changed rights holder or mel setting must not reuse an older dataset). A re-run whose plan (config,
track metadata, planned stems and decoded-PCM sha256 of every mixture and stem) matches a committed dataset does
no new work. A committed dataset folder never changes: a Run that finds its dataset already there (the same plan,
or the same bytes from another catalog version or other decisions) keeps ``dataset.json`` as the first build wrote
it, and names the catalog version and clean Run it read itself (its inputs, its config's ``clean_run_id`` and its
result); ``linernotes lineage DATASET`` lists every Run that produced the dataset.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from cleaning.decision import DROP
from pipelines.catalog import CatalogVersion, catalog_id, decisions_id, read_stem_decisions, resolve_catalog
from pipelines.engines import Engine
from pipelines.stages.shard.config import (  # noqa: F401  (ShardConfig and the sample arithmetic are this stage's API)
    SHARD_FORMAT_VERSION,
    STAGE,
    ShardConfig,
    ShardPlan,
    num_target_samples,
    shard_name,
)
from pipelines.stages.shard.write import (  # noqa: F401  (ShardInputError: what run_shard raises for a stale catalog)
    ShardInputError,
    build_dataset,
    dataset_complete,
    find_dataset,
)
from pipelines.stage import CACHED, Resources, Stage, StageContext, StageOutput, StageResult, run_stage
from provenance import records
from provenance.policy import OptOutRegistry
from provenance.records import RejectionReason, Split
from provenance.workspace import Workspace

Progress = Callable[[str, int, int], None]


@dataclass
class ShardResult:
    """What a shard run produced. ``rejections`` holds track Rejections (``record_kind == "track"``; then
    ``num_tracks_in == num_tracks + len(track rejections)``) and segment Rejections (``silent_segment``).

    ``status`` is ``ran`` or ``cached`` (an earlier run with the same cache key; ``run_id`` is that run's).
    """

    run_id: str
    dataset_id: str
    dataset_dir: Path
    num_tracks_in: int
    num_tracks: int  # tracks with at least one segment in the dataset
    num_segments: int
    counts: dict[str, int]  # segments by split
    num_shards: int
    rejections: list[dict[str, Any]] = field(default_factory=list)
    reused: bool = False
    status: str = "ran"
    stage_result: StageResult | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        """The stage contract's result shape (``stage``, ``run_id``, ``status``, ``inputs``, ``outputs``,
        ``counts``) with the shard details beside it (``segments_by_split``: the typed ``counts``)."""
        if self.stage_result is not None:
            return self.stage_result.to_json()
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k not in {"stage_result", "counts"}}
        return {**fields, "stage": STAGE, "dataset_dir": str(self.dataset_dir), "segments_by_split": self.counts}

    @classmethod
    def from_stage(cls, result: StageResult) -> "ShardResult":
        d = result.details
        return cls(run_id=result.run_id, dataset_id=d["dataset_id"], dataset_dir=Path(d["dataset_dir"]),
                   num_tracks_in=d["num_tracks_in"], num_tracks=d["num_tracks"], num_segments=d["num_segments"],
                   counts=d["segments_by_split"], num_shards=d["num_shards"], rejections=d["rejections"],
                   reused=d["reused"] or result.status == CACHED, status=result.status, stage_result=result)



# ---------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------
def run_shard(workspace: Workspace, config: ShardConfig, progress: Progress | None = None, *,
              engine: Engine | None = None) -> ShardResult:
    """Shard the workspace's curated catalog into a content-addressed WebDataset dataset (through the runner).

    Args:
        workspace: reads ``catalog/{tracks,audio_files,licenses}.parquet`` and the opt-out registry; writes
            ``datasets/<dataset_id>/`` and ``runs/<run_id>/``; registers the run and the dataset.
        config: the stage config.
        progress: called as ``progress(phase, done, total)`` with phase ``"segments"`` or ``"shards"``.
        engine: the run's engines (default: a local Ray, opened and closed here).

    Raises:
        FileNotFoundError: a catalog table is missing (run ``linernotes ingest DELIVERY`` first).
        ShardInputError: a mixture no longer decodes or matches its catalog row (rate, length, channels):
            the catalog is stale, re-run ingest. Other worker failures arrive as Ray's ``RayError``.
    """
    return ShardResult.from_stage(run_stage(SHARD, workspace, config, engine=engine, progress=progress))


class ShardStage(Stage):
    """The shard stage on the contract: catalog (+ opt-outs) → a dataset."""

    name = STAGE
    version = "1"
    config_model = ShardConfig
    resources = Resources(engine="ray", cpus=1.0)
    key_inputs = ("catalog_tables", "decisions", "opt_outs", "plan")
    reads = ("catalog", "catalog_tables", "decisions", "opt_outs", "plan")
    writes = ("dataset", "rejections")

    def inputs(self, ctx: StageContext, config: ShardConfig) -> dict[str, str]:
        """The catalog version and the tables of it that shard reads, clean's decisions in it (``decisions``: the
        content id of its ``stem_scores``, ``none`` before any clean run), the opt-out registry, and the plan: every
        track's segments and kept stems and the PCM sha256 (or size and mtime) of every file it reads, with the
        files that are missing now. The cache key leaves the version id out and keys on the decisions instead: new
        decisions give a new Run, and a new dataset id only when they change what the plan holds (a dropped mixture,
        or a stem with ``stems: true``)."""
        rows = ctx.store.list_opt_outs()
        opt_outs = [{k: row[k] for k in ("kind", "value")} for row in rows]
        version = resolve_catalog(ctx.workspace, ctx.select.get("catalog"))
        tracks, audio_files, license_ids = read_catalog(ctx.workspace, version)
        decisions = read_stem_decisions(version)
        missing_uris = {row["uri"] for row in audio_files if row.get("uri") and not Path(row["uri"]).is_file()}
        plan = plan_shards(tracks, audio_files, license_ids, config, missing_uris, OptOutRegistry.from_rows(rows),
                           decisions)
        clean_runs = sorted({row["run_id"] for row in decisions if row.get("run_id")})
        ctx.prepared.update(plan=plan, plan_sha256=_plan_sha256(plan, config),
                            clean_run_id=clean_runs[-1] if clean_runs else None)
        return {"catalog": version.catalog_id, "catalog_tables": catalog_id(ctx.workspace, version=version),
                "decisions": decisions_id(version),
                "opt_outs": "optouts-" + records.sha256_hex(records.canonical_json(opt_outs))[:16],
                "plan": "plan-" + ctx.prepared["plan_sha256"][:16]}

    def record(self, ctx: StageContext, config: ShardConfig) -> dict[str, Any]:
        """The clean Run whose decisions this Run reads (None before any clean run), beside the catalog version in
        its inputs: ``dataset.json`` names the first build's, and a dataset built again from another catalog version
        with the same content keeps that file as it was (``linernotes lineage DATASET`` lists every Run)."""
        return {"clean_run_id": ctx.prepared["clean_run_id"]}

    def outputs_valid(self, run: Mapping[str, Any]) -> bool:
        """The dataset still has its index, its manifest and every tar the manifest names."""
        return dataset_complete(Path((run.get("outputs") or {}).get("dataset", "")))

    def resolved_config(self, config: ShardConfig) -> dict[str, Any]:
        return config.resolved()

    def run(self, ctx: StageContext, config: ShardConfig) -> StageOutput:
        workspace, run_id = ctx.workspace, ctx.run_id
        plan, plan_sha256 = ctx.prepared["plan"], ctx.prepared["plan_sha256"]
        rejections = [{**r, "run_id": run_id} for r in plan.rejections]
        dataset_dir = find_dataset(workspace, plan_sha256)
        reused = dataset_dir is not None
        if dataset_dir is None:
            ctx.engine.ray()
            sources = {"catalog_id": ctx.inputs["catalog"], "decisions": ctx.inputs["decisions"],
                       "clean_run_id": ctx.prepared["clean_run_id"]}
            dataset_dir, reused = build_dataset(workspace, plan, plan_sha256, config, run_id, ctx.progress, sources)
        manifest = json.loads((dataset_dir / "dataset.json").read_text())
        rejections += [{**r, "run_id": run_id} for r in manifest.get("rejections", [])]
        counts = manifest["counts"]
        by_split = {split.value: counts[split.value] for split in Split}
        ctx.store.add_dataset({"dataset_id": manifest["dataset_id"], "run_id": run_id,
                               "config_sha256": config.sha256(), "uri": str(dataset_dir),
                               "num_tracks": counts["tracks"], "num_segments": counts["segments"],
                               "num_train_segments": by_split.get(Split.TRAIN.value, 0),
                               "num_validation_segments": by_split.get(Split.VALIDATION.value, 0),
                               "num_shards": counts["shards"]}, manifest["tracks"])
        rejections_path = records.write_table(records.to_table(rejections, records.REJECTION),
                                              ctx.run_dir / "rejections.parquet")
        track_rejections = [r for r in rejections if r["record_kind"] == "track"]
        segment_rejections = [r for r in rejections if r["record_kind"] == "segment"]
        # this Run's sources, not dataset.json's: a dataset found again (the same content from another catalog
        # version, other decisions) keeps the manifest of its first build, immutable like the rest of the folder
        details = {"dataset_id": manifest["dataset_id"], "dataset_dir": str(dataset_dir),
                   "catalog_id": ctx.inputs["catalog"], "decisions": ctx.inputs["decisions"],
                   "clean_run_id": ctx.prepared["clean_run_id"],
                   "num_tracks_in": plan.num_tracks_in, "num_tracks": counts["tracks"],
                   "num_segments": counts["segments"], "segments_by_split": by_split,
                   "num_shards": counts["shards"], "rejections": rejections, "reused": reused}
        run_counts = {"tracks_in": plan.num_tracks_in, "accepted": counts["tracks"],
                      "rejected": dict(sorted(Counter(r["reason"] for r in track_rejections).items())),
                      "segments_planned": counts.get("segments_planned", counts["segments"]),
                      "segments": counts["segments"],
                      "segments_rejected": dict(sorted(Counter(r["reason"] for r in segment_rejections).items())),
                      "segments_by_split": by_split, "shards": counts["shards"], "reused": reused}
        return StageOutput(outputs={"dataset": str(dataset_dir), "rejections": str(rejections_path)},
                           counts=run_counts, output_ids={"dataset": manifest["dataset_id"]}, details=details)


SHARD = ShardStage()


def read_catalog(workspace: Workspace, version: CatalogVersion | None = None
                 ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], set[str]]:
    """A catalog version's (default: the latest's) tables as rows: (tracks, audio files, licence ids).

    Raises:
        FileNotFoundError: naming each missing table and the command that writes it.
    """
    paths = {name: version.table(name) if version else workspace.catalog_table(name)
             for name in ("tracks", "audio_files", "licenses")}
    missing = [str(path) for path in paths.values() if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"the curated catalog is incomplete, missing {', '.join(missing)}: "
                                f"run `linernotes ingest DELIVERY` first")
    tracks = records.read_table(paths["tracks"], records.TRACK).to_pylist()
    audio_files = records.read_table(paths["audio_files"], records.AUDIO_FILE).to_pylist()
    licenses = records.read_table(paths["licenses"], records.LICENSE)
    return tracks, audio_files, set(licenses.column("license_id").to_pylist())


# ---------------------------------------------------------------------------------------------------
# Plan (pure)
# ---------------------------------------------------------------------------------------------------
def split_for_track(track_id: str, validation_fraction: float) -> Split:
    """``validation`` when ``int(sha256("split:" + track_id), 16) / 2**256 < validation_fraction``."""
    position = int(hashlib.sha256(f"split:{track_id}".encode()).hexdigest(), 16) / 2**256
    return Split.VALIDATION if position < validation_fraction else Split.TRAIN


def segment_starts(num_source_samples: int, source_rate_hz: int, config: ShardConfig) -> list[int]:
    """Start samples (at the dataset rate) of the whole segments of a track: ``0, S, 2S, ...``.

    At most ``config.max_segments_per_track``; empty when the track is shorter than one segment.
    """
    length = num_target_samples(num_source_samples, source_rate_hz, config.sample_rate_hz)
    count = length // config.segment_samples
    if config.max_segments_per_track is not None:
        count = min(count, config.max_segments_per_track)
    return [i * config.segment_samples for i in range(count)]


def plan_shards(tracks: Sequence[Mapping[str, Any]], audio_files: Sequence[Mapping[str, Any]],
                license_ids: set[str], config: ShardConfig, missing_uris: set[str] = frozenset(),
                opt_outs: OptOutRegistry | None = None,
                decisions: Sequence[Mapping[str, Any]] = ()) -> ShardPlan:
    """Plan segments and shards for every track; each track is planned or rejected, never dropped.

    Args:
        tracks: Track rows (the stage's input records).
        audio_files: AudioFile rows: the ``mixture`` row of each track is cut into segments; with
            ``config.stems`` its kept stems go with it.
        license_ids: ids in the licence table; a track whose licence is not there is rejected.
        config: the stage config.
        missing_uris: URIs known not to exist (checked by the caller, so this stays pure).
        opt_outs: tracks it names are rejected ``opted_out`` (a takedown after the catalog was curated).
        decisions: clean's decisions (StemScore ``final``/``reference`` rows of the catalog version): a track whose
            mixture is dropped is rejected ``mixture_dropped``; a dropped stem is never planned, and with
            ``config.stems`` a track with no kept stem left is rejected ``no_kept_stems``. A stem without a
            decision is kept.
    """
    mixtures: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    stems: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for row in audio_files:
        (mixtures if row["role"] == records.Role.MIXTURE.value else stems)[row["track_id"]].append(row)
    decided = {(row["track_id"], row["role"], row["instrument"] or ""): row for row in decisions}

    rejections: list[dict[str, Any]] = []
    work: list[dict[str, Any]] = []
    segments: list[dict[str, Any]] = []
    seen: set[str] = set()
    for track in sorted(tracks, key=lambda t: t["track_id"]):
        track_id = track["track_id"]
        if track_id in seen:
            rejections.append(records.rejection("track", track_id, STAGE, RejectionReason.DUPLICATE_ID,
                                                "track_id appears more than once in tracks.parquet"))
            continue
        seen.add(track_id)
        decision = opt_outs.check(track) if opt_outs is not None else None
        if decision is not None and not decision.admitted:
            rejections.append(records.rejection("track", track_id, STAGE, decision.reason, decision.detail))
            continue
        reason, detail, starts = _check_track(track, mixtures.get(track_id, []), license_ids, config, missing_uris)
        if reason is None:
            reason, detail = _check_mixture_decision(mixtures[track_id][0], decided)
        kept: list[dict[str, Any]] = []
        if reason is None and config.stems:
            reason, detail, kept = _kept_stems(track_id, stems.get(track_id, []), decided, missing_uris)
        if reason is not None:
            rejections.append(records.rejection("track", track_id, STAGE, reason, detail))
            continue
        mixture = mixtures[track_id][0]
        split = split_for_track(track_id, config.validation_fraction).value
        track_segments = [{"segment_id": records.segment_id(track_id, start), "start_sample": start,
                           "split": split} for start in starts]
        segments.extend(track_segments)
        work.append({
            "track_id": track_id, "uri": mixture["uri"], "source_rate_hz": int(mixture["sample_rate_hz"]),
            "source_num_samples": int(mixture["num_samples"]), "num_channels": int(mixture["num_channels"] or 0),
            "pcm_sha256": mixture.get("sha256") or "", "meta": _track_meta(track), "segments": track_segments,
            **({"stems": kept} if config.stems else {}),
        })

    shard_sizes: dict[str, int] = {}
    for split in (Split.TRAIN.value, Split.VALIDATION.value):
        in_split = sorted((s for s in segments if s["split"] == split), key=lambda s: s["segment_id"])
        for position, segment in enumerate(in_split):
            segment["shard"] = shard_name(split, position // config.samples_per_shard)
            segment["key"] = records.sample_key(segment["segment_id"])
            shard_sizes[segment["shard"]] = shard_sizes.get(segment["shard"], 0) + 1
    # Tracks in the order their first segment is written, so shards complete one after another.
    work.sort(key=lambda w: min((s["shard"], s["segment_id"]) for s in w["segments"]))
    return ShardPlan(work=work, shard_sizes=shard_sizes, rejections=rejections, num_tracks_in=len(tracks))


def _check_track(track: Mapping[str, Any], mixtures: list[Mapping[str, Any]], license_ids: set[str],
                 config: ShardConfig, missing_uris: set[str]) -> tuple[RejectionReason | None, str, list[int]]:
    if track.get("license_id") not in license_ids:
        return RejectionReason.UNKNOWN_LICENSE, f"license_id {track.get('license_id')!r} is not in the catalog", []
    if not mixtures:
        return RejectionReason.NO_AUDIO, "no audio file with role 'mixture'", []
    if len(mixtures) > 1:
        return RejectionReason.DUPLICATE_FILE, f"{len(mixtures)} audio files with role 'mixture'", []
    mixture = mixtures[0]
    rate, count = mixture.get("sample_rate_hz"), mixture.get("num_samples")
    if not mixture.get("uri") or not rate or rate <= 0 or count is None or count < 0:
        return (RejectionReason.INVALID_FIELD,
                f"mixture row has uri={mixture.get('uri')!r} sample_rate_hz={rate} num_samples={count}", [])
    if mixture["uri"] in missing_uris:
        return RejectionReason.MISSING_FILE, f"mixture {mixture['uri']} does not exist", []
    starts = segment_starts(count, rate, config)
    if not starts:
        length = num_target_samples(count, rate, config.sample_rate_hz)
        return (RejectionReason.SHORTER_THAN_SEGMENT,
                f"duration {count / rate:.3f} s ({length} samples at {config.sample_rate_hz} Hz) is shorter than "
                f"one segment of {config.segment_s} s ({config.segment_samples} samples)", [])
    return None, "", starts


def _check_mixture_decision(mixture: Mapping[str, Any], decided: Mapping[tuple[str, str, str], Mapping[str, Any]]
                            ) -> tuple[RejectionReason | None, str]:
    row = decided.get((mixture["track_id"], mixture["role"], mixture.get("instrument") or ""))
    if row is not None and row["decision"] == DROP:
        return (RejectionReason.MIXTURE_DROPPED,
                f"clean run {row.get('run_id') or '?'} dropped the mixture: {row.get('reason') or 'no reason given'}")
    return None, ""


def _kept_stems(track_id: str, rows: Sequence[Mapping[str, Any]],
                decided: Mapping[tuple[str, str, str], Mapping[str, Any]], missing_uris: set[str]
                ) -> tuple[RejectionReason | None, str, list[dict[str, Any]]]:
    """A track's stems that clean did not drop, with their member names (``<role>.flac``, or
    ``<role>.<instrument slug>.flac`` when the role has several), sorted by member; or why there are none."""
    kept = sorted((r for r in rows if (decided.get((track_id, r["role"], r["instrument"] or "")) or {})
                   .get("decision") != DROP), key=lambda r: (r["role"], r["instrument"] or "", r.get("uri") or ""))
    if not kept:
        dropped = ", ".join(f"{r['role']}/{r['instrument']}" if r["instrument"] else r["role"] for r in rows)
        return (RejectionReason.NO_KEPT_STEMS,
                f"shard.stems is on and clean dropped every stem ({dropped})" if rows
                else "shard.stems is on and the track has no stems", [])
    for row in kept:
        rate, count = row.get("sample_rate_hz"), row.get("num_samples")
        name = f"{row['role']}/{row['instrument']}" if row["instrument"] else row["role"]
        if not row.get("uri") or not rate or rate <= 0 or count is None or count < 0:
            return (RejectionReason.INVALID_FIELD,
                    f"stem {name} row has uri={row.get('uri')!r} sample_rate_hz={rate} num_samples={count}", [])
        if row["uri"] in missing_uris:
            return RejectionReason.MISSING_FILE, f"stem {name}: {row['uri']} does not exist", []
    members = _stem_members([(r["role"], r["instrument"] or "") for r in kept])
    out = [{"role": r["role"], "instrument": r["instrument"] or "", "member": member, "uri": r["uri"],
            "source_rate_hz": int(r["sample_rate_hz"]), "source_num_samples": int(r["num_samples"]),
            "num_channels": int(r["num_channels"] or 0), "pcm_sha256": r.get("sha256") or ""}
           for r, member in zip(kept, members)]
    return None, "", sorted(out, key=lambda s: s["member"])


def _stem_members(keys: Sequence[tuple[str, str]]) -> list[str]:
    """Member extensions for (role, instrument) pairs: ``vocals.flac`` when the role has one stem, else
    ``other.<slug>.flac`` with a dot-free slug of the instrument (``Electric Guitar (jazz)`` →
    ``electric-guitar-jazz``; ``-2``, ``-3`` … added when a name is taken)."""
    per_role = Counter(role for role, _ in keys)
    used: set[str] = set()
    members = []
    for role, instrument in keys:
        if per_role[role] == 1:
            member = f"{role}.flac"
        else:
            slug = re.sub(r"[^a-z0-9]+", "-", instrument.lower()).strip("-")[:40].strip("-") or "stem"
            member, n = f"{role}.{slug}.flac", 1
            while member in used:
                n += 1
                member = f"{role}.{slug}-{n}.flac"
        used.add(member)
        members.append(member)
    return members


def _track_meta(track: Mapping[str, Any]) -> dict[str, Any]:
    return {"license_id": track.get("license_id"), "rights_holder": track.get("rights_holder"),
            "title": track.get("title"), "artist": track.get("artist"), "tags": list(track.get("tags") or []),
            "attribution": track.get("attribution") or "", "text": records.conditioning_text(track),
            # musical conditions (training/conditioning.py reads them; absent values are "unknown")
            "genre": track.get("genre") or None, "bpm": track.get("bpm"), "key": track.get("key") or None}


def _plan_sha256(plan: ShardPlan, config: ShardConfig) -> str:
    """Hash of everything the dataset's bytes depend on; the PCM sha256 stands for the audio (or the
    file's size and mtime when the catalog has no sha256) of the mixture and of every planned stem."""
    audio = []
    for item in plan.work:
        for source in (item, *item.get("stems", ())):
            if source["pcm_sha256"]:
                audio.append(source["pcm_sha256"])
            else:
                stat = os.stat(source["uri"])
                audio.append(f"{source['uri']}:{stat.st_size}:{stat.st_mtime_ns}")
    work = [{k: v for k, v in item.items() if k not in ("uri", "pcm_sha256")} for item in plan.work]
    for item in work:
        if "stems" in item:
            item["stems"] = [{k: v for k, v in stem.items() if k not in ("uri", "pcm_sha256")}
                             for stem in item["stems"]]
    return records.sha256_hex(records.canonical_json(
        {"format": SHARD_FORMAT_VERSION, "config": config.resolved(), "work": work, "audio": audio}))
