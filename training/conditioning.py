"""Musical conditioning from the catalog: tempo (BPM), key, instrument and duration.

A shard sample's ``json`` (``pipelines/stages/shard/stage.py``) carries the track's catalog fields.
``encode_conditions`` turns one such dict into a float32 vector of ``len(CONDITION_NAMES)`` numbers, NaN where a value is
unknown, so that batches collate with the default ``torch.utils.data`` collation and a missing field
never fails a run. ``MusicalConditionEncoder`` embeds the vector: tempo and duration as sinusoidal
features of their logarithms (as Stable Audio embeds timing, Evans et al. 2024), key and instrument as
learned rows, and every unknown value as a learned "unknown" vector of its own, which is also what
condition dropout produces: classifier-free guidance (Ho & Salimans 2022) extrapolates from "nothing
known" to the given conditions.

Vector layout (``CONDITION_NAMES``):
    0 ``bpm``: beats per minute in ``[BPM_RANGE]``;
    1 ``key``: index in ``KEY_NAMES`` (0-11 major on C..B, 12-23 minor on C..B);
    2 ``instrument``: BLAKE2b bucket of the lower-cased instrument name in ``[0, INSTRUMENT_BUCKETS)``;
    3 ``duration_s``: seconds, > 0.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

CONDITION_NAMES = ("bpm", "key", "instrument", "duration_s")
"""The musical conditions, in vector order."""
BPM_RANGE = (20.0, 400.0)
"""Tempi outside this range (beats per minute) are treated as unknown."""
INSTRUMENT_BUCKETS = 1024
"""Hash buckets of instrument names (``"Distortion Guitar"`` → one row)."""
_PITCH_CLASSES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
KEY_NAMES = tuple(f"{p} major" for p in _PITCH_CLASSES) + tuple(f"{p} minor" for p in _PITCH_CLASSES)
"""The 24 keys, in ``key`` index order."""
_FLATS = {"DB": "C#", "EB": "D#", "GB": "F#", "AB": "G#", "BB": "A#", "CB": "B", "FB": "E", "E#": "F", "B#": "C"}
_KEY_PATTERN = re.compile(r"^\s*([A-Ga-g])\s*([#♯b♭]?)\s*(.*?)\s*$")
_MINOR = {"m", "min", "minor", "moll", "-"}
_MAJOR = {"", "maj", "major", "dur", "M"}


def parse_key(value: Any) -> int | None:
    """Index in ``KEY_NAMES`` of a key name, or None when it cannot be read.

    Accepts ``"A minor"``, ``"Am"``, ``"a min"``, ``"F# major"``, ``"Gb"``, ``"Bbm"``, ``"C"`` (major), and
    integers 0-23 (already an index).
    """
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value) if 0 <= int(value) < len(KEY_NAMES) else None
    match = _KEY_PATTERN.match(str(value))
    if match is None:
        return None
    letter, accidental, mode = match.group(1).upper(), match.group(2), match.group(3)
    pitch = letter + {"♯": "#", "#": "#", "b": "B", "♭": "B", "": ""}[accidental]
    pitch = _FLATS.get(pitch, pitch)
    if pitch not in _PITCH_CLASSES:
        return None
    if mode in _MAJOR:
        minor = False
    elif mode.lower() in _MINOR:
        minor = True
    else:
        return None
    return _PITCH_CLASSES.index(pitch) + (12 if minor else 0)


def instrument_bucket(name: str) -> int:
    """Row of an instrument name: BLAKE2b-64 of its lower-cased, stripped UTF-8 bytes mod ``INSTRUMENT_BUCKETS``."""
    digest = hashlib.blake2b(name.strip().lower().encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % INSTRUMENT_BUCKETS


def encode_conditions(meta: Mapping[str, Any] | None) -> np.ndarray:
    """The musical-condition vector of one sample's metadata (a shard sample's ``json``, or generate options).

    Reads ``bpm`` (or ``tempo_bpm``), ``key``, ``instrument`` (or the first of ``instruments``) and
    ``duration_s``; absent, empty or unreadable values become NaN (unknown), never an error.

    Returns:
        float32 ``(len(CONDITION_NAMES),)`` in ``CONDITION_NAMES`` order.
    """
    meta = meta or {}
    out = np.full(len(CONDITION_NAMES), np.nan, dtype=np.float32)
    bpm = _number(meta.get("bpm", meta.get("tempo_bpm")))
    if bpm is not None and BPM_RANGE[0] <= bpm <= BPM_RANGE[1]:
        out[0] = bpm
    key = parse_key(meta.get("key"))
    if key is not None:
        out[1] = key
    instrument = meta.get("instrument")
    if not instrument and isinstance(meta.get("instruments"), (list, tuple)) and meta["instruments"]:
        instrument = meta["instruments"][0]
    if isinstance(instrument, str) and instrument.strip():
        out[2] = instrument_bucket(instrument)
    duration_s = _number(meta.get("duration_s"))
    if duration_s is not None and duration_s > 0:
        out[3] = duration_s
    return out


def stack_conditions(metas: Sequence[Mapping[str, Any] | None]) -> torch.Tensor:
    """float32 ``(len(metas), len(CONDITION_NAMES))``: ``encode_conditions`` of each."""
    return torch.from_numpy(np.stack([encode_conditions(meta) for meta in metas])) if metas else \
        torch.zeros(0, len(CONDITION_NAMES))


def unknown_conditions(batch: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """float32 ``(batch, len(CONDITION_NAMES))`` of NaN: nothing known (the null condition)."""
    return torch.full((batch, len(CONDITION_NAMES)), float("nan"), device=device)


def drop_conditions(conditions: torch.Tensor, probability: float,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Set each entry of ``conditions`` ``(batch, K)`` to unknown (NaN) independently with ``probability``.

    Draws ``torch.rand((batch, K))`` from ``generator`` (None: the global RNG) on ``conditions``' device.
    """
    dropped = torch.rand(conditions.shape, generator=generator, device=conditions.device) < probability
    return torch.where(dropped, torch.full_like(conditions, float("nan")), conditions)


