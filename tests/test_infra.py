"""Every YAML under infra/ loads into its stage's typed config (unknown keys would fail)."""

from pathlib import Path

import pytest

from pipelines.config import load_config
from pipelines.ingest import IngestConfig
from pipelines.shard import ShardConfig
from training.config import TrainConfig

INFRA = Path(__file__).resolve().parents[1] / "infra"
MODELS = {"beam": IngestConfig, "shard": ShardConfig, "train": TrainConfig}


@pytest.mark.parametrize("path", sorted(p for p in INFRA.rglob("*.yaml") if p.parent.name != "kuberay"),
                         ids=lambda p: str(p.relative_to(INFRA)))  # kuberay/: tests/training/test_submit.py
def test_infra_yaml_loads(path):
    key = "beam" if path.parent.name == "beam" else path.stem.split("-")[0]
    config = load_config(MODELS[key], path)
    if key == "beam":
        assert config.beam_options and config.beam_options[0].startswith("--runner=")
