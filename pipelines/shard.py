"""The ``shard`` stage: curated catalog → WebDataset tars, a Parquet shard index and ``dataset.json``.

Three parts, in the order they run:

1. **Plan** (pure, on the driver): each track's mixture is cut into whole segments of
   ``segment_samples = round(segment_s * sample_rate_hz)`` samples at the dataset rate, starting at 0;
   the track's length at the dataset rate is ``floor(num_samples * sample_rate_hz / source_rate_hz)``
   (whole samples, integer arithmetic; the resampler returns at least that many). A track goes to
   ``validation`` or ``train`` by a hash of its id, so no recording straddles splits. Within a split,
   segments sorted by ``segment_id`` are chunked into ``{split}-{000000}.tar`` shards of
   ``samples_per_shard``. Tracks that cannot be sharded become Rejections with a reason.
2. **Encode** (Ray Data, one row per track): decode the mixture, downmix to mono, resample, cut the
   planned segments and encode each sample's members: ``KEY.flac`` (PCM_16 mono at the dataset rate),
   ``KEY.mel.npy`` (float16 log-mel ``(n_mels, segment_samples // hop_length + 1)``) and ``KEY.json``.
3. **Commit** (on the driver): members are collected by shard and each tar is written with members
   sorted by name and fixed headers (GNU format, ``mtime=0``, uid/gid 0, no owner names, mode 0o444),
   so the bytes do not depend on Ray's ordering. Everything goes into a temporary folder under
   ``datasets/``, ``index.parquet`` last, and the folder is renamed to ``datasets/<dataset_id>``.

``dataset_id = "ds-" + sha256(canonical JSON of {"index": index rows, "shard_sha256": {tar: sha256}})[:16]``:
the index rows pin every segment and its flac bytes, the tar digests pin the mel and json members too
(a changed rights holder or mel setting must not reuse an older dataset). A re-run whose plan (config,
track metadata and decoded-PCM sha256 of every mixture) matches a committed dataset does no new work.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import shutil
import tarfile
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, model_validator

from cleaning.audio import encode_flac, read_audio, resample, to_mono
from cleaning.mel import MelConfig, log_mel
from pipelines.catalog import catalog_id
from pipelines.engines import Engine
from pipelines.stage import CACHED, Resources, Stage, StageContext, StageOutput, StageResult, run_stage
from provenance import records
from provenance.policy import OptOutRegistry
from provenance.records import RejectionReason, Split
from provenance.workspace import Workspace

STAGE = "shard"
SHARD_FORMAT_VERSION = "1"  # bump when member encoding or tar layout changes: it enters the plan hash

Progress = Callable[[str, int, int], None]


class ShardConfig(BaseModel):
    """Config of the shard stage. Frozen; unknown keys are rejected."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    segment_s: float = 10.0
    sample_rate_hz: int = 32000
    n_mels: int = 64
    n_fft: int = 1024
    hop_length: int = 320
    validation_fraction: float = 0.1
    samples_per_shard: int = 64
    max_segments_per_track: int | None = None  # None = every whole segment

    @model_validator(mode="after")
    def _check(self) -> "ShardConfig":
        positive = {"segment_s": self.segment_s, "sample_rate_hz": self.sample_rate_hz, "n_mels": self.n_mels,
                    "n_fft": self.n_fft, "hop_length": self.hop_length, "samples_per_shard": self.samples_per_shard}
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"shard.{name} must be > 0, got {value}")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ValueError(f"shard.validation_fraction must be in [0, 1), got {self.validation_fraction}")
        if self.hop_length >= self.n_fft:
            raise ValueError(f"shard.hop_length ({self.hop_length}) must be < shard.n_fft ({self.n_fft})")
        if self.max_segments_per_track is not None and self.max_segments_per_track < 1:
            raise ValueError(f"shard.max_segments_per_track must be ≥ 1 or null, got {self.max_segments_per_track}")
        if self.segment_samples < self.n_fft:
            raise ValueError(f"shard.segment_s={self.segment_s} gives {self.segment_samples} samples, fewer than "
                             f"shard.n_fft={self.n_fft}: raise segment_s")
        return self

    @property
    def segment_samples(self) -> int:
        """Samples per segment at the dataset rate: ``round(segment_s * sample_rate_hz)``."""
        return round(self.segment_s * self.sample_rate_hz)

    def mel_config(self) -> MelConfig:
        return MelConfig(sample_rate_hz=self.sample_rate_hz, n_fft=self.n_fft, hop_length=self.hop_length,
                         n_mels=self.n_mels)

    def resolved(self) -> dict[str, Any]:
        """The config as written next to outputs: every field plus the full ``mel`` config."""
        return {**self.model_dump(), "mel": self.mel_config().to_dict()}

    def sha256(self) -> str:
        return records.sha256_hex(records.canonical_json(self.resolved()))


