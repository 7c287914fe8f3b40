"""Run specs: a curation run declared in one YAML file, validated whole before any work.

A spec names a delivery, the purpose rights are judged for, the stages in chain order with their configs (each
the stage's own typed config, ``linernotes stages``), the workspace and the engine::

    delivery: ../../../shared/corpus     # a delivery folder; a relative path is read from the spec's folder
    workspace: ./linernotes-work         # optional; default $LINERNOTES_WORKDIR or ./linernotes-work
    purpose: {commercial: true, territory: Worldwide, as_of: 2026-11-21}
    stages:                              # in chain order; any subset (ingest + shard is the common case)
      ingest: {}
      clean: {methods: [fad], reference_tracks: [...]}
      shard: {segment_s: 5}
      train: {steps: 20}
    engine: {ray_address: null}          # optional: pipelines.engines.EngineConfig

Light: pydantic and YAML only; the stages' config models are imported from their light modules.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipelines.config import ConfigError, parse_overrides
from pipelines.engines import EngineConfig, read_beam_options_file
from provenance import records
from provenance.workspace import DEFAULT_WORKDIR

#: The stages a run spec may name, in chain order (each reads what the ones before it write).
RUN_CHAIN = ("ingest", "separate", "clean", "shard", "train", "index", "generate", "evaluate")
WORKDIR_ENV = "LINERNOTES_WORKDIR"
#: stage config keys that a command line hands to the engine; a run spec sets them once, under ``engine:``
ENGINE_OWNED = frozenset({"address", "num_cpus", "beam_options"})
#: stage config keys that may name a local file or folder (``embedder``: ``KIND:PATH``); :func:`pin_spec` makes a
#: relative one absolute, so a Ray job, whose working directory is elsewhere, reads the same file
PATH_KEYS: dict[str, tuple[str, ...]] = {
    "ingest": ("opt_out_csv",), "clean": ("embedder",), "train": ("storage_path", "text_encoder_path"),
    "index": ("embedder",), "generate": ("context_path", "vocoder"), "evaluate": ("embedder", "vocoder"),
}


class PurposeSpec(BaseModel):
    """What the run trains for: the rights policy admits a recording only when a licence allows it."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    commercial: bool = Field(default=True, description="A commercial run admits only licences for commercial use.")
    territory: str = Field(default="Worldwide", min_length=2, description="ISO 3166-1 alpha-2 code or Worldwide.")
    as_of: dt.date | None = Field(default=None, description="The date rights are judged at; default today. Set it "
                                                            "for re-runs that must stay cached from day to day.")


class SpecFile(BaseModel):
    """The top level of a run spec, as written (stage configs are checked against each stage's model)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    delivery: str | None = Field(default=None, description="The delivery folder (needed when ingest runs).")
    workspace: str | None = None
    purpose: PurposeSpec = PurposeSpec()
    stages: dict[str, dict[str, Any] | None]
    engine: EngineConfig = EngineConfig()


@dataclass(frozen=True)
class RunSpec:
    """A validated run spec: each stage's typed config, in chain order.

    Attributes:
        source: the spec file (or ``"<dict>"``); delivery: absolute path or None; workspace: absolute path.
        stages: stage name → its config model instance, in chain order.
        values: the spec as resolved (JSON-ready), recorded on the whole run's Run; sha256: of ``values``.
    """

    source: str
    delivery: Path | None
    workspace: Path
    purpose: PurposeSpec
    stages: dict[str, BaseModel]
    engine: EngineConfig
    values: dict[str, Any]

    @property
    def sha256(self) -> str:
        return records.sha256_hex(records.canonical_json(self.values))


def load_spec(path: str | os.PathLike[str], overrides: Iterable[str] = (), workspace: str | None = None) -> RunSpec:
    """Read, override and validate the spec at ``path`` (see :func:`parse_spec`).

    Raises:
        ConfigError: the file is missing or not YAML, or anything :func:`parse_spec` rejects.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"run spec {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"run spec {path} is not valid YAML: {err}") from err
    return parse_spec(raw, base_dir=path.resolve().parent, source=str(path), overrides=overrides,
                      workspace=workspace)


