"""The shard stage's encode and commit steps (see ``pipelines.stages.shard.stage`` for the whole stage).

- **Encode** (Ray Data, one row per track, in the workers): decode the mixture, downmix to mono, resample, cut the
  planned segments and encode each sample's members: ``KEY.flac``, ``KEY.mel.npy`` and ``KEY.json``.
- **Commit** (on the driver): tars written deterministically into a temporary folder under ``datasets/``,
  ``index.parquet`` last, then the folder renamed to ``datasets/<dataset_id>``.
"""

from __future__ import annotations

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
from pathlib import Path
from typing import Any

import numpy as np

from cleaning.audio import encode_flac, read_audio, resample, to_mono
from cleaning.measure import measure_peak_dbfs
from cleaning.mel import log_mel
from pipelines.stages.shard.config import (
    SHARD_FORMAT_VERSION,
    STAGE,
    ShardConfig,
    ShardPlan,
    num_target_samples,
    shard_name,
)
from provenance import records
from provenance.records import RejectionReason, Split
from provenance.workspace import Workspace

Progress = Callable[[str, int, int], None]


# ---------------------------------------------------------------------------------------------------
# Encode (one track → its samples); runs inside Ray workers
# ---------------------------------------------------------------------------------------------------
class ShardInputError(ValueError):
    """A mixture or stem does not match its catalog row (decode failure, other rate, length or channel count)."""


def encode_track(item: Mapping[str, Any], config: ShardConfig) -> list[dict[str, Any]]:
    """Decode, downmix, resample and cut one track (and its planned stems); encode each planned segment's members.

    A segment whose mixture peak (mono, at the dataset rate) is below ``config.silence_floor_dbfs`` is not encoded:
    its row carries ``rejection`` (``silent_segment``) and ``detail`` instead of members. A stem shorter than the
    mixture is zero-padded to the segment window (it is silent there).

    Returns:
        one dict per planned segment, in plan order: ``track_id``, ``split``, ``key``, ``segment_id``, ``flac``,
        ``mel_npy``, ``json`` (bytes), ``stem_members`` (member extensions, ``vocals.flac``) and ``stem_flacs``
        (bytes, aligned), ``rejection`` and ``detail`` (empty for a sample).

    Raises:
        ShardInputError: a file cannot be decoded or no longer matches the catalog.
    """
    mono = _read_mono(item, item["track_id"], "mixture", config)
    mel_config, segment_samples = config.mel_config(), config.segment_samples
    out = []
    for segment in item["segments"]:
        start = segment["start_sample"]
        clip = mono[:, start:start + segment_samples]
        row = {"track_id": item["track_id"], "split": segment["split"], "key": segment["key"],
               "segment_id": segment["segment_id"], "flac": b"", "mel_npy": b"", "json": b"",
               "stem_members": [], "stem_flacs": [], "rejection": "", "detail": ""}
        peak_dbfs = measure_peak_dbfs(clip)
        if peak_dbfs < config.silence_floor_dbfs:
            out.append({**row, "rejection": RejectionReason.SILENT_SEGMENT.value,
                        "detail": f"peak {peak_dbfs:.1f} dBFS is below shard.silence_floor_dbfs="
                                  f"{config.silence_floor_dbfs:g}"})
            continue
        buffer = io.BytesIO()
        np.save(buffer, log_mel(clip, mel_config).astype(np.float16), allow_pickle=False)
        out.append({**row, "flac": encode_flac(clip, config.sample_rate_hz, subtype="PCM_16"),
                    "mel_npy": buffer.getvalue(), "json": _sample_json(item, segment, config).encode("utf-8")})
    del mono
    for stem in item.get("stems", ()):  # one stem decoded at a time: memory stays one file, not the multitrack
        audio = _read_mono(stem, item["track_id"], f"stem {stem['member']}", config)
        for segment, row in zip(item["segments"], out):
            if not row["rejection"]:
                window = _window(audio, segment["start_sample"], segment_samples)
                row["stem_members"].append(stem["member"])
                row["stem_flacs"].append(encode_flac(window, config.sample_rate_hz, subtype="PCM_16"))
    return out


