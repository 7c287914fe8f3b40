"""Source separation with demucs: a mixture → one stem per source (drums, bass, other, vocals for the
pretrained models), chunked with overlap by ``demucs.apply.apply_model`` (Défossez, "Hybrid Spectrogram and
Waveform Source Separation", 2021; Rouard et al., "Hybrid Transformers for Music Source Separation", 2023).

A separator is named either by a demucs pretrained name (``htdemucs``, ``htdemucs_ft``, ``mdx_extra`` …;
demucs downloads the weights to its cache on first use — never in tests) or by a local checkpoint file in
demucs's package format (``demucs.states.load_model``: ``klass``, ``args``, ``kwargs``, ``state``), such as
``cleaning.separator.save_separator`` writes. Its checksum goes into the lineage of every stem it makes: the
file's sha256 for a checkpoint, a sha256 over the parameters (sorted names, float32 bytes) for a pretrained
model.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cleaning.audio import resample


@dataclass
class LoadedSeparator:
    """A separator ready to run: the model, its name and checksum, its sources and rate."""

    model: torch.nn.Module
    name: str
    sha256: str
    sources: tuple[str, ...]
    sample_rate_hz: int
    audio_channels: int


def load_separator(spec: str) -> LoadedSeparator:
    """Load a separator by local checkpoint path or demucs pretrained name.

    Raises:
        FileNotFoundError: ``spec`` looks like a path (has a suffix or a separator) but no file is there.
        ValueError: demucs does not know the name (its ``ModelLoadingError``) or the file is not a demucs package.
    """
    from demucs.pretrained import ModelLoadingError, get_model
    from demucs.states import load_model

    path = Path(spec).expanduser()
    if path.is_file():
        try:
            model = load_model(str(path))
        except (KeyError, RuntimeError, TypeError, AttributeError) as err:
            raise ValueError(f"{path} is not a demucs checkpoint package: {err}") from err
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        name = path.name
    elif path.suffix or "/" in spec:
        raise FileNotFoundError(f"separator checkpoint {spec} does not exist")
    else:
        try:
            model = get_model(spec)
        except ModelLoadingError as err:
            raise ValueError(f"demucs has no pretrained model {spec!r}: {err}") from err
        digest = parameters_sha256(model)
        name = spec
    model.eval()
    return LoadedSeparator(model=model, name=name, sha256=digest, sources=tuple(model.sources),
                           sample_rate_hz=int(model.samplerate), audio_channels=int(model.audio_channels))


def parameters_sha256(model: torch.nn.Module) -> str:
    """sha256 over a model's state: for each entry in sorted name order, the name then float32 bytes."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def separate_audio(separator: LoadedSeparator, audio: np.ndarray, sample_rate_hz: int, *, segment_s: float | None = None,
                   overlap: float = 0.25, shifts: int = 0, device: str = "cpu") -> dict[str, np.ndarray]:
    """Separate one mixture.

    The mixture is resampled to the model's rate and matched to its channel count (mono duplicated, or
    channels averaged for a mono model), normalised by its standard deviation as demucs's own CLI does,
    separated by ``apply_model`` in chunks of ``segment_s`` (default: the model's training segment) with
    ``overlap`` (a fraction of a chunk, linearly cross-faded), then brought back to the input's rate and
    channel count.

    Args:
        separator: from ``load_separator``.
        audio: float32 ``(channels, samples)``.
        sample_rate_hz: rate of ``audio``.
        segment_s: chunk length, seconds.
        overlap: overlap between chunks, in [0, 1).
        shifts: random time shifts averaged (demucs's test-time augmentation; 0 = none).
        device: torch device.

    Returns:
        source → float32 ``(channels, samples)`` at ``sample_rate_hz``, same shape as ``audio``; the stems
        sum to the mixture up to the model's error.

    Raises:
        ValueError: empty audio or ``overlap`` outside [0, 1).
    """
    from demucs.apply import apply_model

    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim != 2 or audio.shape[1] == 0:
        raise ValueError(f"audio must be non-empty (channels, samples), got {audio.shape}")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    channels, num_samples = audio.shape
    mix = resample(audio, sample_rate_hz, separator.sample_rate_hz)
    if separator.audio_channels == 1:
        mix = mix.mean(axis=0, keepdims=True)
    elif mix.shape[0] == 1:
        mix = np.repeat(mix, separator.audio_channels, axis=0)
    tensor = torch.from_numpy(np.ascontiguousarray(mix))
    reference = tensor.mean(0)
    mean, std = reference.mean(), reference.std().clamp(min=1e-8)
    with torch.no_grad():
        out = apply_model(separator.model, ((tensor - mean) / std)[None], shifts=shifts, split=True, overlap=overlap,
                          segment=segment_s, device=device, progress=False)[0]
    out = (out * std + mean).cpu().numpy()
    stems = {}
    for index, source in enumerate(separator.sources):
        stem = resample(out[index], separator.sample_rate_hz, sample_rate_hz)
        if stem.shape[0] != channels:
            stem = np.repeat(stem.mean(axis=0, keepdims=True), channels, axis=0)
        fitted = np.zeros((channels, num_samples), dtype=np.float32)
        length = min(num_samples, stem.shape[1])
        fitted[:, :length] = stem[:, :length]
        stems[source] = fitted
    return stems
