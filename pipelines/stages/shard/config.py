"""The shard stage's config and plan record, and the sample arithmetic both the planner and the encoder use.

Light on purpose (pydantic and the mel config, no audio or engine library): the config is read by commands that
run no stage (``linernotes stages``) and by the Ray workers that encode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator

from cleaning.mel import MelConfig
from provenance import records

STAGE = "shard"
SHARD_FORMAT_VERSION = "1"  # bump when member encoding or tar layout changes: it enters the plan hash


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
    # each sample also carries its track's kept stems (clean's decisions) as ``<role>.flac`` members
    stems: bool = False
    # a segment whose sample peak (mono, at the dataset rate) is below this is a Rejection (silent_segment)
    silence_floor_dbfs: float = -60.0

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
        if not -200.0 <= self.silence_floor_dbfs <= 0.0:
            raise ValueError(f"shard.silence_floor_dbfs must be in [-200, 0] dBFS, got {self.silence_floor_dbfs}")
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


@dataclass(frozen=True)
class ShardPlan:
    """The pure plan: per-track work (JSON-ready dicts), the shard of every segment, and rejections.

    ``work`` items hold ``track_id``, ``uri``, ``source_rate_hz``, ``source_num_samples``, ``num_channels``,
    ``pcm_sha256``, ``meta`` (the track fields the json member carries) and ``segments`` (dicts with
    ``segment_id``, ``start_sample``, ``split``, ``shard``, ``key``); with ``stems`` in the config also
    ``stems``: the kept stems, dicts with ``role``, ``instrument``, ``member`` (the member's extension,
    ``vocals.flac``), ``uri``, ``source_rate_hz``, ``source_num_samples``, ``num_channels``, ``pcm_sha256``.
    A segment's ``shard`` is where it goes when no segment is rejected while encoding (``silent_segment``); the
    encoder fills shards in the same order with the segments it keeps.
    """

    work: list[dict[str, Any]]
    shard_sizes: dict[str, int]  # shard name → planned samples
    rejections: list[dict[str, Any]]
    num_tracks_in: int


def num_target_samples(num_source_samples: int, source_rate_hz: int, target_rate_hz: int) -> int:
    """Whole samples of a ``num_source_samples`` signal at ``target_rate_hz``: ``floor(n * target / source)``."""
    return int(num_source_samples) * int(target_rate_hz) // int(source_rate_hz)


def shard_name(split: str, index: int) -> str:
    """The tar of a split's ``index``-th shard: ``train-000000.tar``."""
    return f"{split}-{index:06d}.tar"
