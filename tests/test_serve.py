"""`bloodcell serve`: the API answers like `predict --json`, its limits hold, and (slow lane) a real
server answers HTTP requests while abuse is going on."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time

import httpx
import pytest
from fastapi.testclient import TestClient

import bloodcell
from bloodcell.app.serve import Admission, ServeLimits, create_app, is_loopback
from tests.cli import call_cli, free_port


@pytest.fixture(scope="module")
def client(synthetic_run):
    return TestClient(create_app(bloodcell.load(synthetic_run), limits=ServeLimits(max_request_bytes=2 * 2**20)))


def _files(paths):
    return [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in paths]


def test_a_server_restricted_to_some_classes_says_so_and_answers_among_them(synthetic_run, cell_images):
    restricted = bloodcell.load(synthetic_run).restricted_to(["lymphocyte", "monocyte"])
    client = TestClient(create_app(restricted))
    assert client.get("/health").json()["answerable"] == ["lymphocyte", "monocyte"]
    records = client.post("/predict", files=_files(cell_images)).json()["records"]
    assert [r["class"] for r in records] == [r["class"] for r in restricted.predict_files(cell_images)]
    assert {r["class"] for r in records} <= {"lymphocyte", "monocyte"}


def test_predict_endpoint_matches_predict_files_and_reports_bad_uploads(client, synthetic_run, cell_images):
    classifier = bloodcell.load(synthetic_run)
    health = client.get("/health").json()
    assert health["status"] == "ok" and tuple(health["classes"]) == classifier.classes and health["image_size"] == 28

    files = _files(cell_images) + [("files", ("notes.png", b"not an image", "image/png"))]
    response = client.post("/predict", files=files, params={"tta": "true"})
    assert response.status_code == 200
    payload = response.json()
    expected = classifier.predict_files(cell_images, tta=True)
    got = payload["records"][: len(cell_images)]
    assert [r["class"] for r in got] == [r["class"] for r in expected]
    assert [r["probability"] for r in got] == [r["probability"] for r in expected]
    assert payload["records"][-1]["path"] == "notes.png" and "not an image" in payload["records"][-1]["error"]
    assert payload["summary"]["classified"] == len(cell_images) and payload["summary"]["failed"] == 1
    assert client.post("/predict", params={"min_confidence": 2}, files=files[:1]).status_code == 422
    assert client.post("/predict").status_code == 422  # no files


def test_explain_returns_the_overlay(client, cell_images):
    response = client.post("/explain", files=_files(cell_images[:1]))
    body = response.json()
    assert response.status_code == 200 and body["overlay"].startswith("data:image/png;base64,")
    assert body["explained_class"] == body["record"]["class"]
    assert client.post("/explain", files=_files(cell_images[:2])).status_code == 422


def test_page_and_docs_are_served_from_the_package(client):
    page = client.get("/")
    assert page.status_code == 200 and "/static/app.js" in page.text and "http" not in page.text.split("<body>")[1]
    assert client.get("/static/app.js").status_code == 200
    docs = client.get("/docs").text
    assert "/docs-assets/swagger-ui-bundle.js" in docs and "cdn" not in docs.lower()
    assert client.get("/docs-assets/swagger-ui-bundle.js").status_code == 200


def test_limits_hold_while_reading(client, cell_images):
    oversized = [("files", ("big.jpg", b"x" * (3 * 2**20), "image/jpeg"))]
    response = client.post("/predict", files=oversized)
    assert response.status_code == 413 and "/" not in response.json()["detail"].split("larger")[0]
    declared = client.post("/predict", content=b"x", headers={"content-length": str(10**10)})
    assert declared.status_code == 413
    assert (
        client.post("/predict", files=_files(cell_images[:1]), headers={"Origin": "http://elsewhere"}).status_code
        == 403
    )


def test_a_token_guards_the_api_but_not_the_page(synthetic_run, cell_images):
    guarded = TestClient(create_app(bloodcell.load(synthetic_run), token="s3cret"))
    assert guarded.post("/predict", files=_files(cell_images[:1])).status_code == 401
    wrong = {"Authorization": "Bearer guess"}
    assert guarded.post("/predict", files=_files(cell_images[:1]), headers=wrong).status_code == 401
    right = {"Authorization": "Bearer s3cret"}
    assert guarded.post("/predict", files=_files(cell_images[:1]), headers=right).status_code == 200
    assert guarded.get("/health").json()["token_required"] is True and guarded.get("/").status_code == 200


def test_admission_turns_away_requests_beyond_the_queue():
    from fastapi import HTTPException

    async def scenario():
        admission = Admission(active=1, waiting=1)
        gate = asyncio.Event()

        async def hold():
            async with admission.turn():
                await gate.wait()

        holders = [asyncio.create_task(hold()) for _ in range(2)]
        await asyncio.sleep(0.01)
        with pytest.raises(HTTPException) as refused:
            async with admission.turn():
                pass
        gate.set()
        await asyncio.gather(*holders)
        return refused.value, admission.in_use

    refused, left = asyncio.run(scenario())
    assert refused.status_code == 503 and refused.headers["Retry-After"] == "2" and left == 0


def test_serving_beyond_this_machine_needs_a_token(synthetic_run, monkeypatch):
    monkeypatch.delenv("BLOODCELL_TOKEN", raising=False)
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and not is_loopback("0.0.0.0")
    result = call_cli("serve", synthetic_run, "--host", "0.0.0.0", check=False)
    assert result.returncode == 1 and "needs a token" in result.stderr


def test_serve_refuses_a_folder_that_is_not_a_run(tmp_path):
    result = call_cli("serve", tmp_path, check=False)
    assert result.returncode == 1 and "not a bloodcell run directory" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------- slow lane: a real server


def start_server(run, reviews, *extra) -> tuple[subprocess.Popen, str, int]:
    """A real `bloodcell serve` on a free loopback port, once it answers /health."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "bloodcell", "serve", str(run), "--port", str(port), "--reviews", str(reviews), *extra],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        assert process.poll() is None, process.stderr.read()
        try:
            httpx.get(f"{url}/health").raise_for_status()
            return process, url, port
        except httpx.TransportError:
            assert time.monotonic() < deadline, "server did not start within 120 s"
            time.sleep(0.5)


