"""Generation: checkpoint + prompt + seed → audio, with a sampler, classifier-free guidance and a vocoder.

``generate`` samples a normalised log-mel with the EMA weights (the checkpoint's parameterization and
sampler: DDIM, Song et al. 2021; DDPM; Euler/Heun for flow matching; Ho & Salimans 2022 guidance),
optionally keeping the known frames of a context for continuation and inpainting (RePaint, Lugmayr et
al. 2022), undoes the dataset normalisation stored in the checkpoint, vocodes it (Griffin-Lim by
default, Griffin & Lim 1984; a local HiFi-GAN generator when given, ``training.vocoder``), fixes the
length to exactly ``round(duration_s · sample_rate_hz)`` samples and peak-normalises to −1 dBFS.
``generate_variations`` makes a batch over seeds, guidance scales and durations.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cleaning.audio import resample, to_mono
from cleaning.mel import MelConfig, log_mel
from training.conditioning import stack_conditions
from training.config import TrainConfig
from training.model import MelUNet
from training.objectives import build_parameterization
from training.parameterization import Parameterization
from training.text import TextEncoder
from training.vocoder import load_vocoder

Vocoder = Callable[..., np.ndarray]
"""``vocoder(log_mel float32 (n_mels, frames), num_samples=int) -> float32 (1, samples)``."""

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
        diffusion: the parameterization it was trained with (``GaussianDiffusion`` for ε/v,
            ``FlowMatching`` for flow): ``per_example_loss``, ``loss`` and ``sample``.
        mel_config: log-mel parameters of its training data.
        config: its ``TrainConfig``.
        mel_mean, mel_std: log-mel normalisation statistics (natural-log magnitude units).
        dataset_id: the dataset it was trained on.
        step: optimizer steps taken.
        config_sha256: ``config.sha256()``.
        path: the file it was loaded from.
    """

    model: MelUNet
    diffusion: Parameterization
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
        diffusion=build_parameterization(config),
        mel_config=MelConfig(**state["mel_config"]), config=config, mel_mean=float(state["mel_mean"]),
        mel_std=float(state["mel_std"]), dataset_id=str(state["dataset_id"]), step=int(state["step"]),
        config_sha256=str(state.get("config_sha256") or config.sha256()), path=path,
    )


def generate(checkpoint_path: str | os.PathLike[str] | LoadedCheckpoint, prompt: str, seed: int, duration_s: float,
             num_steps: int | None = None, guidance_scale: float | None = None, *, sampler: str | None = None,
             conditions: Mapping[str, Any] | None = None, context_audio: np.ndarray | None = None,
             context_sample_rate_hz: int | None = None, regenerate_s: tuple[float, float] | None = None,
             vocoder: str | os.PathLike[str] | Vocoder | None = None) -> GenerationResult:
    """Generate ``duration_s`` seconds of audio for a text prompt (and musical conditions).

    Deterministic: the same checkpoint, prompt, seed, duration, conditions, context and sampler settings
    give the same samples (on the same torch build; sampling runs on the CPU).

    Continuation and inpainting (RePaint replacement, Lugmayr et al. 2022): with ``context_audio`` the
    mel frames of the context outside ``regenerate_s`` are kept and the others generated. Continuation:
    a context shorter than ``duration_s`` and no ``regenerate_s`` regenerates from the end of the context
    to ``duration_s``. Inpainting: a context of (at least) ``duration_s`` and ``regenerate_s=(start, end)``.
    The whole mel is vocoded, so the kept part is re-synthesised too.

    Args:
        checkpoint_path: a ``checkpoint.pt`` path, or a ``LoadedCheckpoint`` to reuse across calls.
        prompt: conditioning text (lower-cased words as in training); ``""`` samples unconditionally.
        seed: seed of the initial noise and of every later random draw.
        duration_s: length of the output, > 0 and <= ``MAX_DURATION_S``.
        num_steps: sampler steps (DDIM/DDPM: in ``[1, diffusion_steps]``); None: the config's ``sample_steps``.
        guidance_scale: classifier-free guidance scale s >= 0 (1: no guidance); None: the config's.
        sampler: ``ddim``/``ddpm`` (ε, v) or ``euler``/``heun`` (flow); None: the config's default.
        conditions: musical conditions (``bpm``, ``key``, ``instrument``; ``duration_s`` defaults to the
            output's), used when the checkpoint's model was trained with ``musical_conditioning``.
        context_audio: float32 ``(channels, samples)`` known audio (mixed to mono).
        context_sample_rate_hz: its rate; resampled to the checkpoint's. Required with ``context_audio``.
        regenerate_s: ``(start_s, end_s)`` of the output to generate; the rest comes from the context.
        vocoder: None or ``"griffin-lim"`` (default), a local HiFi-GAN generator checkpoint path
            (``training.vocoder.load_vocoder``), or a vocoder object ``(log_mel, num_samples) → (1, samples)``.

    Returns:
        The audio (float32 ``(1, round(duration_s · sample_rate_hz))``, peak −1 dBFS), its sample rate,
        the sampled log-mel and the sampler's name (e.g. ``"ddim-50-cfg3.0"``, ``"heun-32-cfg3.0-inpaint"``).

    Raises:
        ValueError: bad ``duration_s`` (not finite, <= 0, > ``MAX_DURATION_S``, or under one hop),
            ``num_steps``, ``guidance_scale``, ``sampler``, ``regenerate_s`` (empty, outside the output, or
            covering everything/no context); a prompt that is not a string; context without its rate.
        RuntimeError: the vocoded audio is silent or not finite.
    """
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
    if not (isinstance(duration_s, (int, float)) and math.isfinite(duration_s) and 0 < duration_s <= MAX_DURATION_S):
        raise ValueError(f"duration_s must be a finite number in (0, {MAX_DURATION_S}], got {duration_s!r}")
    checkpoint = checkpoint_path if isinstance(checkpoint_path, LoadedCheckpoint) else load_checkpoint(checkpoint_path)
    config, mel_config = checkpoint.config, checkpoint.mel_config
    num_steps = config.sample_steps if num_steps is None else int(num_steps)
    guidance_scale = config.guidance_scale if guidance_scale is None else float(guidance_scale)
    sampler = sampler or (config.default_sampler if config.default_sampler in checkpoint.diffusion.samplers
                          else checkpoint.diffusion.samplers[0])
    num_samples = _num_samples(duration_s, mel_config)
    frames = mel_config.num_frames(num_samples)
    known, known_mask, mode = _context(checkpoint, frames, duration_s, context_audio, context_sample_rate_hz,
                                       regenerate_s)
    mel = _sample_mel(checkpoint, prompt, int(seed), frames, {"duration_s": duration_s, **(conditions or {})},
                      sampler=sampler, num_steps=num_steps, guidance_scale=guidance_scale, known=known,
                      known_mask=known_mask)
    audio = _vocode(mel, vocoder, mel_config, num_samples, int(seed), prompt)
    name = f"{sampler}-{num_steps}-cfg{float(guidance_scale)}" + (f"-{mode}" if mode else "")
    return GenerationResult(audio=audio, sample_rate_hz=mel_config.sample_rate_hz, mel=mel, sampler=name,
                            prompt=prompt, seed=int(seed), duration_s=float(duration_s))


