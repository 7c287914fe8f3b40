"""The pure per-record steps of ingest, in the order the Beam graph applies them (``pipelines.stages.ingest.stage``).

``decide_tracks`` (dedupe, fields, rights policy) → ``route_files`` (unknown or rejected tracks, roles, safe
paths) → ``measure_file`` (decode, measure, cached per file) → ``finalize_track`` (stem agreement and
residual, the mixture built from stems); then, on the driver, ``pipelines.stages.ingest.duplicates.link_duplicates``
(exact and near duplicate recordings, within the delivery and with the earlier deliveries'). Each takes records and
returns records or Rejections; none knows about Beam.
"""

from __future__ import annotations

import base64
import functools
import json
import math
import os
import tempfile
import threading
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from threadpoolctl import ThreadpoolController

from cleaning.audio import CONTAINER_BY_SUFFIX, AudioDecodeError, detect_container, read_audio, write_audio
from cleaning.fingerprint import fingerprint
from cleaning.measure import Levels, measure_audio, measure_levels
from cleaning.quality import check_stem_formats, measure_stem_residual_db, measure_true_peak_dbtp
from pipelines.stages.ingest.delivery import INGEST, check_file_row, file_record_id, parse_track
from provenance.policy import OptOutRegistry, RunPurpose, decide
from provenance.records import RejectionReason, Role, canonical_json, rejection, safe_name, sha256_hex

STAGE = INGEST

def decide_tracks(track_id: str, rows: Iterable[Mapping[str, Any]], licenses: Mapping[str, Mapping[str, Any]],
                  run: RunPurpose, opt_outs: OptOutRegistry, delivery_id: str, run_id: str
                  ) -> Iterable[tuple[str, Any]]:
    """All tracks.csv rows sharing one ``track_id`` → tagged outputs.

    Yields ``("decision", (track_id, {"status": "accepted", "record": TRACK row}))``, or
    ``("decision", (track_id, {"status": "rejected", "reason": ..}))`` plus ``("rejection", Rejection)``.
    The first row (by row number) of a duplicated id is judged; later ones are ``duplicate_id``.
    """
    ordered = sorted(rows, key=lambda r: r["_row"])
    if not track_id:
        for row in ordered:
            _, rej = parse_track(row, delivery_id, STAGE, run_id)
            yield "rejection", rej
        return
    first, duplicates = ordered[0], ordered[1:]
    for row in duplicates:
        yield "rejection", rejection("track", track_id, STAGE, RejectionReason.DUPLICATE_ID,
                                     f"tracks.csv row {row['_row']} repeats the id of row {first['_row']}", run_id)
    record, rej = parse_track(first, delivery_id, STAGE, run_id)
    if rej is None:
        decision = decide(record, licenses, run, opt_outs)
        if not decision.admitted:
            rej = rejection("track", track_id, STAGE, decision.reason, decision.detail, run_id)
    if rej is not None:
        yield "rejection", rej
        yield "decision", (track_id, {"status": "rejected", "reason": rej["reason"]})
    else:
        yield "decision", (track_id, {"status": "accepted", "record": record})