@pytest.fixture(scope="module")
def server(real_run, tmp_path_factory):
    process, url, port = start_server(real_run, tmp_path_factory.mktemp("reviews"))
    yield url, port
    process.terminate()
    process.wait(timeout=60)


def test_serve_command_answers_http_requests(server, real_run, pbc_sample):
    url, _ = server
    sample = pbc_sample[0]
    files = {"files": (sample["path"].name, sample["path"].read_bytes(), "image/jpeg")}
    record = httpx.post(f"{url}/predict", files=files, timeout=60).json()["records"][0]
    expected = bloodcell.load(real_run).predict_files([sample["path"]])[0]
    assert record["error"] is None and record["class"] == expected["class"]
    assert record["probability"] == expected["probability"]


def test_idle_and_stalled_connections_do_not_starve_health(server):
    url, port = server
    idle = []
    for _ in range(300):  # more half-open connections than the server keeps: the oldest are dropped
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\n")  # headers never finished
        idle.append(s)
    stalled = socket.create_connection(("127.0.0.1", port))
    head = b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=x\r\n"
    stalled.sendall(head + b"Content-Length: 100000\r\n\r\n--x\r\n")  # the rest of the body never comes
    started = time.monotonic()
    assert httpx.get(f"{url}/health", timeout=5).status_code == 200
    assert time.monotonic() - started < 1.0
    stalled.settimeout(30)
    answer = stalled.recv(200)
    assert b" 408 " in answer.split(b"\r\n")[0]
    for s in idle:
        s.close()
