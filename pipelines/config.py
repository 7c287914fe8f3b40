"""Stage configs from YAML files and ``key=value`` overrides, validated before any work starts.

Every stage config is a frozen pydantic model that forbids unknown keys; a bad key or value raises
``ConfigError`` naming the key and what it accepts.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError


ConfigT = TypeVar("ConfigT", bound=BaseModel)


class ConfigError(ValueError):
    """A config key or value is wrong; the message names the key."""


def parse_overrides(pairs: Iterable[str]) -> dict[str, Any]:
    """``["steps=100", "channel_mults=[1,2]"]`` → ``{"steps": 100, "channel_mults": [1, 2]}`` (values as YAML)."""
    overrides: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {pair!r} is not key=value")
        overrides[key.strip()] = yaml.safe_load(value) if value.strip() else None
    return overrides


def load_config(model: type[ConfigT], path: str | Path | None = None, overrides: Mapping[str, Any] | None = None,
                /, **defaults: Any) -> ConfigT:
    """Build ``model`` from ``defaults`` (e.g. CLI options), then a YAML file, then overrides (last wins).

    ``None`` values in ``defaults`` are ignored so unset CLI options keep the model's defaults. The first three
    parameters are positional-only, so a config may have keys named ``model``, ``path`` or ``overrides``.

    Raises:
        ConfigError: the file is missing or not a mapping, or a key is unknown or a value invalid.
    """
    values: dict[str, Any] = {k: v for k, v in defaults.items() if v is not None}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys to values")
        values.update(loaded)
    values.update(overrides or {})
    try:
        return model(**values)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(config)'}: {e['msg']}" for e in err.errors())
        raise ConfigError(f"{model.__name__}: {problems}") from err


def config_dict(config: BaseModel) -> dict[str, Any]:
    return json.loads(config.model_dump_json())