def generate_variations(checkpoint_path: str | os.PathLike[str] | LoadedCheckpoint, prompt: str,
                        seeds: Sequence[int], guidance_scales: Sequence[float | None] = (None,),
                        durations_s: Sequence[float] = (5.0,), **options: Any) -> list[GenerationResult]:
    """A batch of variations: every combination of ``seeds`` × ``guidance_scales`` × ``durations_s``.

    The checkpoint is loaded once; each result equals ``generate(checkpoint, prompt, seed, duration_s,
    guidance_scale=scale, **options)`` (so a variation is reproducible alone by its seed). Order: durations,
    then guidance scales, then seeds.

    Raises:
        ValueError: an empty ``seeds``, ``guidance_scales`` or ``durations_s``; see ``generate``.
    """
    if not seeds or not guidance_scales or not durations_s:
        raise ValueError("seeds, guidance_scales and durations_s must each hold at least one value")
    checkpoint = checkpoint_path if isinstance(checkpoint_path, LoadedCheckpoint) else load_checkpoint(checkpoint_path)
    if isinstance(options.get("vocoder"), (str, os.PathLike)) and str(options["vocoder"]) != "griffin-lim":
        options = {**options, "vocoder": load_vocoder(options["vocoder"], checkpoint.mel_config)}
    return [generate(checkpoint, prompt, int(seed), float(duration_s), guidance_scale=scale, **options)
            for duration_s in durations_s for scale in guidance_scales for seed in seeds]


