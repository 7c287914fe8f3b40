"""The training input: a seeded, endless WebDataset stream of (normalised log-mel crop, text) pairs.

A dataset folder (written by the shard stage) holds ``dataset.json``, ``index.parquet`` and WebDataset
tars whose samples have members ``KEY.flac``, ``KEY.mel.npy`` (float16 ``(n_mels, frames)`` natural-log
magnitude mel, ``cleaning.mel.log_mel``) and ``KEY.json`` (segment_id, track_id, text, tags, ...).
Training reads only ``mel.npy`` and ``json``: the audio is never decoded (the tar stream skips it).

Order is a pure function of ``(seed, rank, loader worker, epoch)``: shards are shuffled per epoch, split
between ranks and DataLoader workers, samples pass a seeded shuffle buffer and are cropped at seeded
offsets. With fewer shards than readers, every reader reads every shard and keeps every n-th sample.

``MelBatchStream`` is the trainer's stream: whole batches with the samples' conditioning fields, epochs of
a fixed length per reader (so uneven shards never starve a rank), and an exact resume position.
``MelTextStream`` is the earlier per-sample stream, kept for its callers.

With ``source="stems"`` (``shard_statistics`` and ``MelBatchStream``) every kept stem of a sample is one example
(``training.stems``): its mel is computed from the stem's FLAC member at load time and its text and instrument name
the stem. The mixture path (the default) reads and yields exactly what it did before stems existed.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import count, islice
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.conditioning import encode_conditions
import webdataset as wds

from cleaning.mel import MelConfig
from training.stems import STEM_FLAC, NoStemsError, expand_stems, is_stem_member, no_stems_message, stem_mel

_MEMBERS = ("mel.npy", "json")
SOURCES = ("mixture", "stems")
"""What a training example is (``TrainConfig.source``): a segment's mixture ``mel.npy``, or each of its kept stems
(``training.stems``)."""


@dataclass(frozen=True)
class DatasetInfo:
    """What ``dataset.json`` says about a dataset folder.

    Attributes:
        dataset_id: the Dataset record's key.
        mel_config: the log-mel parameters of every ``mel.npy``.
        segment_s: segment duration in seconds.
        shards: split name → absolute shard paths, in the manifest's order.
        manifest: the whole parsed ``dataset.json``.
    """

    dataset_id: str
    mel_config: MelConfig
    segment_s: float
    shards: dict[str, list[str]]
    manifest: dict[str, Any]


def read_dataset_info(dataset_dir: str | os.PathLike[str]) -> DatasetInfo:
    """Read ``dataset_dir/dataset.json``.

    Raises:
        FileNotFoundError: no ``dataset.json``, or a listed shard is missing.
        ValueError: a required key (dataset_id, config.mel, shards) is missing.
    """
    dataset_dir = Path(dataset_dir)
    manifest = json.loads((dataset_dir / "dataset.json").read_text(encoding="utf-8"))
    try:
        config = manifest["config"]
        mel_config = MelConfig(**config["mel"])
        shards = {split: [str((dataset_dir / name).resolve()) for name in names]
                  for split, names in manifest["shards"].items()}
        info = DatasetInfo(manifest["dataset_id"], mel_config, float(config.get("segment_s", 0.0)), shards, manifest)
    except (KeyError, TypeError) as err:
        raise ValueError(f"{dataset_dir / 'dataset.json'}: missing or malformed key {err}") from err
    for paths in shards.values():
        for path in paths:
            if not Path(path).exists():
                raise FileNotFoundError(f"shard {path} listed in {dataset_dir / 'dataset.json'} does not exist")
    return info


def iter_mel_samples(shard_paths: Sequence[str | os.PathLike[str]]) -> Iterator[dict[str, Any]]:
    """Samples of the shards, in tar order, without decoding audio.

    Yields:
        dicts with ``key`` (str), ``mel`` (float32 ``(n_mels, frames)`` log-mel) and ``meta`` (the json).

    Raises:
        ValueError: a sample lacks ``mel.npy`` or ``json``.
    """
    sources = ({"url": str(path)} for path in shard_paths)
    for sample in wds.tarfile_samples(sources, select_files=_is_training_member):
        missing = [member for member in _MEMBERS if member not in sample]
        if missing:
            raise ValueError(f"sample {sample.get('__key__')} in {sample.get('__url__')} lacks {missing}")
        mel = np.load(io.BytesIO(sample["mel.npy"]), allow_pickle=False).astype(np.float32)
        yield {"key": sample["__key__"], "mel": mel, "meta": json.loads(sample["json"].decode("utf-8"))}


def measure_mel_stats(shard_paths: Sequence[str | os.PathLike[str]]) -> tuple[float, float]:
    """Mean and standard deviation of every log-mel value (all bins, frames, samples) in the shards.

    Accumulated in float64 over one pass. These normalise the model's input and are stored in its
    checkpoint so that generation can undo them.

    Returns:
        ``(mean, std)`` in natural-log magnitude units; ``std > 0``.

    Raises:
        ValueError: no samples, or the values are constant or not finite.
    """
    stats = shard_statistics(shard_paths)
    return stats.mel_mean, stats.mel_std


@dataclass(frozen=True)
class ShardStatistics:
    """One pass over the train shards: the normalisation statistics and the sample count.

    Attributes:
        mel_mean, mel_std: mean and standard deviation of every log-mel value (natural-log magnitude).
        num_samples: samples (segments) in all the shards.
    """

    mel_mean: float
    mel_std: float
    num_samples: int


def shard_statistics(shard_paths: Sequence[str | os.PathLike[str]], source: str = "mixture",
                     mel_config: MelConfig | None = None) -> ShardStatistics:
    """``measure_mel_stats`` and the number of examples, in one float64 pass over the shards.

    With ``source="stems"`` the examples are the samples' stems and their mels are computed from the stem FLACs
    with ``mel_config`` (the dataset's), so the statistics normalise what the stem model is trained on.

    Raises:
        NoStemsError: ``source="stems"`` and a sample has no stem list (the dataset was sharded without stems).
        ValueError: no examples, the values are constant or not finite, an unknown ``source``, or ``stems``
            without ``mel_config``.
    """
    _check_source(source, mel_config)
    if source == "stems":
        mels: Iterator[np.ndarray] = (stem_mel(example[STEM_FLAC], mel_config).astype(np.float32)
                                      for example in _raw_samples([str(p) for p in shard_paths], source))
    else:
        mels = (sample["mel"] for sample in iter_mel_samples(shard_paths))
    total, total_sq, num_values, num_samples = 0.0, 0.0, 0, 0
    for values in mels:
        mel = values.astype(np.float64)
        total += float(mel.sum())
        total_sq += float((mel * mel).sum())
        num_values += mel.size
        num_samples += 1
    if num_values == 0 and source == "stems":
        raise NoStemsError(no_stems_message(f"{len(shard_paths)} shard(s) {list(map(str, shard_paths))[:3]}"))
    if num_values == 0:
        raise ValueError(f"no samples in {len(shard_paths)} shard(s): {list(map(str, shard_paths))[:3]}")
    mean = total / num_values
    std = float(np.sqrt(max(total_sq / num_values - mean * mean, 0.0)))
    if not (np.isfinite(mean) and np.isfinite(std) and std > 0):
        raise ValueError(f"log-mel statistics are degenerate: mean={mean}, std={std}")
    return ShardStatistics(mean, std, num_samples)


def crop_or_pad(mel: np.ndarray, crop_frames: int, rng: np.random.Generator, pad_value: float) -> np.ndarray:
    """A ``crop_frames`` window of ``mel`` (float32 ``(n_mels, frames)``) at a uniform random offset;
    shorter inputs are right-padded with ``pad_value``. Returns float32 ``(n_mels, crop_frames)``."""
    frames = mel.shape[-1]
    if frames >= crop_frames:
        start = int(rng.integers(0, frames - crop_frames + 1))
        return np.ascontiguousarray(mel[:, start:start + crop_frames], dtype=np.float32)
    out = np.full((mel.shape[0], crop_frames), pad_value, dtype=np.float32)
    out[:, :frames] = mel
    return out


class MelTextStream(torch.utils.data.IterableDataset):
    """Endless stream of ``(mel float32 (n_mels, crop_frames), text str)`` for one rank.

    ``mel`` is ``(log_mel - mel_mean) / mel_std``; crops shorter than ``crop_frames`` are padded with the
    normalised log floor (silence). Batch it with ``torch.utils.data.DataLoader(stream, batch_size)``.

    Args:
        shard_paths: the train shards (paths or URLs webdataset opens).
        mel_mean, mel_std: from ``measure_mel_stats`` over the train shards.
        crop_frames: frames per example.
        log_floor: ``MelConfig.log_floor``; padding is ``(log(log_floor) - mel_mean) / mel_std``.
        seed: the run's seed.
        rank, world_size: this reader's data-parallel rank and the number of ranks.
        shuffle_buffer: samples held by the shuffle buffer (1 disables shuffling within shards).
        with_conditions: yield ``(mel, text, conditions)`` with the float32 ``(K,)`` musical-condition
            vector of the sample's json (``training.conditioning.encode_conditions``).

    Raises:
        ValueError: no shards, ``mel_std <= 0``, or a bad rank (at construction); a reader that finds no
            samples in a whole epoch (when iterated), rather than spinning forever.
    """

    def __init__(self, shard_paths: Sequence[str | os.PathLike[str]], mel_mean: float, mel_std: float,
                 crop_frames: int, log_floor: float, seed: int, rank: int = 0, world_size: int = 1,
                 shuffle_buffer: int = 256, with_conditions: bool = False) -> None:
        super().__init__()
        self.with_conditions = with_conditions
        if not shard_paths:
            raise ValueError("shard_paths is empty: pass the dataset's train shards")
        if not mel_std > 0:
            raise ValueError(f"mel_std must be > 0, got {mel_std}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside [0, {world_size})")
        self.shard_paths = [str(path) for path in shard_paths]
        self.mel_mean, self.mel_std = float(mel_mean), float(mel_std)
        self.crop_frames = crop_frames
        self.pad_value = (float(np.log(log_floor)) - self.mel_mean) / self.mel_std
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.shuffle_buffer = max(1, shuffle_buffer)

    def __iter__(self) -> Iterator[tuple[np.ndarray, str]]:
        worker = torch.utils.data.get_worker_info()
        worker_id, num_loader_workers = (worker.id, worker.num_workers) if worker else (0, 1)
        reader, num_readers = self.rank * num_loader_workers + worker_id, self.world_size * num_loader_workers
        for epoch in count():
            rng = np.random.default_rng([self.seed, reader, epoch])
            shards = [self.shard_paths[i] for i in np.random.default_rng([self.seed, epoch]).permutation(
                len(self.shard_paths))]
            if len(shards) >= num_readers:  # split by shard
                samples = iter_mel_samples(shards[reader::num_readers])
            else:  # too few shards: everyone reads everything, keeps every n-th sample
                samples = (s for i, s in enumerate(iter_mel_samples(shards)) if i % num_readers == reader)
            num_yielded = 0
            for sample in _shuffled(samples, self.shuffle_buffer, rng):
                mel = (sample["mel"] - self.mel_mean) / self.mel_std
                item = crop_or_pad(mel, self.crop_frames, rng, self.pad_value), str(sample["meta"].get("text", ""))
                yield (*item, encode_conditions(sample["meta"])) if self.with_conditions else item
                num_yielded += 1
            if num_yielded == 0:
                raise ValueError(f"reader {reader} of {num_readers} got no samples from {len(shards)} shard(s): "
                                 "use fewer workers or more data")


def _shuffled(items: Iterator[Any], buffer_size: int, rng: np.random.Generator) -> Iterator[Any]:
    """Reservoir-style streaming shuffle: fill a buffer, emit a uniformly chosen element, refill."""
    buffer: list[Any] = []
    for item in items:
        buffer.append(item)
        if len(buffer) >= buffer_size:
            index = int(rng.integers(len(buffer)))
            buffer[index], buffer[-1] = buffer[-1], buffer[index]
            yield buffer.pop()
    while buffer:
        index = int(rng.integers(len(buffer)))
        buffer[index], buffer[-1] = buffer[-1], buffer[index]
        yield buffer.pop()


def _is_training_member(name: str) -> bool:
    """Keep ``KEY.mel.npy`` and ``KEY.json``; skip the audio and anything else."""
    return name.endswith(".mel.npy") or name.endswith(".json")


def _is_stem_training_member(name: str) -> bool:
    """Keep ``KEY.json`` and the stems ``KEY.<role>[.<slug>].flac``; skip the mixture's audio and mel."""
    return name.endswith(".json") or is_stem_member(name)


def _check_source(source: str, mel_config: MelConfig | None) -> None:
    if source not in SOURCES:
        raise ValueError(f"source must be one of {list(SOURCES)}, got {source!r}")
    if source == "stems" and mel_config is None:
        raise ValueError("source='stems' needs mel_config: the dataset's (dataset.json config.mel) to compute "
                         "the stems' mels")


# --- the trainer's stream: fixed-length epochs, whole batches, an exact resume position -----------------

CONDITIONING_FIELDS = ("text", "tags", "bpm", "key", "instrument", "genre", "mood", "duration_s")
"""The json fields a batch carries for conditioning (``None`` where a sample lacks one)."""


def loader_batches_consumed(start_batch: int, worker_id: int, num_loader_workers: int) -> int:
    """Batches that DataLoader worker ``worker_id`` had delivered when its rank had consumed ``start_batch``.

    ``torch.utils.data.DataLoader`` over an ``IterableDataset`` takes batch ``i`` from worker
    ``i % num_workers`` (in order), so worker ``w`` delivered ``#{i < start_batch : i % k == w}``.
    """
    k = max(1, num_loader_workers)
    return max(0, -(-(start_batch - worker_id) // k))


class MelBatchStream(torch.utils.data.IterableDataset):
    """Endless stream of training batches for one data-parallel rank, resumable at any batch.

    Wrap it as ``DataLoader(stream, batch_size=None, num_workers=k)``; each item is a dict::

        mel   float32 tensor (batch_size, n_mels, crop_frames): (log_mel - mel_mean) / mel_std, a seeded
              random window (shorter segments are right-padded with the normalised log floor)
        text  list[str], the samples' conditioning text
        cond  dict field -> list (one value per sample, ``None`` when absent) of ``CONDITIONING_FIELDS``
        meta  list[dict], each sample's whole ``json`` member (segment_id, track_id, licence, ...)
        key   list[str], the samples' WebDataset keys

    Readers: every (rank, DataLoader worker) pair is one reader, ``reader = rank * k + worker``, of
    ``world_size * k``. A reader's sample sequence is cut into epochs of exactly
    ``ceil(samples_per_epoch / num_readers)`` samples, so every reader yields the same number of
    batches per epoch whatever the shard sizes, and never runs dry (it is endless): no rank starves or
    waits at a collective for one that has. Within epoch ``e`` the shards are visited in passes; pass
    ``p`` permutes all shards with ``seed(seed, e, p)`` and, with at least as many shards as readers,
    deals them round-robin (split by node/rank and by worker: readers read disjoint shards); with fewer
    shards than readers every reader reads the pass's shards and keeps every ``num_readers``-th sample.
    Passes repeat until the epoch is full, then a seeded shuffle buffer (raw bytes, nothing decoded)
    reorders the epoch and the mels are decoded and cropped at offsets seeded by
    ``(seed, reader, epoch, index)``.

    Everything is a pure function of ``(seed, reader, position)``, so ``start_batch`` resumes the stream
    exactly: a reader skips the samples its rank's first ``start_batch`` batches took from it (undecoded,
    at most one epoch is re-read). Only ``mel.npy`` and ``json`` are read; the audio is skipped.

    Args:
        shard_paths: the train shards (paths or URLs webdataset opens).
        mel_mean, mel_std: from ``shard_statistics`` over the train shards.
        crop_frames: frames per example.
        log_floor: ``MelConfig.log_floor``.
        batch_size: samples per batch (per rank).
        seed: the run's seed.
        samples_per_epoch: samples of one epoch over all readers (usually the shards' sample count).
        rank, world_size: this rank and the number of ranks.
        shuffle_buffer: samples held by the shuffle buffer (1 disables shuffling).
        start_batch: batches this rank has already consumed (0 for a new run).
        source: ``"mixture"`` (each sample's ``mel.npy``) or ``"stems"`` (each kept stem of each sample, its mel
            computed from the stem's FLAC at load time, its json ``training.stems.stem_meta``); a "sample" above
            is then one stem example, and ``samples_per_epoch`` counts stem examples.
        mel_config: the dataset's mel parameters; required with ``source="stems"``.

    Raises:
        NoStemsError: ``source="stems"`` and a sample has no stem list (when iterated).
        ValueError: no shards, an unknown source, stems without ``mel_config``, ``mel_std <= 0``, a bad rank,
            a non-positive size (at construction); a pass over the shards that yields no sample for a reader
            (when iterated), instead of spinning.
    """

    def __init__(self, shard_paths: Sequence[str | os.PathLike[str]], mel_mean: float, mel_std: float,
                 crop_frames: int, log_floor: float, *, batch_size: int, seed: int, samples_per_epoch: int,
                 rank: int = 0, world_size: int = 1, shuffle_buffer: int = 256, start_batch: int = 0,
                 source: str = "mixture", mel_config: MelConfig | None = None) -> None:
        super().__init__()
        _check_source(source, mel_config)
        if not shard_paths:
            raise ValueError("shard_paths is empty: pass the dataset's train shards")
        if not mel_std > 0:
            raise ValueError(f"mel_std must be > 0, got {mel_std}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside [0, {world_size})")
        for name, value in (("batch_size", batch_size), ("samples_per_epoch", samples_per_epoch),
                            ("crop_frames", crop_frames)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if start_batch < 0:
            raise ValueError(f"start_batch must be >= 0, got {start_batch}")
        self.shard_paths = [str(path) for path in shard_paths]
        self.mel_mean, self.mel_std = float(mel_mean), float(mel_std)
        self.crop_frames, self.batch_size = crop_frames, batch_size
        self.pad_value = (float(np.log(log_floor)) - self.mel_mean) / self.mel_std
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.samples_per_epoch, self.shuffle_buffer = samples_per_epoch, max(1, shuffle_buffer)
        self.start_batch = start_batch
        self.source, self.mel_config = source, mel_config

    def reader_layout(self) -> tuple[int, int, int, int]:
        """``(reader, num_readers, logical worker, loader worker count)`` of the calling process.

        After a resume at ``start_batch`` the DataLoader asks its worker 0 first, but the next batch of the
        uninterrupted run was due from worker ``start_batch % k``: physical worker ``w`` therefore plays
        logical worker ``(w + start_batch) % k``, whose reader and position it takes over.
        """
        worker = torch.utils.data.get_worker_info()
        worker_id, num_loader_workers = (worker.id, worker.num_workers) if worker else (0, 1)
        logical = (worker_id + self.start_batch) % num_loader_workers
        return (self.rank * num_loader_workers + logical, self.world_size * num_loader_workers, logical,
                num_loader_workers)

    def epoch_length(self, num_readers: int) -> int:
        """Samples per reader per epoch: ``ceil(samples_per_epoch / num_readers)``."""
        return -(-self.samples_per_epoch // num_readers)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        reader, num_readers, logical_worker, num_loader_workers = self.reader_layout()
        skip = loader_batches_consumed(self.start_batch, logical_worker, num_loader_workers) * self.batch_size
        length = self.epoch_length(num_readers)
        batch: list[tuple[str, np.ndarray, dict[str, Any]]] = []
        for key, mel, meta in self._samples(reader, num_readers, length, skip):
            batch.append((key, mel, meta))
            if len(batch) == self.batch_size:
                yield self._collate(batch)
                batch = []

    def _samples(self, reader: int, num_readers: int, length: int,
                 skip: int) -> Iterator[tuple[str, np.ndarray, dict[str, Any]]]:
        """This reader's endless ``(key, normalised crop, json)`` sequence from sample ``skip`` on."""
        for epoch in count(skip // length):
            offset = skip - epoch * length if epoch == skip // length else 0
            raw = islice(self._passes(reader, num_readers, epoch), length)
            shuffled = _shuffled(raw, self.shuffle_buffer, np.random.default_rng([self.seed, reader, epoch, 1]))
            for index, sample in enumerate(shuffled):
                if index < offset:
                    continue
                rng = np.random.default_rng([self.seed, reader, epoch, index])
                if self.source == "stems":  # float16, whole segment, as shard computes a mel.npy
                    mel = stem_mel(sample[STEM_FLAC], self.mel_config)
                else:
                    mel = np.load(io.BytesIO(sample["mel.npy"]), allow_pickle=False)  # float16, whole segment
                yield sample["__key__"], self._crop(mel, rng), json.loads(sample["json"].decode("utf-8"))

    def _crop(self, mel: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """``crop_or_pad`` of the normalised mel, converting and normalising only the window's frames."""
        frames = mel.shape[-1]
        if frames >= self.crop_frames:
            start = int(rng.integers(0, frames - self.crop_frames + 1))
            window = mel[:, start:start + self.crop_frames].astype(np.float32)
            return (window - np.float32(self.mel_mean)) / np.float32(self.mel_std)
        out = np.full((mel.shape[0], self.crop_frames), self.pad_value, dtype=np.float32)
        out[:, :frames] = (mel.astype(np.float32) - np.float32(self.mel_mean)) / np.float32(self.mel_std)
        return out

    def _passes(self, reader: int, num_readers: int, epoch: int) -> Iterator[dict[str, Any]]:
        """Raw samples (``__key__``, ``mel.npy`` and ``json`` bytes) of passes 0, 1, ... of ``epoch``."""
        num_shards = len(self.shard_paths)
        for pass_index in count():
            order = np.random.default_rng([self.seed, epoch, pass_index, 0]).permutation(num_shards)
            shards = [self.shard_paths[i] for i in order]
            if num_shards >= num_readers:  # split by shard: disjoint shards per reader
                samples: Iterator[dict[str, Any]] = _raw_samples(shards[reader::num_readers], self.source)
            else:  # fewer shards than readers: every reader reads them all, keeps every n-th sample
                samples = (s for i, s in enumerate(_raw_samples(shards, self.source)) if i % num_readers == reader)
            num_yielded = 0
            for sample in samples:
                num_yielded += 1
                yield sample
            if num_yielded == 0:
                raise ValueError(f"reader {reader} of {num_readers} got no samples from {num_shards} shard(s): "
                                 "use fewer workers or more data")

    @staticmethod
    def _collate(batch: list[tuple[str, np.ndarray, dict[str, Any]]]) -> dict[str, Any]:
        metas = [meta for _, _, meta in batch]
        return {"mel": torch.from_numpy(np.stack([mel for _, mel, _ in batch])),
                "text": [str(meta.get("text", "")) for meta in metas],
                "cond": {name: [meta.get(name) for meta in metas] for name in CONDITIONING_FIELDS},
                "meta": metas, "key": [key for key, _, _ in batch]}


def _raw_samples(shard_paths: Sequence[str], source: str = "mixture") -> Iterator[dict[str, Any]]:
    """WebDataset samples (``__key__``, ``__url__``, ``mel.npy``, ``json`` bytes) of the shards, in tar order; with
    ``source="stems"`` their stem examples (``training.stems.expand_stems``: ``stem.flac`` instead of ``mel.npy``)."""
    sources = ({"url": path} for path in shard_paths)
    if source == "stems":
        for sample in wds.tarfile_samples(sources, select_files=_is_stem_training_member):
            if "json" not in sample:
                raise ValueError(f"sample {sample.get('__key__')} in {sample.get('__url__')} lacks ['json']")
            yield from expand_stems(sample)
        return
    for sample in wds.tarfile_samples(sources, select_files=_is_training_member):
        missing = [member for member in _MEMBERS if member not in sample]
        if missing:
            raise ValueError(f"sample {sample.get('__key__')} in {sample.get('__url__')} lacks {missing}")
        yield sample
