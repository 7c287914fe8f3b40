"""Learned embedders from local files (CLAP via transformers, PANNs Cnn14 in the authors' checkpoint format):
tiny checkpoints built here, nothing downloaded. Shapes, determinism, agreement with the model run directly,
the front end against torch.stft / librosa, and ``clean run`` accepting ``embedder=...``."""

from __future__ import annotations

from pathlib import Path

import librosa
import numpy as np
import pytest
import torch

from cleaning.embed import load_embedder
from cleaning.embed_learned import Cnn14, ClapEmbedder, PannsCnn14Embedder
from cleaning.fad import gaussian_stats, per_item_fad
from cleaning.synthetic_stems import render_song
from pipelines.stages.clean import CleanConfig
from pipelines.config import ConfigError, load_config, parse_overrides

SR = 16000


@pytest.fixture(scope="module")
def clap_dir(tmp_path_factory) -> Path:
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel

    config = ClapConfig(
        text_config=dict(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=16, max_position_embeddings=40, projection_dim=8),
        audio_config=dict(spec_size=32, num_mel_bins=8, window_size=4, patch_size=4, depths=[1, 1],
                          num_attention_heads=[1, 2], patch_embeds_hidden_size=8, hidden_size=16, projection_dim=8,
                          enable_fusion=False),
        projection_dim=8)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("clap")
    ClapModel(config).save_pretrained(path)
    ClapFeatureExtractor(feature_size=8, sampling_rate=SR, hop_length=160, max_length_s=1, fft_window_size=256,
                         frequency_max=8000, truncation="rand_trunc").save_pretrained(path)
    return path


TINY_WIDTHS = (4, 4, 8, 8, 16, 16)


@pytest.fixture(scope="module")
def cnn14_file(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = Cnn14(sample_rate_hz=SR, n_fft=512, hop_length=160, mel_bins=64, fmax_hz=8000, widths=TINY_WIDTHS)
    for module in model.modules():  # non-trivial batch-norm statistics, as a trained checkpoint has
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
    path = tmp_path_factory.mktemp("panns") / "Cnn14_16k_tiny.pth"
    torch.save({"model": model.state_dict(), "iteration": 0}, path)  # the authors' checkpoint layout
    return path


def _stems():
    return render_song("s", seed=3, duration_s=3.0)


def test_clap_embedder_shapes_determinism_and_agreement_with_the_model(clap_dir):
    embedder = load_embedder(f"clap:{clap_dir}")
    assert isinstance(embedder, ClapEmbedder) and embedder.dim == 8 and embedder.sample_rate_hz == SR
    bass, drums = _stems()[0], _stems()[1]
    vectors = embedder.embed(bass.audio, SR)
    assert vectors.shape == (5, 8) and vectors.dtype == np.float32  # 3 s, 1 s windows every 0.5 s
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)  # CLAP's normalised projection
    again = load_embedder(f"clap:{clap_dir}").embed(bass.audio, SR)
    assert np.array_equal(vectors, again)
    first = bass.audio[0, :SR]
    inputs = embedder.feature_extractor([first], sampling_rate=SR, return_tensors="pt")
    with torch.no_grad():
        direct = embedder.model.get_audio_features(input_features=inputs["input_features"]).pooler_output
    assert np.allclose(vectors[0], direct[0].numpy(), atol=1e-5)
    assert not np.allclose(vectors, embedder.embed(drums.audio, SR)[:5], atol=1e-3)
    # other rates are resampled: a 32 kHz copy embeds like the original
    up = librosa.resample(bass.audio, orig_sr=SR, target_sr=2 * SR)
    assert np.allclose(embedder.embed(up, 2 * SR), vectors, atol=0.05)
    assert embedder.name.startswith("clap-") and "/" not in embedder.name


