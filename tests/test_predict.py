"""`bloodcell predict` on real full-size images: accuracy vs the 28 px twins, bad files, exit codes."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

import bloodcell
from bloodcell import data
from bloodcell.errors import BloodcellError
from bloodcell.predict import differential
from tests.cli import run_cli


def test_predictions_on_full_size_files_match_their_bloodmnist_twins(default_run, pbc_sample, real_dataset):
    classifier = bloodcell.load(default_run)
    records = classifier.predict_files([r["path"] for r in pbc_sample])
    twins = real_dataset.train.images[[int(r["bloodmnist_index"]) for r in pbc_sample]]
    twin_classes = classifier.predict(twins)
    agreement = np.mean([rec["class"] == twin for rec, twin in zip(records, twin_classes)])
    assert agreement >= 0.98
    truth = [r["class"] for r in pbc_sample]
    file_accuracy = np.mean([rec["class"] == t for rec, t in zip(records, truth)])
    twin_accuracy = np.mean([c == t for c, t in zip(twin_classes, truth)])
    assert abs(file_accuracy - twin_accuracy) <= 0.005  # the 0.5 percentage-point target


def test_bfloat16_and_compiled_inference_agree_with_float32(default_run, real_dataset):
    images = real_dataset.val.images[:600]
    reference = bloodcell.load(default_run).predict_proba(images)
    for precision, compile in (("bfloat16", False), ("bfloat16", True)):
        fast = bloodcell.load(default_run, precision=precision, compile=compile)
        probs = fast.predict_proba(images)
        assert probs.dtype == reference.dtype and probs.shape == reference.shape
        assert (probs.argmax(1) == reference.argmax(1)).float().mean() >= 0.99
        assert (probs - reference).abs().max() < 0.1  # bfloat16 keeps about 3 significant digits
    with pytest.raises(BloodcellError, match="unknown precision 'float16'"):
        bloodcell.load(default_run, precision="float16")


def test_predict_api_on_pil_images_and_arrays(default_run, pbc_sample):
    classifier = bloodcell.load(default_run)
    paths = [r["path"] for r in pbc_sample[:4]]
    from_files = classifier.predict_files(paths)
    images = [Image.open(p) for p in paths]
    from_pil = classifier.predict_images(images)
    from_arrays = classifier.predict_images([np.asarray(im.convert("RGB")) for im in images])
    assert [r["class"] for r in from_files] == [r["class"] for r in from_pil] == [r["class"] for r in from_arrays]


@pytest.fixture()
def bad_folder(tmp_path, pbc_sample):
    folder = tmp_path / "cells"
    folder.mkdir()
    good = pbc_sample[0]["path"].read_bytes()
    (folder / "good.jpg").write_bytes(good)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "truncated.jpg").write_bytes(good[:3000])
    (folder / "notes.png").write_text("not an image")
    Image.new("1", (10_000, 10_000)).save(folder / "bomb.png")  # 100 Mpx, a few kB on disk
    return folder


def test_bad_files_get_error_rows_and_the_rest_are_classified(default_run, bad_folder, tmp_path):
    out_csv = tmp_path / "predictions.csv"
    result = run_cli("predict", default_run, bad_folder, "--json", "--csv", out_csv, check=False)
    assert result.returncode == 3 and "Traceback" not in result.stderr
    payload = json.loads(result.stdout)
    by_name = {r["path"].rsplit("/", 1)[-1]: r for r in payload["records"]}
    assert by_name["good.jpg"]["error"] is None and by_name["good.jpg"]["class"] == "basophil"
    assert "empty" in by_name["empty.jpg"]["error"]
    assert "truncated" in by_name["truncated.jpg"]["error"]
    assert "not an image" in by_name["notes.png"]["error"]
    assert "bomb" in by_name["bomb.png"]["error"]
    assert payload["summary"]["failed"] == 4 and payload["summary"]["classified"] == 1
    with open(out_csv) as f:
        assert len(list(csv.DictReader(f))) == 5


def test_exit_code_when_nothing_can_be_classified(default_run, bad_folder):
    (bad_folder / "good.jpg").unlink()
    result = run_cli("predict", default_run, bad_folder, check=False)
    assert result.returncode == 4 and "0 of 4 images classified" in result.stdout


def test_predict_folder_prints_differential(default_run, pbc_sample):
    folder = pbc_sample[0]["path"].parents[1] / "platelet"
    result = run_cli("predict", default_run, folder, "--top-k", "2")
    assert result.returncode == 0
    assert "50 of 50 images classified" in result.stdout and "platelets (counted apart)" in result.stdout


def test_differential_arithmetic():
    classes = list(data.CLASSES)
    labels = ["neutrophil"] * 6 + ["lymphocyte"] * 3 + ["monocyte"] + ["erythroblast"] * 2 + ["platelet"] * 5
    records = [{"class": c, "review": i == 0, "error": None} for i, c in enumerate(labels)]
    records.append({"class": None, "review": False, "error": "empty file"})
    summary = differential(records, classes)
    assert summary["images"] == 18 and summary["classified"] == 17 and summary["failed"] == 1
    assert summary["flagged_for_review"] == 1
    assert summary["white_cells"] == 10
    assert summary["white_cell_differential"]["neutrophil"]["percent"] == pytest.approx(60.0)
    assert summary["erythroblasts_per_100_wbc"] == pytest.approx(20.0)
    assert summary["platelets"] == 5
    assert summary["per_class"]["platelet"]["percent"] == pytest.approx(100 * 5 / 17)
    assert sum(r["percent"] for r in summary["white_cell_differential"].values()) == pytest.approx(100.0)
