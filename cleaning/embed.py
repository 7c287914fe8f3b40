"""Embedders: audio windows → vectors, for FAD and for the ``embedding`` attribution method.

``MelStatsEmbedder`` is the offline default: a hand-built timbre/texture descriptor computed from the
log-mel spectrogram, with no learned weights and nothing to download. It is *not* a learned audio
embedding (CLAP, VGGish, PANNs): it knows spectral envelope, spectral variability and how fast the
spectrum changes, and nothing of melody, rhythm, harmony or semantics. It retrieves near-copies of
training audio well (including gain changes and light noise) and separates clearly different timbres;
it is a weak judge of stylistic influence. Learned embedders from local files (CLAP, PANNs Cnn14;
``cleaning.embed_learned``) implement the same ``provenance.attribution.Embedder`` protocol and load through
``load_embedder`` (``"clap:DIR"``, ``"panns:FILE.pth"``).
"""

from __future__ import annotations

import numpy as np
import torch

from cleaning.audio import check_audio, resample, to_mono
from cleaning.mel import MelConfig
from provenance.attribution import Embedder, l2_normalize

MEL_STATS = "mel-stats"


class MelStatsEmbedder:
    """Windowed log-mel statistics (a timbre/texture embedding; see the module docstring).

    Pipeline: mix to mono, resample to ``sample_rate_hz`` (``cleaning.audio.resample``), one log-mel
    spectrogram of the whole clip (as ``cleaning.mel.log_mel``: ``n_fft`` = 32 ms, 10 ms hop, ``n_mels``
    Slaney bands, natural log floored at 1e-5; the transform is built once per embedder), cut into
    windows of ``window_s`` every ``hop_s``. Per window, three ``n_mels``-long blocks:

    1. spectral shape: each band's mean log-mel minus the mean over all bands and frames (so a gain
       change, which adds a constant in the log domain, leaves it unchanged);
    2. each band's standard deviation over the window's frames (dynamics, tremolo, note changes);
    3. each band's mean absolute frame-to-frame difference (onsets, texture, noisiness).

    Each block is L2-normalised so that the three weigh equally, then the concatenation is
    L2-normalised (a block that is all zero, e.g. the variability of a steady tone, stays zero). No
    random projection: at 192 dimensions it would not make search cheaper, would only perturb cosine
    similarities, and would hide what each coordinate means.

    Windows: ``1 + (num_samples - window) // hop`` of them (a trailing part shorter than a window is
    not embedded on its own); a clip shorter than one window gives one window over the whole clip.

    Args:
        window_s: window length in seconds (> 0).
        hop_s: window hop in seconds (> 0).
        sample_rate_hz: the embedder's rate; input at other rates is resampled.
        n_mels: mel bands; ``dim = 3 * n_mels``.

    Raises:
        ValueError: a non-positive argument, or a window shorter than 3 STFT frames.
    """

    VERSION = "v1"

    def __init__(self, window_s: float = 1.0, hop_s: float = 0.5, sample_rate_hz: int = 16000,
                 n_mels: int = 64) -> None:
        if window_s <= 0 or hop_s <= 0 or sample_rate_hz <= 0 or n_mels <= 0:
            raise ValueError(f"window_s, hop_s, sample_rate_hz, n_mels must be > 0; got "
                             f"{window_s}, {hop_s}, {sample_rate_hz}, {n_mels}")
        self.window_s = float(window_s)
        self.hop_s = float(hop_s)
        self.sample_rate_hz = int(sample_rate_hz)
        self.n_mels = int(n_mels)
        hop_length = max(1, round(0.010 * self.sample_rate_hz))
        n_fft = 1 << max(1, round(np.log2(0.032 * self.sample_rate_hz)))
        self.mel_config = MelConfig(sample_rate_hz=self.sample_rate_hz, n_fft=n_fft, hop_length=hop_length,
                                    n_mels=self.n_mels)
        self.window_samples = round(self.window_s * self.sample_rate_hz)
        self.hop_samples = max(1, round(self.hop_s * self.sample_rate_hz))
        self._window_frames = self.window_samples // hop_length
        self._hop_frames = max(1, self.hop_samples // hop_length)
        if self._window_frames < 3:
            raise ValueError(f"window_s={window_s} is under 3 frames of {hop_length} samples")
        self.dim = 3 * self.n_mels
        self.name = (f"{MEL_STATS}-{self.VERSION}_sr{self.sample_rate_hz}_mels{self.n_mels}"
                     f"_win{round(self.window_s * 1000)}ms_hop{round(self.hop_s * 1000)}ms_fft{n_fft}")
        self._mel = self.mel_config.mel_transform()

    def __repr__(self) -> str:
        return f"MelStatsEmbedder({self.name})"

    def embed(self, audio: np.ndarray, sample_rate_hz: int) -> np.ndarray:
        """Embed ``audio`` window by window.

        Args:
            audio: float32 ``(channels, samples)`` (``(samples,)`` is taken as mono), any rate.
            sample_rate_hz: rate of ``audio``.

        Returns:
            float32 ``(num_windows, 3 * n_mels)``; each row has unit L2 norm, or is all zero for a window
            with no spectral variation at all (digital silence, a DC offset).

        Raises:
            ValueError: empty audio, non-finite samples, more than 2 dims, or ``sample_rate_hz <= 0``.
        """
        audio = check_audio(audio, sample_rate_hz)
        mono = resample(to_mono(audio), int(sample_rate_hz), self.sample_rate_hz)[0]
        with torch.no_grad():
            mel = self._mel(torch.from_numpy(np.ascontiguousarray(mono)))
            logmel = torch.log(torch.clamp(mel, min=self.mel_config.log_floor)).numpy().astype(np.float64)
        return self._window_features(logmel)

    def _window_features(self, logmel: np.ndarray) -> np.ndarray:
        """float64 ``(n_mels, frames)`` log-mel → float32 ``(num_windows, 3 * n_mels)``."""
        num_frames = logmel.shape[1]
        if num_frames <= self._window_frames:
            windows = logmel[None]  # (1, n_mels, frames)
        else:
            num_windows = 1 + (num_frames - self._window_frames) // self._hop_frames
            view = np.lib.stride_tricks.sliding_window_view(logmel, self._window_frames, axis=1)
            windows = view[:, :: self._hop_frames][:, :num_windows].transpose(1, 0, 2)  # (w, mels, frames)
        band_mean = windows.mean(axis=2)
        shape = band_mean - band_mean.mean(axis=1, keepdims=True)
        spread = windows.std(axis=2)
        delta = np.abs(np.diff(windows, axis=2)).mean(axis=2)
        blocks = [l2_normalize(block).astype(np.float64) for block in (shape, spread, delta)]
        return l2_normalize(np.concatenate(blocks, axis=1))


def embed_clip(embedder: Embedder, audio: np.ndarray, sample_rate_hz: int) -> np.ndarray:
    """One vector for a whole clip: the mean of its window vectors, L2-normalised.

    Args:
        embedder: any ``Embedder``.
        audio: float32 ``(channels, samples)`` at ``sample_rate_hz``.

    Returns:
        float32 ``(embedder.dim,)`` with unit norm (all zero if every window embeds to zero).
    """
    windows = np.asarray(embedder.embed(audio, sample_rate_hz), dtype=np.float64)
    return l2_normalize(windows.mean(axis=0))


def known_embedders() -> list[str]:
    """Names ``load_embedder`` accepts (``PATH``: a local directory or file)."""
    return [MEL_STATS, "clap:PATH", "panns:PATH"]


def load_embedder(spec: str) -> Embedder:
    """The embedder a config or an index's lineage names.

    Args:
        spec: ``"mel-stats"`` (the default ``MelStatsEmbedder()``), or the full ``name`` of the default
            mel-stats embedder as written into an index's ``meta.json``; ``"clap:DIR"`` (a CLAP model saved
            with ``save_pretrained``, ``cleaning.embed_learned.ClapEmbedder``); ``"panns:FILE"`` or
            ``"panns-cnn14:FILE"`` (the PANNs authors' Cnn14 checkpoint, ``PannsCnn14Embedder``). Nothing is
            downloaded.

    Raises:
        ValueError: an unknown name (the message lists the known ones), or a file that holds no such model.
        FileNotFoundError: the named directory or file does not exist.
    """
    default = MelStatsEmbedder()
    if spec in (MEL_STATS, default.name):
        return default
    kind, sep, path = spec.partition(":")
    if sep and path:
        from cleaning import embed_learned

        if kind == embed_learned.CLAP:
            return embed_learned.ClapEmbedder(path)
        if kind in (embed_learned.PANNS, embed_learned.PANNS_CNN14):
            return embed_learned.PannsCnn14Embedder(path)
    raise ValueError(f"unknown embedder {spec!r}; known: {', '.join(known_embedders())}")
