"""`bloodcell serve`: the HTTP API answers like `predict --json`, in-process and as a real server."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import httpx
from fastapi.testclient import TestClient

import bloodcell
from bloodcell.serve import create_app
from tests.cli import call_cli


def test_predict_endpoint_matches_predict_files_and_reports_bad_uploads(synthetic_run, cell_images):
    classifier = bloodcell.load(synthetic_run)
    client = TestClient(create_app(classifier))
    health = client.get("/health").json()
    assert health["status"] == "ok" and tuple(health["classes"]) == classifier.classes and health["image_size"] == 28

    paths = cell_images + cell_images[:2]
    files = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in paths]
    files.append(("files", ("notes.png", b"not an image", "image/png")))
    response = client.post("/predict", files=files, params={"tta": "true"})
    assert response.status_code == 200
    payload = response.json()
    expected = classifier.predict_files(paths, tta=True)
    assert [r["class"] for r in payload["records"][:5]] == [r["class"] for r in expected]
    assert [r["probability"] for r in payload["records"][:5]] == [r["probability"] for r in expected]
    assert payload["records"][5]["path"] == "notes.png" and "not an image" in payload["records"][5]["error"]
    assert payload["summary"]["classified"] == 5 and payload["summary"]["failed"] == 1

    assert client.post("/predict", params={"min_confidence": 2}, files=files[:1]).status_code == 422
    assert client.post("/predict").status_code == 422  # no files


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_command_answers_http_requests(real_run, pbc_sample):
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "bloodcell", "serve", str(real_run), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stderr.read()
            try:
                httpx.get(f"{url}/health").raise_for_status()
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "server did not start within 120 s"
                time.sleep(0.5)
        sample = pbc_sample[0]
        files = {"files": (sample["path"].name, sample["path"].read_bytes(), "image/jpeg")}
        record = httpx.post(f"{url}/predict", files=files, timeout=60).json()["records"][0]
        expected = bloodcell.load(real_run).predict_files([sample["path"]])[0]
        assert record["error"] is None and record["class"] == expected["class"]
        assert record["probability"] == expected["probability"]
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_serve_refuses_a_folder_that_is_not_a_run(tmp_path):
    result = call_cli("serve", tmp_path, check=False)
    assert result.returncode == 1 and "not a bloodcell run directory" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
