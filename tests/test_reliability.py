"""The hostile probe's defects, each kept as a test: nothing lost, nothing replaced, nothing silent."""

from __future__ import annotations

import csv
import json
import os
import shutil
import stat
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bloodcell import runs
from bloodcell.app.serve import create_app
from bloodcell.datasets import bloodmnist
from bloodcell.errors import BloodcellError
from bloodcell.files import load_tensors, save_tensors, write_csv
from bloodcell.inference.classifier import Classifier, PredictOptions
from bloodcell.training import checkpoint
from bloodcell.training.recipe import PRESETS, with_overrides
from bloodcell.workflows.pipeline import train_run
from tests.cli import call_cli

TINY = with_overrides(PRESETS["fast"], epochs=2, batch_size=32)


def test_results_are_printed_even_when_the_csv_cannot_be_written(synthetic_run, cell_images):
    result = call_cli("predict", synthetic_run, *cell_images, "--csv", "/dev/full", check=False)
    assert result.returncode == 1
    assert "3 of 3 images classified" in result.stdout  # the work is not lost
    assert (
        result.stderr.strip().splitlines()[-1] == "bloodcell: error: /dev/full: cannot write (No space left on device)"
    )
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode)  # the device is still a device


def test_a_link_stays_a_link_and_a_fifo_is_written_into(synthetic_run, cell_images, tmp_path):
    target = tmp_path / "real.csv"
    target.write_text("old")
    link = tmp_path / "link.csv"
    link.symlink_to(target)
    call_cli("predict", synthetic_run, cell_images[0], "--csv", link)
    assert link.is_symlink() and "path,class" in target.read_text()

    fifo = tmp_path / "pipe.csv"
    os.mkfifo(fifo)
    received = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_text()))
    reader.start()
    call_cli("predict", synthetic_run, cell_images[0], "--csv", fifo)
    reader.join(timeout=30)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode) and "path,class" in received[0]


def test_a_file_name_that_is_not_utf8_is_classified_and_written(synthetic_run, cell_images, tmp_path):
    folder = tmp_path / "cells"
    folder.mkdir()
    odd = os.fsdecode(b"cell-\xff\xfe.png")
    shutil.copyfile(cell_images[1], folder / odd)
    out = tmp_path / "out.csv"
    result = call_cli("predict", synthetic_run, folder, "--csv", out)
    assert "1 of 1 images classified" in result.stdout and "\\udcff" in result.stdout
    rows = list(csv.DictReader(out.open(encoding="utf-8")))
    assert rows[0]["path"].endswith("cell-\\udcff\\udcfe.png")


def test_spreadsheet_formulas_in_csv_cells_are_neutralised(tmp_path):
    write_csv(tmp_path / "x.csv", [{"path": "=HYPERLINK(1)", "b": "+1", "c": "-cmd", "d": "@SUM", "e": 0.5, "f": "ok"}])
    row = next(csv.DictReader((tmp_path / "x.csv").open()))
    assert row == {"path": "'=HYPERLINK(1)", "b": "'+1", "c": "'-cmd", "d": "'@SUM", "e": "0.5", "f": "ok"}


def test_folders_are_walked_past_what_cannot_be_used(synthetic_run, cell_images, tmp_path):
    folder = tmp_path / "cells"
    (folder / "sub").mkdir(parents=True)
    with Image.open(cell_images[0]) as image:
        image.save(folder / "a.webp")
        image.convert("P").save(folder / "sub" / "b.gif")
    (folder / "notes.txt").write_text("x")
    (folder / "list.csv").write_text("x")
    result = call_cli("predict", synthetic_run, folder, "--json")
    records = json.loads(result.stdout)["records"]
    assert sorted(Path(r["path"]).name for r in records) == ["a.webp", "b.gif"] and not any(r["error"] for r in records)
    assert "skipped 2 files that are not images (.csv 1, .txt 1)" in result.stderr


