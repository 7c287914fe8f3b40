"""The workspace folder: where a linernotes installation keeps its lineage store and outputs.

Layout (all under ``root``)::

    lineage.sqlite                 SQLite lineage store (runs, datasets, checkpoints, generations, attributions),
                                   unless a store URL names another database (PostgreSQL)
    catalogs/<catalog_id>/         catalog versions, never overwritten (Parquet tables + catalog.json): ingest,
                                   separate and clean each commit a new one (pipelines/catalog.py)
        licenses.parquet tracks.parquet audio_files.parquet rejections.parquet [stem_scores.parquet]
    catalog -> catalogs/<id>       a link to the latest version
    audio/mixtures/                mixtures built by summing stems (float32 WAV), named by the stems' content
    audio/separated/<key>/         stems written by the separate stage, per separator and settings (float32 WAV)
    runs/<run_id>/                 per-run outputs: resolved config, summary.json, rejections
    datasets/<dataset_id>/         WebDataset tars, index.parquet, dataset.json
    checkpoints/<checkpoint_id>/   checkpoint.pt, config.json
    generations/<generation_id>/   generated WAV, generation.json, report.html + report_files/
    indexes/<dataset_id>/          attribution indexes (embedding vectors, FAISS)
    recordings/<n>-<delivery_id>/  the recording index: every accepted mixture's sha256 and fingerprint, and the
                                   sub-fingerprint postings, per delivery (pipelines/stages/ingest/recordings.py)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_WORKDIR = "./linernotes-work"
STORE_URL_ENV = "LINERNOTES_STORE_URL"


@dataclass(frozen=True)
class Workspace:
    """Paths inside a workspace folder. Creating the object touches nothing; ``ensure()`` makes folders."""

    root: Path
    #: SQLAlchemy URL of the lineage store when it is not the workspace's SQLite file (e.g. PostgreSQL).
    lineage_url: str | None = None

    @classmethod
    def at(cls, root: str | os.PathLike[str], store_url: str | None = None) -> "Workspace":
        """A workspace at ``root``; its lineage store is ``store_url``, else ``$LINERNOTES_STORE_URL``, else
        ``root/lineage.sqlite``."""
        url = store_url or os.environ.get(STORE_URL_ENV) or None
        return cls(Path(root).expanduser().resolve(), url)

    def ensure(self) -> "Workspace":
        for path in (self.mixtures_dir, self.runs_dir, self.datasets_dir,
                     self.checkpoints_dir, self.generations_dir, self.indexes_dir):
            path.mkdir(parents=True, exist_ok=True)
        return self

    @property
    def store_url(self) -> str:
        return self.lineage_url or f"sqlite:///{self.root / 'lineage.sqlite'}"

    @property
    def catalog_dir(self) -> Path:
        """The latest catalog version (a link into ``catalogs/``; see pipelines/catalog.py)."""
        return self.root / "catalog"

    @property
    def mixtures_dir(self) -> Path:
        return self.root / "audio" / "mixtures"

    @property
    def separated_dir(self) -> Path:
        """Stems the separate stage wrote: ``<separator key>/<track>-<mixture sha256[:12]>/<source>.wav``."""
        return self.root / "audio" / "separated"

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    @property
    def datasets_dir(self) -> Path:
        return self.root / "datasets"

    @property
    def checkpoints_dir(self) -> Path:
        return self.root / "checkpoints"

    @property
    def generations_dir(self) -> Path:
        return self.root / "generations"

    @property
    def indexes_dir(self) -> Path:
        return self.root / "indexes"

    @property
    def recordings_dir(self) -> Path:
        return self.root / "recordings"

    def run_dir(self, run_id: str) -> Path:
        return self.runs_dir / run_id

    def dataset_dir(self, dataset_id: str) -> Path:
        return self.datasets_dir / dataset_id

    def checkpoint_dir(self, checkpoint_id: str) -> Path:
        return self.checkpoints_dir / checkpoint_id

    def generation_dir(self, generation_id: str) -> Path:
        return self.generations_dir / generation_id

    def catalog_table(self, name: str) -> Path:
        """``name`` is one of ``licenses``, ``tracks``, ``audio_files``, ``rejections``."""
        return self.catalog_dir / f"{name}.parquet"
