"""``linernotes index --checkpoint ID``: the attribution index of one checkpoint, built by Ray actors.

For a checkpoint trained on dataset ``D`` it builds, under ``indexes/<D>/``:

- the ``embedding`` index of ``D``'s train segments (``pipelines.attribution.index``; shared by every
  checkpoint of ``D``, reused when cached);
- ``<checkpoint_id>/dtrak-<identity>/``: D-TRAK features of every train segment (``provenance.dtrak``): the
  gradient of the configured objective (default D-TRAK's ``Square``) averaged over ``num_timesteps`` fixed
  timesteps with fixed noise (``pipelines.attribution.loss.DiffusionLoss``), Rademacher-projected to
  ``projection_dim``; a memory-mapped ``(N, dim)`` float32 array with a done-mask, so a killed build
  resumes; then finalized (kernel inverse, float16 serving copy);
- ``<checkpoint_id>/unlearning-<identity>/fisher.pt``: the diagonal empirical Fisher of the training loss on
  a seeded sample of train segments, reused by every ``unlearning`` query.

Rows are featurized in fixed chunks of ``batch_size`` consecutive rows (row order = shard order), each
chunk by one ``DTrakFeaturizer`` actor (a GPU per actor when ``use_gpu``); the driver writes each chunk as
it arrives and marks it done. The same chunking on a resumed build gives bit-identical features.

torch and the embedding libraries are imported where the work runs, so that describing the stage
(``linernotes stages``) loads none of them.
"""

from __future__ import annotations

import contextlib
import io
import json
import tarfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from pipelines.engines import Engine
from pipelines.inputs import resolve_checkpoint
from pipelines.stage import Resources, Stage, StageContext, StageOutput
from provenance import dtrak, records
from provenance.records import canonical_json, sha256_hex
from provenance.workspace import Workspace

Progress = Callable[[str, int, int], None]


class IndexConfig(BaseModel):
    """Config of the ``index`` stage (``--config FILE --set key=value``).

    Attributes:
        projection_dim: D-TRAK feature dimension, 512–32,768 (TRAK uses 2,048–20,480; D-TRAK 32,768).
        num_timesteps: K, timesteps the objective is averaged over (D-TRAK: 10 for LDS, up to 1,000).
        objective: ``"square"`` (D-TRAK's best: ‖model output‖²) or ``"loss"`` (the training loss).
        seed: seeds the projection and the fixed noise.
        batch_size: segments per actor task (also the resume granularity).
        num_workers: ``DTrakFeaturizer`` actors.
        use_gpu: one GPU per actor (falls back to CPU when torch sees none).
        ridge: relative ridge of the TRAK kernel (``provenance.dtrak.DEFAULT_RIDGE``).
        fisher_segments: train segments the diagonal Fisher for ``unlearning`` is estimated on.
        unlearning_timesteps: K of the unlearning loss (fixed timesteps and noise, identical before/after).
        embedder: the ``embedding`` method's embedder.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    projection_dim: int = Field(2048, ge=dtrak.MIN_DIM, le=dtrak.MAX_DIM)
    num_timesteps: int = Field(10, ge=1)
    objective: Literal["square", "loss"] = "square"
    seed: int = 0
    batch_size: int = Field(8, ge=1)
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    ridge: float = Field(dtrak.DEFAULT_RIDGE, gt=0)
    fisher_segments: int = Field(64, ge=1)
    unlearning_timesteps: int = Field(8, ge=1)
    embedder: str = "mel-stats"

    def dtrak_identity(self, checkpoint_id: str) -> dict[str, Any]:
        return {"checkpoint_id": checkpoint_id, "objective": self.objective, "num_timesteps": self.num_timesteps,
                "seed": self.seed, "projection_dim": self.projection_dim, "batch_size": self.batch_size}

    def unlearning_identity(self, checkpoint_id: str) -> dict[str, Any]:
        return {"checkpoint_id": checkpoint_id, "objective": "loss", "num_timesteps": self.unlearning_timesteps,
                "seed": self.seed, "fisher_segments": self.fisher_segments}


@dataclass(frozen=True)
class CheckpointIndex:
    """Where a checkpoint's attribution index lives, and what it was built from."""

    checkpoint_id: str
    dataset_id: str
    checkpoint_path: Path
    dtrak_dir: Path
    unlearning_dir: Path
    config: IndexConfig

    @property
    def fisher_path(self) -> Path:
        return self.unlearning_dir / "fisher.pt"


