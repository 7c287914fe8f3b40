"""The ``separate`` stage: demucs turns the mixtures of catalog tracks that have no stems into stems.

Ray actors (one per CPU by default; one per GPU, on the GPU, when the cluster has GPUs) load the separator
once in their constructor and separate one track per call (``cleaning.separate.separate_audio``: chunked
with overlap). Stems are written as float32 WAV to
``audio/separated/<separator_key>/<track>-<mixture sha256[:12]>/<source>.wav``: ``separator_key``
(:func:`separator_key`) names the separator (name and weights sha256) and the settings that change its output, and
the mixture's decoded-PCM sha256 names its input, so a path holds one content for good and an older catalog
version's ``audio_files`` rows never point at audio that changed under them. A file already there is never
rewritten: a re-run with the same separator and settings takes it as it is (measured again, not separated again).
The stems are measured like delivered files and added to the ``audio_files`` table of a new catalog version with
``derived_from = "separated:<separator name>@<sha256>"``; the run's config, separator name and checksum are in the
lineage store. A re-run skips tracks that already have stems in the catalog version it reads.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, model_validator

from pipelines.catalog import CatalogVersion, catalog_id, derive_catalog, resolve_catalog
from pipelines.engines import Engine
from pipelines.stage import Resources, Stage, StageContext, StageOutput, StageResult, run_stage
from provenance import records
from provenance.records import Role
from provenance.workspace import Workspace

STAGE = "separate"
DERIVED_PREFIX = "separated:"
SEPARATION_VERSION = "1"
"""Bump when separating computes something different from the same separator, settings and mixture (chunking,
overlap-add, the WAV written): it is part of :func:`separator_key`, so the new stems go to new paths."""

Progress = Callable[[str, int, int], None]


class SeparateConfig(BaseModel):
    """Config of the separate stage. Frozen; unknown keys are rejected.

    ``model`` is a demucs pretrained name (``htdemucs``; downloads on first use) or a local checkpoint file.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str = "htdemucs"
    segment_s: float | None = None  # chunk length; None = the model's training segment
    overlap: float = 0.25
    shifts: int = 0
    tracks: list[str] = []  # restrict to these track ids; [] = every track with a mixture and no stems
    num_actors: int | None = None  # None = one per GPU, else one per CPU (at most the number of tracks)
    num_cpus: int | None = None
    address: str | None = None

    @model_validator(mode="after")
    def _check(self) -> "SeparateConfig":
        if not 0.0 <= self.overlap < 1.0:
            raise ValueError(f"separate.overlap must be in [0, 1), got {self.overlap}")
        if self.segment_s is not None and self.segment_s <= 0:
            raise ValueError(f"separate.segment_s must be > 0, got {self.segment_s}")
        if self.shifts < 0 or (self.num_actors is not None and self.num_actors < 1):
            raise ValueError("separate.shifts must be ≥ 0 and separate.num_actors ≥ 1")
        return self


@dataclass
class SeparateResult:
    run_id: str
    separator: str
    separator_sha256: str
    num_tracks: int
    num_stems: int
    skipped_tracks: int
    stems: list[dict[str, Any]] = field(default_factory=list)  # the new AudioFile rows
    status: str = "ran"
    stage_result: StageResult | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        if self.stage_result is not None:
            return self.stage_result.to_json()
        return {"stage": STAGE, **{k: v for k, v in dataclasses.asdict(self).items() if k != "stage_result"}}

    @classmethod
    def from_stage(cls, result: StageResult) -> "SeparateResult":
        names = {f.name for f in dataclasses.fields(cls)} - {"run_id", "status", "stage_result"}
        return cls(run_id=result.run_id, status=result.status, stage_result=result,
                   **{k: v for k, v in result.details.items() if k in names})


