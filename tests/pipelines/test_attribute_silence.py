"""Silence is not evidence (issue 17, item 6): a query below the silence floor gets no ranking and no shares, with the
reason, from the stage, the CLI (as a process), the HTTP API and the report; and no method's all-zero, all-equal or
undefined scores are shared out."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from fastapi.testclient import TestClient

from pipelines.api.app import create_app
from pipelines.attribution.attribute import run_attribute, silent_query_reason
from pipelines.attribution.config import AttributeConfig
from pipelines.lineage.report import build_report
from provenance.store import LineageStore
from provenance.workspace import STORE_URL_ENV
from tests.pipelines.attributed_workspace import make_attributed_workspace
from tests.training.conftest import MEL_CONFIG

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "silence-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SILENT_DETAIL = "peak -inf dBFS is below the floor of -60 dBFS"


@pytest.fixture(scope="module")
def attributed(tmp_path_factory):
    return make_attributed_workspace(tmp_path_factory.mktemp("silence") / "work")


def zeros(duration_s: float = 2.0, channels: int = 1) -> np.ndarray:
    """Digital silence, float32 ``(channels, samples)`` at the test dataset's rate."""
    return np.zeros((channels, int(duration_s * MEL_CONFIG.sample_rate_hz)), dtype=np.float32)