def parse_spec(raw: Any, *, base_dir: Path, source: str = "<dict>", overrides: Iterable[str] = (),
               workspace: str | None = None) -> RunSpec:
    """Validate a spec mapping. ``overrides`` are ``--set`` pairs: ``STAGE.KEY=VALUE`` (a stage's config key),
    ``purpose.KEY=VALUE``, ``engine.KEY=VALUE``, or a top-level ``delivery=``/``workspace=``. ``workspace`` (the
    command's ``--workdir``) wins over the spec's.

    Raises:
        ConfigError: one line naming the key and the fix: an unknown top-level or stage key, an unknown stage, stages
            out of chain order, a bad value, a missing delivery.
    """
    if not isinstance(raw, Mapping):
        raise ConfigError(f"run spec {source}: must be a mapping with at least `stages:` (see infra/runs/)")
    values = _with_overrides(dict(raw), overrides)
    stages = values.get("stages")
    if not isinstance(stages, Mapping) or not stages:
        raise ConfigError(f"run spec {source}: `stages:` must map stage names to their configs, e.g. "
                          "`stages: {ingest: {}, shard: {segment_s: 5}}`")
    _check_order(list(stages), source)
    try:
        top = SpecFile(**values)
    except ValidationError as err:
        raise ConfigError(f"run spec {source}: {_problems(err)}") from err
    delivery = _delivery(top, base_dir, source)
    configs = {name: _stage_config(name, top.stages[name] or {}, top.purpose, source) for name in top.stages}
    _check_train_source(configs, source)
    root = Path(workspace or top.workspace or os.environ.get(WORKDIR_ENV) or DEFAULT_WORKDIR).expanduser().resolve()
    resolved = {
        "delivery": str(delivery) if delivery else None, "purpose": top.purpose.model_dump(mode="json"),
        "stages": {name: config.model_dump(mode="json") for name, config in configs.items()},
        "engine": top.engine.model_dump(mode="json"),
    }
    return RunSpec(source, delivery, root, top.purpose, configs, top.engine, resolved)


def pin_spec(spec: RunSpec, workspace: str | None = None) -> dict[str, Any]:
    """``spec`` as a Ray job on a cluster must run it, every value explicit (``linernotes submit SPEC``).

    Each stage's config with its defaults filled (``as_of`` included: today, here), the delivery and the workspace
    as absolute paths, a relative local path in a stage config (:data:`PATH_KEYS`) made absolute, the engine's
    ``beam_options_file`` read into ``beam_options`` (the same flags, in the same order), and no stage key the
    engine owns. :func:`parse_spec` of the result gives the same stage configs as ``spec``; its ``sha256`` is what
    the job's whole-run Run records.

    Args:
        spec: a validated spec (:func:`load_spec`).
        workspace: the workspace as the cluster's nodes see it; default ``spec.workspace``. Either way it must be
            shared storage that every node mounts at that path (the driver writes the lineage store and the
            catalog, the Ray workers write shards and checkpoints, the next stage reads them).

    Raises:
        ConfigError: ``engine.ray_address`` names a cluster: a job joins the cluster it runs on.
    """
    engine = spec.engine
    if engine.ray_address not in (None, "auto"):
        raise ConfigError(f"run spec {spec.source}: engine.ray_address: {engine.ray_address!r}, but a submitted run "
                          "joins the cluster it runs on; drop it (--set engine.ray_address=null)")
    from pipelines.stage import get_stage

    stages = {}
    for name, config in spec.stages.items():
        owned = set(get_stage(name).engine_keys) & ENGINE_OWNED
        values = {k: v for k, v in config.model_dump(mode="json").items() if k not in owned}
        for key in PATH_KEYS.get(name, ()):
            if isinstance(values.get(key), str):
                values[key] = _absolute(values[key], kind_prefix=key == "embedder")
        stages[name] = values
    file_options = read_beam_options_file(engine.beam_options_file) if engine.beam_options_file else []
    return {
        "delivery": str(spec.delivery) if spec.delivery else None,
        "workspace": workspace or str(spec.workspace),
        "purpose": spec.purpose.model_dump(mode="json"),
        "stages": stages,
        "engine": {**engine.model_dump(mode="json"), "beam_options_file": None,
                   "beam_options": [*file_options, *engine.beam_options]},
    }


def _absolute(value: str, kind_prefix: bool = False) -> str:
    """``value`` with a relative path that exists here made absolute; a URI (``s3://``), a name or an absolute path
    as it is. ``kind_prefix``: the path follows ``KIND:`` (``clap:models/clap``)."""
    kind, sep, path = value.partition(":") if kind_prefix else ("", "", value)
    if not sep and kind_prefix:
        return value
    if not path or "://" in path or Path(path).is_absolute() or not Path(path).exists():
        return value
    return f"{kind}{sep}{Path(path).resolve()}"