def route_files(track_id: str, decisions: list[Mapping[str, Any]], rows: list[Mapping[str, Any]], root: Path,
                run_id: str) -> Iterable[tuple[str, Any]]:
    """files.csv rows of one track → ``("measure", (track_id, task))`` or ``("rejection", Rejection)``.

    Rows of unknown or rejected tracks, bad roles, unsafe or missing paths are rejected here, before any
    decoding. Two stems with the same role and instrument but different paths keep both, the later one's
    instrument suffixed `` #2``; the same path twice, or a second mixture, is ``duplicate_file``.
    """
    decision = decisions[0] if decisions else None
    seen_paths: set[str] = set()
    seen_keys: Counter[tuple[str, str]] = Counter()
    for row in sorted(rows, key=lambda r: r["_row"]):
        record_id = file_record_id(row)
        if decision is None:
            yield "rejection", rejection("audio_file", record_id, STAGE, RejectionReason.UNKNOWN_TRACK,
                                         f"files.csv row {row['_row']}: no track {track_id!r} in tracks.csv", run_id)
            continue
        if decision["status"] != "accepted":
            yield "rejection", rejection("audio_file", record_id, STAGE, RejectionReason.TRACK_REJECTED,
                                         f"its track was rejected: {decision['reason']}", run_id)
            continue
        path, rej = check_file_row(row, root, STAGE, run_id)
        if rej is not None:
            yield "rejection", rej
            continue
        key = (row["role"], row.get("instrument", ""))
        if str(path) in seen_paths or (row["role"] == Role.MIXTURE and seen_keys[key]):
            yield "rejection", rejection("audio_file", record_id, STAGE, RejectionReason.DUPLICATE_FILE,
                                         f"files.csv row {row['_row']} repeats a {row['role']} of this track", run_id)
            continue
        seen_paths.add(str(path))
        seen_keys[key] += 1
        instrument = key[1] if seen_keys[key] == 1 else f"{key[1]} #{seen_keys[key]}"
        yield "measure", (track_id, {"record_id": record_id, "role": row["role"], "instrument": instrument,
                                     "path": str(path)})


from pipelines.stages.ingest.config import MEASURE_VERSION  # noqa: E402  (light: the ingest config's module)
MAX_CHANNELS = 2
MIX_VERSION = "1"
"""Bump when a built mixture's samples change for the same stems (how they are padded, broadcast, summed or
written): part of the built mixture's file name (:func:`mixture_name`), so a new sum never overwrites an old one."""


def measure_file(track_id: str, task: Mapping[str, Any], run_id: str,
                 cache_dir: Path | None = None, fingerprints_dir: Path | None = None) -> tuple[str, dict[str, Any]]:
    """Decode and measure one file → ``("accepted", AUDIO_FILE row)`` or ``("rejected", Rejection)``.

    Only mixtures are fingerprinted: duplicate detection compares tracks by their mixture (delivered, or
    built from the stems by ``finalize_track``). With ``fingerprints_dir`` the fingerprint goes to a file there
    (:func:`write_fingerprint`) and the row carries its path (``_fingerprint_file``), so that rows stay small
    whatever the recording's length; without, the row carries it (``_fingerprint``, base64). With ``cache_dir``,
    the outcome (measurements, or the reason the file is unusable) is cached under a key of (``MEASURE_VERSION``,
    whether it is fingerprinted, absolute path, size, mtime in ns): a re-run skips decoding unchanged files,
    a changed file (or one whose fingerprint file is gone) is measured again, and a killed run resumes with what
    it had measured. Rows carry ``_cached`` (dropped before writing) so the run can count cache hits.
    """
    needs_fingerprint = task["role"] == Role.MIXTURE
    key = _measure_key(task["path"], needs_fingerprint) if cache_dir is not None else None
    outcome = _read_cached(cache_dir, key)
    if outcome is not None and not _fingerprint_usable(outcome.get("fields", {}), fingerprints_dir):
        outcome = None
    cached = outcome is not None
    if outcome is None:
        outcome = _measure_outcome(task["path"], needs_fingerprint, fingerprints_dir)
        _write_cached(cache_dir, key, outcome)
    if outcome["status"] == "rejected":
        return "rejected", {**rejection("audio_file", task["record_id"], STAGE, outcome["reason"],
                                        outcome["detail"], run_id), "_cached": cached}
    return "accepted", {"track_id": track_id, "role": task["role"], "instrument": task["instrument"],
                        "uri": task["path"], "derived_from": "", "run_id": run_id,
                        "_record_id": task["record_id"], "_cached": cached, **outcome["fields"]}


