"""`bloodcell build-data`: PBC source images matched to their official split and index."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
from PIL import Image

from bloodcell.datasets import bloodmnist
from tests.cli import call_cli


def _rows(path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_every_sample_file_finds_its_official_split_and_index(pbc_sample, real_data_dir, real_dataset, tmp_path):
    sample = real_data_dir / "pbc_sample"
    refused = call_cli(
        "build-data", sample, "--size", "64", "--data-dir", real_data_dir, "--out", tmp_path, check=False
    )
    assert refused.returncode == 1 and "nothing written" in refused.stderr
    assert not (tmp_path / "bloodmnist_64.npz").exists()

    result = call_cli(
        "build-data", sample, "--size", "64", "--data-dir", real_data_dir, "--out", tmp_path, "--partial", "--json"
    )
    summary = json.loads(result.stdout)
    assert summary["filled"] == 400 and summary["problems"] == 0 and not summary["complete"]
    truth = {str(r["path"]): (r["bloodmnist_split"], r["bloodmnist_index"]) for r in pbc_sample}
    rows = _rows(tmp_path / "bloodmnist_build.csv")
    assert len(rows) == 400
    assert all(truth[r["file"]] == (r["split"], r["index"]) for r in rows), "a file got the wrong slot"

    built = bloodmnist.load_npz(tmp_path / "bloodmnist_64.npz")
    assert built.image_size == 64 and not built.official and built.build["filled"] == 400
    assert len(built.train) == 400 and len(built.test) == 0
    # the 64 px image, shrunk back to 28 px, is close to the official image of the slot it was given
    order = sorted(range(400), key=lambda i: int(pbc_sample[i]["bloodmnist_index"]))
    first = pbc_sample[order[0]]
    shrunk = np.asarray(Image.fromarray(built.train.images[0].permute(1, 2, 0).numpy()).resize((28, 28)), float)
    official = real_dataset.train.images[int(first["bloodmnist_index"])].permute(1, 2, 0).numpy()
    assert np.sqrt(((shrunk - official) ** 2).mean()) < 15
    assert "partial" in call_cli("info", "--data-file", tmp_path / "bloodmnist_64.npz").stdout


def test_odd_source_folders_are_reported_not_filled(pbc_sample, real_data_dir, tmp_path):
    pbc = tmp_path / "PBC"
    (pbc / "neutrophil").mkdir(parents=True)
    (pbc / "ig").mkdir()
    neutrophils = [r["path"] for r in pbc_sample if r["class"] == "neutrophil"][:3]
    for path in neutrophils:
        shutil.copy(path, pbc / "neutrophil" / path.name)
    shutil.copy(neutrophils[0], pbc / "neutrophil" / "copy_of_first.jpg")  # a duplicate: no second slot
    shutil.copy(neutrophils[1], pbc / "ig" / "wrong_class.jpg")  # the right image in the wrong class folder
    noise = np.random.default_rng(0).integers(0, 255, (360, 363, 3), dtype=np.uint8)
    Image.fromarray(noise).save(pbc / "neutrophil" / "noise.jpg")
    (pbc / "neutrophil" / "notes.txt").write_text("not an image")
    (pbc / "neutrophil" / ".DS_Store.jpg").write_bytes(b"\0" * 100)
    (pbc / "Thumbs").mkdir()

    result = call_cli("build-data", pbc, "--size", "64", "--data-dir", real_data_dir, "--out", tmp_path, check=False)
    assert result.returncode == 1 and not list(tmp_path.glob("*.npz"))
    status = {r["file"].rsplit("/", 1)[-1]: r["status"] for r in _rows(tmp_path / "bloodmnist_build.csv")}
    assert [status[p.name] for p in neutrophils] == ["matched"] * 3
    assert status["copy_of_first.jpg"] == "duplicate with no slot left"
    assert status["wrong_class.jpg"] == "label mismatch"
    assert status["noise.jpg"] == "unmatched"
    assert status["notes.txt"] == "not an image file, skipped" and status[".DS_Store.jpg"] == "hidden file, skipped"
    assert status["Thumbs"] == "unknown class folder" and status["basophil"] == "class folder missing"