class _SeparatorActor:
    """Loads the separator once; separates, writes and measures one track per call."""

    def __init__(self, spec: str, device: str = "cpu") -> None:
        from cleaning.separate import load_separator

        self.separator = load_separator(spec)
        self.device = device

    def identity(self) -> tuple[str, str]:
        return self.separator.name, self.separator.sha256

    def separate(self, mixture_row: dict[str, Any], out_dir: str, config: SeparateConfig,
                 run_id: str) -> list[dict[str, Any]]:
        """Separate one mixture into ``out_dir/<track>-<mixture sha256[:12]>/<source>.wav`` and return the stems'
        AudioFile rows, measured from the audio the files hold. A stem file already there (the same separator,
        settings and mixture wrote it) is kept as it is; when every one is there nothing is separated."""
        from cleaning.audio import read_audio, write_audio
        from cleaning.measure import measure_audio, measure_pcm_sha256
        from cleaning.separate import separate_audio

        audio, rate = read_audio(mixture_row["uri"])
        folder = Path(out_dir) / stems_folder_name(mixture_row["track_id"], measure_pcm_sha256(audio))
        stems: dict[str, Any] = dict.fromkeys(self.separator.sources)  # None: the file is there, read below
        if not all((folder / f"{source}.wav").is_file() for source in stems):
            stems = separate_audio(self.separator, audio, rate, segment_s=config.segment_s, overlap=config.overlap,
                                   shifts=config.shifts, device=self.device)
        derived = f"{DERIVED_PREFIX}{self.separator.name}@{self.separator.sha256}"
        rows = []
        for source, stem in sorted(stems.items()):
            role = source if source in {r.value for r in Role} else Role.OTHER.value
            path = folder / f"{source}.wav"
            if path.is_file():  # written before from the same input: immutable, an older catalog may point at it
                stem, rate_hz = read_audio(path)
            else:
                path, rate_hz = write_audio(path, stem, rate), rate
            rows.append({"track_id": mixture_row["track_id"], "role": role,
                         "instrument": "" if role == source else source, "uri": str(path), "derived_from": derived,
                         **measure_audio(stem, rate_hz), "run_id": run_id})
        return rows


def separator_key(separator: str, config: SeparateConfig) -> str:
    """The 12-hex content key of a separator and the settings that change what it writes: sha256 of the canonical
    JSON of ``separator`` (``"<name>@<weights sha256>"``), ``segment_s``, ``overlap``, ``shifts`` and
    ``SEPARATION_VERSION``. Names the folder ``audio/separated/<key>/`` its stems go to; ``tracks`` and the engine
    settings are left out (they choose which tracks and where, not what a track's stems are)."""
    return records.sha256_hex(records.canonical_json({
        "separator": separator, "segment_s": config.segment_s, "overlap": config.overlap, "shifts": config.shifts,
        "version": SEPARATION_VERSION}))[:12]


def stems_folder_name(track_id: str, mixture_pcm_sha256: str) -> str:
    """``<safe track id>-<mixture sha256[:12]>``: a track's stems folder, named by the mixture they come from."""
    return f"{records.safe_name(track_id)}-{mixture_pcm_sha256[:12]}"


def run_separate(workspace: Workspace, config: SeparateConfig, progress: Progress | None = None, *,
                 engine: Engine | None = None) -> SeparateResult:
    """Separate the catalog's stem-less mixtures (see the module docstring), through the stage runner.

    Raises:
        FileNotFoundError: no catalog, or a checkpoint path that does not exist.
        ValueError: an unknown pretrained name or a file that is not a demucs package; a ``tracks`` entry
            that is not a catalog mixture.
    """
    return SeparateResult.from_stage(run_stage(SEPARATE, workspace, config, engine=engine, progress=progress))


