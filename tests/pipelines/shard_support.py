"""Reading a shard dataset back, for the tests of what clean's decisions let into it (``test_shard_decisions``,
``test_shard_fad_drop``)."""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

MIXTURE_MEMBERS = {"flac", "json", "mel.npy"}  # what every sample holds; the rest are stems


def read_samples(dataset_dir: Path) -> dict[str, dict[str, bytes]]:
    """Every sample of a dataset's tars: key → member extension (``flac``, ``json``, ``vocals.flac``, ...) →
    bytes."""
    out: dict[str, dict[str, bytes]] = {}
    for path in sorted(dataset_dir.glob("*.tar")):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                key, _, extension = member.name.partition(".")
                out.setdefault(key, {})[extension] = tar.extractfile(member).read()
    return out


def stems_by_track(dataset_dir: Path) -> dict[str, set[str]]:
    """track id → the stem members its samples hold. Checks on the way that each sample's json lists exactly the
    stem members its tar holds (``stems: [{role, instrument, member}]``)."""
    out: dict[str, set[str]] = {}
    for members in read_samples(dataset_dir).values():
        sample = json.loads(members["json"])
        listed = {s["member"] for s in sample.get("stems", [])}
        assert listed == set(members) - MIXTURE_MEMBERS
        out.setdefault(sample["track_id"], set()).update(listed)
    return out


def file_digests(folder: Path) -> dict[str, str]:
    """Relative path → sha256 of every file under ``folder``: to show that a dataset was left untouched."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}