def wav_bytes(audio: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, audio.T, MEL_CONFIG.sample_rate_hz, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def stored(workspace, query_id: str) -> list[dict]:
    with LineageStore(workspace.store_url) as store:
        return store.get_attributions(query_id)


def run_record(workspace, run_id: str) -> dict:
    with LineageStore(workspace.store_url) as store:
        return store.get_run(run_id)


def assert_silent_answer(payload: dict) -> None:
    assert payload["no_attribution"] == {"reason": "silent_query", "detail": SILENT_DETAIL}
    assert payload["segments"] == payload["tracks"] == payload["rights_holders"] == []
    assert payload["counts"] == {"segments": 0, "tracks": 0, "rights_holders": 0,
                                 "no_attribution": {"silent_query": 1}}


def test_the_floor_is_a_config_key_with_shards_default():
    assert AttributeConfig().silence_floor_dbfs == -60.0
    with pytest.raises(ValueError, match="silence_floor_dbfs"):
        AttributeConfig(silence_floor_dbfs=6.0)


@pytest.mark.parametrize(("peak", "floor", "silent"), [(0.0, -60.0, True), (10 ** (-70 / 20), -60.0, True),
                                                      (10 ** (-50 / 20), -60.0, False), (0.5, -60.0, False),
                                                      (10 ** (-70 / 20), -80.0, False)])
def test_silent_query_reason_compares_the_sample_peak_with_the_floor(peak, floor, silent):
    t = np.arange(16000) / 16000
    audio = (peak * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None]
    audio[0, 4000] = peak  # the sine's samples may miss its crest
    why = silent_query_reason(audio, floor)
    assert (why is not None) == silent
    if silent:
        assert why.reason == "silent_query" and f"below the floor of {floor:g} dBFS" in why.detail
    assert silent_query_reason(zeros(), -60.0).detail == SILENT_DETAIL


def test_cli_attribute_of_silence_as_a_process_gives_no_shares(attributed, tmp_path):
    """`linernotes attribute silence.wav --json`: one object with the reason and no shares; nothing stored; the Run
    succeeded. Without --json: one line that says so."""
    silence = tmp_path / "silence.wav"
    silence.write_bytes(wav_bytes(zeros(2.0, channels=2)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "COLUMNS": "100"}
    env.pop(STORE_URL_ENV, None)
    linernotes = Path(sys.executable).with_name("linernotes")
    command = [str(linernotes), "attribute", str(silence), "--workdir", str(attributed.workspace.root)]
    done = subprocess.run([*command, "--json"], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, done.stdout
    payload = json.loads(lines[0])
    assert_silent_answer(payload)
    assert payload["status"] == "ran" and payload["query_id"].startswith("pcm-")
    assert stored(attributed.workspace, payload["query_id"]) == []
    assert run_record(attributed.workspace, payload["run_id"])["status"] == "succeeded"

    rendered = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert rendered.returncode == 0, rendered.stderr[-3000:]
    lines = [line for line in rendered.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, rendered.stdout
    assert "nothing to attribute" in lines[0] and "silent_query" in lines[0] and SILENT_DETAIL in lines[0]
    assert "%" not in lines[0]


def test_api_attribute_of_silence_is_200_with_the_reason_and_no_shares(attributed):
    with TestClient(create_app(attributed.workspace, token=TOKEN)) as client:
        answer = client.post("/attribute", headers=AUTH, data={"top_k": "5"},
                             files={"file": ("silence.wav", wav_bytes(zeros(3.0)), "audio/wav")})
        assert answer.status_code == 200, answer.text
        payload = answer.json()
        assert_silent_answer(payload)
        assert stored(attributed.workspace, payload["query_id"]) == []
        assert run_record(attributed.workspace, payload["run_id"])["status"] == "succeeded"

        again = client.get(f"/attributions/{payload['query_id']}")
        assert again.status_code == 200, again.text
        body = again.json()
        assert body["no_attribution"] == {"reason": "silent_query", "detail": SILENT_DETAIL}
        assert body["segments"] == body["tracks"] == body["rights_holders"] == []

        # the white-box methods are refused the same way, before any model is loaded
        dtrak = client.post("/attribute", headers=AUTH, data={"method": "dtrak"},
                            files={"file": ("silence.wav", wav_bytes(zeros(3.0)), "audio/wav")})
        assert dtrak.status_code == 200, dtrak.text
        assert dtrak.json()["no_attribution"]["reason"] == "silent_query"

        # a sound still gets its ranking and shares
        noisy = client.post("/attribute", headers=AUTH, data={"top_k": "3"}, files={"file": (
            "noise.wav", wav_bytes(0.3 * np.random.default_rng(3).standard_normal((1, 32000)).astype(np.float32)),
            "audio/wav")})
        assert noisy.status_code == 200 and noisy.json()["no_attribution"] is None
        assert sum(h["share"] for h in noisy.json()["rights_holders"]) == pytest.approx(1.0)


def test_a_silent_generation_replaces_earlier_rows_and_its_report_says_nothing_to_attribute(attributed):
    workspace, generation_id = attributed.workspace, "gen-0000000silence"
    with LineageStore(workspace.store_url) as store:
        from cleaning.audio import write_audio

        wav = write_audio(workspace.generation_dir(generation_id) / "generation.wav", zeros(),
                          MEL_CONFIG.sample_rate_hz, subtype="PCM_16")
        store.add_generation({"generation_id": generation_id, "checkpoint_id": "ckpt-tiny", "run_id": "r",
                              "prompt": "nothing", "conditioning": "{}", "seed": 0, "sampler": "ddim-50",
                              "duration_s": 2.0, "uri": str(wav)})
        store.add_attributions(generation_id, "embedding", "r", attributed.dataset_id, [  # a stale pre-fix answer
            {"segment_id": "t-mid@0", "rank": 1, "score": 0.0, "track_id": "t-mid",
             "rights_holder": "Mid & Co <Publishing>", "share": 1.0}])
    job = run_attribute(workspace, zeros(), MEL_CONFIG.sample_rate_hz, generation_id, dataset_id=attributed.dataset_id)
    assert job.result.no_attribution.reason == "silent_query" and job.result.rows() == []
    assert stored(workspace, generation_id) == []

    payload = build_report(workspace, generation_id)
    assert payload["no_attribution"] == {"reason": "silent_query", "detail": SILENT_DETAIL}
    assert payload["segments"] == 0
    html = Path(payload["report"]).read_text()
    assert "Nothing to attribute" in html and "silent_query" in html and SILENT_DETAIL in html
    assert "shares-table" not in html and "Mid &amp; Co" not in html


def test_any_methods_unshareable_scores_give_no_shares_through_the_stage(attributed, monkeypatch):
    """A non-silent query whose method scores every segment the same: the Run succeeds, stores nothing, says why."""
    from pipelines.attribution import methods
    from provenance.attribution import ScoredSegment, aggregate

    class FlatMethod:
        method, dataset_id = "embedding", attributed.dataset_id

        def attribute(self, audio, sample_rate_hz, query_id, top_k=10, text=""):
            ranked = [ScoredSegment(f"t-mid@{i}", "t-mid", 0.5) for i in range(3)]
            return aggregate(ranked, {"t-mid": {"rights_holder": "Mid"}}, method="embedding", query_id=query_id,
                             dataset_id=self.dataset_id)

    monkeypatch.setattr(methods, "load_attributor", lambda *args, **kwargs: FlatMethod())
    audio = 0.3 * np.random.default_rng(7).standard_normal((1, 16000)).astype(np.float32)
    job = run_attribute(attributed.workspace, audio, MEL_CONFIG.sample_rate_hz, "pcm-flat-scores",
                        dataset_id=attributed.dataset_id)
    assert job.result.no_attribution.reason == "scores_all_equal"
    assert job.stage_result.counts["no_attribution"] == {"scores_all_equal": 1}
    assert stored(attributed.workspace, "pcm-flat-scores") == []