def _measure_outcome(path: str, with_fingerprint: bool = True, fingerprints_dir: Path | None = None
                     ) -> dict[str, Any]:
    """Decode and measure one file: ``{"status": "accepted", "fields": ...}`` or ``{"status": "rejected",
    "reason": ..., "detail": ...}``. BLAS and OpenMP pools run on one thread here: the engine already runs one
    file per core, and idle threads spinning would only cost CPU time."""
    with _thread_controller().limit(limits=1):
        return _measure_outcome_unlimited(path, with_fingerprint, fingerprints_dir)


@functools.cache
def _thread_controller() -> ThreadpoolController:
    return ThreadpoolController()


SCRATCH_MAX_SAMPLES = 32 * 2**20
"""float32 samples of decoded audio a worker thread keeps for reuse (128 MB, ~6 minutes of 44.1 kHz stereo), and
half as many for the channel mean: a file that fits is decoded and measured in memory reused from the last one,
which spares the page faults of fresh arrays (~20% of a FLAC decode); a longer file gets fresh memory, given back
after it."""


class _Scratch(threading.local):
    """Per-thread buffers for ``_measure_outcome_unlimited``: grown to the largest file that fits, never shrunk."""

    def __init__(self) -> None:
        self.pcm = np.zeros(0, dtype=np.float32)
        self.mono = np.zeros(0, dtype=np.float32)

    def take(self, path: str) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(PCM buffer, channel-mean buffer) large enough for ``path``'s audio, or (None, None) when it does not
        fit ``SCRATCH_MAX_SAMPLES`` or cannot be read (decoding then reports why)."""
        import soundfile as sf

        try:
            info = sf.info(path)
        except (sf.LibsndfileError, RuntimeError, OSError):  # read_audio raises the error that names it
            return None, None
        needed = info.frames * info.channels
        if not 0 < needed <= SCRATCH_MAX_SAMPLES:
            return None, None
        if self.pcm.shape[0] < needed:
            self.pcm = np.empty(needed, dtype=np.float32)
        if self.mono.shape[0] < info.frames:
            self.mono = np.empty(info.frames, dtype=np.float32)
        return self.pcm, self.mono


_scratch = _Scratch()


def _measure_outcome_unlimited(path: str, with_fingerprint: bool, fingerprints_dir: Path | None
                               ) -> dict[str, Any]:
    def rejected(reason: RejectionReason, detail: str) -> dict[str, Any]:
        return {"status": "rejected", "reason": reason.value, "detail": detail}

    try:
        if os.path.getsize(path) == 0:
            return rejected(RejectionReason.EMPTY_AUDIO, f"{path} is a zero-byte file")
        expected = CONTAINER_BY_SUFFIX.get(Path(path).suffix.lower())
        found = detect_container(path)
        if expected is not None and found != expected:
            return rejected(RejectionReason.FORMAT_MISMATCH,
                            f"{Path(path).name} is named {Path(path).suffix} but holds {found} audio")
        pcm, mono = _scratch.take(path)
        # the interleaved buffer, not copied, in this thread's reused memory when the file fits
        audio, sample_rate_hz = read_audio(path, contiguous=False, scratch=pcm)
    except FileNotFoundError:
        return rejected(RejectionReason.MISSING_FILE, f"{path} vanished before decoding")
    except AudioDecodeError as err:
        return rejected(RejectionReason.DECODE_ERROR, str(err))
    if audio.shape[-1] == 0:
        return rejected(RejectionReason.EMPTY_AUDIO, "decoded to 0 samples")
    if audio.shape[0] > MAX_CHANNELS:
        return rejected(RejectionReason.TOO_MANY_CHANNELS,
                        f"{audio.shape[0]} channels; linernotes takes mono or stereo files (deliver stems instead)")
    levels = measure_levels(audio, sample_rate_hz, with_mono=with_fingerprint, mono_out=mono)  # one compiled pass
    # its per-channel float64 sums of float32 samples cannot overflow, so the DC offset is finite exactly
    # when every sample is: the pass doubles as the NaN/infinity check
    if not math.isfinite(levels.dc_offset):
        bad = int(np.size(audio) - np.count_nonzero(np.isfinite(audio)))
        return rejected(RejectionReason.NON_FINITE_SAMPLES, f"{bad} NaN or infinite samples")
    return {"status": "accepted",
            "fields": measure_all(audio, sample_rate_hz, with_fingerprint, levels, fingerprints_dir)}


def measure_all(audio: np.ndarray, sample_rate_hz: int, with_fingerprint: bool = True,
                levels: Levels | None = None, fingerprints_dir: Path | None = None) -> dict[str, Any]:
    """The AudioFile measurements plus true peak, DC offset and, ``with_fingerprint``, the fingerprint, used for
    near-duplicate detection and dropped before writing: in a file under ``fingerprints_dir``
    (``_fingerprint_file``, :func:`write_fingerprint`), or without one as ``_fingerprint`` (base64 of little-endian
    uint32 sub-fingerprints; ``""`` when not fingerprinted). ``levels``: ``measure_levels(audio, sample_rate_hz,
    with_mono=with_fingerprint)`` when the caller already has it."""
    if levels is None or (with_fingerprint and levels.mono is None):
        levels = measure_levels(audio, sample_rate_hz, with_mono=with_fingerprint)  # one compiled pass
    fields = {**measure_audio(audio, sample_rate_hz, levels),
              "true_peak_dbtp": measure_true_peak_dbtp(audio, sample_rate_hz),
              "dc_offset": levels.dc_offset}
    prints = fingerprint(audio, sample_rate_hz, mono=levels.mono) if with_fingerprint else None
    if prints is not None and fingerprints_dir is not None:
        fields["_fingerprint_file"] = str(write_fingerprint(fingerprints_dir, fields["sha256"], sample_rate_hz,
                                                            prints))
    else:
        raw = prints.astype("<u4").tobytes() if prints is not None else b""
        fields["_fingerprint"] = base64.b64encode(raw).decode()
    return fields


def fingerprint_file(fingerprints_dir: Path, sha256: str, sample_rate_hz: int) -> Path:
    """Where the fingerprint of the decoded PCM with ``sha256`` at ``sample_rate_hz`` is kept:
    ``<dir>/<2 hex>/<sha256>-<rate>.u32`` (content-addressed: a file once written never changes)."""
    return Path(fingerprints_dir) / sha256[:2] / f"{sha256}-{int(sample_rate_hz)}.u32"


def write_fingerprint(fingerprints_dir: Path, sha256: str, sample_rate_hz: int, prints: np.ndarray) -> Path:
    """Write uint32 ``(frames,)`` sub-fingerprints as raw little-endian uint32 to :func:`fingerprint_file`
    (atomically; an existing file is kept, it holds the same bytes). Returns the path."""
    path = fingerprint_file(fingerprints_dir, sha256, sample_rate_hz)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "wb") as handle:
        handle.write(np.asarray(prints, dtype="<u4").tobytes())
    os.replace(tmp, path)
    return path


def load_fingerprint(row: Mapping[str, Any]) -> np.ndarray:
    """A measured mixture row's fingerprint, uint32 ``(frames,)``: from its ``_fingerprint_file``, or its
    ``_fingerprint`` (base64); empty when it has neither.

    Raises:
        FileNotFoundError: the row names a fingerprint file that is gone.
    """
    path = row.get("_fingerprint_file")
    if path:
        return np.fromfile(path, dtype="<u4").astype(np.uint32)
    return np.frombuffer(base64.b64decode(row.get("_fingerprint") or ""), dtype="<u4").astype(np.uint32)


def _fingerprint_usable(fields: Mapping[str, Any], fingerprints_dir: Path | None) -> bool:
    """Whether cached measurements still give their fingerprint: its file (when they name one) exists, and they
    are in the form this run keeps them in (a file under ``fingerprints_dir``, or inline without one)."""
    path = fields.get("_fingerprint_file")
    if path:
        return fingerprints_dir is not None and Path(path).is_file()
    return fingerprints_dir is None or not fields.get("_fingerprint")


def _measure_key(path: str, with_fingerprint: bool) -> str | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return sha256_hex(f"{MEASURE_VERSION}|{int(with_fingerprint)}|{os.path.abspath(path)}|{stat.st_size}|"
                      f"{stat.st_mtime_ns}")


def _read_cached(cache_dir: Path | None, key: str | None) -> dict[str, Any] | None:
    if cache_dir is None or key is None:
        return None
    try:
        return json.loads((cache_dir / f"{key}.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _write_cached(cache_dir: Path | None, key: str | None, outcome: Mapping[str, Any]) -> None:
    if cache_dir is None or key is None:
        return
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{key}.", dir=cache_dir)
    with os.fdopen(fd, "w") as handle:
        json.dump(outcome, handle)
    os.replace(tmp, cache_dir / f"{key}.json")


def finalize_track(track_id: str, decision: Mapping[str, Any] | None, measured: list[tuple[str, dict[str, Any]]],
                   mixtures_dir: Path, run_id: str, stem_length_tolerance_samples: int = 0,
                   max_stem_residual_db: float = -15.0, fingerprints_dir: Path | None = None
                   ) -> Iterable[tuple[str, dict[str, Any]]]:
    """One accepted track and its measured files → ``("track"|"audio_file"|"rejection", row)``.

    Builds the mixture as the sample-wise sum of the stems when no mixture file was delivered (stems
    zero-padded to the longest; a float32 WAV, so a sum above full scale is kept, not clipped). Stems at
    different sample rates cannot be summed: the track is rejected ``stem_mismatch``. A track left with no
    usable audio is rejected ``no_audio``; its delivered files that did decode are then ``track_rejected``.
    """
    if decision is None or decision["status"] != "accepted":
        return
    files = [row for status, row in measured if status == "accepted"]
    rejected_files = [row for status, row in measured if status == "rejected"]
    for rej in rejected_files:
        yield "rejection", rej
    track = decision["record"]

    def reject_track(reason: RejectionReason, detail: str) -> Iterable[tuple[str, dict[str, Any]]]:
        yield "rejection", rejection("track", track_id, STAGE, reason, detail, run_id)
        for row in files:
            yield "rejection", rejection("audio_file", row["_record_id"], STAGE, RejectionReason.TRACK_REJECTED,
                                         f"its track was rejected: {reason.value}", run_id)

    if not files:
        reasons = Counter(r["reason"] for r in rejected_files)
        detail = ("no files in files.csv" if not measured else
                  "no usable audio: " + ", ".join(f"{n}× {r}" for r, n in sorted(reasons.items())))
        yield from reject_track(RejectionReason.NO_AUDIO, detail)
        return
    outputs = [dict(row) for row in files]
    stems = [row for row in outputs if row["role"] != Role.MIXTURE]
    mixtures = [row for row in outputs if row["role"] == Role.MIXTURE]
    if stems:
        check = check_stem_formats([r["sample_rate_hz"] for r in stems], [r["num_samples"] for r in stems],
                                   [r["num_channels"] for r in stems], stem_length_tolerance_samples)
        if not check.ok:
            yield from reject_track(RejectionReason.STEM_MISMATCH, f"stems disagree: {check.detail}")
            return
    if not mixtures:
        outputs.append(build_mixture(track_id, stems, mixtures_dir, run_id, fingerprints_dir))
    elif stems:
        residual_db = stem_residual_db(mixtures[0], stems, mixtures_dir)
        mixtures[0]["stem_residual_db"] = residual_db
        if residual_db > max_stem_residual_db:
            yield from reject_track(RejectionReason.STEM_RESIDUAL,
                                    f"the stems sum to the mixture with a residual of {residual_db:.1f} dB "
                                    f"(limit {max_stem_residual_db:g} dB)")
            return
    yield "track", track
    for row in outputs:
        yield "audio_file", row  # keeps _record_id: the driver may still reject it as a duplicate's file


def stem_residual_db(mixture: Mapping[str, Any], stems: list[Mapping[str, Any]], cache_dir: Path) -> float:
    """``cleaning.quality.measure_stem_residual_db`` of a delivered mixture against its delivered stems (rows
    already measured). Content-addressed like ``build_mixture``: the same PCM (by sha256) is not decoded again.
    """
    key = ".residual-" + sha256_hex(canonical_json([MEASURE_VERSION, mixture["sha256"],
                                                    sorted(row["sha256"] for row in stems)]))
    cached = _read_cached(cache_dir, key)
    if cached is not None:
        return float(cached["stem_residual_db"])
    mixture_audio, _ = read_audio(mixture["uri"])
    residual_db = measure_stem_residual_db(mixture_audio, [read_audio(row["uri"])[0] for row in stems])
    _write_cached(cache_dir, key, {"stem_residual_db": residual_db})
    return residual_db


def build_mixture(track_id: str, stems: list[Mapping[str, Any]], mixtures_dir: Path, run_id: str,
                  fingerprints_dir: Path | None = None) -> dict[str, Any]:
    """Sum the stems (float32 ``(channels, samples)``; mono stems broadcast to the widest channel count) into
    a float32 WAV under ``mixtures_dir`` and return its measured AUDIO_FILE row.

    The WAV is named by its content key (:func:`mixture_name`: the track and its stems' decoded-PCM sha256s), so
    another set of stems for the same track id gets another file and a file once written never changes under a
    catalog version that points at it. When the same stems were summed before and the WAV is still there, its
    recorded measurements are reused and nothing is decoded.
    """
    key = sha256_hex(canonical_json([MEASURE_VERSION, track_id, sorted(row["sha256"] for row in stems)]))
    note = mixtures_dir / f".{key}.json"
    path = mixtures_dir / mixture_name(track_id, stems)
    try:
        recorded = json.loads(note.read_text())
        if recorded["uri"] == str(path) and path.is_file() and _fingerprint_usable(recorded, fingerprints_dir):
            return {**recorded, "run_id": run_id, "_cached": True}
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        pass
    decoded = [read_audio(row["uri"]) for row in sorted(stems, key=lambda r: r["uri"])]
    sample_rate_hz = decoded[0][1]
    num_channels = max(a.shape[0] for a, _ in decoded)
    num_samples = max(a.shape[1] for a, _ in decoded)
    mixture = np.zeros((num_channels, num_samples), dtype=np.float64)
    for audio, _ in decoded:
        mixture[:, : audio.shape[1]] += audio  # (1, n) broadcasts over channels
    mixture32 = mixture.astype(np.float32)
    if not path.is_file():  # the same name is the same stems: a file already there holds this sum
        write_audio(path, mixture32, sample_rate_hz)
    row = {"track_id": track_id, "role": Role.MIXTURE.value, "instrument": "", "uri": str(path),
           "derived_from": "sum_of_stems"}
    with _thread_controller().limit(limits=1):
        row.update(measure_all(mixture32, sample_rate_hz, fingerprints_dir=fingerprints_dir))
    _write_cached(mixtures_dir, f".{key}", row)
    return {**row, "run_id": run_id, "_cached": False}


def mixture_name(track_id: str, stems: list[Mapping[str, Any]]) -> str:
    """The file name of the mixture built from ``stems`` (AudioFile rows with their decoded-PCM ``sha256``):
    ``<safe track id>-<16 hex>.wav``, the hex a sha256 over the track id, the sum's ``MIX_VERSION`` and the stems'
    sha256s (sorted). The PCM of the stems and how they are summed fix the file's bytes; the track id keeps two
    tracks that share stems apart."""
    content = sha256_hex(canonical_json({"track_id": track_id, "mix_version": MIX_VERSION,
                                         "stems": sorted(row["sha256"] for row in stems)}))
    return f"{safe_name(track_id)}-{content[:16]}.wav"