@pytest.mark.slow  # a fresh Python process under setpriv: 3 s of the one-minute fast lane
@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and util-linux setpriv")
def test_an_unreadable_subfolder_is_reported_and_skipped(synthetic_run, cell_images, tmp_path):
    """Run as root without the capabilities that bypass permissions (root reads every folder):
    a mode-000 subfolder and one without execute permission are each one warning line, and the
    readable images are still classified."""
    for sub, mode in (("ok", 0o755), ("closed", 0o000), ("no-exec", 0o644)):
        (tmp_path / "cells" / sub).mkdir(parents=True)
        shutil.copyfile(cell_images[1], tmp_path / "cells" / sub / "cell.png")
        (tmp_path / "cells" / sub).chmod(mode)
    drop = "-dac_override,-dac_read_search"
    try:
        result = subprocess.run(
            ["setpriv", f"--inh-caps={drop}", f"--bounding-set={drop}", sys.executable, "-m", "bloodcell",
             "predict", str(synthetic_run), str(tmp_path / "cells"), "--json"],
            capture_output=True, text=True,
        )  # fmt: skip
    finally:
        for sub in ("closed", "no-exec"):
            (tmp_path / "cells" / sub).chmod(0o755)
    assert result.returncode == 0, result.stderr[-2000:]
    assert [Path(r["path"]).parent.name for r in json.loads(result.stdout)["records"]] == ["ok"]
    assert "closed: cannot read this folder (Permission denied); skipped" in result.stderr
    assert "no-exec: cannot open the files in this folder (permission denied); skipped" in result.stderr
    assert "Traceback" not in result.stderr


def _shard(run, files, index, of, *extra):
    return json.loads(call_cli("predict", run, *files, "--shard", f"{index}/{of}", "--json", *extra).stdout)


def test_merge_refuses_parts_of_other_jobs(synthetic_run, cell_images, tmp_path):
    other_run = tmp_path / "other"
    shutil.copytree(synthetic_run, other_run)
    meta = json.loads((other_run / runs.MODEL_META).read_text())
    (other_run / runs.MODEL_META).write_text(json.dumps(meta | {"temperature": 2.0}))
    parts = {
        "a": _shard(synthetic_run, cell_images, 1, 2),
        "b": _shard(synthetic_run, cell_images, 2, 2),
        "other run": _shard(other_run, cell_images, 2, 2),
        "other classes": _shard(synthetic_run, cell_images, 2, 2, "--classes", "basophil,neutrophil"),
        "other tta": _shard(synthetic_run, cell_images, 2, 2, "--tta"),
        "other files": _shard(synthetic_run, cell_images[:2], 2, 2),
    }
    edited = json.loads(json.dumps(parts["b"]))
    edited["shard"]["index"] = 7
    parts["part 7 of 2"] = edited
    zero = json.loads(json.dumps(parts["b"]))
    zero["shard"]["of"] = 0
    parts["of 0"] = zero
    for name, part in parts.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(part))
    assert call_cli("merge", tmp_path / "a.json", tmp_path / "b.json").returncode == 0
    for name, message in {
        "other run": "different run_sha256",
        "other classes": "different options",
        "other tta": "different options",
        "other files": "different files_in_all_shards, listing_sha256",
        "part 7 of 2": "part 7 of 2 is not a part",
        "of 0": "part 2 of 0 is not a part",
    }.items():
        result = call_cli("merge", tmp_path / "a.json", tmp_path / f"{name}.json", check=False)
        assert result.returncode == 1 and message in result.stderr, (name, result.stderr)
        assert result.stderr.count("\n") == 1


def test_resuming_a_finished_run_with_another_recipe_is_refused(synthetic_file, tmp_path):
    run = tmp_path / "run"
    call_cli("train", "--data-file", synthetic_file, "--preset", "fast", "--epochs", "1", "--batch-size", "32",
             "--out", run)  # fmt: skip
    result = call_cli("train", "--data-file", synthetic_file, "--preset", "fast", "--epochs", "99", "--batch-size",
                      "32", "--model", "res-large", "--out", run, "--resume", check=False)  # fmt: skip
    assert result.returncode == 1 and "finished with another recipe (epochs 1 -> 99; model 'res-small'" in result.stderr
    same = call_cli("train", "--data-file", synthetic_file, "--preset", "fast", "--epochs", "1", "--batch-size", "32",
                    "--out", run, "--resume")  # fmt: skip
    assert "test " in same.stdout  # the same recipe: its results, as before


@pytest.fixture
def interrupted(synthetic_file, tmp_path):
    """A run stopped after one of two epochs: its checkpoint folder."""
    run = tmp_path / "run"
    dataset = bloodmnist.load_npz(synthetic_file)
    assert train_run(dataset, run, TINY, progress=False, stop_after_epochs=1) is None
    return dataset, run


def _resume(dataset, run):
    return train_run(dataset, run, TINY, progress=False, resume=True)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s["scheduler"].update(foo=1), "scheduler state does not fit"),
        (lambda s: s["scheduler"].update(last_epoch=3), "step counts do not match"),
        (lambda s: s["history"][0].update(train_loss="low"), "history row 1 holds a value that is not a number"),
        (lambda s: s["history"].__setitem__(0, [1, 2]), "history row 1 is not a record"),
        (lambda s: s["best"].update(epoch="one"), "early-stopping record is malformed"),
        (lambda s: s["optimizer"]["param_groups"][0].update(lr="fast"), "optimiser settings do not fit"),
    ],
)
def test_an_edited_checkpoint_is_refused_before_any_work(interrupted, edit, message):
    dataset, run = interrupted
    path = run / runs.CHECKPOINT / checkpoint.STATE
    state = json.loads(path.read_text())
    edit(state)
    path.write_text(json.dumps(state))
    with pytest.raises(BloodcellError, match=message):
        _resume(dataset, run)


