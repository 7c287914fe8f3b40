"""Learned audio embedders from local files, behind the same ``provenance.attribution.Embedder`` protocol as the
offline default (``cleaning.embed.MelStatsEmbedder``). Nothing here downloads: every loader takes a path.

- ``ClapEmbedder`` — CLAP (Wu et al., "Large-scale Contrastive Language-Audio Pretraining with Feature Fusion
  and Keyword-to-Caption Augmentation", ICASSP 2023): ``transformers.ClapModel`` and its
  ``ClapFeatureExtractor`` loaded from a local ``save_pretrained`` directory (e.g. a copy of
  ``laion/clap-htsat-unfused``); the vector of a window is the model's L2-normalised audio projection
  (``get_audio_features``), ``dim = projection_dim`` (512 for the LAION models).
- ``PannsCnn14Embedder`` — PANNs Cnn14 (Kong et al., "PANNs: Large-Scale Pretrained Audio Neural Networks
  for Audio Pattern Recognition", IEEE/ACM TASLP 2020), the architecture defined in this module and loaded
  from the authors' checkpoint file (``torch.save({"model": state_dict})``, e.g. ``Cnn14_mAP=0.431.pth``);
  the vector of a window is Cnn14's 2048-d ``embedding`` (fc1 after global time pooling), as in fadtk's and
  the FAD literature's PANNs embeddings. Layer widths, FFT size and mel bands are read from the state dict,
  so the 32 kHz (``n_fft`` 1024), 16 kHz (512) and 8 kHz (256) Cnn14 variants all load.

Both cut audio into ``window_s`` windows every ``hop_s`` (as the default embedder), resample to the model's
rate (``cleaning.audio.resample``), run in eval mode under ``torch.no_grad`` — deterministic for a given
checkpoint — and name themselves after the checkpoint's sha256 so that lineage and index folders change when
the weights do.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cleaning.audio import check_audio, resample, to_mono

CLAP = "clap"
PANNS = "panns"
PANNS_CNN14 = "panns-cnn14"


def _sha256_files(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(path.name.encode())
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _windows(mono: np.ndarray, window_samples: int, hop_samples: int) -> np.ndarray:
    """float32 ``(n, window_samples)``: ``1 + (len - window) // hop`` windows; a shorter clip is zero-padded
    to one window."""
    if mono.shape[0] <= window_samples:
        return np.pad(mono, (0, window_samples - mono.shape[0]))[None]
    count = 1 + (mono.shape[0] - window_samples) // hop_samples
    view = np.lib.stride_tricks.sliding_window_view(mono, window_samples)
    return np.ascontiguousarray(view[::hop_samples][:count])


class _WindowedEmbedder:
    """Shared windowing: mono, the model's rate, ``window_s`` windows every ``hop_s``, ``batch_size`` at a time."""

    sample_rate_hz: int
    dim: int
    name: str

    def __init__(self, window_s: float, hop_s: float, batch_size: int) -> None:
        if window_s <= 0 or hop_s <= 0 or batch_size < 1:
            raise ValueError(f"window_s, hop_s must be > 0 and batch_size ≥ 1; got {window_s}, {hop_s}, {batch_size}")
        self.window_s, self.hop_s, self.batch_size = float(window_s), float(hop_s), int(batch_size)

    def _embed_windows(self, windows: np.ndarray) -> np.ndarray:  # (n, T) -> (n, dim)
        raise NotImplementedError

    def embed(self, audio: np.ndarray, sample_rate_hz: int) -> np.ndarray:
        """Embed ``audio`` window by window.

        Args:
            audio: float32 ``(channels, samples)`` (``(samples,)`` is taken as mono), any rate.
            sample_rate_hz: rate of ``audio``.

        Returns:
            float32 ``(num_windows, dim)``.

        Raises:
            ValueError: empty audio, non-finite samples, more than 2 dims, or ``sample_rate_hz <= 0``.
        """
        audio = check_audio(audio, sample_rate_hz)
        mono = resample(to_mono(audio), int(sample_rate_hz), self.sample_rate_hz)[0]
        windows = _windows(mono, round(self.window_s * self.sample_rate_hz),
                           max(1, round(self.hop_s * self.sample_rate_hz)))
        out = [self._embed_windows(windows[i:i + self.batch_size]) for i in range(0, len(windows), self.batch_size)]
        return np.concatenate(out).astype(np.float32)


