"""The engines: the Beam part (runner and pipeline options from the engine config, ``apache_beam`` imported only
when a pipeline is built). The Ray part is tested with the stage contract (tests/pipelines/test_stage.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from pipelines.engines import Engine, EngineConfig

ROOT = Path(__file__).resolve().parents[2]
FLINK = ROOT / "infra" / "beam" / "flink.yaml"


def test_the_direct_runner_by_default():
    from apache_beam.options.pipeline_options import DirectOptions, StandardOptions

    options = Engine().beam_options()
    assert Engine().beam_flags() == ["--runner=DirectRunner"]
    assert options.view_as(StandardOptions).runner == "DirectRunner"
    assert options.view_as(DirectOptions).direct_num_workers == 1


def test_runner_options_from_a_file_then_flags_the_later_winning():
    from apache_beam.options.pipeline_options import PortableOptions, StandardOptions

    engine = Engine(EngineConfig(beam_options_file=str(FLINK), beam_options=("--environment_type=DOCKER",)))
    options = engine.beam_options()
    assert options.view_as(StandardOptions).runner == "FlinkRunner"  # the file's --runner= wins over the default
    assert options.view_as(PortableOptions).environment_type == "DOCKER"  # beam_options win over the file's
    assert engine.beam_flags()[0] == "--runner=DirectRunner" and engine.beam_flags()[-1] == "--environment_type=DOCKER"
    other = Engine(EngineConfig(beam_runner="SparkRunner")).beam_options()
    assert other.view_as(StandardOptions).runner == "SparkRunner"


def test_a_bad_options_file_fails_when_the_config_is_made(tmp_path):
    with pytest.raises(ValidationError, match="does not exist"):
        EngineConfig(beam_options_file=str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("runner: FlinkRunner\n")
    with pytest.raises(ValidationError, match="beam_options"):
        EngineConfig(beam_options_file=str(bad))


def test_engine_settings_import_no_engine_library_until_used():
    code = ("import sys; from pipelines.engines import Engine, EngineConfig\n"
            f"e = Engine(EngineConfig(beam_options_file={str(FLINK)!r})); e.beam_flags(); e.describe()\n"
            "assert 'apache_beam' not in sys.modules and 'ray' not in sys.modules\n"
            "e.beam_options(); assert 'apache_beam' in sys.modules; print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.stdout.strip() == "ok", done.stderr[-2000:]