def _context(checkpoint: LoadedCheckpoint, frames: int, duration_s: float, context_audio: np.ndarray | None,
             context_sample_rate_hz: int | None, regenerate_s: tuple[float, float] | None
             ) -> tuple[torch.Tensor | None, torch.Tensor | None, str]:
    """``(known normalised mel (1, n_mels, frames), known mask (frames,), mode)`` from the context audio."""
    if context_audio is None:
        if regenerate_s is not None:
            raise ValueError("regenerate_s needs context_audio: the frames outside it come from the context")
        return None, None, ""
    if context_sample_rate_hz is None:
        raise ValueError("context_audio needs context_sample_rate_hz")
    mel_config = checkpoint.mel_config
    audio = to_mono(np.asarray(context_audio, dtype=np.float32).reshape(-1, np.shape(context_audio)[-1]))
    audio = resample(audio, int(context_sample_rate_hz), mel_config.sample_rate_hz)
    context_s = audio.shape[-1] / mel_config.sample_rate_hz
    mode = "inpaint" if regenerate_s is not None else "continue"
    start_s, end_s = regenerate_s if regenerate_s is not None else (context_s, duration_s)
    if not (0 <= start_s < end_s <= duration_s + 1e-9):
        raise ValueError(f"the regenerated interval ({start_s:g}, {end_s:g}) s must be non-empty and within the "
                         f"output's (0, {duration_s:g}) s; a continuation's context ({context_s:g} s) must be "
                         "shorter than duration_s")
    log_floor = math.log(mel_config.log_floor)
    context_mel = log_mel(audio, mel_config)[:, :frames]
    full = np.full((mel_config.n_mels, frames), log_floor, dtype=np.float32)
    full[:, :context_mel.shape[1]] = context_mel
    frame_s = mel_config.hop_length / mel_config.sample_rate_hz
    times = np.arange(frames) * frame_s
    have_context = np.arange(frames) < context_mel.shape[1]
    # a frame is regenerated when its centre lies in the interval; frames without context are always generated
    mask = have_context & ~((times >= start_s - frame_s / 2) & (times < end_s - frame_s / 2))
    if not mask.any():
        raise ValueError(f"nothing of the context is kept: regenerate_s=({start_s:g}, {end_s:g}) s covers it all")
    known = torch.from_numpy((full - checkpoint.mel_mean) / checkpoint.mel_std)[None]
    return known, torch.from_numpy(mask), mode


def _num_samples(duration_s: float, mel_config: MelConfig) -> int:
    """``round(duration_s · sample_rate_hz)``; raises ``ValueError`` when that is under one mel hop."""
    num_samples = round(duration_s * mel_config.sample_rate_hz)
    if num_samples < mel_config.hop_length:
        raise ValueError(f"duration_s={duration_s} is shorter than one mel hop "
                         f"({mel_config.hop_length / mel_config.sample_rate_hz} s)")
    return num_samples


def _sample_mel(checkpoint: LoadedCheckpoint, prompt: str, seed: int, frames: int, conditions: Mapping[str, Any],
                *, sampler: str, num_steps: int, guidance_scale: float, known: torch.Tensor | None,
                known_mask: torch.Tensor | None) -> np.ndarray:
    """Sample one log-mel with the checkpoint's EMA model and undo the dataset normalisation.

    Returns:
        float32 ``(n_mels, frames)`` natural-log magnitudes, floored at ``log(log_floor)``.
    """
    mel_config = checkpoint.mel_config
    condition_tensor = None
    if checkpoint.model.model_kwargs.get("musical_conditioning"):
        condition_tensor = stack_conditions([dict(conditions)])
    generator = torch.Generator().manual_seed(seed)
    normalised = checkpoint.diffusion.sample(
        checkpoint.model, (1, mel_config.n_mels, frames), [prompt], generator, sampler=sampler, num_steps=num_steps,
        guidance_scale=guidance_scale, conditions=condition_tensor, known=known, known_mask=known_mask,
        x0_clip=X0_CLIP,
    )[0]
    log_floor = math.log(mel_config.log_floor)
    return (normalised * checkpoint.mel_std + checkpoint.mel_mean).clamp(min=log_floor).numpy().astype(np.float32)


def _vocode(mel: np.ndarray, vocoder: str | os.PathLike[str] | Vocoder | None, mel_config: MelConfig,
            num_samples: int, seed: int, prompt: str) -> np.ndarray:
    """Vocode a log-mel to float32 ``(1, num_samples)`` peak-normalised to ``PEAK_DBFS``.

    Raises:
        RuntimeError: the vocoded audio is silent or not finite.
    """
    if vocoder is None or isinstance(vocoder, (str, os.PathLike)):
        vocoder = load_vocoder(vocoder, mel_config, seed=seed)
    audio = _fit_length(vocoder(mel, num_samples=num_samples), num_samples)
    peak = float(np.max(np.abs(audio))) if audio.size else 0.0
    if not (np.isfinite(audio).all() and peak > 0.0):
        raise RuntimeError(f"vocoded audio is silent or not finite (peak {peak}) for prompt {prompt!r}, seed {seed}")
    return (audio * (10.0 ** (PEAK_DBFS / 20.0) / peak)).astype(np.float32)


def _fit_length(audio: np.ndarray, num_samples: int) -> np.ndarray:
    """Trim or zero-pad float32 ``(1, samples)`` to exactly ``num_samples``."""
    if audio.shape[-1] >= num_samples:
        return audio[..., :num_samples]
    return np.pad(audio, ((0, 0), (0, num_samples - audio.shape[-1])))