# CLAP -----------------------------------------------------------------------------------------------------

class ClapEmbedder(_WindowedEmbedder):
    """CLAP audio embeddings from a local ``transformers`` directory (see the module docstring).

    Args:
        directory: holds ``config.json``, the weights and ``preprocessor_config.json`` (a ``ClapModel`` and its
            ``ClapFeatureExtractor`` saved with ``save_pretrained``); read with ``local_files_only``.
        window_s, hop_s: windowing, seconds (each window is padded by the feature extractor as CLAP expects).
        batch_size: windows per forward pass.

    Raises:
        FileNotFoundError: ``directory`` or its ``config.json`` is missing.
        ValueError: the directory does not hold a CLAP model.
    """

    def __init__(self, directory: str | os.PathLike[str], window_s: float = 1.0, hop_s: float = 0.5,
                 batch_size: int = 8) -> None:
        super().__init__(window_s, hop_s, batch_size)
        from transformers import ClapConfig, ClapFeatureExtractor, ClapModel

        path = Path(directory)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"no CLAP model at {path}: expected a save_pretrained directory with config.json")
        config = ClapConfig.from_pretrained(path, local_files_only=True)
        if config.model_type != "clap":
            raise ValueError(f"{path} holds a {config.model_type!r} model, not CLAP")
        self.model = ClapModel.from_pretrained(path, local_files_only=True).eval()
        self.feature_extractor = ClapFeatureExtractor.from_pretrained(path, local_files_only=True)
        self.sample_rate_hz = int(self.feature_extractor.sampling_rate)
        self.dim = int(config.projection_dim)
        weights = [p for p in path.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file()]
        digest = _sha256_files(weights + [path / "config.json"])[:12]
        self.name = f"{CLAP}-{digest}_sr{self.sample_rate_hz}_win{round(self.window_s * 1000)}ms_hop{round(self.hop_s * 1000)}ms"

    def __repr__(self) -> str:
        return f"ClapEmbedder({self.name})"

    def _embed_windows(self, windows: np.ndarray) -> np.ndarray:
        inputs = self.feature_extractor(list(windows), sampling_rate=self.sample_rate_hz, return_tensors="pt")
        with torch.no_grad():
            out = self.model.get_audio_features(**{k: v for k, v in inputs.items()
                                                   if k in ("input_features", "is_longer")})
        vectors = out.pooler_output if hasattr(out, "pooler_output") else out
        return vectors.detach().float().cpu().numpy()


# PANNs Cnn14 ----------------------------------------------------------------------------------------------