class SeparateStage(Stage):
    """The separate stage on the contract: the catalog's stem-less mixtures and a separator → stems."""

    name = STAGE
    version = "1"
    config_model = SeparateConfig
    resources = Resources(engine="ray", cpus=1.0, gpus=1.0)
    engine_keys = ("num_cpus", "address", "num_actors")
    key_inputs = ("audio_files", "separator")  # the only catalog table separate reads
    reads = ("catalog", "audio_files", "separator")
    writes = ("catalog", "audio_files", "stems")

    def inputs(self, ctx: StageContext, config: SeparateConfig) -> dict[str, str]:
        from cleaning.separate import load_separator

        version = ctx.prepared["catalog"] = resolve_catalog(ctx.workspace, ctx.select.get("catalog"))
        rows = _catalog_rows(version)
        unknown = sorted(set(config.tracks) - {r["track_id"] for r in rows if r["role"] == Role.MIXTURE.value})
        if unknown:
            raise ValueError(f"separate.tracks: {unknown} have no mixture in the catalog")
        identity = load_separator(config.model)  # fails here, before any Run, on a bad name or file
        return {"catalog": version.catalog_id, "audio_files": catalog_id(ctx.workspace, ("audio_files",), version),
                "separator": f"{identity.name}@{identity.sha256}"}

    def run(self, ctx: StageContext, config: SeparateConfig) -> StageOutput:
        import ray

        from cleaning.separate import load_separator

        version = ctx.prepared["catalog"]
        rows = _catalog_rows(version)
        with_stems = {r["track_id"] for r in rows if r["role"] != Role.MIXTURE.value}
        mixtures = {r["track_id"]: r for r in rows if r["role"] == Role.MIXTURE.value}
        wanted = sorted(config.tracks or mixtures)
        todo = [mixtures[t] for t in wanted if t not in with_stems]
        identity = load_separator(config.model)
        new_rows: list[dict[str, Any]] = []
        if todo:
            ctx.engine.ray()
            actors = ctx.engine.actor_pool(_SeparatorActor, config.model,
                                           count=min(config.num_actors, len(todo)) if config.num_actors else None,
                                           max_actors=len(todo))
            out_dir = str(ctx.workspace.separated_dir / separator_key(ctx.inputs["separator"], config))
            pending = [actors[i % len(actors)].separate.remote(row, out_dir, config, ctx.run_id)
                       for i, row in enumerate(todo)]
            for done, ref in enumerate(pending, start=1):
                new_rows.extend(ray.get(ref))
                if ctx.progress is not None:
                    ctx.progress("separate", done, len(todo))
        outputs = {"audio_files": str(version.table("audio_files"))}
        derived = version
        if new_rows:
            added = {(n["track_id"], n["role"], n["instrument"]) for n in new_rows}
            kept = [r for r in rows if (r["track_id"], r["role"], r["instrument"]) not in added]
            derived = derive_catalog(ctx.workspace, version,
                                     {"audio_files": records.to_table(kept + new_rows, records.AUDIO_FILE)},
                                     stage=STAGE, run_id=ctx.run_id)
            outputs["audio_files"] = str(derived.table("audio_files"))
            outputs["stems"] = str(records.write_table(records.to_table(new_rows, records.AUDIO_FILE),
                                                       ctx.run_dir / "audio_files.parquet"))
        details = {"separator": identity.name, "separator_sha256": identity.sha256,
                   "separator_key": separator_key(ctx.inputs["separator"], config), "num_tracks": len(todo),
                   "num_stems": len(new_rows), "skipped_tracks": len(wanted) - len(todo), "stems": new_rows}
        counts = {"tracks": len(todo), "stems": len(new_rows), "skipped": len(wanted) - len(todo),
                  "separator": identity.name, "separator_sha256": identity.sha256}
        details["catalog_id"] = derived.catalog_id
        return StageOutput(outputs=outputs, counts=counts, output_ids={"catalog": derived.catalog_id},
                           details=details)


def _catalog_rows(version: CatalogVersion) -> list[dict[str, Any]]:
    path = version.table("audio_files")
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run `linernotes ingest DELIVERY` first")
    return pq.read_table(path).to_pylist()


SEPARATE = SeparateStage()
