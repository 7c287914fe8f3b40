"""Generation: checkpoint + prompt + seed → audio, with DDIM, classifier-free guidance and Griffin-Lim.

``generate`` samples a normalised log-mel with the EMA weights (Song et al. 2021 DDIM; Ho & Salimans
2022 guidance), undoes the dataset normalisation stored in the checkpoint, vocodes it
(``training.vocoder.GriffinLimVocoder``, Griffin & Lim 1984), fixes the length to exactly
``round(duration_s · sample_rate_hz)`` samples and peak-normalises to −1 dBFS.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cleaning.mel import MelConfig
from training.config import TrainConfig
from training.diffusion import GaussianDiffusion
from training.model import MelUNet
from training.text import TextEncoder
from training.vocoder import GriffinLimVocoder

PEAK_DBFS = -1.0
"""Every generated waveform is scaled so that its peak is at this level (dBFS)."""
X0_CLIP = 5.0
"""The sampler clips its clean-sample estimate to ±5 standard deviations of the training log-mels, the
data range of a standardised log-mel, as Ho et al. 2020 clip to [-1, 1]: a guard for guided sampling and
for ε-prediction checkpoints, whose x̂_0 at the first (near-zero ᾱ) steps magnifies small ε errors."""
MAX_DURATION_S = 600.0


@dataclass(frozen=True)
class LoadedCheckpoint:
    """A checkpoint ready to sample from.

    Attributes:
        model: ``MelUNet`` holding the EMA weights, in eval mode, on the CPU.
        diffusion: the noise schedule it was trained with.
        mel_config: log-mel parameters of its training data.
        config: its ``TrainConfig``.
        mel_mean, mel_std: log-mel normalisation statistics (natural-log magnitude units).
        dataset_id: the dataset it was trained on.
        step: optimizer steps taken.
        config_sha256: ``config.sha256()``.
        path: the file it was loaded from.
    """

    model: MelUNet
    diffusion: GaussianDiffusion
    mel_config: MelConfig
    config: TrainConfig
    mel_mean: float
    mel_std: float
    dataset_id: str
    step: int
    config_sha256: str
    path: Path

    @property
    def text_encoder(self) -> TextEncoder:
        """The trained text encoder (part of ``model``)."""
        return self.model.text_encoder


@dataclass(frozen=True)
class GenerationResult:
    """One generated track.

    Attributes:
        audio: float32 ``(1, samples)``, ``samples == round(duration_s · sample_rate_hz)``, peak at
            ``PEAK_DBFS``.
        sample_rate_hz: the checkpoint's mel sample rate.
        mel: float32 ``(n_mels, frames)``, the sampled natural-log magnitude mel (denormalised) that was
            vocoded; ``frames = mel_config.num_frames(samples)``.
        sampler: e.g. ``"ddim-50-cfg3.0"`` (the Generation record's ``sampler``).
        prompt, seed, duration_s: as requested.
    """

    audio: np.ndarray
    sample_rate_hz: int
    mel: np.ndarray
    sampler: str
    prompt: str
    seed: int
    duration_s: float


def load_checkpoint(path: str | os.PathLike[str]) -> LoadedCheckpoint:
    """Load a ``checkpoint.pt`` written by ``training.train`` with its EMA weights, on the CPU.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file lacks a key a checkpoint must have.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    required = ("model_kwargs", "ema_state", "config", "mel_config", "mel_mean", "mel_std", "dataset_id", "step")
    missing = [key for key in required if key not in state]
    if missing:
        raise ValueError(f"{path} is not a linernotes checkpoint: missing {missing}")
    config = TrainConfig(**state["config"])
    model = MelUNet(**state["model_kwargs"])
    model.load_state_dict(state["ema_state"])
    model.eval().requires_grad_(False)
    return LoadedCheckpoint(
        model=model,
        diffusion=GaussianDiffusion(config.diffusion_steps, config.beta_schedule, config.beta_start, config.beta_end,
                                    config.prediction),
        mel_config=MelConfig(**state["mel_config"]), config=config, mel_mean=float(state["mel_mean"]),
        mel_std=float(state["mel_std"]), dataset_id=str(state["dataset_id"]), step=int(state["step"]),
        config_sha256=config.sha256(), path=path,
    )


def generate(checkpoint_path: str | os.PathLike[str] | LoadedCheckpoint, prompt: str, seed: int, duration_s: float,
             num_steps: int = 50, guidance_scale: float = 3.0) -> GenerationResult:
    """Generate ``duration_s`` seconds of audio for a text prompt.

    Deterministic: the same checkpoint, prompt, seed, duration and sampler settings give the same samples
    (on the same torch build; sampling runs on the CPU).

    Args:
        checkpoint_path: a ``checkpoint.pt`` path, or a ``LoadedCheckpoint`` to reuse across calls.
        prompt: conditioning text (lower-cased words as in training); ``""`` samples unconditionally.
        seed: seed of the initial noise.
        duration_s: length of the output, > 0 and <= ``MAX_DURATION_S``.
        num_steps: DDIM steps, in ``[1, diffusion_steps]``.
        guidance_scale: classifier-free guidance scale s >= 0 (1: no guidance).

    Returns:
        The audio (float32 ``(1, round(duration_s · sample_rate_hz))``, peak −1 dBFS), its sample rate,
        the sampled log-mel and the sampler's name.

    Raises:
        ValueError: bad ``duration_s`` (not finite, <= 0, > ``MAX_DURATION_S``, or under one hop),
            ``num_steps`` or ``guidance_scale``; a prompt that is not a string.
        RuntimeError: the vocoded audio is silent or not finite.
    """
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
    if not (isinstance(duration_s, (int, float)) and math.isfinite(duration_s) and 0 < duration_s <= MAX_DURATION_S):
        raise ValueError(f"duration_s must be a finite number in (0, {MAX_DURATION_S}], got {duration_s!r}")
    checkpoint = checkpoint_path if isinstance(checkpoint_path, LoadedCheckpoint) else load_checkpoint(checkpoint_path)
    mel_config = checkpoint.mel_config
    num_samples = round(duration_s * mel_config.sample_rate_hz)
    if num_samples < mel_config.hop_length:
        raise ValueError(f"duration_s={duration_s} is shorter than one mel hop "
                         f"({mel_config.hop_length / mel_config.sample_rate_hz} s)")
    frames = mel_config.num_frames(num_samples)

    generator = torch.Generator().manual_seed(int(seed))
    normalised = checkpoint.diffusion.ddim_sample(
        checkpoint.model, (1, mel_config.n_mels, frames), [prompt], generator, num_steps=num_steps,
        guidance_scale=guidance_scale, eta=0.0, x0_clip=X0_CLIP,
    )[0]
    log_floor = math.log(mel_config.log_floor)
    mel = (normalised * checkpoint.mel_std + checkpoint.mel_mean).clamp(min=log_floor).numpy().astype(np.float32)

    audio = GriffinLimVocoder(mel_config, seed=int(seed))(mel, num_samples=num_samples)
    audio = _fit_length(audio, num_samples)
    peak = float(np.max(np.abs(audio))) if audio.size else 0.0
    if not (np.isfinite(audio).all() and peak > 0.0):
        raise RuntimeError(f"vocoded audio is silent or not finite (peak {peak}) for prompt {prompt!r}, seed {seed}")
    audio = (audio * (10.0 ** (PEAK_DBFS / 20.0) / peak)).astype(np.float32)
    return GenerationResult(audio=audio, sample_rate_hz=mel_config.sample_rate_hz, mel=mel,
                            sampler=f"ddim-{num_steps}-cfg{float(guidance_scale)}", prompt=prompt, seed=int(seed),
                            duration_s=float(duration_s))


def _fit_length(audio: np.ndarray, num_samples: int) -> np.ndarray:
    """Trim or zero-pad float32 ``(1, samples)`` to exactly ``num_samples``."""
    if audio.shape[-1] >= num_samples:
        return audio[..., :num_samples]
    return np.pad(audio, ((0, 0), (0, num_samples - audio.shape[-1])))
