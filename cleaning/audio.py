"""Audio I/O and resampling. Audio arrays are float32 ``(channels, samples)`` in [-1, 1] full scale."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import soundfile as sf


class AudioDecodeError(ValueError):
    """The file exists but could not be decoded as audio (corrupt, truncated, or not audio at all)."""


def read_audio(path: str | os.PathLike[str] | io.BytesIO, *, contiguous: bool = True,
               scratch: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """Decode a WAV, FLAC, Ogg Vorbis/Opus or MP3 file with libsndfile (soundfile).

    Args:
        path: a file path or an in-memory file.
        contiguous: ``True`` (default) returns C-contiguous channel-major memory; ``False`` returns the
            transposed view of the decoded interleaved buffer (same values and shape, no 10 MB-per-30 s
            copy), for callers that only read it, e.g. ingest's measurements.
        scratch: float32 ``(n,)`` to decode into when it holds the file's ``frames × channels`` samples (with
            ``contiguous=False``): the audio returned is then a view of it, valid until the caller reuses it. A
            buffer reused from file to file spares the page faults of a fresh one (~20% of a FLAC decode).

    Returns:
        (audio, sample_rate_hz): audio is float32 ``(channels, samples)``.

    Raises:
        FileNotFoundError: the path does not exist.
        AudioDecodeError: libsndfile cannot decode it.
    """
    if not isinstance(path, io.BytesIO) and not Path(path).exists():
        raise FileNotFoundError(str(path))
    try:
        info = sf.info(path)
        if isinstance(path, io.BytesIO):
            path.seek(0)
        needed = info.frames * info.channels
        if scratch is not None and not contiguous and scratch.dtype == np.float32 and scratch.ndim == 1 \
                and 0 < needed <= scratch.shape[0]:
            out = scratch[:needed].reshape(info.frames, info.channels)
            data, sample_rate_hz = sf.read(path, dtype="float32", always_2d=True, out=out)
        else:
            data, sample_rate_hz = sf.read(path, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError) as err:
        raise AudioDecodeError(f"cannot decode {path}: {err}") from err
    if 0 < data.shape[0] < info.frames:
        raise AudioDecodeError(f"{path} is truncated: its header announces {info.frames} samples, "
                               f"{data.shape[0]} decode")
    return (np.ascontiguousarray(data.T) if contiguous else data.T), int(sample_rate_hz)


CONTAINER_BY_SUFFIX = {".wav": "WAV", ".wave": "WAV", ".flac": "FLAC", ".ogg": "OGG", ".oga": "OGG",
                       ".opus": "OGG", ".mp3": "MP3", ".aif": "AIFF", ".aiff": "AIFF"}


def detect_container(path: str | os.PathLike[str]) -> str:
    """The container libsndfile finds in the file's bytes (``WAV``, ``FLAC``, ``OGG``, ``MP3``, ...).

    Raises:
        AudioDecodeError: libsndfile does not recognise the bytes as audio.
    """
    try:
        return str(sf.info(path).format)
    except (sf.LibsndfileError, RuntimeError) as err:
        raise AudioDecodeError(f"cannot decode {path}: {err}") from err


def write_audio(path: str | os.PathLike[str], audio: np.ndarray, sample_rate_hz: int,
                subtype: str | None = None) -> Path:
    """Write ``audio`` (float32 ``(channels, samples)``) atomically. Format from the suffix (.wav, .flac).

    ``subtype`` defaults to ``FLOAT`` for WAV (lossless, no clipping) and ``PCM_24`` for FLAC.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = {"wav": "WAV", "flac": "FLAC"}[path.suffix.lower().lstrip(".")]
    subtype = subtype or ("FLOAT" if fmt == "WAV" else "PCM_24")
    tmp = path.with_name(f".{path.name}.tmp")
    sf.write(tmp, np.asarray(audio, dtype=np.float32).T, sample_rate_hz, format=fmt, subtype=subtype)
    os.replace(tmp, path)
    return path


def encode_flac(audio: np.ndarray, sample_rate_hz: int, subtype: str = "PCM_16") -> bytes:
    """FLAC bytes of ``audio`` (float32 ``(channels, samples)``, clipped to [-1, 1]). Deterministic."""
    buffer = io.BytesIO()
    clipped = np.clip(np.asarray(audio, dtype=np.float32), -1.0, 1.0)
    sf.write(buffer, clipped.T, sample_rate_hz, format="FLAC", subtype=subtype)
    return buffer.getvalue()


def check_audio(audio: np.ndarray, sample_rate_hz: int) -> np.ndarray:
    """The embedders' input check (``cleaning.embed``, ``cleaning.embed_learned``): float32
    ``(channels, samples)`` from ``(samples,)`` or ``(channels, samples)``.

    Raises:
        ValueError: empty audio, non-finite samples, more than 2 dims, or ``sample_rate_hz <= 0``.
    """
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim == 1:
        audio = audio[None]
    if audio.ndim != 2 or audio.shape[1] == 0 or audio.shape[0] == 0:
        raise ValueError(f"audio must be non-empty (channels, samples); got shape {audio.shape}")
    if sample_rate_hz <= 0:
        raise ValueError(f"sample_rate_hz must be > 0; got {sample_rate_hz}")
    if not np.all(np.isfinite(audio)):
        raise ValueError("audio contains NaN or inf")
    return audio


def to_mono(audio: np.ndarray) -> np.ndarray:
    """Average channels: ``(channels, samples)`` → ``(1, samples)`` float32."""
    return np.asarray(audio, dtype=np.float32).mean(axis=0, keepdims=True)


def resample(audio: np.ndarray, from_hz: int, to_hz: int) -> np.ndarray:
    """Band-limited sinc resampling (torchaudio.functional.resample, Kaiser window). Shape-preserving
    on the channel axis; float32 ``(channels, samples)`` in and out."""
    if from_hz == to_hz:
        return np.asarray(audio, dtype=np.float32)
    import torch  # here, not at the top: reading and writing audio (the CLI's light commands) needs no torch
    import torchaudio.functional as AF

    tensor = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))
    out = AF.resample(tensor, orig_freq=from_hz, new_freq=to_hz, lowpass_filter_width=16,
                      rolloff=0.945, resampling_method="sinc_interp_kaiser", beta=14.769656459379492)
    return out.numpy().astype(np.float32, copy=False)
