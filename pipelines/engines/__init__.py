"""The engines stages run on, opened once per run and handed to every stage (no stage starts or stops Ray).

- **Ray** (separate, clean, shard, index, and train's Ray Train workers): a local Ray started in this process
  with an explicit CPU count, no dashboard and a modest object store, or a cluster by address
  (``ray://HEAD:10001``, ``auto``, or ``$RAY_ADDRESS`` inside a Ray Job). A Ray that is already initialized (a
  notebook, a test's session Ray, a Ray Job's driver) is used as it is and never shut down here. On a cluster no
  stage pins work to the driver's node: tasks, actors and Ray Train's workers ask only for CPUs or GPUs (no node
  affinity, no node resources), Ray Data chooses its own placement, and Ray places them over the cluster's nodes
  (``linernotes submit SPEC``, tests/e2e/test_submit_cluster.py).
- **Beam** (ingest): the DirectRunner by default, inside this process (a Ray job's driver on a cluster); another
  runner (Portable, Flink, Spark, Dataflow) and its pipeline options from a runner options file
  (``infra/beam/<runner>.yaml``, a ``beam_options`` list) or a list of flags; ``infra/beam/README.md`` says what
  its workers read and write. ``apache_beam`` is imported only when a pipeline is built.

Engine settings are not stage settings: they live in :class:`EngineConfig` and never enter a stage's cache key
(the same data sharded on a laptop or a cluster is the same dataset).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

if TYPE_CHECKING:
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

DEFAULT_OBJECT_STORE_MEMORY_BYTES = 512 * 1024 * 1024

# The repository root, so that Ray workers import ``provenance``/``cleaning``/``pipelines`` from the same
# tree as the driver even when the package is not installed (a local Ray only).
_REPO_ROOT = Path(__file__).resolve().parents[2]


class EngineConfig(BaseModel):
    """Where the stages' distributed work runs. Frozen; unknown keys are rejected."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    ray_address: str | None = Field(None, description="Ray cluster to join (ray://HEAD:10001 or auto); "
                                    "null: $RAY_ADDRESS when set, else a local Ray in this process.")
    num_cpus: int | None = Field(None, ge=1, description="CPUs a local Ray may use; null: every CPU.")
    object_store_memory_bytes: int = Field(DEFAULT_OBJECT_STORE_MEMORY_BYTES, gt=0,
                                           description="Object store of a local Ray, in bytes.")
    beam_runner: str = Field("DirectRunner", min_length=1, description="Beam runner of ingest (DirectRunner, "
                             "PortableRunner, FlinkRunner, SparkRunner, DataflowRunner); a --runner= in the options "
                             "wins.")
    beam_options_file: str | None = Field(None, description="YAML file whose beam_options list holds Beam pipeline "
                                          "options, e.g. infra/beam/flink.yaml; read before beam_options.")
    beam_options: tuple[str, ...] = Field((), description="Beam pipeline options (--flag=value), e.g. "
                                          "--direct_num_workers=2; later ones win.")

    @field_validator("beam_options_file")
    @classmethod
    def _readable_options_file(cls, path: str | None) -> str | None:
        if path is not None:
            read_beam_options_file(path)  # a bad file fails here, before any work
        return path


