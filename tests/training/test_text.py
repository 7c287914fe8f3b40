"""Text encoder: tokenisation, process-independent hashing, the null condition."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from training.text import TextEncoder, token_bucket, tokenize

REPO_ROOT = Path(__file__).resolve().parents[2]
TOKENS = ["piano", "lo", "fi", "hip", "hop", "90", "bpm", "ambient", "drums"]


def test_tokenize_lower_cases_and_splits_on_punctuation():
    assert tokenize("Lo-Fi Hip Hop, 90 BPM") == ["lo", "fi", "hip", "hop", "90", "bpm"]
    assert tokenize("  ...  ") == []


def test_token_bucket_is_pinned():
    # BLAKE2b-64, little-endian, mod buckets: a different hash would silently scramble old checkpoints
    assert [token_bucket(token, 2048) for token in ("piano", "drums")] == [368, 1279]
    assert [token_bucket(token, 2**20) for token in ("piano", "drums")] == [29040, 167167]
    assert all(0 <= token_bucket(token, 7) < 7 for token in TOKENS)


def test_buckets_are_identical_across_processes_with_different_hash_seeds():
    code = ("from training.text import token_bucket; "
            f"print([token_bucket(t, 2048) for t in {TOKENS!r}]); print(hash('piano'))")
    outputs = []
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True,
                                text=True, check=True)
        outputs.append(result.stdout.splitlines())
    assert outputs[0][1] != outputs[1][1]  # Python's hash() differs between these processes ...
    here = str([token_bucket(token, 2048) for token in TOKENS])
    assert outputs[0][0] == outputs[1][0] == here  # ... the buckets do not


def test_encoder_mean_of_tokens_and_null_embedding():
    torch.manual_seed(0)
    encoder = TextEncoder(text_buckets=64, text_dim=8)
    with torch.no_grad():
        encoder.null_embedding.fill_(7.0)
    out = encoder(["piano", "piano drums", "", "!!!"])
    assert out.shape == (4, 8) and out.dtype == torch.float32
    weight = encoder.embedding.weight
    torch.testing.assert_close(out[0], weight[token_bucket("piano", 64)])
    torch.testing.assert_close(out[1], (weight[token_bucket("piano", 64)] + weight[token_bucket("drums", 64)]) / 2)
    torch.testing.assert_close(out[2], torch.full((8,), 7.0))
    torch.testing.assert_close(out[3], torch.full((8,), 7.0))  # no word characters: the null condition
    torch.testing.assert_close(encoder(["Piano!"]), encoder(["piano"]))


def test_null_embedding_gets_a_gradient_even_without_empty_texts():
    encoder = TextEncoder(text_buckets=16, text_dim=4)
    encoder(["a b", "c"]).sum().backward()
    assert encoder.null_embedding.grad is not None  # DDP needs every parameter in the graph
    encoder.zero_grad()
    encoder(["", "c"]).sum().backward()
    assert torch.all(encoder.null_embedding.grad == 1.0)