def _read_mono(source: Mapping[str, Any], track_id: str, what: str, config: ShardConfig) -> np.ndarray:
    """One planned file decoded, checked against its catalog row, downmixed and resampled: float32 ``(1, n)`` with
    ``n ≥ floor(num_samples · rate / source rate)``."""
    try:
        audio, rate = read_audio(source["uri"])
    except (FileNotFoundError, ValueError) as err:
        raise ShardInputError(f"track {track_id} {what}: {err}; re-run `linernotes ingest`") from err
    expected = (source["source_rate_hz"], source["source_num_samples"])
    if (rate, audio.shape[1]) != expected or (source["num_channels"] and audio.shape[0] != source["num_channels"]):
        raise ShardInputError(
            f"track {track_id} {what}: {source['uri']} has {audio.shape[0]} channels, {audio.shape[1]} samples at "
            f"{rate} Hz, the catalog says {source['num_channels']}, {expected[1]} at {expected[0]} Hz: the catalog "
            f"is stale, re-run `linernotes ingest`")
    mono = resample(to_mono(audio), rate, config.sample_rate_hz)
    length = num_target_samples(audio.shape[1], rate, config.sample_rate_hz)
    if mono.shape[1] < length:
        raise RuntimeError(f"resampler returned {mono.shape[1]} samples, fewer than floor(n·to/from)={length}")
    return mono


def _window(audio: np.ndarray, start: int, num_samples: int) -> np.ndarray:
    """``audio[:, start:start + num_samples]``, zero-padded at the end to ``num_samples``."""
    clip = audio[:, start:start + num_samples]
    if clip.shape[1] < num_samples:
        clip = np.pad(clip, ((0, 0), (0, num_samples - clip.shape[1])))
    return clip


def _sample_json(item: Mapping[str, Any], segment: Mapping[str, Any], config: ShardConfig) -> str:
    sample_rate_hz, segment_samples = config.sample_rate_hz, config.segment_samples
    stems = ({"stems": [{"role": s["role"], "instrument": s["instrument"], "member": s["member"]}
                        for s in item["stems"]]} if config.stems else {})
    return records.canonical_json({
        "segment_id": segment["segment_id"], "track_id": item["track_id"], "start_sample": segment["start_sample"],
        "num_samples": segment_samples, "start_s": segment["start_sample"] / sample_rate_hz,
        "duration_s": segment_samples / sample_rate_hz, "sample_rate_hz": sample_rate_hz, "split": segment["split"],
        **item["meta"], **stems,
    })


def _encode_row(row: dict[str, Any], config: dict[str, Any]) -> list[dict[str, Any]]:
    """Ray Data UDF: one ``{"work": json}`` row → the track's sample rows."""
    return encode_track(json.loads(row["work"]), ShardConfig(**config))


# ---------------------------------------------------------------------------------------------------
# Commit (driver)
# ---------------------------------------------------------------------------------------------------
def write_shard(path: Path, samples: Sequence[Mapping[str, Any]]) -> str:
    """Write a WebDataset tar deterministically; returns its sha256.

    Members (``KEY.flac``, ``KEY.json``, ``KEY.mel.npy`` and the stems' ``KEY.<role>[.<instrument>].flac`` of each
    sample) are sorted by name; headers are GNU format (long names), ``mtime=0``, uid/gid 0, empty owner names,
    mode 0o444.
    """
    members = {}
    for sample in samples:
        for name, data in sample_members(sample).items():
            members[name] = data
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


def sample_members(sample: Mapping[str, Any]) -> dict[str, bytes]:
    """Member name → bytes of one encoded sample, sorted by name."""
    key = sample["key"]
    members = {f"{key}.{extension}": bytes(sample[column])
               for extension, column in (("flac", "flac"), ("json", "json"), ("mel.npy", "mel_npy"))}
    for extension, data in zip(sample.get("stem_members") or (), sample.get("stem_flacs") or ()):
        members[f"{key}.{extension}"] = bytes(data)
    return dict(sorted(members.items()))


