"""Griffin-Lim vocoder: log-mel spectrogram → waveform, with no learned parameters.

The magnitude mel is inverted to a linear-frequency magnitude spectrogram by non-negative least squares
against the same Slaney filter bank ``cleaning.mel.MelConfig`` uses (``torchaudio.transforms.
InverseMelScale``), then a phase is estimated by Griffin-Lim iterations (Griffin & Lim 1984, "Signal
estimation from modified short-time Fourier transform") with the momentum of Perraudin et al. 2013
("A fast Griffin-Lim algorithm"). A baseline: a neural vocoder would sound better and slot in here.
"""

from __future__ import annotations

import numpy as np
import torch
import torchaudio

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