class _ConvBlock(nn.Module):
    """PANNs ConvBlock: two 3×3 convolutions (no bias) with batch norm and ReLU, then 2×2 average pooling."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor, pool_size: tuple[int, int]) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return F.avg_pool2d(x, kernel_size=pool_size)


class _Stft(nn.Module):
    """torchlibrosa's STFT as two 1-D convolutions (Hann window, centred, reflect padding): the authors'
    parameter names ``conv_real`` / ``conv_imag``, each ``(n_fft // 2 + 1, 1, n_fft)``."""

    def __init__(self, n_fft: int, hop_length: int) -> None:
        super().__init__()
        self.n_fft, self.hop_length = n_fft, hop_length
        bins = n_fft // 2 + 1
        self.conv_real = nn.Conv1d(1, bins, n_fft, stride=hop_length, bias=False)
        self.conv_imag = nn.Conv1d(1, bins, n_fft, stride=hop_length, bias=False)
        n = np.arange(n_fft)
        window = 0.5 - 0.5 * np.cos(2 * np.pi * n / n_fft)  # periodic Hann (scipy get_window fftbins=True)
        dft = np.exp(-2j * np.pi * np.outer(n, n[:bins]) / n_fft) * window[:, None]
        with torch.no_grad():
            self.conv_real.weight.copy_(torch.from_numpy(np.real(dft).T[:, None, :].astype(np.float32)))
            self.conv_imag.weight.copy_(torch.from_numpy(np.imag(dft).T[:, None, :].astype(np.float32)))
        for p in self.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # (B, T) -> 2 × (B, 1, frames, bins)
        x = F.pad(x[:, None, :], (self.n_fft // 2, self.n_fft // 2), mode="reflect")
        return self.conv_real(x).transpose(1, 2)[:, None], self.conv_imag(x).transpose(1, 2)[:, None]


class _Spectrogram(nn.Module):
    def __init__(self, n_fft: int, hop_length: int) -> None:
        super().__init__()
        self.stft = _Stft(n_fft, hop_length)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        real, imag = self.stft(x)
        return real ** 2 + imag ** 2


class _LogMel(nn.Module):
    """Mel filter bank ``melW`` ``(bins, mel_bins)`` (Slaney mel, librosa's), then ``10·log10(max(·, 1e-10))``."""

    def __init__(self, sample_rate_hz: int, n_fft: int, mel_bins: int, fmin_hz: float, fmax_hz: float) -> None:
        super().__init__()
        from torchaudio.functional import melscale_fbanks

        mel = melscale_fbanks(n_fft // 2 + 1, fmin_hz, fmax_hz, mel_bins, sample_rate_hz, norm="slaney",
                              mel_scale="slaney")  # = librosa.filters.mel(...).T, as the authors build it
        self.melW = nn.Parameter(mel.float(), requires_grad=False)

    def forward(self, power: torch.Tensor) -> torch.Tensor:
        return 10.0 * torch.log10(torch.clamp(power @ self.melW, min=1e-10))


class Cnn14(nn.Module):
    """PANNs Cnn14 (Kong et al. 2020), parameter names as in the authors' ``models.py`` so their checkpoints load.

    Log-mel front end (``_Spectrogram`` → ``_LogMel``), ``bn0`` over mel bands, six ``_ConvBlock`` (2×2
    pooling, the last 1×1), mean over frequency, max + mean over time, ``fc1`` + ReLU: the ``embedding``;
    ``fc_audioset`` (527 AudioSet classes) is kept so that a checkpoint loads strictly, and not used here.

    Args:
        sample_rate_hz, n_fft, hop_length, mel_bins, fmin_hz, fmax_hz: the front end (authors' 32 kHz model:
            32000, 1024, 320, 64, 50, 14000).
        widths: output channels of the six conv blocks (authors: 64, 128, 256, 512, 1024, 2048); ``fc1`` is
            ``widths[-1]`` wide, so ``dim = widths[-1]``.
        classes_num: AudioSet classes (527).
    """

    def __init__(self, sample_rate_hz: int = 32000, n_fft: int = 1024, hop_length: int = 320, mel_bins: int = 64,
                 fmin_hz: float = 50.0, fmax_hz: float = 14000.0,
                 widths: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048), classes_num: int = 527) -> None:
        super().__init__()
        if len(widths) != 6:
            raise ValueError(f"Cnn14 has six conv blocks; got widths {widths}")
        self.sample_rate_hz = int(sample_rate_hz)
        self.spectrogram_extractor = _Spectrogram(n_fft, hop_length)
        self.logmel_extractor = _LogMel(sample_rate_hz, n_fft, mel_bins, fmin_hz, fmax_hz)
        self.bn0 = nn.BatchNorm2d(mel_bins)
        channels = (1, *widths)
        for i in range(6):
            setattr(self, f"conv_block{i + 1}", _ConvBlock(channels[i], channels[i + 1]))
        self.fc1 = nn.Linear(widths[-1], widths[-1], bias=True)
        self.fc_audioset = nn.Linear(widths[-1], classes_num, bias=True)

    def embedding(self, waveform: torch.Tensor) -> torch.Tensor:
        """float32 ``(B, samples)`` at ``sample_rate_hz`` → float32 ``(B, widths[-1])`` (eval mode)."""
        x = self.logmel_extractor(self.spectrogram_extractor(waveform))  # (B, 1, frames, mel_bins)
        x = self.bn0(x.transpose(1, 3)).transpose(1, 3)
        for i in range(6):
            x = getattr(self, f"conv_block{i + 1}")(x, pool_size=(2, 2) if i < 5 else (1, 1))
        x = x.mean(dim=3)
        x = x.max(dim=2).values + x.mean(dim=2)
        return F.relu(self.fc1(x))

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], sample_rate_hz: int | None = None) -> "Cnn14":
        """A Cnn14 shaped like ``state`` (the authors' ``checkpoint["model"]``), its weights loaded strictly.

        Widths, ``n_fft``, mel bands and classes come from the tensors' shapes; the rate, unless given, from
        ``n_fft`` as in the authors' family (``sample_rate_hz = 31.25 · n_fft``: 1024 → 32 kHz, 512 → 16 kHz,
        256 → 8 kHz), the hop is ``5/16 · n_fft`` (320, 160, 80).

        Raises:
            ValueError: a key is missing or a shape does not fit Cnn14.
        """
        try:
            widths = tuple(int(state[f"conv_block{i + 1}.conv1.weight"].shape[0]) for i in range(6))
            n_fft = int(state["spectrogram_extractor.stft.conv_real.weight"].shape[-1])
            mel_bins = int(state["logmel_extractor.melW"].shape[1])
            classes = int(state["fc_audioset.weight"].shape[0])
        except KeyError as error:
            raise ValueError(f"not a PANNs Cnn14 state dict: missing {error}") from None
        rate = int(sample_rate_hz) if sample_rate_hz else round(n_fft * 31.25)
        model = cls(sample_rate_hz=rate, n_fft=n_fft, hop_length=max(1, round(n_fft * 5 / 16)), mel_bins=mel_bins,
                    fmax_hz=min(14000.0, rate / 2), widths=widths, classes_num=classes)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as error:
            raise ValueError(f"the state dict does not fit Cnn14: {str(error).splitlines()[0]}") from None
        return model.eval()