def checkpoint_index(workspace: Workspace, checkpoint: Mapping[str, Any], config: IndexConfig) -> CheckpointIndex:
    """Paths of ``checkpoint``'s (a lineage-store Checkpoint row) index for ``config`` (nothing is built)."""
    checkpoint_id, dataset_id = checkpoint["checkpoint_id"], checkpoint["dataset_id"]
    base = workspace.indexes_dir / dataset_id / checkpoint_id
    tag = sha256_hex(canonical_json(config.dtrak_identity(checkpoint_id)))[:12]
    utag = sha256_hex(canonical_json(config.unlearning_identity(checkpoint_id)))[:12]
    return CheckpointIndex(checkpoint_id, dataset_id, Path(checkpoint["uri"]), base / f"dtrak-{tag}",
                           base / f"unlearning-{utag}", config)


def train_entries(workspace: Workspace, dataset_id: str) -> list[dict[str, Any]]:
    """The dataset's train-split shard-index rows in feature-row order: by shard, then key."""
    from pipelines.attribution.index import read_shard_index

    rows = [row for row in read_shard_index(workspace, dataset_id) if row["split"] == records.Split.TRAIN.value]
    if not rows:
        raise ValueError(f"dataset {dataset_id!r} has no train segments to index")
    return sorted(rows, key=lambda row: (row["shard"], row["key"]))


def iter_segment_mels(dataset_dir: Path, entries: Sequence[Mapping[str, Any]]) -> Iterator[tuple[int, np.ndarray, str]]:
    """``(position in entries, log-mel float32 (n_mels, frames), conditioning text)`` of each entry, in
    ``entries`` order, reading each shard once (``entries`` must be grouped by shard, as ``train_entries``).

    Raises:
        FileNotFoundError: a shard is missing. ValueError: a sample lacks ``mel.npy`` or ``json``.
    """
    position = 0
    while position < len(entries):
        shard = entries[position]["shard"]
        group = []
        while position < len(entries) and entries[position]["shard"] == shard:
            group.append(position)
            position += 1
        wanted = {entries[i]["key"]: i for i in group}
        found: dict[int, dict[str, bytes]] = {}
        path = dataset_dir / shard
        if not path.is_file():
            raise FileNotFoundError(f"shard {path} named in index.parquet is missing")
        with tarfile.open(path, mode="r|*") as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                if key in wanted and ext in ("mel.npy", "json") and member.isfile():
                    found.setdefault(wanted[key], {})[ext] = tar.extractfile(member).read()
        for i in group:
            members = found.get(i, {})
            if set(members) != {"mel.npy", "json"}:
                raise ValueError(f"{path} lacks mel.npy or json of segment {entries[i]['segment_id']}")
            mel = np.load(io.BytesIO(members["mel.npy"]), allow_pickle=False).astype(np.float32)
            yield i, mel, str(json.loads(members["json"]).get("text") or "")


def load_attribution_model(checkpoint_path: str | Path, device: str = "cpu") -> Any:
    """``training.generate.load_checkpoint`` with the model's parameters made differentiable (the
    loaded EMA model is frozen for sampling), on ``device``."""
    from training.generate import load_checkpoint

    loaded = load_checkpoint(checkpoint_path)
    loaded.model.to(device).eval().requires_grad_(True)
    return loaded


def normalise(mel: np.ndarray, loaded: Any) -> np.ndarray:
    """``(log_mel − mel_mean) / mel_std`` as float32, with the checkpoint's statistics."""
    return ((np.asarray(mel, dtype=np.float32) - loaded.mel_mean) / loaded.mel_std).astype(np.float32)


class DTrakFeaturizer:
    """Loads a checkpoint once and turns normalised log-mels into D-TRAK features (a Ray actor in
    ``build_checkpoint_index``; usable in-process for queries)."""

    def __init__(self, checkpoint_path: str, objective: str, num_timesteps: int, seed: int, dim: int,
                 device: str = "cpu", torch_threads: int | None = None) -> None:
        import torch

        from pipelines.attribution.loss import DiffusionLoss

        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.device = device if device != "cuda" or torch.cuda.is_available() else "cpu"
        self.loaded = load_attribution_model(checkpoint_path, self.device)
        self.loss = DiffusionLoss(self.loaded.diffusion, objective, num_timesteps, noise_seed=seed)
        from provenance.unlearning import trainable_parameters

        self.params = trainable_parameters(self.loaded.model)
        self.projector = dtrak.GradientProjector(dtrak.num_parameters(self.params), dim, seed=seed)

    def featurize(self, mels: Sequence[np.ndarray], texts: Sequence[str], normalised: bool = False) -> np.ndarray:
        """float32 ``(B, dim)`` features of ``B`` log-mels ``(n_mels, frames)`` (equal frames) and texts."""
        import torch

        from pipelines.attribution.loss import MelBatch

        x0 = np.stack([m if normalised else normalise(m, self.loaded) for m in mels])
        batch = MelBatch(torch.from_numpy(x0).to(self.device), tuple(texts))
        return dtrak.project_gradients(self.loaded.model, self.loss, batch, self.projector, params=self.params)


