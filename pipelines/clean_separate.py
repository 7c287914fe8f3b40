"""The ``separate`` stage: demucs turns the mixtures of catalog tracks that have no stems into stems.

Ray actors (one per CPU by default; one per GPU, on the GPU, when the cluster has GPUs) load the separator
once in their constructor and separate one track per call (``cleaning.separate.separate_audio``: chunked
with overlap). Stems are written as float32 WAV to ``audio/separated/<track>/<source>.wav``, measured like
delivered files, and added to ``catalog/audio_files.parquet`` with ``derived_from =
"separated:<separator name>@<sha256>"``; the run's config, separator name and checksum are in the lineage
store. A re-run skips tracks whose stems from the same separator are already in the catalog.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, model_validator

from provenance import records
from provenance.records import Role
from provenance.store import LineageStore
from provenance.workspace import Workspace

STAGE = "separate"
DERIVED_PREFIX = "separated:"

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

    def to_json(self) -> dict[str, Any]:
        return {"stage": STAGE, **dataclasses.asdict(self)}


class _SeparatorActor:
    """Loads the separator once; separates, writes and measures one track per call."""

    def __init__(self, spec: str, device: str) -> None:
        from cleaning.separate import load_separator

        self.separator = load_separator(spec)
        self.device = device

    def identity(self) -> tuple[str, str]:
        return self.separator.name, self.separator.sha256

    def separate(self, mixture_row: dict[str, Any], out_dir: str, config: SeparateConfig,
                 run_id: str) -> list[dict[str, Any]]:
        from cleaning.audio import read_audio, write_audio
        from cleaning.measure import measure_audio
        from cleaning.separate import separate_audio

        audio, rate = read_audio(mixture_row["uri"])
        stems = separate_audio(self.separator, audio, rate, segment_s=config.segment_s, overlap=config.overlap,
                               shifts=config.shifts, device=self.device)
        derived = f"{DERIVED_PREFIX}{self.separator.name}@{self.separator.sha256}"
        rows = []
        for source, stem in sorted(stems.items()):
            role = source if source in {r.value for r in Role} else Role.OTHER.value
            path = write_audio(Path(out_dir) / records.safe_name(mixture_row["track_id"]) / f"{source}.wav", stem, rate)
            rows.append({"track_id": mixture_row["track_id"], "role": role,
                         "instrument": "" if role == source else source, "uri": str(path), "derived_from": derived,
                         **measure_audio(stem, rate), "run_id": run_id})
        return rows


def run_separate(workspace: Workspace, config: SeparateConfig, progress: Progress | None = None) -> SeparateResult:
    """Separate the catalog's stem-less mixtures (see the module docstring).

    Raises:
        FileNotFoundError: no catalog, or a checkpoint path that does not exist.
        ValueError: an unknown pretrained name or a file that is not a demucs package; a ``tracks`` entry
            that is not a catalog mixture.
    """
    import ray

    from cleaning.separate import load_separator
    from pipelines.ray_runtime import local_ray

    path = workspace.catalog_table("audio_files")
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run `linernotes ingest DELIVERY` first")
    rows = pq.read_table(path).to_pylist()
    with_stems = {r["track_id"] for r in rows if r["role"] != Role.MIXTURE.value}
    mixtures = {r["track_id"]: r for r in rows if r["role"] == Role.MIXTURE.value}
    unknown = sorted(set(config.tracks) - set(mixtures))
    if unknown:
        raise ValueError(f"separate.tracks: {unknown} have no mixture in the catalog")
    wanted = sorted(config.tracks or mixtures)
    todo = [mixtures[t] for t in wanted if t not in with_stems]
    identity = load_separator(config.model)  # fails here, before any Ray work, on a bad name or file
    store = LineageStore(workspace.store_url)
    run_id = store.start_run(STAGE, {**config.model_dump(), "separator": identity.name,
                                     "separator_sha256": identity.sha256})
    run_dir = workspace.run_dir(run_id)
    records.write_json({"stage": STAGE, "config": config.model_dump(), "separator": identity.name,
                        "separator_sha256": identity.sha256}, run_dir / "config.json", default=str)
    try:
        new_rows: list[dict[str, Any]] = []
        if todo:
            with local_ray(address=config.address, num_cpus=config.num_cpus):
                num_gpus = int(ray.cluster_resources().get("GPU", 0))
                count = config.num_actors or (num_gpus or int(ray.cluster_resources().get("CPU", 1)))
                count = max(1, min(count, len(todo)))
                actor_class = ray.remote(num_cpus=1, num_gpus=1 if num_gpus else 0)(_SeparatorActor)
                actors = [actor_class.remote(config.model, "cuda" if num_gpus else "cpu") for _ in range(count)]
                out_dir = str(workspace.root / "audio" / "separated")
                pending = [actors[i % count].separate.remote(row, out_dir, config, run_id)
                           for i, row in enumerate(todo)]
                for done, ref in enumerate(pending, start=1):
                    new_rows.extend(ray.get(ref))
                    if progress is not None:
                        progress("separate", done, len(todo))
        if new_rows:
            kept = [r for r in rows if (r["track_id"], r["role"], r["instrument"]) not in
                    {(n["track_id"], n["role"], n["instrument"]) for n in new_rows}]
            table = records.to_table(kept + new_rows, records.AUDIO_FILE)
            records.write_table(table, path)
            records.write_table(records.to_table(new_rows, records.AUDIO_FILE), run_dir / "audio_files.parquet")
        result = SeparateResult(run_id=run_id, separator=identity.name, separator_sha256=identity.sha256,
                                num_tracks=len(todo), num_stems=len(new_rows),
                                skipped_tracks=len(wanted) - len(todo), stems=new_rows)
        records.write_json(result.to_json(), run_dir / "summary.json", default=str)
        store.finish_run(run_id, {"tracks": len(todo), "stems": len(new_rows), "skipped": result.skipped_tracks,
                                  "separator": identity.name, "separator_sha256": identity.sha256},
                         {"audio_files": str(path), "summary": str(run_dir / "summary.json")})
        return result
    except BaseException as err:
        store.finish_run(run_id, {}, status="failed", error=f"{type(err).__name__}: {err}")
        raise
    finally:
        store.close()