def test_cnn14_front_end_is_the_authors_stft_and_mel(cnn14_file):
    model = PannsCnn14Embedder(cnn14_file).model
    x = torch.from_numpy(_stems()[2].audio[0, :SR].copy())[None]
    power = model.spectrogram_extractor(x)[0, 0]  # (frames, bins)
    reference = torch.stft(x[0], 512, 160, window=torch.hann_window(512), center=True, pad_mode="reflect",
                           return_complex=True).abs().T ** 2
    assert power.shape == reference.shape
    assert torch.allclose(power, reference, rtol=1e-3, atol=1e-4 * float(reference.max()))
    mel = librosa.filters.mel(sr=SR, n_fft=512, n_mels=64, fmin=50, fmax=8000).T
    assert np.allclose(model.logmel_extractor.melW.numpy(), mel, atol=1e-6)


def test_panns_embedder_loads_the_authors_format_shapes_and_determinism(cnn14_file, tmp_path):
    embedder = load_embedder(f"panns:{cnn14_file}")
    assert isinstance(embedder, PannsCnn14Embedder)
    assert embedder.sample_rate_hz == SR and embedder.dim == TINY_WIDTHS[-1]  # 16 kHz from n_fft 512
    stems = _stems()
    vectors = embedder.embed(stems[0].audio, SR)
    assert vectors.shape == (5, 16) and vectors.dtype == np.float32 and np.all(vectors >= 0)  # after ReLU
    assert np.array_equal(vectors, load_embedder(f"panns-cnn14:{cnn14_file}").embed(stems[0].audio, SR))
    state = torch.load(cnn14_file, weights_only=True)["model"]
    reference = Cnn14(sample_rate_hz=SR, n_fft=512, hop_length=160, mel_bins=64, fmax_hz=8000, widths=TINY_WIDTHS)
    reference.load_state_dict(state)
    with torch.no_grad():
        direct = reference.eval().embedding(torch.from_numpy(stems[0].audio[0, SR // 2:SR // 2 + SR].copy())[None])
    assert np.allclose(vectors[1], direct[0].numpy(), rtol=1e-4, atol=1e-6)
    # it serves FAD: a stem is nearer its own role's Gaussian than another role's
    own = gaussian_stats(np.concatenate([embedder.embed(s.audio, SR) for s in stems[:1]] * 2))
    assert per_item_fad(vectors, own) < per_item_fad(embedder.embed(stems[1].audio, SR), own)
    bad = tmp_path / "bad.pth"
    torch.save({"model": {"fc1.weight": torch.zeros(2, 2)}}, bad)
    with pytest.raises(ValueError, match="not a PANNs Cnn14"):
        load_embedder(f"panns:{bad}")
    with pytest.raises(FileNotFoundError):
        load_embedder(f"panns:{tmp_path / 'missing.pth'}")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_embedder(f"clap:{tmp_path}")


def test_clean_config_accepts_learned_embedders_and_the_measure_task_uses_them(cnn14_file, clap_dir, tmp_path):
    from cleaning.audio import write_audio
    from pipelines.stages.clean import _measure_track

    for spec in (f"panns:{cnn14_file}", f"clap:{clap_dir}"):
        config = load_config(CleanConfig, None, parse_overrides([f"embedder={spec}"]), reference_tracks=["r"],
                             methods=["fad"])  # as `clean run --set embedder=...`
        assert config.embedder == spec
        stems = _stems()
        rows = [{"track_id": "s", "role": s.role, "instrument": "", "uri": str(write_audio(
            tmp_path / f"{s.role}.wav", s.audio, SR)), "sha256": ""} for s in stems]
        measured = _measure_track(rows, None, config)
        expected = load_embedder(spec).embed(stems[0].audio, SR)
        assert measured[0].embeddings.shape == expected.shape
        assert np.allclose(measured[0].embeddings, expected, atol=1e-4)

    with pytest.raises(ConfigError, match="embedder"):
        load_config(CleanConfig, None, {"embedder": f"panns:{tmp_path / 'missing.pth'}", "reference_tracks": ["r"]})
    with pytest.raises(ConfigError, match="embedder"):
        load_config(CleanConfig, None, {"embedder": "vggish", "reference_tracks": ["r"]})