@dataclass
class IndexResult:
    checkpoint_id: str
    dataset_id: str
    num_segments: int
    computed_segments: int
    embedding_dir: Path
    dtrak_dir: Path
    fisher_path: Path

    def to_json(self) -> dict[str, Any]:
        return {"stage": "index", "checkpoint_id": self.checkpoint_id, "dataset_id": self.dataset_id,
                "counts": {"segments": self.num_segments, "computed": self.computed_segments,
                           "reused": self.num_segments - self.computed_segments},
                "outputs": {"embedding": str(self.embedding_dir), "dtrak": str(self.dtrak_dir),
                            "fisher": str(self.fisher_path)}}


class IndexStage(Stage):
    """The index stage on the contract: a checkpoint (and its dataset) → its attribution index."""

    name = "index"
    version = "1"
    config_model = IndexConfig
    resources = Resources(engine="ray", cpus=1.0, gpus=1.0)
    reads = ("checkpoint", "dataset")
    writes = ("embedding", "dtrak", "fisher")

    def inputs(self, ctx: StageContext, config: IndexConfig) -> dict[str, str]:
        checkpoint = resolve_checkpoint(ctx.store, ctx.workspace, ctx.select.get("checkpoint"))
        return {"checkpoint": checkpoint["checkpoint_id"], "dataset": checkpoint["dataset_id"]}

    def outputs_valid(self, run: Mapping[str, Any]) -> bool:
        """The D-TRAK features are finalized and the Fisher is there."""
        outputs = run.get("outputs") or {}
        return (Path(outputs.get("dtrak", "")) / "kernel_inverse.npy").is_file() and Path(
            outputs.get("fisher", "")).is_file()

    def run(self, ctx: StageContext, config: IndexConfig) -> StageOutput:
        checkpoint = ctx.store.get_checkpoint(ctx.inputs["checkpoint"])
        payload = build_checkpoint_index(ctx.workspace, checkpoint, config, progress=ctx.progress,
                                         engine=ctx.engine).to_json()
        return StageOutput(outputs=payload["outputs"], counts=payload["counts"],
                           details={"checkpoint_id": payload["checkpoint_id"], "dataset_id": payload["dataset_id"]})


INDEX = IndexStage()


def build_checkpoint_index(workspace: Workspace, checkpoint: Mapping[str, Any], config: IndexConfig,
                           progress: Progress | None = None, engine: Engine | None = None) -> IndexResult:
    """Build (or finish, or reuse) every part of ``checkpoint``'s attribution index. Idempotent: a complete
    index is reused; a partial one is resumed from its done-mask.

    Args:
        checkpoint: a lineage-store Checkpoint row (``checkpoint_id``, ``dataset_id``, ``uri``).
        progress: called as ``("D-TRAK features", done, total)`` per chunk and ``("indexing segments", ...)``.
        engine: where the featurizer actors run (default: a local Ray for this call).

    Raises:
        FileNotFoundError: the checkpoint file, the dataset or a shard is missing.
        ValueError: no train segments, or non-finite features (a diverged checkpoint).
    """
    from cleaning.embed import load_embedder
    from pipelines.attribution.index import build_embedding_index, index_dir

    index = checkpoint_index(workspace, checkpoint, config)
    if not index.checkpoint_path.is_file():
        raise FileNotFoundError(f"checkpoint file {index.checkpoint_path} is missing")
    embedder = load_embedder(config.embedder)
    build_embedding_index(workspace, index.dataset_id, embedder, progress=progress)
    entries = train_entries(workspace, index.dataset_id)
    computed = build_dtrak_features(workspace, index, entries, progress=progress, engine=engine)
    build_fisher(workspace, index, entries)
    return IndexResult(index.checkpoint_id, index.dataset_id, len(entries), computed,
                       index_dir(workspace, index.dataset_id, embedder.name), index.dtrak_dir, index.fisher_path)


