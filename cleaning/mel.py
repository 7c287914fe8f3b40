"""Log-mel spectrogram: the training input, the vocoder's target and the default embedder's front end."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class MelConfig:
    """Log-mel parameters. Magnitude (power 1) mel, Slaney-normalised filters, natural log with a floor.

    At the defaults one frame is 10 ms: ``hop_length / sample_rate_hz``.
    """

    sample_rate_hz: int = 32000
    n_fft: int = 1024
    hop_length: int = 320
    n_mels: int = 64
    f_min_hz: float = 0.0
    f_max_hz: float | None = None  # Nyquist when None
    log_floor: float = 1e-5

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def num_frames(self, num_samples: int) -> int:
        """Frames that ``log_mel`` returns for ``num_samples`` samples (centred STFT)."""
        return num_samples // self.hop_length + 1

    def mel_transform(self) -> "torchaudio.transforms.MelSpectrogram":  # noqa: F821  (imported on use)
        import torchaudio  # on use: a config is read by light commands (`linernotes stages`) that need no torch

        return torchaudio.transforms.MelSpectrogram(
            sample_rate=self.sample_rate_hz, n_fft=self.n_fft, hop_length=self.hop_length,
            n_mels=self.n_mels, f_min=self.f_min_hz, f_max=self.f_max_hz, power=1.0,
            norm="slaney", mel_scale="slaney", center=True,
        )


def log_mel(audio: "np.ndarray | torch.Tensor", config: MelConfig) -> np.ndarray:  # noqa: F821
    """Natural-log magnitude mel spectrogram of mono audio.

    Args:
        audio: float32 ``(samples,)`` or ``(1, samples)`` at ``config.sample_rate_hz``.
        config: mel parameters.

    Returns:
        float32 ``(n_mels, frames)`` with ``frames = samples // hop_length + 1``; values are
        ``log(max(mel, log_floor))``, so ≥ ``log(log_floor)`` (≈ -11.5 at the default floor).
    """
    import torch

    tensor = torch.as_tensor(np.asarray(audio, dtype=np.float32)).reshape(-1)
    with torch.no_grad():
        mel = config.mel_transform()(tensor)
    return torch.log(torch.clamp(mel, min=config.log_floor)).numpy().astype(np.float32)