class PannsCnn14Embedder(_WindowedEmbedder):
    """PANNs Cnn14 ``embedding`` vectors from the authors' checkpoint file (see the module docstring).

    Args:
        checkpoint: a ``.pth`` file holding ``{"model": state_dict, ...}`` (or a bare state dict).
        window_s, hop_s: windowing, seconds.
        batch_size: windows per forward pass.
        sample_rate_hz: the model's rate, when it is not the one its ``n_fft`` implies.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file does not hold a Cnn14 state dict.
    """

    def __init__(self, checkpoint: str | os.PathLike[str], window_s: float = 1.0, hop_s: float = 0.5,
                 batch_size: int = 8, sample_rate_hz: int | None = None) -> None:
        super().__init__(window_s, hop_s, batch_size)
        path = Path(checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"no PANNs checkpoint at {path}")
        package = torch.load(path, map_location="cpu", weights_only=True)
        state = package.get("model", package) if isinstance(package, dict) else None
        if not isinstance(state, dict):
            raise ValueError(f"{path} holds no state dict (expected the authors' {{'model': state_dict}})")
        self.model = Cnn14.from_state_dict(state, sample_rate_hz)
        self.sample_rate_hz = self.model.sample_rate_hz
        self.dim = int(self.model.fc1.out_features)
        digest = _sha256_files([path])[:12]
        self.name = (f"{PANNS_CNN14}-{digest}_sr{self.sample_rate_hz}_win{round(self.window_s * 1000)}ms"
                     f"_hop{round(self.hop_s * 1000)}ms")

    def __repr__(self) -> str:
        return f"PannsCnn14Embedder({self.name})"

    def _embed_windows(self, windows: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self.model.embedding(torch.from_numpy(np.ascontiguousarray(windows))).numpy()