def build_dtrak_features(workspace: Workspace, index: CheckpointIndex, entries: Sequence[Mapping[str, Any]],
                         progress: Progress | None = None, engine: Engine | None = None) -> int:
    """Featurize the pending rows with Ray actors, then finalize. Returns the number of rows computed now.

    ``engine``: the run's engines (default: a local Ray opened and closed by this call when there is work)."""
    config = index.config
    store = dtrak.FeatureStore.open(index.dtrak_dir, [row["segment_id"] for row in entries], config.projection_dim,
                                    config.dtrak_identity(index.checkpoint_id))
    pending = set(store.pending_rows().tolist())
    total, size = len(entries), config.batch_size
    chunks = [list(range(start, min(start + size, total))) for start in range(0, total, size)]
    todo = [chunk for chunk in chunks if any(row in pending for row in chunk)]
    if todo:
        with contextlib.ExitStack() as stack:
            engine = engine or stack.enter_context(Engine())
            _featurize(engine, workspace, index, entries, todo, pending, store, progress)
    if not (index.dtrak_dir / "kernel_inverse.npy").is_file() or todo:
        dtrak.DTrakScorer.finalize(store, ridge=config.ridge)
    return sum(1 for chunk in todo for row in chunk if row in pending)


def _featurize(engine: Engine, workspace: Workspace, index: CheckpointIndex, entries: Sequence[Mapping[str, Any]],
               todo: list[list[int]], pending: set[int], store: dtrak.FeatureStore, progress: Progress | None) -> None:
    """Send the ``todo`` chunks to ``DTrakFeaturizer`` actors (a GPU each when asked for and present); write each
    chunk's features as it arrives."""
    import ray

    engine.ray()
    config, total = index.config, len(entries)
    use_gpu = config.use_gpu and engine.num_gpus() > 0
    actor_class = ray.remote(num_cpus=1, num_gpus=1 if use_gpu else 0)(DTrakFeaturizer)
    actors = [actor_class.remote(str(index.checkpoint_path), config.objective, config.num_timesteps,
                                 config.seed, config.projection_dim, "cuda" if use_gpu else "cpu",
                                 torch_threads=None if config.num_workers == 1 else 1)
              for _ in range(min(config.num_workers, len(todo)))]
    rows_wanted = [row for chunk in todo for row in chunk]
    mels = iter_segment_mels(workspace.dataset_dir(index.dataset_id), [entries[row] for row in rows_wanted])
    in_flight: dict[Any, list[int]] = {}
    done_rows = total - len(pending)
    try:
        for number, chunk in enumerate(todo):
            items = [next(mels) for _ in chunk]
            actor = actors[number % len(actors)]
            in_flight[actor.featurize.remote([m for _, m, _ in items], [t for _, _, t in items])] = chunk
            while len(in_flight) >= 2 * len(actors) or (number == len(todo) - 1 and in_flight):
                ready, _ = ray.wait(list(in_flight), num_returns=1)
                finished = in_flight.pop(ready[0])
                store.write(finished, ray.get(ready[0]))
                done_rows += sum(1 for row in finished if row in pending)
                if progress is not None:
                    progress("D-TRAK features", done_rows, total)
    finally:
        for actor in actors:
            ray.kill(actor)


def build_fisher(workspace: Workspace, index: CheckpointIndex, entries: Sequence[Mapping[str, Any]]) -> Path:
    """The diagonal empirical Fisher of the unlearning loss on ``fisher_segments`` train segments drawn with
    ``seed`` (all of them when fewer), cached at ``index.fisher_path``; reused when present."""
    import torch

    from pipelines.attribution.loss import DiffusionLoss, MelBatch
    from provenance.unlearning import diagonal_fisher

    if index.fisher_path.is_file():
        return index.fisher_path
    config = index.config
    rng = np.random.default_rng(config.seed)
    chosen = sorted(rng.choice(len(entries), size=min(config.fisher_segments, len(entries)), replace=False).tolist())
    loaded = load_attribution_model(index.checkpoint_path)
    loss = DiffusionLoss(loaded.diffusion, "loss", config.unlearning_timesteps, noise_seed=config.seed)
    items = list(iter_segment_mels(workspace.dataset_dir(index.dataset_id), [entries[i] for i in chosen]))
    batches = [MelBatch(torch.from_numpy(np.stack([normalise(m, loaded) for _, m, _ in items[s:s + config.batch_size]])),
                        tuple(t for _, _, t in items[s:s + config.batch_size]))
               for s in range(0, len(items), config.batch_size)]
    fisher = diagonal_fisher(loaded.model, loss, batches, seed=config.seed)
    index.unlearning_dir.mkdir(parents=True, exist_ok=True)
    tmp = index.unlearning_dir / ".fisher.pt.tmp"
    torch.save({"fisher": fisher, "identity": config.unlearning_identity(index.checkpoint_id),
                "segments": [entries[i]["segment_id"] for i in chosen]}, tmp)
    tmp.replace(index.fisher_path)
    return index.fisher_path
