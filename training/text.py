"""Text conditioning: hashed bag-of-words embedding, trained with the diffusion model.

The conditioning text of a segment (``provenance.records.conditioning_text``: title, artist, genre,
tags, description, lower-cased) becomes lower-case word tokens; each token is hashed with BLAKE2b into
one of ``text_buckets`` rows of an ``nn.EmbeddingBag`` (the "hashing trick", Weinberger et al. 2009),
and the rows are averaged. The hash is ``hashlib``'s, never Python's salted ``hash()``, so a token maps
to the same row in every process, on every machine, in every checkpoint. The empty text is the null
condition: a learned vector of its own, the unconditional branch of classifier-free guidance (Ho &
Salimans 2022).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence

import torch
from torch import nn

_TOKEN = re.compile(r"[a-z0-9]+")


def tokenize(text: str) -> list[str]:
    """Lower-case word tokens: maximal runs of ``[a-z0-9]`` after lower-casing; punctuation splits.

    ``"Lo-Fi Hip Hop, 90 BPM"`` → ``["lo", "fi", "hip", "hop", "90", "bpm"]``.
    """
    return _TOKEN.findall(text.lower())


def token_bucket(token: str, text_buckets: int) -> int:
    """The embedding row of ``token``: BLAKE2b-64 of its UTF-8 bytes, little-endian, mod ``text_buckets``.

    Stable across processes, platforms and Python versions (unlike ``hash()``).
    """
    digest = hashlib.blake2b(token.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % text_buckets


class TextEncoder(nn.Module):
    """Texts → conditioning vectors: mean of hashed token embeddings; the empty text → null embedding.

    Args:
        text_buckets: rows of the embedding table (hash buckets).
        text_dim: width of each vector.
    """

    def __init__(self, text_buckets: int, text_dim: int) -> None:
        super().__init__()
        self.text_buckets = text_buckets
        self.text_dim = text_dim
        self.embedding = nn.EmbeddingBag(text_buckets, text_dim, mode="mean")
        self.null_embedding = nn.Parameter(torch.zeros(text_dim))
        nn.init.normal_(self.embedding.weight, std=0.02)

    def token_ids(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Flattened bucket ids, bag offsets and the null mask for ``nn.EmbeddingBag``.

        Returns:
            ``(ids, offsets, is_null)``: int64 ``(total_tokens,)``, int64 ``(batch,)`` (start of each
            text's tokens in ``ids``), bool ``(batch,)`` (the text has no tokens), all on the CPU.
        """
        ids: list[int] = []
        offsets: list[int] = []
        is_null: list[bool] = []
        for text in texts:
            tokens = tokenize(text)
            offsets.append(len(ids))
            ids.extend(token_bucket(token, self.text_buckets) for token in tokens)
            is_null.append(not tokens)
        return (torch.tensor(ids, dtype=torch.int64), torch.tensor(offsets, dtype=torch.int64),
                torch.tensor(is_null, dtype=torch.bool))

    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        """Embed a batch of texts.

        Args:
            texts: ``batch`` strings; ``""`` (or text with no word characters) is the null condition.

        Returns:
            float32 ``(batch, text_dim)`` on the module's device.
        """
        if isinstance(texts, str):
            raise TypeError("texts must be a sequence of strings, not one string")
        device = self.null_embedding.device
        ids, offsets, is_null = (tensor.to(device) for tensor in self.token_ids(texts))
        bags = self.embedding(ids, offsets)  # an empty bag is a zero row
        # torch.where keeps null_embedding in the graph even when no text is null (DDP needs every
        # parameter to receive a gradient each step).
        return torch.where(is_null[:, None], self.null_embedding.expand_as(bags), bags)
