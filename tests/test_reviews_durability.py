"""A review server killed without warning (SIGKILL) loses at most the change in flight, and leaves a
database that is whole and that the next server opens. Loopback only, bounded loops."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from bloodcell.app.reviews import ReviewStore
from tests.test_fields import synthetic_field
from tests.test_serve import start_server

pytestmark = pytest.mark.slow


def _new_review(url: str, fields: list) -> tuple[int, list[dict]]:
    review = httpx.post(f"{url}/reviews", json={"title": "kill test", "reviewer": "a"}).json()["id"]
    files = [("files", (f.name, f.read_bytes(), "image/png")) for f in fields]
    cells = httpx.post(f"{url}/reviews/{review}/images", files=files, timeout=120).json()["cells"]
    return review, [c for c in cells if c["class"]]


def test_a_server_killed_mid_review_loses_at_most_the_correction_in_flight(synthetic_run, tmp_path):
    reviews = tmp_path / "reviews"
    fields = [synthetic_field(tmp_path / f"field{i}.png", seed=i) for i in range(3)]
    process, url, _ = start_server(synthetic_run, reviews, "--crop", "cell")
    review, cells = _new_review(url, fields)
    classes = httpx.get(f"{url}/health").json()["classes"]
    acknowledged: list[tuple[int, str]] = []
    current = {c["id"]: c["class"] for c in cells}

    def correct_in_a_loop() -> None:
        for i in range(100_000):  # bounded; ends when the server dies
            cell = cells[i % len(cells)]["id"]
            new = classes[(classes.index(current[cell]) + 1) % len(classes)]
            body = {"cell": cell, "class": new, "reviewer": "b", "expected": current[cell]}
            try:
                answer = httpx.post(f"{url}/reviews/{review}/corrections", json=body, timeout=10)
            except httpx.TransportError:
                return
            if answer.status_code == 200:
                acknowledged.append((cell, new))
                current[cell] = new

    worker = threading.Thread(target=correct_in_a_loop)
    worker.start()
    time.sleep(3)
    process.kill()  # SIGKILL: no shutdown, no flush
    process.wait(timeout=30)
    worker.join(timeout=30)
    assert len(acknowledged) > 10

    store = ReviewStore(reviews)
    assert store.integrity() == "ok"
    kept = [(e["cell"], e["value"]) for e in store.events(review) if e["kind"] == "correction"]
    assert kept[: len(acknowledged)] == acknowledged  # every acknowledged correction, in order
    assert len(kept) - len(acknowledged) <= 1  # at most the one in flight, written but not answered
    final = {c["id"]: c["class"] for c in store.cells(review, with_thumbnails=False)}
    last = {cell: value for cell, value in kept}
    assert all(final[cell] == value for cell, value in last.items())  # each cell's class: its latest correction

    process, url, _ = start_server(synthetic_run, reviews, "--crop", "cell")  # the next server opens it
    try:
        assert httpx.get(f"{url}/reviews/{review}").json()["review"]["title"] == "kill test"
    finally:
        process.terminate()
        process.wait(timeout=60)


def _upload(address: str, files: list) -> None:
    try:
        httpx.post(address, files=files, timeout=60)
    except httpx.TransportError:
        pass  # the server was killed under it: that is the test


def test_a_server_killed_while_it_writes_an_upload_leaves_all_of_it_or_none(synthetic_run, tmp_path):
    reviews = tmp_path / "reviews"
    fields = [synthetic_field(tmp_path / f"field{i}.png", seed=i) for i in range(12)]
    for attempt in range(3):  # kill at a few moments of the write; each time the database stays whole
        process, url, _ = start_server(synthetic_run, reviews, "--crop", "cell")
        review = httpx.post(f"{url}/reviews", json={"title": f"upload {attempt}"}).json()["id"]
        files = [("files", (f.name, f.read_bytes(), "image/png")) for f in fields]
        sender = threading.Thread(target=_upload, args=(f"{url}/reviews/{review}/images", files), daemon=True)
        sender.start()
        time.sleep(1.0 + attempt)
        process.kill()
        process.wait(timeout=30)
        sender.join(timeout=30)
        store = ReviewStore(reviews)
        assert store.integrity() == "ok"
        assert len(store.images(review)) in (0, len(fields))  # one transaction: all the request's images or none
        del store