@dataclass
class ShardResult:
    """What a shard run produced. ``num_tracks_in == num_tracks + len(rejections)``.

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


@dataclass(frozen=True)
class ShardPlan:
    """The pure plan: per-track work (JSON-ready dicts), the shard of every segment, and rejections.

    ``work`` items hold ``track_id``, ``uri``, ``source_rate_hz``, ``source_num_samples``, ``num_channels``,
    ``pcm_sha256``, ``meta`` (the track fields the json member carries) and ``segments`` (dicts with
    ``segment_id``, ``start_sample``, ``split``, ``shard``, ``key``).
    """

    work: list[dict[str, Any]]
    shard_sizes: dict[str, int]  # shard name → planned samples
    rejections: list[dict[str, Any]]
    num_tracks_in: int


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
    reads = ("catalog", "opt_outs", "plan")
    writes = ("dataset", "rejections")

    def inputs(self, ctx: StageContext, config: ShardConfig) -> dict[str, str]:
        """The catalog tables, the opt-out registry, and the plan: every track's segments and the PCM sha256 (or
        size and mtime) of every mixture it reads, with the files that are missing now."""
        rows = ctx.store.list_opt_outs()
        opt_outs = [{k: row[k] for k in ("kind", "value")} for row in rows]
        tracks, audio_files, license_ids = read_catalog(ctx.workspace)
        missing_uris = {row["uri"] for row in audio_files if row.get("uri") and not Path(row["uri"]).is_file()}
        plan = plan_shards(tracks, audio_files, license_ids, config, missing_uris, OptOutRegistry.from_rows(rows))
        ctx.prepared.update(plan=plan, plan_sha256=_plan_sha256(plan, config))
        return {"catalog": catalog_id(ctx.workspace),
                "opt_outs": "optouts-" + records.sha256_hex(records.canonical_json(opt_outs))[:16],
                "plan": "plan-" + ctx.prepared["plan_sha256"][:16]}

    def outputs_valid(self, run: Mapping[str, Any]) -> bool:
        """The dataset still has its index, its manifest and every tar the manifest names."""
        return dataset_complete(Path((run.get("outputs") or {}).get("dataset", "")))

    def resolved_config(self, config: ShardConfig) -> dict[str, Any]:
        return config.resolved()

    def run(self, ctx: StageContext, config: ShardConfig) -> StageOutput:
        workspace, run_id = ctx.workspace, ctx.run_id
        plan, plan_sha256 = ctx.prepared["plan"], ctx.prepared["plan_sha256"]
        rejections = [{**r, "run_id": run_id} for r in plan.rejections]
        dataset_dir = _find_dataset(workspace, plan_sha256)
        reused = dataset_dir is not None
        if dataset_dir is None:
            ctx.engine.ray()
            dataset_dir, reused = _build_dataset(workspace, plan, plan_sha256, config, run_id, ctx.progress)
        manifest = json.loads((dataset_dir / "dataset.json").read_text())
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
        details = {"dataset_id": manifest["dataset_id"], "dataset_dir": str(dataset_dir),
                   "num_tracks_in": plan.num_tracks_in, "num_tracks": counts["tracks"],
                   "num_segments": counts["segments"], "segments_by_split": by_split,
                   "num_shards": counts["shards"], "rejections": rejections, "reused": reused}
        run_counts = {"tracks_in": plan.num_tracks_in, "accepted": counts["tracks"],
                      "rejected": dict(sorted(Counter(r["reason"] for r in rejections).items())),
                      "segments": counts["segments"], "segments_by_split": by_split, "shards": counts["shards"],
                      "reused": reused}
        return StageOutput(outputs={"dataset": str(dataset_dir), "rejections": str(rejections_path)},
                           counts=run_counts, output_ids={"dataset": manifest["dataset_id"]}, details=details)


SHARD = ShardStage()


def read_catalog(workspace: Workspace) -> tuple[list[dict[str, Any]], list[dict[str, Any]], set[str]]:
    """The catalog tables as rows: (tracks, audio files, licence ids).

    Raises:
        FileNotFoundError: naming each missing table and the command that writes it.
    """
    paths = {name: workspace.catalog_table(name) for name in ("tracks", "audio_files", "licenses")}
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


def num_target_samples(num_source_samples: int, source_rate_hz: int, target_rate_hz: int) -> int:
    """Whole samples of a ``num_source_samples`` signal at ``target_rate_hz``: ``floor(n * target / source)``."""
    return int(num_source_samples) * int(target_rate_hz) // int(source_rate_hz)


def segment_starts(num_source_samples: int, source_rate_hz: int, config: ShardConfig) -> list[int]:
    """Start samples (at the dataset rate) of the whole segments of a track: ``0, S, 2S, ...``.

    At most ``config.max_segments_per_track``; empty when the track is shorter than one segment.
    """
    length = num_target_samples(num_source_samples, source_rate_hz, config.sample_rate_hz)
    count = length // config.segment_samples
    if config.max_segments_per_track is not None:
        count = min(count, config.max_segments_per_track)
    return [i * config.segment_samples for i in range(count)]


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def plan_shards(tracks: Sequence[Mapping[str, Any]], audio_files: Sequence[Mapping[str, Any]],
                license_ids: set[str], config: ShardConfig, missing_uris: set[str] = frozenset(),
                opt_outs: OptOutRegistry | None = None) -> ShardPlan:
    """Plan segments and shards for every track; each track is planned or rejected, never dropped.

    Args:
        tracks: Track rows (the stage's input records).
        audio_files: AudioFile rows; only ``role == "mixture"`` rows are used.
        license_ids: ids in the licence table; a track whose licence is not there is rejected.
        config: the stage config.
        missing_uris: mixture URIs known not to exist (checked by the caller, so this stays pure).
        opt_outs: tracks it names are rejected ``opted_out`` (a takedown after the catalog was curated).
    """
    mixtures: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for row in audio_files:
        if row["role"] == records.Role.MIXTURE.value:
            mixtures[row["track_id"]].append(row)

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


def _track_meta(track: Mapping[str, Any]) -> dict[str, Any]:
    return {"license_id": track.get("license_id"), "rights_holder": track.get("rights_holder"),
            "title": track.get("title"), "artist": track.get("artist"), "tags": list(track.get("tags") or []),
            "attribution": track.get("attribution") or "", "text": records.conditioning_text(track),
            # musical conditions (training/conditioning.py reads them; absent values are "unknown")
            "genre": track.get("genre") or None, "bpm": track.get("bpm"), "key": track.get("key") or None}


def _plan_sha256(plan: ShardPlan, config: ShardConfig) -> str:
    """Hash of everything the dataset's bytes depend on; the PCM sha256 stands for the audio (or the
    file's size and mtime when the catalog has no sha256)."""
    audio = []
    for item in plan.work:
        if item["pcm_sha256"]:
            audio.append(item["pcm_sha256"])
        else:
            stat = os.stat(item["uri"])
            audio.append(f"{item['uri']}:{stat.st_size}:{stat.st_mtime_ns}")
    work = [{k: v for k, v in item.items() if k not in ("uri", "pcm_sha256")} for item in plan.work]
    return records.sha256_hex(records.canonical_json(
        {"format": SHARD_FORMAT_VERSION, "config": config.resolved(), "work": work, "audio": audio}))


# ---------------------------------------------------------------------------------------------------
# Encode (one track → its samples); runs inside Ray workers
# ---------------------------------------------------------------------------------------------------
class ShardInputError(ValueError):
    """A mixture does not match its catalog row (decode failure, other rate, length or channel count)."""


def encode_track(item: Mapping[str, Any], config: ShardConfig) -> list[dict[str, Any]]:
    """Decode, downmix, resample and cut one track; encode each planned segment's members.

    Returns:
        one dict per segment: ``shard``, ``key``, ``segment_id``, ``flac``, ``mel_npy``, ``json`` (bytes).

    Raises:
        ShardInputError: the file cannot be decoded or no longer matches the catalog.
    """
    try:
        audio, rate = read_audio(item["uri"])
    except (FileNotFoundError, ValueError) as err:
        raise ShardInputError(f"track {item['track_id']}: {err}; re-run `linernotes ingest`") from err
    expected = (item["source_rate_hz"], item["source_num_samples"])
    if (rate, audio.shape[1]) != expected or (item["num_channels"] and audio.shape[0] != item["num_channels"]):
        raise ShardInputError(
            f"track {item['track_id']}: {item['uri']} has {audio.shape[0]} channels, {audio.shape[1]} samples at "
            f"{rate} Hz, the catalog says {item['num_channels']}, {expected[1]} at {expected[0]} Hz: the catalog "
            f"is stale, re-run `linernotes ingest`")
    mono = resample(to_mono(audio), rate, config.sample_rate_hz)
    length = num_target_samples(audio.shape[1], rate, config.sample_rate_hz)
    if mono.shape[1] < length:
        raise RuntimeError(f"resampler returned {mono.shape[1]} samples, fewer than floor(n·to/from)={length}")
    mel_config, segment_samples = config.mel_config(), config.segment_samples
    out = []
    for segment in item["segments"]:
        start = segment["start_sample"]
        clip = mono[:, start:start + segment_samples]
        buffer = io.BytesIO()
        np.save(buffer, log_mel(clip, mel_config).astype(np.float16), allow_pickle=False)
        out.append({
            "shard": segment["shard"], "key": segment["key"], "segment_id": segment["segment_id"],
            "flac": encode_flac(clip, config.sample_rate_hz, subtype="PCM_16"),
            "mel_npy": buffer.getvalue(),
            "json": _sample_json(item, segment, config).encode("utf-8"),
        })
    return out


def _sample_json(item: Mapping[str, Any], segment: Mapping[str, Any], config: ShardConfig) -> str:
    sample_rate_hz, segment_samples = config.sample_rate_hz, config.segment_samples
    return records.canonical_json({
        "segment_id": segment["segment_id"], "track_id": item["track_id"], "start_sample": segment["start_sample"],
        "num_samples": segment_samples, "start_s": segment["start_sample"] / sample_rate_hz,
        "duration_s": segment_samples / sample_rate_hz, "sample_rate_hz": sample_rate_hz, "split": segment["split"],
        **item["meta"],
    })


def _encode_row(row: dict[str, Any], config: dict[str, Any]) -> list[dict[str, Any]]:
    """Ray Data UDF: one ``{"work": json}`` row → the track's sample rows."""
    return encode_track(json.loads(row["work"]), ShardConfig(**config))


# ---------------------------------------------------------------------------------------------------
# Commit (driver)
# ---------------------------------------------------------------------------------------------------
def write_shard(path: Path, samples: Sequence[Mapping[str, Any]]) -> str:
    """Write a WebDataset tar deterministically; returns its sha256.

    Members (``KEY.flac``, ``KEY.json``, ``KEY.mel.npy`` of each sample) are sorted by name; headers are
    GNU format (long names), ``mtime=0``, uid/gid 0, empty owner names, mode 0o444.
    """
    members = {}
    for sample in samples:
        for extension, column in (("flac", "flac"), ("json", "json"), ("mel.npy", "mel_npy")):
            members[f"{sample['key']}.{extension}"] = bytes(sample[column])
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name in sorted(members):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(members[name]), 0, 0o444
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(members[name]))
    data = buffer.getvalue()
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def _build_dataset(workspace: Workspace, plan: ShardPlan, plan_sha256: str, config: ShardConfig, run_id: str,
                   progress: Progress | None) -> tuple[Path, bool]:
    """Encode with Ray Data, write tars, manifest and index into a temporary folder, then rename it."""
    tmp_dir = workspace.datasets_dir / f".tmp-{run_id}"
    tmp_dir.mkdir(parents=True)
    try:
        planned = {s["segment_id"]: (item, s) for item in plan.work for s in item["segments"]}
        index_rows, shard_sha256 = [], {}
        pending: dict[str, list[dict[str, Any]]] = defaultdict(list)
        total = len(planned)
        for done, sample in enumerate(_encode_with_ray(plan.work, config), start=1):
            pending[sample["shard"]].append(sample)
            if progress:
                progress("segments", done, total)
            shard = sample["shard"]
            if len(pending[shard]) == plan.shard_sizes[shard]:
                samples = pending.pop(shard)
                shard_sha256[shard] = write_shard(tmp_dir / shard, samples)
                index_rows.extend(_index_row(planned[s["segment_id"]], s, config) for s in samples)
                if progress:
                    progress("shards", len(shard_sha256), len(plan.shard_sizes))
        if pending or len(index_rows) != total:
            raise RuntimeError(f"Ray returned {len(index_rows)} of {total} planned segments; "
                               f"incomplete shards: {sorted(pending)}")

        index_rows.sort(key=lambda r: (r["split"], r["shard"], r["key"]))
        dataset_id = "ds-" + records.sha256_hex(records.canonical_json(
            {"index": index_rows, "shard_sha256": dict(sorted(shard_sha256.items()))}))[:16]
        records.write_json(_manifest(dataset_id, plan, plan_sha256, config, index_rows, shard_sha256),
                           tmp_dir / "dataset.json")
        records.write_table(records.to_table(index_rows, records.SHARD_ENTRY), tmp_dir / "index.parquet")

        final_dir = workspace.dataset_dir(dataset_id)
        if final_dir.exists() and dataset_complete(final_dir):
            shutil.rmtree(tmp_dir)
            return final_dir, True
        if final_dir.exists():  # a broken copy (a tar or the index lost): the one just built replaces it
            shutil.rmtree(final_dir)
        try:
            os.rename(tmp_dir, final_dir)
        except OSError:
            if not (final_dir / "index.parquet").is_file():
                raise
            shutil.rmtree(tmp_dir)  # a concurrent run committed the same dataset first
            return final_dir, True
        return final_dir, False
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise


def _encode_with_ray(work: list[dict[str, Any]], config: ShardConfig) -> Iterator[dict[str, Any]]:
    """Sample rows from Ray Data, in plan order (``preserve_order``) so shards complete one by one."""
    import ray.data
    import ray.exceptions

    if not work:
        return
    with _quiet_ray_data():
        items = [{"work": records.canonical_json(item)} for item in work]
        ds = ray.data.from_items(items, override_num_blocks=min(len(items), 512))
        ds = ds.flat_map(_encode_row, fn_kwargs={"config": config.model_dump()})
        try:
            for row in ds.iter_rows():
                yield dict(row)
        except ray.exceptions.RayError as err:
            # Ray passes the worker's exception as text only; give the caller the typed error back.
            marker = f"{ShardInputError.__name__}: "
            lines = [line for line in str(err).splitlines() if marker in line]
            if not lines:
                raise
            raise ShardInputError(lines[-1].split(marker, 1)[1]) from err


@contextmanager
def _quiet_ray_data() -> Iterator[None]:
    """No Ray Data progress bars or progress logs (the CLI shows its own); order preserved. Restored after."""
    from ray.data import DataContext

    context = DataContext.get_current()
    saved = (context.enable_progress_bars, context.enable_operator_progress_bars,
             context.execution_options.preserve_order)
    logger = logging.getLogger("ray.data")
    saved_level = logger.level
    context.enable_progress_bars = context.enable_operator_progress_bars = False
    context.execution_options.preserve_order = True
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        (context.enable_progress_bars, context.enable_operator_progress_bars,
         context.execution_options.preserve_order) = saved
        logger.setLevel(saved_level)