class MusicalConditionEncoder(nn.Module):
    """Musical-condition vectors → conditioning vectors added to the U-Net's timestep embedding.

    Args:
        out_dim: width of the output (the U-Net's condition width).
        feature_dim: width of each condition's own embedding (even).

    Shapes: float32 ``(batch, len(CONDITION_NAMES))`` with NaN for unknown → float32 ``(batch, out_dim)``.
    """

    def __init__(self, out_dim: int, feature_dim: int = 32) -> None:
        super().__init__()
        self.feature_dim = feature_dim
        self.bpm_proj = nn.Linear(feature_dim, feature_dim)
        self.duration_proj = nn.Linear(feature_dim, feature_dim)
        self.key_embedding = nn.Embedding(len(KEY_NAMES), feature_dim)
        self.instrument_embedding = nn.Embedding(INSTRUMENT_BUCKETS, feature_dim)
        self.unknown = nn.Parameter(torch.zeros(len(CONDITION_NAMES), feature_dim))
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(len(CONDITION_NAMES) * feature_dim, out_dim))
        nn.init.normal_(self.key_embedding.weight, std=0.02)
        nn.init.normal_(self.instrument_embedding.weight, std=0.02)

    def forward(self, conditions: torch.Tensor) -> torch.Tensor:
        if conditions.ndim != 2 or conditions.shape[1] != len(CONDITION_NAMES):
            raise ValueError(f"conditions must be (batch, {len(CONDITION_NAMES)}) in the order {CONDITION_NAMES}, "
                             f"got {tuple(conditions.shape)}")
        conditions = conditions.float()
        known = ~torch.isnan(conditions)
        filled = torch.where(known, conditions, torch.ones_like(conditions))  # any valid placeholder
        parts = [
            self.bpm_proj(_log_features(filled[:, 0] / 120.0, self.feature_dim)),
            self.key_embedding(filled[:, 1].long().clamp(0, len(KEY_NAMES) - 1)),
            self.instrument_embedding(filled[:, 2].long().clamp(0, INSTRUMENT_BUCKETS - 1)),
            self.duration_proj(_log_features(filled[:, 3] / 10.0, self.feature_dim)),
        ]
        # torch.where keeps every parameter in the graph (DDP needs a gradient for each, each step)
        parts = [torch.where(known[:, i, None], part, self.unknown[i].expand_as(part)) for i, part in enumerate(parts)]
        return self.out(torch.cat(parts, dim=1))


def _log_features(ratio: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features ``(batch, dim)`` of ``log2(ratio)`` at octave-spaced frequencies (periods 1/8 to 64 octaves)."""
    half = dim // 2
    freqs = 2.0 ** torch.linspace(3.0, -6.0, half, device=ratio.device)
    args = torch.log2(ratio.clamp(min=1e-6))[:, None] * freqs[None] * math.pi
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _number(value: Any) -> float | None:
    """A finite float, or None."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None
