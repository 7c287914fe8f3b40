"""The HTTP API (FastAPI TestClient): queries, uploads, opt-outs and takedowns; writes need the bearer token;
unauthenticated writes and malformed requests get clear 4xx answers and change nothing."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf
from fastapi.testclient import TestClient

from pipelines.api.app import create_app
from provenance.store import LineageStore
from provenance.workspace import Workspace
from tests.pipelines.attributed_workspace import make_attributed_workspace
from tests.provenance.lineage_graph import build_graph
from tests.training.conftest import MEL_CONFIG, segment_audio

TOKEN = "s3cret-token-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def attributed(tmp_path_factory):
    return make_attributed_workspace(tmp_path_factory.mktemp("api") / "work")


@pytest.fixture(scope="module")
def client(attributed):
    with TestClient(create_app(attributed.workspace, token=TOKEN)) as client:
        yield client


def wav_bytes(audio: np.ndarray, sample_rate_hz: int) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, audio.T, sample_rate_hz, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def opt_outs(workspace: Workspace) -> list[dict]:
    store = LineageStore(workspace.store_url)
    try:
        return store.list_opt_outs()
    finally:
        store.close()


def test_openapi_spec_documents_every_endpoint_and_the_bearer_scheme(client):
    spec = client.get("/openapi.json").json()
    assert {"/health", "/lineage/{entity_id}", "/generations/{generation_id}/attribution", "/attribute",
            "/opt-outs", "/takedown", "/attributions/{query_id}", "/generations/{generation_id}/report"} <= set(spec["paths"])
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    for path, method in (("/attribute", "post"), ("/opt-outs", "post"), ("/takedown", "post")):
        assert spec["paths"][path][method]["security"] == [{"HTTPBearer": []}]
    assert "security" not in spec["paths"]["/lineage/{entity_id}"]["get"]
    assert client.get("/health").json()["store_backend"] == "sqlite"


def test_generation_attribution_and_lineage(client, attributed):
    got = client.get(f"/generations/{attributed.generation_id}/attribution")
    assert got.status_code == 200
    body = got.json()
    assert body["generation"]["checkpoint_id"] == "ckpt-tiny" and body["methods"] == ["embedding"]
    assert [s["rank"] for s in body["segments"]] == [1, 2, 3, 4, 5]
    assert body["segments"][0]["track_id"] == "t-mid"  # the generation is t-mid's audio plus noise
    assert sum(t["share"] for t in body["tracks"]) == pytest.approx(1.0)
    assert sum(h["share"] for h in body["rights_holders"]) == pytest.approx(1.0)
    assert body["tracks"][0]["license_name"] == "Test Training Licence"

    lineage = client.get(f"/lineage/{attributed.generation_id}").json()
    assert lineage["kind"] == "generation" and lineage["dataset"]["dataset_id"] == attributed.dataset_id
    assert {r["rights_holder"] for r in lineage["rights_holders"]} >= {"Low Records", "Noise Ltd"}
    track = client.get("/lineage/t-mid", params={"kind": "track"}).json()
    assert [g["generation_id"] for g in track["generations"]] == [attributed.generation_id]


def test_queries_with_unknown_ids_or_bad_parameters_are_4xx(client, attributed):
    missing = client.get("/lineage/no-such-id")
    assert missing.status_code == 404 and "no-such-id" in missing.json()["detail"]
    assert client.get("/lineage/t-mid", params={"kind": "album"}).status_code == 422
    no_gen = client.get("/generations/gen-nope/attribution")
    assert no_gen.status_code == 404 and "gen-nope" in no_gen.json()["detail"]
    other_method = client.get(f"/generations/{attributed.generation_id}/attribution", params={"method": "dtrak"})
    assert other_method.status_code == 404 and "it has embedding" in other_method.json()["detail"]
    injected = client.get(f"/attributions/{attributed.generation_id}", params={"method": "x'; DROP TABLE runs;--"})
    assert injected.status_code == 422
    assert client.get("/attributions/pcm-unknown").status_code == 404


def test_writes_without_a_valid_token_are_refused_and_change_nothing(client, attributed, tmp_path):
    body = {"kind": "rights_holder", "value": "Noise Ltd"}
    no_token = client.post("/opt-outs", json=body)
    assert no_token.status_code == 401 and no_token.headers["WWW-Authenticate"].startswith("Bearer")
    assert "Authorization: Bearer" in no_token.json()["detail"]
    wrong = client.post("/opt-outs", json=body, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["detail"] == "invalid bearer token"
    assert client.post("/opt-outs", json=body, headers={"Authorization": f"Basic {TOKEN}"}).status_code == 401
    assert client.post("/takedown", json=body).status_code == 401
    upload = client.post("/attribute", files={"file": ("x.wav", wav_bytes(np.zeros((1, 16000), np.float32), 16000))})
    assert upload.status_code == 401
    assert opt_outs(attributed.workspace) == []

    with TestClient(create_app(Workspace.at(tmp_path / "ro"), token=None)) as read_only:
        refused = read_only.post("/opt-outs", json=body, headers=AUTH)
        assert refused.status_code == 403 and "LINERNOTES_API_TOKEN" in refused.json()["detail"]
        assert read_only.get("/opt-outs").json() == {"opt_outs": []}


@pytest.mark.parametrize("body", [
    {"kind": "label", "value": "x"},                      # unknown kind
    {"kind": "isrc"},                                     # missing value
    {"kind": "track_id", "value": "   "},                 # blank value
    {"kind": "track_id", "value": "t", "extra": 1},        # unknown field
    {"kind": "track_id", "value": "t" * 301},             # too long
])
def test_malformed_opt_outs_are_422(client, attributed, body):
    answer = client.post("/opt-outs", json=body, headers=AUTH)
    assert answer.status_code == 422 and answer.json()["detail"]
    assert opt_outs(attributed.workspace) == []


def test_invalid_json_is_422(client):
    answer = client.post("/opt-outs", content=b"{not json", headers={**AUTH, "Content-Type": "application/json"})
    assert answer.status_code == 422


def test_upload_attribution_round_trip_and_bad_uploads(client, attributed, tmp_path):
    audio = segment_audio("noise", 0.0, 0, np.random.default_rng(5), MEL_CONFIG.sample_rate_hz)
    answer = client.post("/attribute", headers=AUTH, data={"top_k": "3"},
                         files={"file": ("query.wav", wav_bytes(audio, MEL_CONFIG.sample_rate_hz), "audio/wav")})
    assert answer.status_code == 200, answer.text
    result = answer.json()
    assert result["query_id"].startswith("pcm-") and len(result["segments"]) == 3
    assert result["segments"][0]["track_id"] == "t-noise"
    stored = client.get(f"/attributions/{result['query_id']}").json()
    assert [s["segment_id"] for s in stored["segments"]] == [s["segment_id"] for s in result["segments"]]

    not_audio = client.post("/attribute", headers=AUTH, files={"file": ("notes.wav", b"RIFF....garbage", "audio/wav")})
    assert not_audio.status_code == 422 and "not decodable audio" in not_audio.json()["detail"]
    empty = client.post("/attribute", headers=AUTH, files={"file": ("empty.wav", b"", "audio/wav")})
    assert empty.status_code == 422 and "empty" in empty.json()["detail"]
    assert client.post("/attribute", headers=AUTH, data={"top_k": "3"}).status_code == 422  # no file
    bad_k = client.post("/attribute", headers=AUTH, data={"top_k": "0"},
                        files={"file": ("q.wav", wav_bytes(audio, 16000), "audio/wav")})
    assert bad_k.status_code == 422
    bad_method = client.post("/attribute", headers=AUTH, data={"method": "nosuchmethod"},
                             files={"file": ("q.wav", wav_bytes(audio, 16000), "audio/wav")})
    assert bad_method.status_code == 422 and "nosuchmethod" in bad_method.json()["detail"]
    with TestClient(create_app(attributed.workspace, token=TOKEN, max_upload_bytes=1000)) as small:
        too_big = small.post("/attribute", headers=AUTH, files={"file": ("q.wav", wav_bytes(audio, 16000))})
        assert too_big.status_code == 413
    with TestClient(create_app(Workspace.at(tmp_path / "empty"), token=TOKEN)) as fresh:
        no_dataset = fresh.post("/attribute", headers=AUTH, files={"file": ("q.wav", wav_bytes(audio, 16000))})
        assert no_dataset.status_code == 409 and "linernotes shard" in no_dataset.json()["detail"]


def test_report_and_its_files_are_served(client, attributed):
    redirect = client.get(f"/generations/{attributed.generation_id}/report", follow_redirects=False)
    assert redirect.status_code == 307
    assert redirect.headers["location"] == f"/files/generations/{attributed.generation_id}/report.html"
    page = client.get(f"/generations/{attributed.generation_id}/report")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "report_files/segment-001.wav" in page.text
    base = f"/files/generations/{attributed.generation_id}"
    wav = client.get(f"{base}/report_files/segment-001.wav")
    assert wav.status_code == 200 and wav.content[:4] == b"RIFF"
    assert client.get(f"{base}/generation.wav").status_code == 200
    assert client.get("/files/generations/../lineage.sqlite").status_code == 404
    assert client.get("/generations/gen-nope/report").status_code == 404


def test_opt_out_then_takedown_with_token(client, attributed):
    first = client.post("/opt-outs", json={"kind": "isrc", "value": "us-s1z-99-00001", "reason": "r"}, headers=AUTH)
    assert first.status_code == 201 and first.json()["value"] == "USS1Z9900001"
    again = client.post("/opt-outs", json={"kind": "isrc", "value": "USS1Z9900001"}, headers=AUTH)
    assert again.status_code == 200 and again.json()["added"] is False

    taken = client.post("/takedown", json={"kind": "rights_holder", "value": "Mid & Co <Publishing>"}, headers=AUTH)
    assert taken.status_code == 200, taken.text
    body = taken.json()
    assert [t["track_id"] for t in body["tracks"]] == ["t-chord", "t-mid"]
    assert [d["dataset_id"] for d in body["datasets"]] == [attributed.dataset_id]
    assert [c["checkpoint_id"] for c in body["checkpoints"]] == ["ckpt-tiny"]
    assert [g["generation_id"] for g in body["generations"]] == [attributed.generation_id]
    assert {a["track_id"] for a in body["attributions"]} >= {"t-mid"} and body["rebuilt"] == []
    kinds = {(o["kind"], o["value"]) for o in client.get("/opt-outs").json()["opt_outs"]}
    assert kinds == {("isrc", "USS1Z9900001"), ("rights_holder", "Mid & Co <Publishing>")}
    assert client.get("/lineage/t-mid").json()["opted_out"]


def test_lineage_endpoint_on_both_backends(store_url, tmp_path):
    workspace = Workspace.at(tmp_path / "work", store_url=store_url)
    store = LineageStore(store_url)
    build_graph(store)
    store.close()
    with TestClient(create_app(workspace, token=TOKEN)) as client:
        assert client.get("/health").json()["store_backend"] == store_url.split(":")[0].split("+")[0]
        found = client.get("/lineage/t2").json()
        assert [d["dataset_id"] for d in found["datasets"]] == ["ds-a", "ds-b", "ds-c"]
        assert client.get("/generations/gen-1/attribution").json()["tracks"][0]["track_id"] == "t1"
        assert client.post("/opt-outs", json={"kind": "track_id", "value": "t4"}, headers=AUTH).status_code == 201
        assert client.get("/lineage/t4").json()["opted_out"] == "track t4 is opted out"


def test_linernotes_serve_starts_the_api(tmp_path):
    """`linernotes serve` as a process: it answers reads, and refuses writes without the token."""
    import os
    import socket
    import subprocess
    import sys
    import time

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "LINERNOTES_API_TOKEN": TOKEN}
    env.pop("LINERNOTES_STORE_URL", None)
    process = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "serve", "--port", str(port),
                                "--workdir", str(tmp_path / "work")], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None, process.stdout.read().decode()
            assert time.monotonic() < deadline, "linernotes serve did not answer within 180 s"
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=10)
                break
            except httpx.TransportError:
                time.sleep(0.5)
        assert health.json()["status"] == "ok"
        refused = httpx.post(f"http://127.0.0.1:{port}/takedown", json={"kind": "track_id", "value": "t"}, timeout=60)
        assert refused.status_code == 401
        allowed = httpx.post(f"http://127.0.0.1:{port}/opt-outs", json={"kind": "track_id", "value": "t"},
                             headers=AUTH, timeout=60)
        assert allowed.status_code == 201
        assert httpx.get(f"http://127.0.0.1:{port}/opt-outs", timeout=60).json()["opt_outs"][0]["value"] == "t"
    finally:
        process.terminate()
        process.wait(timeout=30)
