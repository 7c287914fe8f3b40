"""Every YAML under infra/ loads into its stage's typed config (unknown keys would fail)."""

from pathlib import Path

import pytest

from pipelines.stages.clean import CleanConfig
from pipelines.experiments.clean_evaluate import EvaluateConfig
from pipelines.config import load_config
from pipelines.stages.ingest.stage import IngestConfig
from pipelines.stages.shard.stage import ShardConfig
from training.config import TrainConfig

INFRA = Path(__file__).resolve().parents[1] / "infra"
MODELS = {"beam": IngestConfig, "shard": ShardConfig, "train": TrainConfig, "clean": CleanConfig,
          "clean-evaluate": EvaluateConfig}


# kuberay/: tests/training/test_submit.py; runs/ (run specs): tests/pipelines/test_run_spec.py; dagster/ (instance
# configs): tests/pipelines/test_orchestration.py
@pytest.mark.parametrize("path", sorted(p for p in INFRA.rglob("*.yaml")
                                        if p.parent.name not in ("kuberay", "runs", "dagster")),
                         ids=lambda p: str(p.relative_to(INFRA)))
def test_infra_yaml_loads(path):
    key = "beam" if path.parent.name == "beam" else path.stem.split("-")[0]
    if path.stem.startswith("clean-evaluate"):
        key = "clean-evaluate"
    # clean run takes its trusted reference set on the command line (--reference-track), as the file says
    defaults = {"reference_tracks": ["reference-track"]} if key == "clean" else {}
    config = load_config(MODELS[key], path, **defaults)
    if key == "beam":
        assert config.beam_options and config.beam_options[0].startswith("--runner=")
