"""Load and abuse benchmark for `bloodcell serve` (client and server on this machine, loopback only).

    python benchmarks/bench_serve.py RUN_DIR IMAGE_FOLDER [--requests 2000] [--abuse-only]

Starts `bloodcell serve RUN_DIR` on a free loopback port, then:
- load: 1, 8 and 32 concurrent clients sending single-image requests, and 64-image requests;
  images/s, p50/p95/p99 latency, errors, and the server's peak memory (VmHWM);
- abuse: an oversized file, a huge total body, too many files, a stalled client, malformed
  multipart, 300 half-open connections and random-noise images; for each, the status returned,
  how long /health took meanwhile, and the server's memory afterwards.
Every loop is bounded in count and time; nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import socket
import subprocess
import sys
import tempfile
import time

import httpx
import numpy as np
from PIL import Image

from bloodcell.evaluation.provenance import stamp_line
from bloodcell.images import decode


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def memory_mb(pid: int, field: str = "VmRSS") -> float:
    with open(f"/proc/{pid}/status") as f:
        line = next(line for line in f if line.startswith(field))
    return int(line.split()[1]) / 1024


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


async def load(url: str, images: list[bytes], concurrency: int, per_request: int, requests: int, limit_s: float):
    latencies, errors, sent = [], 0, 0
    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=60) as client:

        async def worker(index: int):
            nonlocal errors, sent
            while sent < requests and time.perf_counter() - started < limit_s:
                sent += 1
                batch = [images[(index + i + sent) % len(images)] for i in range(per_request)]
                files = [("files", (f"{i}.jpg", content, "image/jpeg")) for i, content in enumerate(batch)]
                t = time.perf_counter()
                try:
                    response = await client.post(f"{url}/predict", files=files)
                    ok = response.status_code == 200
                except httpx.HTTPError:
                    ok = False
                latencies.append(time.perf_counter() - t)
                errors += not ok

        await asyncio.gather(*(worker(i) for i in range(concurrency)))
    elapsed = time.perf_counter() - started
    return {
        "requests": len(latencies),
        "images_per_s": len(latencies) * per_request / elapsed,
        "p50_ms": 1000 * percentile(latencies, 50),
        "p95_ms": 1000 * percentile(latencies, 95),
        "p99_ms": 1000 * percentile(latencies, 99),
        "errors": errors,
    }


def health_ms(url: str) -> float:
    t = time.perf_counter()
    httpx.get(f"{url}/health", timeout=5).raise_for_status()
    return 1000 * (time.perf_counter() - t)


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def raw_upload(port: int, declared: int, sent: bytes) -> str:
    """A multipart POST that declares `declared` bytes but sends only `sent` (httpx refuses to):
    the status line it gets, and after how long."""
    head = "POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=x\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=40) as client:
        client.sendall(f"{head}Content-Length: {declared}\r\n\r\n".encode() + sent)
        started = time.perf_counter()
        status = client.recv(100).split(b"\r\n")[0].decode()
    return f"{status} after {time.perf_counter() - started:.0f} s"


def abuse_cases(url: str, port: int, image: bytes) -> dict:
    """Each case: (what it sends) -> the status it gets."""
    rng = np.random.default_rng(0)
    cases = {
        "file of 25 MB": lambda: (
            httpx.post(
                f"{url}/predict", files={"files": ("big.jpg", b"\xff" * (25 * 2**20), "image/jpeg")}, timeout=60
            ).status_code
        ),
        "body of 200 MB declared": lambda: raw_upload(port, 200 * 2**20, b"x" * 1024),
        "2,000 files": lambda: (
            httpx.post(
                f"{url}/predict", files=[("files", (f"{i}.jpg", image, "image/jpeg")) for i in range(2000)], timeout=120
            ).status_code
        ),
        "malformed multipart": lambda: (
            httpx.post(
                f"{url}/predict",
                content=b"--x\r\nContent-Disposition: form-data; name=files\r\n\r\nno end",
                headers={"content-type": "multipart/form-data; boundary=x"},
                timeout=60,
            ).status_code
        ),
        "16 random-noise images": lambda: sum(
            r["review"]
            for r in httpx.post(
                f"{url}/predict",
                files=[
                    ("files", (f"n{i}.png", png(rng.integers(0, 256, (200, 200, 3), dtype=np.uint8)), "image/png"))
                    for i in range(16)
                ],
                timeout=60,
            ).json()["records"]
        ),
        "stalled body": lambda: raw_upload(port, 100_000, b"--x\r\n"),  # then nothing more
    }
    results = {}
    for name, case in cases.items():
        try:
            results[name] = case()
        except httpx.HTTPError as exc:
            results[name] = f"connection error ({type(exc).__name__})"
    half_open = []
    for _ in range(300):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        half_open.append(s)
    results["300 half-open connections: /health ms"] = round(health_ms(url), 1)
    for s in half_open:
        s.close()
    return results


def start_server(run_dir: str, source_tree: str | None = None) -> tuple[subprocess.Popen, str]:
    """`bloodcell serve RUN_DIR` on a free loopback port (from `source_tree`'s src/ if given), once
    it answers /health: the process and its URL. Exits with the server's error if it stops first."""
    port = free_port()
    server_log = tempfile.TemporaryFile("w+")  # not a pipe: the server logs every request, and a full pipe blocks it
    env = {**os.environ, "PYTHONPATH": os.path.abspath(source_tree)} if source_tree else None
    server = subprocess.Popen(
        [sys.executable, "-m", "bloodcell", "serve", run_dir, "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=server_log,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(240):
        if server.poll() is not None:
            server_log.seek(0)
            sys.exit(f"the server did not start: {server_log.read().strip()}")
        try:
            health_ms(url)
            return server, url
        except httpx.HTTPError:
            time.sleep(0.5)
    server.terminate()
    sys.exit(f"the server on {url} did not answer /health in 120 s")


def main() -> None:
    print(stamp_line(), flush=True)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("folder")
    parser.add_argument("--requests", type=int, default=2000, help="single-image requests per concurrency level")
    parser.add_argument("--seconds", type=float, default=90, help="time limit per load level")
    parser.add_argument("--abuse-only", action="store_true", help="skip the load levels")
    args = parser.parse_args()
    images = [p.read_bytes() for p in decode.find_images([args.folder])][:400]
    server, url = start_server(args.run_dir)
    port = int(url.rsplit(":", 1)[1])
    try:
        print(f"server pid {server.pid}, {memory_mb(server.pid):.0f} MB at start")
        print("| clients | images/request | requests | images/s | p50 ms | p95 ms | p99 ms | errors |")
        print("|---|---|---|---|---|---|---|---|")
        for concurrency in () if args.abuse_only else (1, 8, 32):
            for per_request, requests in ((1, args.requests), (64, max(20, args.requests // 40))):
                r = asyncio.run(load(url, images, concurrency, per_request, requests, args.seconds))
                print(
                    f"| {concurrency} | {per_request} | {r['requests']} | {r['images_per_s']:,.0f} | {r['p50_ms']:.0f} "
                    f"| {r['p95_ms']:.0f} | {r['p99_ms']:.0f} | {r['errors']} |",
                    flush=True,
                )
        print(f"\npeak memory under load: {memory_mb(server.pid, 'VmHWM'):.0f} MB")
        print("\n| abuse case | result | /health ms after | server MB after |\n|---|---|---|---|")
        for name, result in abuse_cases(url, port, images[0]).items():
            print(f"| {name} | {result} | {health_ms(url):.0f} | {memory_mb(server.pid):.0f} |", flush=True)
        print(f"\npeak memory overall: {memory_mb(server.pid, 'VmHWM'):.0f} MB; server alive: {server.poll() is None}")
    finally:
        server.terminate()
        server.wait(timeout=60)


if __name__ == "__main__":
    main()
