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


class PretrainedTextEncoder(nn.Module):
    """Texts → conditioning vectors through a frozen pretrained encoder loaded from LOCAL weights.

    Any ``transformers`` text model saved with ``save_pretrained`` (its folder holding the config, the
    weights and a tokenizer): a T5 encoder (Raffel et al. 2020; the T5 checkpoint's encoder is used), a
    CLAP model (Wu et al. 2023; its ``get_text_features`` projection), or another encoder (mean of the
    last hidden states over real tokens). Nothing is downloaded (``local_files_only=True``). The frozen
    encoder's weights are not part of this module's ``state_dict`` (a checkpoint stores its path, in
    ``MelUNet.model_kwargs``); a trained linear projection to ``text_dim`` and the learned null
    embedding are. Frozen outputs are cached per text (up to ``cache_size`` texts).

    Args:
        path: folder of the pretrained model and tokenizer.
        text_dim: width of each output vector.
        max_tokens: texts are truncated to this many tokens.

    Raises:
        FileNotFoundError: ``path`` is not a folder.
        ValueError: ``transformers`` cannot load a model or tokenizer from it.
    """

    def __init__(self, path: str, text_dim: int, max_tokens: int = 64, cache_size: int = 8192) -> None:
        super().__init__()
        from pathlib import Path

        if not Path(path).is_dir():
            raise FileNotFoundError(f"pretrained text encoder folder {path} does not exist (weights are never "
                                    "downloaded: save the model and tokenizer there with save_pretrained)")
        try:
            import transformers
            config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
            tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
            if config.model_type == "t5":
                encoder = transformers.T5EncoderModel.from_pretrained(path, local_files_only=True)
            else:
                encoder = transformers.AutoModel.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, KeyError) as err:
            raise ValueError(f"cannot load a pretrained text encoder from {path}: {err}") from err
        encoder.eval().requires_grad_(False)
        self.path, self.text_dim, self.max_tokens, self.cache_size = str(path), text_dim, max_tokens, cache_size
        self._frozen = (encoder, tokenizer)  # a tuple: not a registered submodule, so not in state_dict / DDP
        self._cache: dict[str, torch.Tensor] = {}
        self.feature_dim = int(self._features(["probe"]).shape[-1])
        self.proj = nn.Linear(self.feature_dim, text_dim)
        self.null_embedding = nn.Parameter(torch.zeros(text_dim))

    def _apply(self, fn, *args, **kwargs):  # type: ignore[no-untyped-def]
        """Move/cast the frozen encoder with the module (``.to(device)``)."""
        self._frozen[0]._apply(fn)
        self._cache.clear()
        return super()._apply(fn, *args, **kwargs)

    @torch.no_grad()
    def _features(self, texts: Sequence[str]) -> torch.Tensor:
        """float32 ``(batch, feature_dim)`` frozen features of non-empty texts (no cache)."""
        encoder, tokenizer = self._frozen
        device = next(encoder.parameters()).device
        tokens = tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_tokens,
                           return_tensors="pt").to(device)
        if hasattr(encoder, "get_text_features"):
            features = encoder.get_text_features(input_ids=tokens["input_ids"],
                                                 attention_mask=tokens.get("attention_mask"))
            return features.float()
        hidden = encoder(input_ids=tokens["input_ids"], attention_mask=tokens.get("attention_mask")).last_hidden_state
        mask = tokens.get("attention_mask", torch.ones(hidden.shape[:2], device=device))[..., None].float()
        return ((hidden.float() * mask).sum(1) / mask.sum(1).clamp(min=1.0))

    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        """float32 ``(batch, text_dim)`` on the module's device; texts without word characters → null."""
        if isinstance(texts, str):
            raise TypeError("texts must be a sequence of strings, not one string")
        device = self.null_embedding.device
        missing = sorted({text for text in texts if tokenize(text) and text not in self._cache})
        if missing:
            if len(self._cache) + len(missing) > self.cache_size:
                self._cache.clear()
            for text, feature in zip(missing, self._features(missing), strict=True):
                self._cache[text] = feature.to(device)
        is_null = torch.tensor([not tokenize(text) for text in texts], device=device)
        features = torch.stack([self._cache[text] if tokenize(text) else torch.zeros(self.feature_dim, device=device)
                                for text in texts]) if texts else torch.zeros(0, self.feature_dim, device=device)
        projected = self.proj(features)
        return torch.where(is_null[:, None], self.null_embedding.expand_as(projected), projected)