class _ShardFiller:
    """Puts encoded samples into shards in the order the plan sorted them, skipping rejected segments.

    Within a split, segments sorted by ``segment_id`` fill ``{split}-{i:06d}.tar`` with ``samples_per_shard`` each.
    Rows arrive in any order; a segment is placed once every segment before it in its split has arrived, so the
    shards (and their bytes) depend only on which segments were kept. With no rejected segment every sample lands in
    the shard the plan named.
    """

    def __init__(self, plan: ShardPlan, samples_per_shard: int) -> None:
        self.order: dict[str, list[str]] = defaultdict(list)
        for item in plan.work:
            for segment in item["segments"]:
                self.order[segment["split"]].append(segment["segment_id"])
        for ids in self.order.values():
            ids.sort()
        self.per = samples_per_shard
        self.cursor: Counter[str] = Counter()
        self.placed: Counter[str] = Counter()
        self.rejected: Counter[str] = Counter()
        self.arrived: dict[str, dict[str, Any] | None] = {}

    def add(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        """Take one encoder row; returns the samples now placed, each with its ``shard``."""
        split = row["split"]
        self.arrived[row["segment_id"]] = None if row["rejection"] else row
        if row["rejection"]:
            self.rejected[split] += 1
        order, placed = self.order[split], []
        while self.cursor[split] < len(order) and order[self.cursor[split]] in self.arrived:
            sample = self.arrived.pop(order[self.cursor[split]])
            self.cursor[split] += 1
            if sample is not None:
                sample["shard"] = shard_name(split, self.placed[split] // self.per)
                self.placed[split] += 1
                placed.append(sample)
        return placed

    def is_full(self, shard: str, size: int) -> bool:
        """Whether ``shard`` holding ``size`` samples will get no more."""
        split, _, number = shard.rpartition("-")
        if size == self.per:
            return True
        last = (len(self.order[split]) - self.rejected[split] - 1) // self.per
        done = self.cursor[split] == len(self.order[split])
        return done and int(number.removesuffix(".tar")) == last

    def num_shards(self) -> int:
        """Shards expected now: the kept and not-yet-rejected segments of each split, in shards."""
        return sum(-(-(len(ids) - self.rejected[split]) // self.per) for split, ids in self.order.items())


def build_dataset(workspace: Workspace, plan: ShardPlan, plan_sha256: str, config: ShardConfig, run_id: str,
                  progress: Progress | None, sources: Mapping[str, Any] | None = None) -> tuple[Path, bool]:
    """Encode with Ray Data, write tars, manifest and index into a temporary folder, then rename it.

    ``sources`` (the catalog version, its decisions' id and the clean Run that made them) go into ``dataset.json``
    as they are. Segments rejected while encoding (``silent_segment``) are listed in its ``rejections``, and a
    track all of whose segments were rejected is a track Rejection there too.
    """
    tmp_dir = workspace.datasets_dir / f".tmp-{run_id}"
    tmp_dir.mkdir(parents=True)
    try:
        planned = {s["segment_id"]: (item, s) for item in plan.work for s in item["segments"]}
        index_rows, shard_sha256, rejections = [], {}, []
        pending: dict[str, list[dict[str, Any]]] = defaultdict(list)
        filler = _ShardFiller(plan, config.samples_per_shard)
        total = len(planned)
        for done, row in enumerate(_encode_with_ray(plan.work, config), start=1):
            if progress:
                progress("segments", done, total)
            if row["rejection"]:
                rejections.append(records.rejection("segment", row["segment_id"], STAGE, row["rejection"],
                                                    row["detail"]))
            for sample in filler.add(row):
                pending[sample["shard"]].append(sample)
            for shard in [s for s, samples in pending.items() if filler.is_full(s, len(samples))]:
                samples = pending.pop(shard)
                shard_sha256[shard] = write_shard(tmp_dir / shard, samples)
                index_rows.extend(_index_row(planned[s["segment_id"]], s, config) for s in samples)
                if progress:
                    progress("shards", len(shard_sha256), filler.num_shards())
        if pending or len(index_rows) + len(rejections) != total:
            raise RuntimeError(f"Ray returned {len(index_rows) + len(rejections)} of {total} planned segments; "
                               f"incomplete shards: {sorted(pending)}")
        rejections += _emptied_tracks(plan, index_rows, rejections)

        index_rows.sort(key=lambda r: (r["split"], r["shard"], r["key"]))
        dataset_id = "ds-" + records.sha256_hex(records.canonical_json(
            {"index": index_rows, "shard_sha256": dict(sorted(shard_sha256.items()))}))[:16]
        manifest = _manifest(dataset_id, plan, plan_sha256, config, index_rows, shard_sha256, rejections)
        records.write_json({**manifest, **(sources or {})}, tmp_dir / "dataset.json")
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
        "shard": sample["shard"], "key": key, "members": list(sample_members(sample)),
        "sha256": hashlib.sha256(bytes(sample["flac"])).hexdigest(),
    }


def _emptied_tracks(plan: ShardPlan, index_rows: Sequence[Mapping[str, Any]],
                    rejections: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """A track Rejection for each planned track none of whose segments was kept (all below the silence floor)."""
    kept = {row["track_id"] for row in index_rows}
    out = []
    for item in sorted(plan.work, key=lambda w: w["track_id"]):
        if item["track_id"] not in kept:
            out.append(records.rejection("track", item["track_id"], STAGE, RejectionReason.SILENT_SEGMENT,
                                         f"all {len(item['segments'])} segment(s) are below the silence floor"))
    return out


def _manifest(dataset_id: str, plan: ShardPlan, plan_sha256: str, config: ShardConfig,
              index_rows: list[dict[str, Any]], shard_sha256: dict[str, str],
              rejections: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    by_split = Counter(row["split"] for row in index_rows)
    tracks = Counter(row["track_id"] for row in index_rows)
    stems = {item["track_id"]: [stem["member"] for stem in item["stems"]]
             for item in plan.work if item.get("stems") and item["track_id"] in tracks}
    return {
        "dataset_id": dataset_id,
        "config": config.resolved(),
        "config_sha256": config.sha256(),
        "plan_sha256": plan_sha256,
        "format_version": SHARD_FORMAT_VERSION,
        "counts": {"tracks": len(tracks), "segments_planned": sum(len(w["segments"]) for w in plan.work),
                   "segments": len(index_rows),
                   **{split.value: by_split.get(split.value, 0) for split in Split},
                   "shards": len(shard_sha256),
                   "segments_rejected": dict(sorted(Counter(r["reason"] for r in rejections
                                                            if r["record_kind"] == "segment").items()))},
        "shards": {split.value: sorted(s for s in shard_sha256 if s.startswith(f"{split.value}-")) for split in Split},
        "shard_sha256": dict(sorted(shard_sha256.items())),
        "tracks": dict(sorted(tracks.items())),
        "stems": dict(sorted(stems.items())),
        "rejections": sorted(rejections, key=lambda r: (r["record_kind"], r["record_id"])),
    }


def dataset_complete(dataset_dir: Path) -> bool:
    """Whether a dataset folder holds its ``index.parquet``, its ``dataset.json`` and every tar that names."""
    manifest_path = dataset_dir / "dataset.json"
    if not (dataset_dir / "index.parquet").is_file() or not manifest_path.is_file():
        return False
    manifest = json.loads(manifest_path.read_text())
    return all((dataset_dir / name).is_file() for name in manifest.get("shard_sha256", {}))


def find_dataset(workspace: Workspace, plan_sha256: str) -> Path | None:
    """A complete dataset (index, manifest and every tar present) built from the same plan, if any."""
    if not workspace.datasets_dir.is_dir():
        return None
    for candidate in sorted(workspace.datasets_dir.glob("ds-*")):
        if dataset_complete(candidate) and json.loads(
                (candidate / "dataset.json").read_text()).get("plan_sha256") == plan_sha256:
            return candidate
    return None
