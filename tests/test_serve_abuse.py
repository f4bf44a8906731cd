"""A real `bloodcell serve` against clients that misbehave: uploads that trickle in, clients that
leave mid-body, pages that point another host name at the server. Loopback only, bounded loops."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import httpx
import pytest

from tests.cli import free_port

pytestmark = pytest.mark.slow
BOUNDARY = b"bloodcellboundary"


@pytest.fixture(scope="module")
def server(synthetic_run, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "server.log"
    port = free_port()
    with open(log, "w") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "bloodcell", "serve", str(synthetic_run), "--port", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=sink,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        assert process.poll() is None, log.read_text()
        try:
            httpx.get(f"{url}/health").raise_for_status()
            break
        except httpx.TransportError:
            assert time.monotonic() < deadline, "server did not start within 60 s"
            time.sleep(0.3)
    yield url, port, process, log
    process.terminate()
    process.wait(timeout=60)


def _multipart(content: bytes) -> bytes:
    return (
        b"--" + BOUNDARY + b'\r\nContent-Disposition: form-data; name="files"; filename="cell.png"\r\n'
        b"Content-Type: image/png\r\n\r\n" + content + b"\r\n--" + BOUNDARY + b"--\r\n"
    )


def _start_upload(port: int, body: bytes, sent: int) -> socket.socket:
    """A POST /predict whose head and first `sent` body bytes go out now; the rest later, or never."""
    s = socket.create_connection(("127.0.0.1", port))
    head = (
        f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {len(body)}\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY.decode()}\r\n\r\n"
    ).encode()
    s.sendall(head + body[:sent])
    return s


def _normal_request_seconds(url: str, image: bytes) -> float:
    started = time.monotonic()
    response = httpx.post(f"{url}/predict", files={"files": ("cell.png", image, "image/png")}, timeout=30)
    assert response.status_code == 200 and response.json()["records"][0]["error"] is None
    return time.monotonic() - started


@pytest.mark.parametrize("slow_clients", [4, 16])
def test_slow_uploads_do_not_hold_up_other_clients(server, cell_images, slow_clients):
    url, port, process, _ = server
    image = cell_images[1].read_bytes()
    body = _multipart(image)
    trickling = [_start_upload(port, body, 10) for _ in range(slow_clients)]
    try:
        for step in range(4):  # a byte now and then from every slow client, a normal request between
            for s in trickling:
                s.sendall(body[10 + step : 11 + step])
            time.sleep(0.5)
            assert _normal_request_seconds(url, image) <= 2.0
    finally:
        for s in trickling:
            s.close()
    assert _peak_mb(process.pid) < 1536


def test_a_client_that_leaves_mid_body_leaves_no_500_and_no_traceback(server, cell_images):
    url, port, _, log = server
    body = _multipart(cell_images[1].read_bytes())
    for _ in range(3):
        s = _start_upload(port, body, len(body) // 2)
        time.sleep(0.2)
        s.close()
    time.sleep(1.0)
    assert httpx.get(f"{url}/health").status_code == 200
    lines = log.read_text().splitlines()
    statuses = [json.loads(line)["status"] for line in lines if line.startswith("{")]
    assert 499 in statuses and 500 not in statuses
    assert not any("Traceback" in line or "Exception" in line for line in lines)


def test_requests_for_another_host_name_are_refused(server):
    url, port, _, _ = server
    rebinding = httpx.get(f"{url}/health", headers={"Host": f"attacker.example:{port}"})
    assert rebinding.status_code == 421
    assert httpx.get(f"{url}/health", headers={"Host": f"localhost:{port}"}).status_code == 200


def _peak_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
