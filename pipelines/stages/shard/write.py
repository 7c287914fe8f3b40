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
from cleaning.mel import log_mel
from pipelines.stages.shard.config import SHARD_FORMAT_VERSION, ShardConfig, ShardPlan, num_target_samples
from provenance import records
from provenance.records import Split
from provenance.workspace import Workspace

Progress = Callable[[str, int, int], None]


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


def build_dataset(workspace: Workspace, plan: ShardPlan, plan_sha256: str, config: ShardConfig, run_id: str,
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


def find_dataset(workspace: Workspace, plan_sha256: str) -> Path | None:
    """A complete dataset (index, manifest and every tar present) built from the same plan, if any."""
    if not workspace.datasets_dir.is_dir():
        return None
    for candidate in sorted(workspace.datasets_dir.glob("ds-*")):
        if dataset_complete(candidate) and json.loads(
                (candidate / "dataset.json").read_text()).get("plan_sha256") == plan_sha256:
            return candidate
    return None