class Engine:
    """The engines of one run. Use as a context manager; ``ray()`` starts or joins Ray on first need.

    Args:
        config: the engine settings (default: a local Ray on every CPU).
    """

    def __init__(self, config: EngineConfig | None = None) -> None:
        self.config = config or EngineConfig()
        self._started_ray = False

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def ray(self) -> None:
        """Make Ray usable in this process: join the configured cluster or start a local Ray, once.

        Raises:
            ConnectionError: (from Ray) the configured address cannot be reached.
        """
        import ray

        if ray.is_initialized():
            return
        address = self.config.ray_address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
        else:
            python_path = os.pathsep.join(p for p in (str(_REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
            ray.init(num_cpus=self.config.num_cpus or os.cpu_count() or 1, include_dashboard=False,
                     object_store_memory=self.config.object_store_memory_bytes, log_to_driver=False,
                     configure_logging=True, logging_level=logging.WARNING,
                     runtime_env={"env_vars": {"PYTHONPATH": python_path}})
        self._started_ray = True

    def num_gpus(self) -> int:
        """GPUs in the Ray cluster (0 on a CPU-only machine); starts Ray if needed."""
        import ray

        self.ray()
        return int(ray.cluster_resources().get("GPU", 0))

    def actor_pool(self, actor_class: type, *args: Any, count: int | None = None, max_actors: int | None = None,
                   use_gpu: bool | None = None, **kwargs: Any) -> list[Any]:
        """Ray actors of ``actor_class``, each constructed once with ``args``/``kwargs`` (its ``setup``: load a
        model once per worker, as NeMo Curator's stages do), one CPU each, or one GPU each when the cluster has
        GPUs. The caller spreads its calls over the returned handles.

        Args:
            count: exactly this many actors (Ray queues those it cannot place yet).
            max_actors: without ``count``: one per GPU, else one per CPU, at most this many (e.g. the number of
                work items).
            use_gpu: None: when the cluster has GPUs; False: never. The constructor gets ``device="cuda"`` or
                ``"cpu"`` when it declares a ``device`` parameter and ``kwargs`` does not set it.
        """
        import inspect

        import ray

        gpus = self.num_gpus() if use_gpu in (None, True) else 0
        cpus = int(ray.cluster_resources().get("CPU", 1))
        count = count or max(1, min(gpus or cpus, max_actors or gpus or cpus))
        if "device" in inspect.signature(actor_class.__init__).parameters and "device" not in kwargs:
            kwargs["device"] = "cuda" if gpus else "cpu"
        remote = ray.remote(num_cpus=1, num_gpus=1 if gpus else 0)(actor_class)
        return [remote.remote(*args, **kwargs) for _ in range(count)]

    def beam_flags(self) -> list[str]:
        """The Beam pipeline options as command-line flags: ``--runner=<beam_runner>``, then the options file's,
        then ``beam_options`` (a later flag wins over an earlier one)."""
        flags = [f"--runner={self.config.beam_runner}"]
        if self.config.beam_options_file:
            flags += read_beam_options_file(self.config.beam_options_file)
        return flags + list(self.config.beam_options)

    def beam_options(self) -> "PipelineOptions":
        """Beam ``PipelineOptions`` from :meth:`beam_flags` (imports ``apache_beam``)."""
        from pipelines import quiet_beam_import_warnings

        quiet_beam_import_warnings()
        from apache_beam.options.pipeline_options import PipelineOptions

        return PipelineOptions(self.beam_flags())

    def beam_pipeline(self) -> "beam.Pipeline":
        """A Beam pipeline on the configured runner; use as a context manager (it runs on exit)."""
        options = self.beam_options()
        import apache_beam as beam

        return beam.Pipeline(options=options)

    def close(self) -> None:
        """Shut down what this engine started; a Ray it found running stays up."""
        if self._started_ray:
            import ray

            ray.shutdown()
            self._started_ray = False

    def describe(self) -> dict[str, Any]:
        return self.config.model_dump()


def read_beam_options_file(path: str | os.PathLike[str]) -> list[str]:
    """The ``beam_options`` list of a runner options file (``infra/beam/<runner>.yaml``).

    Raises:
        ValueError: the file does not exist, or holds no ``beam_options`` list of strings (the message names it).
    """
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"beam_options_file {str(path)!r} does not exist (see infra/beam/ for runner options files)")
    loaded = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    options = loaded.get("beam_options") if isinstance(loaded, dict) else None
    if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
        raise ValueError(f"beam_options_file {str(path)!r} needs a `beam_options:` list of --flag=value strings")
    return options
