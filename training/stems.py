"""Training on stems (``TrainConfig.source = "stems"``): each kept stem of a segment is one training example.

A dataset sharded with ``stems: true`` (``pipelines/stages/shard``) holds, per WebDataset sample, the segment's
kept stems as members ``KEY.<role>.flac`` or ``KEY.<role>.<instrument slug>.flac`` (mono, PCM 16, at the dataset
rate), listed in the sample's json as ``stems: [{role, instrument, member}]``; a stem that clean dropped is never
written, so it never reaches training. ``expand_stems`` turns one such sample into one raw example per listed stem,
in the json's order; ``stem_mel`` computes the stem's log-mel at load time exactly as shard computes the mixture's
``mel.npy`` (``cleaning.mel.log_mel`` of the mono segment with the dataset's ``MelConfig``, stored as float16; the
loader converts it to float32 as it does a ``mel.npy``). The stem's mel comes from its PCM-16 FLAC, the mixture's
from the float segment before quantisation: they differ by at most the 16-bit quantisation noise.

Conditioning (``stem_meta``): the example's json is the segment's json with

- ``text`` = ``"Instrument: <label>. <track text>"`` (``"Instrument: <label>"`` when the track has no text): the
  label is **prepended**, not substituted, so a stem model keeps the track's title/genre/tag conditioning and a
  prompt of the label alone (``"Instrument: Piano"``) still selects the instrument;
- ``instrument`` = the label, so the musical conditioning (``training.conditioning.encode_conditions``) carries the
  same instrument as the text and ``linernotes generate --instrument piano`` asks for what was trained;
- ``stem`` = ``{role, instrument, member}`` of the stem (``stems`` is dropped: an example is one stem).

The label is the stem's instrument when the catalog names one (``"Piano"``), else its role capitalised
(``"Vocals"``, ``"Drums"``, ``"Bass"``, ``"Other"``).
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from cleaning.audio import read_audio, to_mono
from cleaning.mel import MelConfig, log_mel

STEM_FLAC = "stem.flac"
"""The raw example's field holding the stem's FLAC bytes (a mixture sample's field is ``mel.npy``)."""


class NoStemsError(ValueError):
    """``source: stems`` on a dataset (or sample) without stem members."""


def no_stems_message(where: str) -> str:
    """The one-line error for ``source: stems`` on a dataset without stems: names the key and the fix."""
    return (f"train source='stems' needs a dataset with stem members, but {where} has none: shard with "
            "`stems: true` (run spec `stages: {shard: {stems: true}}`, or `linernotes shard --set stems=true`), "
            "or train with source: mixture")


def stem_label(stem: Mapping[str, Any]) -> str:
    """``stem["instrument"]`` when non-empty, else ``stem["role"]`` capitalised (``"vocals"`` → ``"Vocals"``)."""
    instrument = str(stem.get("instrument") or "").strip()
    return instrument or str(stem["role"]).strip().capitalize()


def stem_meta(meta: Mapping[str, Any], stem: Mapping[str, Any]) -> dict[str, Any]:
    """The json of the training example of one stem of a segment (see the module doc)."""
    label = stem_label(stem)
    text = str(meta.get("text") or "").strip()
    out = {k: v for k, v in meta.items() if k != "stems"}
    out.update(text=f"Instrument: {label}. {text}" if text else f"Instrument: {label}", instrument=label,
               stem={"role": stem["role"], "instrument": stem.get("instrument") or "", "member": stem["member"]})
    return out


def expand_stems(sample: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """One raw example per stem listed in a WebDataset sample's json, in the json's order.

    Args:
        sample: ``__key__``, ``__url__``, ``json`` (bytes) and the stem members (``vocals.flac``, ...: bytes).

    Yields:
        ``{"__key__": "KEY.<member without .flac>", "__url__", "stem.flac": bytes, "json": bytes}`` where the json
        is ``stem_meta`` of the sample's json (canonical: sorted keys).

    Raises:
        NoStemsError: the json has no ``stems`` list (the dataset was sharded without stems).
        ValueError: a listed stem's member is missing from the sample.
    """
    meta = json.loads(sample["json"].decode("utf-8"))
    stems = meta.get("stems")
    if not isinstance(stems, list):
        raise NoStemsError(no_stems_message(f"sample {sample.get('__key__')} in {sample.get('__url__')}"))
    for stem in stems:
        member = stem["member"]
        if member not in sample:
            raise ValueError(f"sample {sample.get('__key__')} in {sample.get('__url__')} lists stem member "
                             f"{member!r} but lacks it: re-run `linernotes shard`")
        yield {"__key__": f"{sample['__key__']}.{member.removesuffix('.flac')}", "__url__": sample.get("__url__"),
               STEM_FLAC: sample[member],
               "json": json.dumps(stem_meta(meta, stem), sort_keys=True, separators=(",", ":")).encode("utf-8")}


def stem_mel(flac: bytes, mel_config: MelConfig) -> np.ndarray:
    """The log-mel of a stem member as shard computes a ``mel.npy``: float16 ``(n_mels, frames)``.

    Raises:
        ValueError: the FLAC's sample rate is not ``mel_config.sample_rate_hz`` (not this dataset's stem).
    """
    audio, sample_rate_hz = read_audio(io.BytesIO(flac))
    if sample_rate_hz != mel_config.sample_rate_hz:
        raise ValueError(f"stem at {sample_rate_hz} Hz, the dataset's mels are at {mel_config.sample_rate_hz} Hz")
    return log_mel(to_mono(audio), mel_config).astype(np.float16)


def is_stem_member(name: str) -> bool:
    """Whether a tar member is a stem of its sample: ``KEY.<role>[.<slug>].flac`` (not the mixture ``KEY.flac``)."""
    base = name.rsplit("/", 1)[-1]
    suffix = base.split(".", 1)[1] if "." in base else ""
    return suffix.endswith(".flac") and suffix != "flac"
