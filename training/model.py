"""``MelUNet``: a 1-D U-Net over time that denoises a noisy log-mel spectrogram (predicts ε or v).

The mel bins are the channels and time is the one spatial axis, so every convolution is temporal
(``Conv1d``, kernel 3). The layout follows the DDPM U-Net (Ho et al. 2020) in one dimension: residual
blocks (GroupNorm → SiLU → Conv), a sinusoidal timestep embedding (Vaswani et al. 2017) plus the text
embedding (``training.text.TextEncoder``) applied in every block as a FiLM scale and shift (Perez et al.
2018), a halving of the frame rate between levels, skip connections across, and a long skip that hands
the noisy input to the output layer. The model owns its text encoder so that one ``state_dict`` holds
everything the sampler needs and DDP sees one module.

Optional parts (constructor defaults keep the original architecture, so older checkpoints load):
- multi-head self-attention over frames (``AttentionBlock``, as the DDPM U-Net at 16×16; Vaswani et al.
  2017) after the residual blocks of the levels in ``attention_levels`` and between the two middle
  blocks: at low resolution, where frames are few and the receptive field of convolutions is short;
- musical conditions (BPM, key, instrument, duration; ``training.conditioning``), added to the
  timestep embedding like the text;
- a frozen pretrained text encoder from local weights (``text_encoder="pretrained"``,
  ``training.text.PretrainedTextEncoder``) instead of the hashed one trained with the model.

Saved models carry their constructor arguments (``model_kwargs``), demucs style:
``MelUNet(**checkpoint["model_kwargs"])``; ``build_model(config, n_mels)`` builds one from a ``TrainConfig``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from training.conditioning import MusicalConditionEncoder
from training.text import PretrainedTextEncoder, TextEncoder


class MelUNet(nn.Module):
    """Denoising network over log-mel spectrograms of any frame count; it outputs what the diffusion's
    ``prediction`` asks for (the noise ε or v, ``training.diffusion``).

    Args:
        n_mels: mel bins of the input (its channels).
        base_channels: channels of the first level; a multiple of 8 (GroupNorm groups).
        channel_mults: channel multiplier per level; ``len(channel_mults) - 1`` halvings of the frame
            rate, so inputs are padded internally to a multiple of ``2 ** (len(channel_mults) - 1)``.
        text_dim: width of the text embedding.
        text_buckets: hash buckets of the text encoder.
        attention_levels: levels (0 = full frame rate; negative counts from the lowest) that get
            self-attention after their residual blocks; non-empty also puts attention in the middle.
        attention_heads: heads of each attention block; every attended width must divide by it.
        musical_conditioning: accept ``conditions`` (BPM, key, instrument, duration) in ``forward``.
        text_encoder: ``"hashed"`` (``TextEncoder``, trained with the model) or ``"pretrained"``
            (``PretrainedTextEncoder`` at ``text_encoder_path``, frozen).
        text_encoder_path: folder of the pretrained text encoder (local weights).

    Raises:
        ValueError: an attention level out of range, a width not divisible by ``attention_heads``, an
            unknown ``text_encoder`` or a pretrained one without a path.
    """

    def __init__(self, n_mels: int, base_channels: int = 32, channel_mults: Sequence[int] = (1, 2, 2),
                 text_dim: int = 64, text_buckets: int = 2048, attention_levels: Sequence[int] = (),
                 attention_heads: int = 4, musical_conditioning: bool = False, text_encoder: str = "hashed",
                 text_encoder_path: str | None = None) -> None:
        super().__init__()
        self.model_kwargs: dict[str, Any] = {
            "n_mels": n_mels, "base_channels": base_channels, "channel_mults": list(channel_mults),
            "text_dim": text_dim, "text_buckets": text_buckets, "attention_levels": list(attention_levels),
            "attention_heads": attention_heads, "musical_conditioning": musical_conditioning,
            "text_encoder": text_encoder, "text_encoder_path": text_encoder_path,
        }
        cond_dim = 4 * base_channels
        levels = len(channel_mults)
        if any(not -levels <= level < levels for level in attention_levels):
            raise ValueError(f"attention_levels must index the {levels} U-Net levels (0..{levels - 1}, or "
                             f"negative from the lowest), got {list(attention_levels)}")
        attended = {level % levels for level in attention_levels}
        if text_encoder == "hashed":
            self.text_encoder: nn.Module = TextEncoder(text_buckets, text_dim)
        elif text_encoder == "pretrained":
            if not text_encoder_path:
                raise ValueError("text_encoder='pretrained' needs text_encoder_path (a local model folder)")
            self.text_encoder = PretrainedTextEncoder(text_encoder_path, text_dim)
        else:
            raise ValueError(f"text_encoder must be 'hashed' or 'pretrained', got {text_encoder!r}")
        self.musical_encoder = MusicalConditionEncoder(cond_dim) if musical_conditioning else None
        self.time_mlp = nn.Sequential(nn.Linear(base_channels, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))
        self.text_proj = nn.Linear(text_dim, cond_dim)
        self.in_conv = nn.Conv1d(n_mels, base_channels, kernel_size=3, padding=1)

        widths = [base_channels * mult for mult in channel_mults]
        self.down_blocks, self.downsamples = nn.ModuleList(), nn.ModuleList()
        channels = base_channels
        self.down_attention, self.up_attention = nn.ModuleDict(), nn.ModuleDict()
        for level, width in enumerate(widths):
            self.down_blocks.append(ResBlock(channels, width, cond_dim))
            if level in attended:
                self.down_attention[str(level)] = AttentionBlock(width, attention_heads)
                self.up_attention[str(level)] = AttentionBlock(width, attention_heads)
            last = level == len(widths) - 1
            self.downsamples.append(nn.Identity() if last else nn.Conv1d(width, width, 3, stride=2, padding=1))
            channels = width
        self.mid_blocks = nn.ModuleList([ResBlock(channels, channels, cond_dim) for _ in range(2)])
        self.mid_attention = AttentionBlock(channels, attention_heads) if attended else None
        self.up_blocks, self.upsamples = nn.ModuleList(), nn.ModuleList()
        for level in reversed(range(len(widths))):
            self.up_blocks.append(ResBlock(channels + widths[level], widths[level], cond_dim))
            self.upsamples.append(Upsample(widths[level]) if level > 0 else nn.Identity())
            channels = widths[level]
        self.out_norm = nn.GroupNorm(8, channels)
        # the output layer also sees the noisy input itself (a long skip): the targets are nearly linear
        # in x_t at the ends of the schedule, and base_channels may be narrower than n_mels
        self.out_conv = nn.Conv1d(channels + n_mels, n_mels, kernel_size=3, padding=1)
        nn.init.zeros_(self.out_conv.weight)  # start by predicting 0: loss ≈ 1 at step 0 on standardised data
        nn.init.zeros_(self.out_conv.bias)

    @property
    def frame_multiple(self) -> int:
        """Frame counts are padded internally to a multiple of this: ``2 ** (levels - 1)``."""
        return 2 ** (len(self.down_blocks) - 1)

    def forward(self, mel: torch.Tensor, timesteps: torch.Tensor, texts: Sequence[str],
                conditions: torch.Tensor | None = None) -> torch.Tensor:
        """Predict the noise ε, v or the flow velocity in ``mel``.

        Args:
            mel: float32 ``(batch, n_mels, frames)``, the noisy normalised log-mel ``x_t``; any ``frames``.
            timesteps: int64 ``(batch,)`` diffusion steps in ``[0, T)`` (floats are accepted too).
            texts: ``batch`` conditioning texts; ``""`` is the null condition.
            conditions: optional float32 ``(batch, len(training.conditioning.CONDITION_NAMES))`` musical
                conditions, NaN where unknown; None: all unknown. Only for ``musical_conditioning=True``.

        Returns:
            float32 ``(batch, n_mels, frames)``: predicted ε, v or velocity.

        Raises:
            ValueError: ``mel`` is not 3-D with ``n_mels`` channels, the batch sizes disagree, or
                ``conditions`` are given to a model built without ``musical_conditioning``.
        """
        n_mels = self.model_kwargs["n_mels"]
        if mel.ndim != 3 or mel.shape[1] != n_mels:
            raise ValueError(f"mel must be (batch, {n_mels}, frames), got {tuple(mel.shape)}")
        if timesteps.shape != (mel.shape[0],) or len(texts) != mel.shape[0]:
            raise ValueError(f"batch sizes disagree: mel {mel.shape[0]}, timesteps {tuple(timesteps.shape)}, "
                             f"texts {len(texts)}")
        frames = mel.shape[-1]
        padded = math.ceil(frames / self.frame_multiple) * self.frame_multiple
        x = F.pad(mel, (0, padded - frames))

        base_channels = self.model_kwargs["base_channels"]
        cond = self.time_mlp(timestep_embedding(timesteps, base_channels)) + self.text_proj(self.text_encoder(texts))
        if self.musical_encoder is not None:
            if conditions is None:
                conditions = torch.full((mel.shape[0], self.musical_encoder.unknown.shape[0]), float("nan"),
                                        device=mel.device)
            if conditions.shape[0] != mel.shape[0]:
                raise ValueError(f"batch sizes disagree: mel {mel.shape[0]}, conditions {tuple(conditions.shape)}")
            cond = cond + self.musical_encoder(conditions.to(mel.device))
        elif conditions is not None:
            raise ValueError("this model was built without musical_conditioning: it takes no conditions")

        h = self.in_conv(x)
        skips = []
        for level, (block, downsample) in enumerate(zip(self.down_blocks, self.downsamples, strict=True)):
            h = block(h, cond)
            if str(level) in self.down_attention:
                h = self.down_attention[str(level)](h)
            skips.append(h)
            h = downsample(h)
        h = self.mid_blocks[0](h, cond)
        if self.mid_attention is not None:
            h = self.mid_attention(h)
        h = self.mid_blocks[1](h, cond)
        for index, (block, upsample) in enumerate(zip(self.up_blocks, self.upsamples, strict=True)):
            level = len(self.up_blocks) - 1 - index
            h = block(torch.cat([h, skips.pop()], dim=1), cond)
            if str(level) in self.up_attention:
                h = self.up_attention[str(level)](h)
            h = upsample(h)
        return self.out_conv(torch.cat([F.silu(self.out_norm(h)), x], dim=1))[..., :frames]


class ResBlock(nn.Module):
    """GroupNorm → SiLU → Conv1d(k=3), FiLM by the condition, GroupNorm → SiLU → Conv1d(k=3), plus skip.

    Shapes: ``(batch, in_channels, frames)`` and cond ``(batch, cond_dim)`` → ``(batch, out_channels, frames)``.
    """

    def __init__(self, in_channels: int, out_channels: int, cond_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(8, in_channels)
        self.conv1 = nn.Conv1d(in_channels, out_channels, kernel_size=3, padding=1)
        self.film = nn.Linear(cond_dim, 2 * out_channels)
        self.norm2 = nn.GroupNorm(8, out_channels)
        self.conv2 = nn.Conv1d(out_channels, out_channels, kernel_size=3, padding=1)
        self.skip = nn.Conv1d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()
        nn.init.zeros_(self.conv2.weight)  # each block starts as its skip path
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(F.silu(cond))[..., None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(F.silu(h))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over frames with a residual: ``x + proj(attn(GroupNorm(x)))``.

    Scaled dot-product attention (Vaswani et al. 2017) via ``F.scaled_dot_product_attention`` (flash /
    memory-efficient kernels on GPU); the output projection starts at zero, so the block starts as identity.
    Padded frames (the U-Net pads to a multiple of its stride) are attended like the others; they hold
    the zero padding's features only.

    Shapes: ``(batch, channels, frames)`` → same.

    Raises:
        ValueError: ``channels`` not divisible by ``heads``.
    """

    def __init__(self, channels: int, heads: int) -> None:
        super().__init__()
        if heads < 1 or channels % heads:
            raise ValueError(f"attention_heads ({heads}) must divide the attended width ({channels})")
        self.heads = heads
        self.norm = nn.GroupNorm(8, channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj = nn.Conv1d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, frames = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(batch, 3, self.heads, channels // self.heads, frames).unbind(1)
        out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.proj(out.transpose(-1, -2).reshape(batch, channels, frames))


class Upsample(nn.Module):
    """Nearest-neighbour ×2 in time, then Conv1d(k=3): ``(batch, c, frames)`` → ``(batch, c, 2 * frames)``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of diffusion steps (Vaswani et al. 2017, as used by Ho et al. 2020).

    Args:
        timesteps: ``(batch,)`` steps (int or float).
        dim: even embedding width.

    Returns:
        float32 ``(batch, dim)``: ``[cos(t·f_k), sin(t·f_k)]`` with ``f_k = max_period^(-k / (dim/2))``.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def build_model(config: Any, n_mels: int) -> MelUNet:
    """The ``MelUNet`` a ``training.config.TrainConfig`` describes, for ``n_mels`` mel bins.

    Raises:
        ValueError: see ``MelUNet``.
    """
    return MelUNet(n_mels=n_mels, base_channels=config.base_channels, channel_mults=config.channel_mults,
                   text_dim=config.text_dim, text_buckets=config.text_buckets,
                   attention_levels=config.attention_levels, attention_heads=config.attention_heads,
                   musical_conditioning=config.musical_conditioning, text_encoder=config.text_encoder,
                   text_encoder_path=config.text_encoder_path)