def _with_overrides(values: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``--set`` pairs to the raw spec (values parsed as YAML, as every ``--set``)."""
    stages = {k: dict(v or {}) if isinstance(v, Mapping) or v is None else v
              for k, v in (values.get("stages") or {}).items()} if isinstance(
        values.get("stages"), Mapping) else values.get("stages")  # a non-mapping value: SpecFile names it
    values = {**values, "stages": stages}
    for dotted, value in parse_overrides(list(overrides)).items():
        head, _, key = dotted.partition(".")
        if not key:
            if head not in SpecFile.model_fields or head == "stages":
                raise ConfigError(f"--set {dotted}: set a stage's key as STAGE.KEY=VALUE (e.g. shard.segment_s=5), or "
                                  f"one of {', '.join(k for k in SpecFile.model_fields if k != 'stages')}")
            values[head] = value
        elif head in ("purpose", "engine"):
            values[head] = {**dict(values.get(head) or {}), key: value}
        elif isinstance(stages, dict) and isinstance(stages.get(head), dict):
            stages[head][key] = value
        elif head in RUN_CHAIN:
            raise ConfigError(f"--set {dotted}: the spec does not run {head}; add `{head}: {{}}` under `stages:`")
        else:
            raise ConfigError(f"--set {dotted}: no stage {head!r} in a run; the stages are {', '.join(RUN_CHAIN)}")
    return values


def _check_order(names: list[str], source: str) -> None:
    for name in names:
        if name not in RUN_CHAIN:
            raise ConfigError(f"run spec {source}: stages.{name}: no such stage in a run; the stages, in chain order, "
                              f"are {', '.join(RUN_CHAIN)}")
    for earlier, later in zip(names, names[1:]):
        if RUN_CHAIN.index(later) < RUN_CHAIN.index(earlier):
            raise ConfigError(f"run spec {source}: stages.{later} is listed after stages.{earlier}, but {later} comes "
                              f"before it in the chain; list the stages in chain order: {', '.join(RUN_CHAIN)}")


def _check_train_source(configs: Mapping[str, BaseModel], source: str) -> None:
    """``train.source: stems`` needs stem members: refuse a spec whose own shard stage writes none, before any work
    (a spec without shard is checked when train resolves its dataset)."""
    train, shard = configs.get("train"), configs.get("shard")
    if train is not None and shard is not None and getattr(train, "source", "mixture") == "stems" and \
            not getattr(shard, "stems", False):
        raise ConfigError(f"run spec {source}: stages.train.source: 'stems' needs stem members, but stages.shard "
                          "writes none; shard with `stems: true` (stages.shard.stems: true) or train with source: "
                          "mixture")


def _delivery(top: SpecFile, base_dir: Path, source: str) -> Path | None:
    if top.delivery is None:
        if "ingest" in top.stages:
            raise ConfigError(f"run spec {source}: delivery: missing; ingest needs the delivery folder "
                              "(`delivery: PATH`, relative to the spec's folder)")
        return None
    path = Path(top.delivery).expanduser()
    path = path if path.is_absolute() else (base_dir / path)
    if not path.is_dir():
        raise ConfigError(f"run spec {source}: delivery: no folder at {path} (a relative path is read from the "
                          "spec's folder)")
    return path.resolve()


def _stage_config(name: str, values: Mapping[str, Any], purpose: PurposeSpec, source: str) -> BaseModel:
    from pipelines.stage import get_stage

    stage = get_stage(name)
    model = stage.config_model
    values = dict(values)
    engine = sorted(set(values) & set(stage.engine_keys) & ENGINE_OWNED)
    if engine:  # one engine serves the whole run: a stage's own Ray address, CPUs or Beam options would be ignored
        raise ConfigError(f"run spec {source}: stages.{name}.{engine[0]}: an engine setting; in a run spec it goes "
                          f"under `engine:` ({', '.join(EngineConfig.model_fields)})")
    if name == "ingest":  # the purpose is the run's; the ingest config may still say otherwise, explicitly
        values.setdefault("purpose", "commercial" if purpose.commercial else "non-commercial")
        values.setdefault("territory", purpose.territory)
        if purpose.as_of is not None:
            values.setdefault("as_of", purpose.as_of)
    try:
        return model(**values)
    except ValidationError as err:
        raise ConfigError(f"run spec {source}: {_problems(err, prefix=f'stages.{name}.')}"
                          f" (the keys of {name}: `linernotes stages --json`)") from err


def _problems(err: ValidationError, prefix: str = "") -> str:
    parts = []
    for error in err.errors():
        key = prefix + ".".join(str(p) for p in error["loc"])
        message = "unknown key" if error["type"] == "extra_forbidden" else error["msg"]
        parts.append(f"{key}: {message}")
    return "; ".join(parts)