def test_nan_weights_in_a_checkpoint_are_refused_at_load(interrupted):
    dataset, run = interrupted
    folder = run / runs.CHECKPOINT
    name = json.loads((folder / checkpoint.STATE).read_text())["tensors"]
    tensors = load_tensors(folder / name)
    first = next(k for k, v in tensors.items() if k.startswith("model.") and v.is_floating_point())
    tensors[first][...] = float("nan")
    save_tensors(folder / name, tensors)
    with pytest.raises(BloodcellError, match=f"{first} has NaN or infinite values"):
        _resume(dataset, run)


def test_a_large_image_size_cannot_make_a_batch_of_gigabytes(synthetic_run, tmp_path):
    run = tmp_path / "big"
    shutil.copytree(synthetic_run, run)
    meta = json.loads((run / runs.MODEL_META).read_text())
    meta["preprocessing"]["image_size"] = 1024
    (run / runs.MODEL_META).write_text(json.dumps(meta | {"ood_threshold": None}))
    classifier = Classifier.from_run(run)
    assert classifier.batch_limit <= 2  # res-small at 1024 px: about 1 GB of layer outputs per image
    assert Classifier.from_run(synthetic_run).batch_limit >= 1024  # 28 px: batches as large as ever


@pytest.fixture
def client(synthetic_run):
    from fastapi.testclient import TestClient

    classifier = Classifier.from_run(synthetic_run)
    app = create_app(classifier, PredictOptions(), token="secret", hosts=frozenset({"127.0.0.1", "localhost"}))
    return TestClient(app, base_url="http://127.0.0.1:8000")


def test_only_the_bound_host_names_are_answered(client):
    assert client.get("/health").status_code == 200
    rebinding = client.get("/health", headers={"Host": "attacker.example:8000"})
    assert rebinding.status_code == 421 and "host name" in rebinding.json()["detail"]
    assert client.get("/health", headers={"Host": "localhost:8000"}).status_code == 200


def test_the_token_rule_is_one_rule(client, cell_images):
    files = {"files": ("a.png", cell_images[1].read_bytes(), "image/png")}
    for header, status in (("Bearer secret", 200), ("bearer secret", 200), ("secret", 401), ("Bearer wrong", 401)):
        assert client.post("/predict", files=files, headers={"Authorization": header}).status_code == status, header


def test_an_oversized_request_head_is_refused(client):
    response = client.get("/health", headers={"X-Padding": "a" * 100_000})
    assert response.status_code == 431


def test_an_uploaded_eps_never_reaches_a_decoder(client):
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 100 100\nshowpage\n"
    response = client.post(
        "/predict", files={"files": ("cell.eps", eps, "image/x-eps")}, headers={"Authorization": "Bearer secret"}
    )
    assert response.status_code == 200
    record = response.json()["records"][0]
    assert record["class"] is None and "not an image file bloodcell reads" in record["error"]


def test_synthetic_images_of_every_kind_are_classified_or_refused_in_one_line(synthetic_run, tmp_path):
    classifier = Classifier.from_run(synthetic_run)
    rng = np.random.default_rng(0)
    good = tmp_path / "good.png"
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(good)
    content = good.read_bytes()
    uploads = [
        ("truncated.png", content[: len(content) // 2]),
        ("header only.png", content[:40]),
        ("random.jpg", rng.integers(0, 255, 5000, dtype=np.uint8).tobytes()),
        ("empty.png", b""),
        ("good.png", content),
    ]
    records = classifier.predict_uploads(uploads)
    assert [r["error"] is None for r in records] == [False, False, False, False, True]
    assert all("\n" not in (r["error"] or "") for r in records)


def test_uploads_in_memory_are_bounded_across_requests(synthetic_run, cell_images):
    from fastapi.testclient import TestClient

    from bloodcell.app.serve import ServeLimits

    classifier = Classifier.from_run(synthetic_run)
    app = create_app(classifier, PredictOptions(), limits=ServeLimits(max_buffered_bytes=4096))
    files = {"files": ("a.png", cell_images[0].read_bytes(), "image/png")}  # a 360 x 363 JPEG: well over 4 KB
    response = TestClient(app).post("/predict", files=files)
    assert response.status_code == 503 and "too many uploads" in response.json()["detail"]
    assert app.buffered == 0  # released when the request ended