def _index_row(planned: tuple[Mapping[str, Any], Mapping[str, Any]], sample: Mapping[str, Any],
               config: ShardConfig) -> dict[str, Any]:
    item, segment = planned
    key = sample["key"]
    return {
        "segment_id": segment["segment_id"], "track_id": item["track_id"], "split": segment["split"],
        "start_sample": segment["start_sample"], "num_samples": config.segment_samples,
        "start_s": segment["start_sample"] / config.sample_rate_hz,
        "duration_s": config.segment_samples / config.sample_rate_hz,
        "shard": segment["shard"], "key": key, "members": [f"{key}.flac", f"{key}.json", f"{key}.mel.npy"],
        "sha256": hashlib.sha256(bytes(sample["flac"])).hexdigest(),
    }


def _manifest(dataset_id: str, plan: ShardPlan, plan_sha256: str, config: ShardConfig,
              index_rows: list[dict[str, Any]], shard_sha256: dict[str, str]) -> dict[str, Any]:
    by_split = Counter(row["split"] for row in index_rows)
    return {
        "dataset_id": dataset_id,
        "config": config.resolved(),
        "config_sha256": config.sha256(),
        "plan_sha256": plan_sha256,
        "format_version": SHARD_FORMAT_VERSION,
        "counts": {"tracks": len(plan.work), "segments": len(index_rows),
                   **{split.value: by_split.get(split.value, 0) for split in Split},
                   "shards": len(shard_sha256)},
        "shards": {split.value: sorted(s for s in shard_sha256 if s.startswith(f"{split.value}-")) for split in Split},
        "shard_sha256": dict(sorted(shard_sha256.items())),
        "tracks": dict(sorted(Counter(row["track_id"] for row in index_rows).items())),
    }


def dataset_complete(dataset_dir: Path) -> bool:
    """Whether a dataset folder holds its ``index.parquet``, its ``dataset.json`` and every tar that names."""
    manifest_path = dataset_dir / "dataset.json"
    if not (dataset_dir / "index.parquet").is_file() or not manifest_path.is_file():
        return False
    manifest = json.loads(manifest_path.read_text())
    return all((dataset_dir / name).is_file() for name in manifest.get("shard_sha256", {}))


def _find_dataset(workspace: Workspace, plan_sha256: str) -> Path | None:
    """A complete dataset (index, manifest and every tar present) built from the same plan, if any."""
    if not workspace.datasets_dir.is_dir():
        return None
    for candidate in sorted(workspace.datasets_dir.glob("ds-*")):
        if dataset_complete(candidate) and json.loads(
                (candidate / "dataset.json").read_text()).get("plan_sha256") == plan_sha256:
            return candidate
    return None
