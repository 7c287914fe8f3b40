"""Griffin-Lim vocoder: log-mel spectrogram → waveform, with no learned parameters.

The magnitude mel is inverted to a linear-frequency magnitude spectrogram by non-negative least squares
against the same Slaney filter bank ``cleaning.mel.MelConfig`` uses (``torchaudio.transforms.
InverseMelScale``), then a phase is estimated by Griffin-Lim iterations (Griffin & Lim 1984, "Signal
estimation from modified short-time Fourier transform") with the momentum of Perraudin et al. 2013
("A fast Griffin-Lim algorithm"). Griffin-Lim is the default (no weights needed); a neural vocoder, the
HiFi-GAN generator (``HiFiGanVocoder``), loads from a local checkpoint with ``load_vocoder``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchaudio
from torch import nn

from cleaning.mel import MelConfig


class GriffinLimVocoder:
    """Invert ``cleaning.mel.log_mel``.

    Deterministic: the random initial phase is drawn from a private generator seeded with ``seed``
    (``torch.random.fork_rng``), so the global RNG is neither used nor advanced.

    Args:
        mel_config: the parameters the log-mel was computed with.
        n_iter: Griffin-Lim iterations.
        momentum: fast Griffin-Lim momentum in [0, 1) (Perraudin et al. 2013); 0 is plain Griffin-Lim.
        seed: seed of the random initial phase.
    """

    def __init__(self, mel_config: MelConfig, n_iter: int = 64, momentum: float = 0.99, seed: int = 0) -> None:
        if n_iter < 1:
            raise ValueError(f"n_iter must be >= 1, got {n_iter}")
        self.mel_config = mel_config
        self.n_iter, self.momentum, self.seed = n_iter, momentum, seed
        self.inverse_mel = torchaudio.transforms.InverseMelScale(
            n_stft=mel_config.n_fft // 2 + 1, n_mels=mel_config.n_mels, sample_rate=mel_config.sample_rate_hz,
            f_min=mel_config.f_min_hz, f_max=mel_config.f_max_hz, norm="slaney", mel_scale="slaney",
            driver="gelsd",  # SVD-based: the filter bank can be rank-deficient (empty low bands)
        )

    def __call__(self, log_mel: np.ndarray | torch.Tensor, num_samples: int | None = None) -> np.ndarray:
        """Waveform of a log-mel spectrogram.

        Args:
            log_mel: float ``(n_mels, frames)`` natural-log magnitude mel at ``mel_config``.
            num_samples: output length; None gives ``(frames - 1) * hop_length`` samples.

        Returns:
            float32 ``(1, samples)`` at ``mel_config.sample_rate_hz``, not normalised (its level follows
            the mel's magnitudes).

        Raises:
            ValueError: ``log_mel`` is not ``(n_mels, frames)`` with ``frames >= 2``, or is not finite.
        """
        config = self.mel_config
        mel = torch.as_tensor(np.asarray(log_mel, dtype=np.float32))
        if mel.ndim != 2 or mel.shape[0] != config.n_mels or mel.shape[1] < 2:
            raise ValueError(f"log_mel must be ({config.n_mels}, frames >= 2), got {tuple(mel.shape)}")
        if not torch.isfinite(mel).all():
            raise ValueError("log_mel has non-finite values")
        griffin_lim = torchaudio.transforms.GriffinLim(
            n_fft=config.n_fft, hop_length=config.hop_length, power=1.0, n_iter=self.n_iter,
            momentum=self.momentum, length=num_samples, rand_init=True,
        )
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            magnitude = self.inverse_mel(torch.exp(mel))  # (n_fft // 2 + 1, frames), >= 0
            audio = griffin_lim(magnitude)
        return audio.reshape(1, -1).numpy().astype(np.float32)


# --- neural vocoder ------------------------------------------------------------------------------------

HIFIGAN_FORMAT = "linernotes-hifigan-1"
"""``format`` of a HiFi-GAN generator checkpoint written by ``save_hifigan``."""
LRELU_SLOPE = 0.1


class HiFiGanGenerator(nn.Module):
    """The HiFi-GAN generator (Kong, Kim & Bae 2020, "HiFi-GAN: Generative Adversarial Networks for
    Efficient and High Fidelity Speech Synthesis"): transposed-convolution upsampling by
    ``upsample_rates`` (their product is the mel hop length), each followed by a multi-receptive-field
    fusion of residual blocks (``ResBlock1``: dilated convolutions), then a 7-tap convolution and tanh.

    Module names follow the authors' code (``conv_pre``, ``ups``, ``resblocks``, ``conv_post``), so
    their released ``generator_*`` checkpoints load (``load_vocoder`` folds their weight norm).

    Args:
        n_mels: mel bins of the input.
        upsample_rates, upsample_kernel_sizes: one per upsampling stage.
        upsample_initial_channel: channels after ``conv_pre``; halved at every stage.
        resblock_kernel_sizes, resblock_dilation_sizes: one residual block per kernel size per stage.

    Shapes: float32 ``(batch, n_mels, frames)`` natural-log magnitude mel → ``(batch, 1, frames · hop)`` in [-1, 1].
    """

    def __init__(self, n_mels: int = 80, upsample_rates: Sequence[int] = (8, 8, 2, 2),
                 upsample_kernel_sizes: Sequence[int] = (16, 16, 4, 4), upsample_initial_channel: int = 512,
                 resblock_kernel_sizes: Sequence[int] = (3, 7, 11),
                 resblock_dilation_sizes: Sequence[Sequence[int]] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))) -> None:
        super().__init__()
        if len(upsample_rates) != len(upsample_kernel_sizes) or len(resblock_kernel_sizes) != len(
                resblock_dilation_sizes):
            raise ValueError("upsample_rates/upsample_kernel_sizes and resblock_kernel_sizes/resblock_dilation_sizes "
                             "must have equal lengths")
        self.generator_kwargs: dict[str, Any] = {
            "n_mels": n_mels, "upsample_rates": list(upsample_rates),
            "upsample_kernel_sizes": list(upsample_kernel_sizes), "upsample_initial_channel": upsample_initial_channel,
            "resblock_kernel_sizes": list(resblock_kernel_sizes),
            "resblock_dilation_sizes": [list(d) for d in resblock_dilation_sizes],
        }
        self.num_kernels = len(resblock_kernel_sizes)
        self.conv_pre = nn.Conv1d(n_mels, upsample_initial_channel, 7, 1, padding=3)
        self.ups = nn.ModuleList()
        self.resblocks = nn.ModuleList()
        channels = upsample_initial_channel
        for rate, kernel in zip(upsample_rates, upsample_kernel_sizes, strict=True):
            self.ups.append(nn.ConvTranspose1d(channels, channels // 2, kernel, rate, padding=(kernel - rate) // 2))
            channels //= 2
            for size, dilations in zip(resblock_kernel_sizes, resblock_dilation_sizes, strict=True):
                self.resblocks.append(ResBlock1(channels, size, dilations))
        self.conv_post = nn.Conv1d(channels, 1, 7, 1, padding=3)

    @property
    def hop_length(self) -> int:
        """Output samples per input frame: the product of ``upsample_rates``."""
        return int(np.prod(self.generator_kwargs["upsample_rates"]))

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        x = self.conv_pre(mel)
        for index, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, LRELU_SLOPE))
            blocks = self.resblocks[index * self.num_kernels:(index + 1) * self.num_kernels]
            x = sum(block(x) for block in blocks) / self.num_kernels
        return torch.tanh(self.conv_post(F.leaky_relu(x)))


class ResBlock1(nn.Module):
    """HiFi-GAN's residual block: for each dilation, LReLU → dilated Conv1d → LReLU → Conv1d, plus skip."""

    def __init__(self, channels: int, kernel_size: int, dilations: Sequence[int]) -> None:
        super().__init__()
        self.convs1 = nn.ModuleList([nn.Conv1d(channels, channels, kernel_size, 1, dilation=d,
                                               padding=(kernel_size * d - d) // 2) for d in dilations])
        self.convs2 = nn.ModuleList([nn.Conv1d(channels, channels, kernel_size, 1, padding=(kernel_size - 1) // 2)
                                     for _ in dilations])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv1, conv2 in zip(self.convs1, self.convs2, strict=True):
            x = x + conv2(F.leaky_relu(conv1(F.leaky_relu(x, LRELU_SLOPE)), LRELU_SLOPE))
        return x


class HiFiGanVocoder:
    """Log-mel → waveform with a trained ``HiFiGanGenerator`` (on the CPU, no gradients).

    Args:
        generator: the generator, with weights.
        mel_config: the log-mel parameters it expects (its ``n_mels`` and hop must match the generator).

    Raises:
        ValueError: the generator's ``n_mels`` or hop length (product of upsample rates) differs from
            ``mel_config``'s.
    """

    def __init__(self, generator: HiFiGanGenerator, mel_config: MelConfig) -> None:
        kwargs = generator.generator_kwargs
        if kwargs["n_mels"] != mel_config.n_mels or generator.hop_length != mel_config.hop_length:
            raise ValueError(f"the vocoder expects {kwargs['n_mels']} mel bins at hop {generator.hop_length}, the "
                             f"checkpoint's mels have {mel_config.n_mels} at hop {mel_config.hop_length}")
        self.generator = generator.eval().requires_grad_(False)
        self.mel_config = mel_config

    def __call__(self, log_mel: np.ndarray | torch.Tensor, num_samples: int | None = None) -> np.ndarray:
        """float32 ``(1, samples)`` of a natural-log magnitude mel ``(n_mels, frames)``; ``num_samples``
        trims or zero-pads (default ``frames · hop``).

        Raises:
            ValueError: wrong shape or non-finite values.
        """
        mel = torch.as_tensor(np.asarray(log_mel, dtype=np.float32))
        if mel.ndim != 2 or mel.shape[0] != self.mel_config.n_mels or not torch.isfinite(mel).all():
            raise ValueError(f"log_mel must be finite ({self.mel_config.n_mels}, frames), got {tuple(mel.shape)}")
        with torch.no_grad():
            audio = self.generator(mel[None])[0].numpy().astype(np.float32)
        if num_samples is not None:
            audio = audio[:, :num_samples] if audio.shape[1] >= num_samples else np.pad(
                audio, ((0, 0), (0, num_samples - audio.shape[1])))
        return audio


def save_hifigan(generator: HiFiGanGenerator, mel_config: MelConfig, path: str | os.PathLike[str]) -> Path:
    """Write a generator checkpoint ``load_vocoder`` reads: format, constructor kwargs, weights, mel config."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": HIFIGAN_FORMAT, "generator_kwargs": generator.generator_kwargs,
                "generator_state": generator.state_dict(), "mel_config": mel_config.to_dict()}, path)
    return path


def load_vocoder(spec: str | os.PathLike[str] | None, mel_config: MelConfig,
                 seed: int = 0) -> GriffinLimVocoder | HiFiGanVocoder:
    """The vocoder for ``spec``: None or ``"griffin-lim"`` → ``GriffinLimVocoder`` (the default), otherwise a
    local HiFi-GAN generator checkpoint (never downloaded):

    - a file written by ``save_hifigan`` (its mel config must equal ``mel_config``), or
    - the authors' release format: a ``{"generator": state_dict}`` file (weight-normed ``weight_g`` /
      ``weight_v`` are folded into plain weights) with its ``config.json`` in the same folder.

    Raises:
        FileNotFoundError: no such file, or an authors' checkpoint without ``config.json`` beside it.
        ValueError: not a generator checkpoint, or its mel parameters differ from ``mel_config``.
    """
    if spec is None or str(spec) == "griffin-lim":
        return GriffinLimVocoder(mel_config, seed=seed)
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"no vocoder checkpoint at {path} (give a local HiFi-GAN generator file, or "
                                "'griffin-lim')")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and state.get("format") == HIFIGAN_FORMAT:
        saved = MelConfig(**state["mel_config"])
        if saved != mel_config:
            raise ValueError(f"vocoder {path} was trained on mels {saved}, the checkpoint's are {mel_config}")
        generator = HiFiGanGenerator(**state["generator_kwargs"])
        generator.load_state_dict(state["generator_state"])
        return HiFiGanVocoder(generator, mel_config)
    if isinstance(state, dict) and "generator" in state:
        config_path = path.parent / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{path} is a HiFi-GAN release checkpoint: its config.json must be beside it")
        hparams = json.loads(config_path.read_text())
        generator = HiFiGanGenerator(
            n_mels=int(hparams.get("num_mels", 80)), upsample_rates=hparams["upsample_rates"],
            upsample_kernel_sizes=hparams["upsample_kernel_sizes"],
            upsample_initial_channel=hparams["upsample_initial_channel"],
            resblock_kernel_sizes=hparams["resblock_kernel_sizes"],
            resblock_dilation_sizes=hparams["resblock_dilation_sizes"])
        if str(hparams.get("resblock", "1")) != "1":
            raise ValueError(f"{path}: only HiFi-GAN's ResBlock1 generators (V1, V2) are supported")
        generator.load_state_dict(fold_weight_norm(state["generator"]))
        return HiFiGanVocoder(generator, mel_config)
    raise ValueError(f"{path} is not a HiFi-GAN generator checkpoint (no 'format' {HIFIGAN_FORMAT!r} and no "
                     "'generator' key)")


def fold_weight_norm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Replace ``X.weight_g`` / ``X.weight_v`` pairs (``torch.nn.utils.weight_norm``, dim 0; Salimans &
    Kingma 2016) by ``X.weight = g · v / ‖v‖``, the norm over all but the first dimension."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.endswith(".weight_g"):
            continue
        if key.endswith(".weight_v"):
            stem = key[: -len("_v")]
            g = state[stem + "_g"]
            norm = value.flatten(1).norm(dim=1).reshape(g.shape)
            out[stem] = value * (g / norm)
        else:
            out[key] = value
    return out
