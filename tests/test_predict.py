"""Prediction: one pipeline for files, bytes, PIL images and arrays; the CLI and the API agree;
bad files get error rows; the differential count; real full-size PBC images (slow lane)."""

from __future__ import annotations

import csv
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

import bloodcell
from bloodcell import runs
from bloodcell.classes import CLASSES
from bloodcell.datasets import bloodmnist
from bloodcell.errors import BloodcellError
from bloodcell.images import crops
from bloodcell.inference.classifier import Classifier, PredictOptions
from bloodcell.inference.differential import differential
from tests.cli import call_cli, run_cli


def test_the_cli_and_the_python_api_agree(synthetic_run, cell_images):
    classifier = bloodcell.load(synthetic_run)
    api = classifier.predict_files(cell_images)
    cli = json.loads(call_cli("predict", synthetic_run, *cell_images, "--json").stdout)["records"]
    assert api == cli
    assert PredictOptions().min_confidence == 0.8  # the same default review threshold everywhere
    assert all(r["review"] == (r["probability"] < 0.8) for r in api)


def test_files_bytes_pil_images_and_arrays_give_the_same_records(synthetic_run, cell_images):
    classifier = bloodcell.load(synthetic_run)
    options = PredictOptions(tta=True, top_k=2)
    files = classifier.predict_files(cell_images, options)
    uploads = classifier.predict_uploads([(str(p), p.read_bytes()) for p in cell_images], options)
    images = [Image.open(p) for p in cell_images]
    from_pil = classifier.predict_images(images, options)
    from_arrays = classifier.predict_images([np.asarray(im.convert("RGB")) for im in images], options)
    strip = [{k: v for k, v in r.items() if k != "path"} for r in files]
    for other in (uploads, from_pil, from_arrays):
        assert [{k: v for k, v in r.items() if k != "path"} for r in other] == strip
    assert all(len(r["top_k"]) == 2 for r in files)


def test_a_batch_is_prepared_as_each_image_alone(synthetic_run, cell_images):
    """`prepare_sources` filters the whole batch at once; the pixels must be those of one image at a time."""
    classifier = bloodcell.load(synthetic_run)
    p = classifier.record.preprocessing
    assert p.medmnist_filter and crops.emulates_medmnist(p.image_size, runs.Crop.parse(p.crop))
    named = [(str(p), p) for p in cell_images] + [("broken", b"not an image")]
    batch = classifier.prepare_sources(named, PredictOptions())
    assert isinstance(batch[-1], str)
    for (_, path), prepared in zip(named, batch[:-1]):
        ((pixels, _),) = prepared.cells
        assert np.array_equal(pixels, classifier.prepare(path)[0])


def test_tensor_inputs_uint8_float_and_normalised(synthetic_run, synthetic_file):
    classifier = bloodcell.load(synthetic_run)
    images = bloodmnist.load_npz(synthetic_file).test.images[:8]
    probs = classifier.predict_proba(images)
    assert probs.shape == (8, 8) and probs.dtype == torch.float32
    assert torch.allclose(probs.sum(1), torch.ones(8), atol=1e-5)
    as_float_nhwc = images.permute(0, 2, 3, 1).float().numpy() / 255
    assert torch.allclose(classifier.predict_proba(as_float_nhwc), probs, atol=1e-6)
    normalised = (images.float() / 255 - 0.5) / 0.25  # what a user might pass by mistake
    with pytest.raises(BloodcellError, match=r"raw pixels in \[0, 1\]"):
        classifier.predict_proba(normalised)
    with pytest.raises(BloodcellError, match="this model takes"):
        classifier.predict_proba(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))


def test_non_finite_output_is_never_a_classified_cell(synthetic_run, cell_images):
    classifier = bloodcell.load(synthetic_run)

    class Broken(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            return torch.full((len(x), 8), float("nan"))

    broken = Classifier(Broken(), classifier.record)
    records = broken.predict_files(cell_images[:2])
    assert all(r["class"] is None and "non-finite" in r["error"] for r in records)
    assert differential(records, broken.classes)["classified"] == 0


def test_bad_options_are_refused():
    for bad in ({"min_confidence": 2.0}, {"top_k": 0}, {"batch_size": 0}, {"crop": "sideways"}):
        with pytest.raises(BloodcellError):
            PredictOptions(**bad)
    assert replace(PredictOptions(), tta=True).tta


@pytest.fixture()
def bad_folder(tmp_path, cell_images):
    folder = tmp_path / "cells"
    folder.mkdir()
    good = cell_images[0].read_bytes()
    (folder / "good.jpg").write_bytes(good)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "truncated.jpg").write_bytes(good[:3000])
    (folder / "notes.png").write_text("not an image")
    (folder / "dot.png").write_bytes(_png((1, 1)))
    Image.new("1", (10_000, 10_000)).save(folder / "bomb.png")  # 100 Mpx, a few kB on disk
    return folder


def _png(size) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.new("RGB", size).save(buffer, format="PNG")
    return buffer.getvalue()


def test_bad_files_get_error_rows_and_the_rest_are_classified(synthetic_run, bad_folder, tmp_path):
    out_csv = tmp_path / "predictions.csv"
    result = call_cli("predict", synthetic_run, bad_folder, "--json", "--csv", out_csv, check=False)
    assert result.returncode == 3 and "Traceback" not in result.stderr
    payload = json.loads(result.stdout)
    by_name = {r["path"].rsplit("/", 1)[-1]: r for r in payload["records"]}
    assert by_name["good.jpg"]["error"] is None and by_name["good.jpg"]["class"] in CLASSES
    assert "empty" in by_name["empty.jpg"]["error"]
    assert "truncated" in by_name["truncated.jpg"]["error"]
    assert "not an image" in by_name["notes.png"]["error"]
    assert "too small to hold a cell" in by_name["dot.png"]["error"]
    assert "too large" in by_name["bomb.png"]["error"]
    assert payload["summary"]["failed"] == 5 and payload["summary"]["classified"] == 1
    with open(out_csv) as f:
        assert len(list(csv.DictReader(f))) == 6


def test_exit_codes_when_nothing_can_be_classified(synthetic_run, bad_folder, tmp_path):
    (bad_folder / "good.jpg").unlink()
    result = call_cli("predict", synthetic_run, bad_folder, check=False)
    assert result.returncode == 4 and "0 of 5 images classified" in result.stdout
    empty = tmp_path / "nothing"
    empty.mkdir()
    result = call_cli("predict", synthetic_run, empty, check=False)
    assert result.returncode == 1 and "no image files found" in result.stderr


def test_odd_file_names_are_printed_escaped(synthetic_run, cell_images, tmp_path):
    odd = tmp_path / "cell\nwith\x1b[31mescape.png"
    odd.write_bytes(cell_images[1].read_bytes())
    out = call_cli("predict", synthetic_run, odd).stdout
    first = out.splitlines()[0]
    assert "\\n" in first and "\\x1b" in first and "\x1b" not in out
    assert json.loads(call_cli("predict", synthetic_run, odd, "--json").stdout)["records"][0]["path"] == str(odd)


def test_a_stated_red_cell_size_frames_the_cell_through_the_cli(synthetic_run, tmp_path):
    from tests.test_cells import smear

    smear().save(tmp_path / "field.png")  # red cells drawn 73 px across
    measured, stated = (
        json.loads(call_cli("predict", synthetic_run, tmp_path / "field.png", "--crop", crop, "--json").stdout)
        for crop in ("cell", "cell:50")
    )
    cells = [result["records"][0]["cell"] for result in (measured, stated)]
    assert [c["scale_from"] for c in cells] == ["red cells", "stated red cell"]
    left, top, right, bottom = cells[1]["box"]
    assert right - left == pytest.approx(50 * 200 / 73, abs=1.5)


def test_a_labs_magnification_measured_over_a_folder_frames_every_crop(synthetic_run, tmp_path):
    from tests.test_cells import crop_of_a_lab

    folder = tmp_path / "lab" / "neutrophil"
    folder.mkdir(parents=True)
    for seed in range(10):
        crop_of_a_lab(seed, red_diameter=60).save(folder / f"crop{seed}.png")
    result = call_cli("predict", synthetic_run, folder, "--crop", "cell:measure")
    assert result.stdout.splitlines()[0].startswith("framing: red cells measurable in")
    data = json.loads(call_cli("predict", synthetic_run, folder, "--crop", "cell:measure", "--json").stdout)
    red_cell = float(data["crop"].removeprefix("cell:"))
    assert red_cell == pytest.approx(60, rel=0.1)
    assert {r["cell"]["scale_from"] for r in data["records"]} == {"stated red cell"}
    scored = call_cli("evaluate", synthetic_run, "--images", tmp_path / "lab", "--crop", "cell:measure", "--json")
    assert json.loads(scored.stdout)["crop"] == data["crop"]


def test_restricted_to_some_classes_answers_only_among_them(synthetic_run, synthetic_file, cell_images):
    classifier = bloodcell.load(synthetic_run)
    images = bloodmnist.load(data_file=synthetic_file).val.images
    full = classifier.predict_proba(images)
    only = classifier.restricted_to(["NEUTROPHILS", "ig", "lymphocyte"])
    assert only.answerable == ("immature granulocyte", "lymphocyte", "neutrophil")
    kept = [3, 4, 6]
    restricted = only.predict_proba(images)
    others = [k for k in range(8) if k not in kept]
    assert torch.all(restricted[:, others] == 0)
    assert torch.allclose(restricted.sum(1), torch.ones(len(images)))
    # among the kept classes the odds are the model's own
    expected = full[:, kept] / full[:, kept].sum(1, keepdim=True)
    assert torch.allclose(restricted[:, kept], expected, atol=1e-5)
    records = only.predict_files(cell_images, top_k=5)
    assert {r["class"] for r in records} <= set(only.answerable)
    assert all(r["top_k"][0]["class"] == r["class"] for r in records)
    out = json.loads(
        call_cli("predict", synthetic_run, *cell_images, "--classes", "ig,lymphocyte,neutrophil", "--json").stdout
    )
    assert out["records"] == only.predict_files(cell_images) and out["answerable"] == list(only.answerable)
    text = call_cli("predict", synthetic_run, *cell_images, "--classes", "ig,lymphocyte,neutrophil").stdout
    assert "answering only among: immature granulocyte, lymphocyte, neutrophil" in text


def test_unknown_or_no_class_names_are_refused(synthetic_run, cell_images):
    bad = call_cli("predict", synthetic_run, *cell_images, "--classes", "neutrophil,macrophage", check=False)
    assert bad.returncode != 0 and len(bad.stderr.strip().splitlines()) == 1
    assert "'macrophage'" in bad.stderr and "basophil, eosinophil" in bad.stderr
    empty = call_cli("predict", synthetic_run, *cell_images, "--classes", ",", check=False)
    assert empty.returncode != 0 and "name at least one class" in empty.stderr


def test_differential_arithmetic():
    classes = list(CLASSES)
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


# ---------------------------------------------------------------- slow lane: real PBC images


def test_predictions_on_full_size_files_match_their_bloodmnist_twins(real_run, pbc_sample, real_dataset):
    classifier = bloodcell.load(real_run)
    records = classifier.predict_files([r["path"] for r in pbc_sample])
    twins = real_dataset.train.images[[int(r["bloodmnist_index"]) for r in pbc_sample]]
    twin_classes = classifier.predict(twins)
    agreement = np.mean([rec["class"] == twin for rec, twin in zip(records, twin_classes)])
    truth = [r["class"] for r in pbc_sample]
    file_accuracy = np.mean([rec["class"] == t for rec, t in zip(records, truth)])
    twin_accuracy = np.mean([c == t for c, t in zip(twin_classes, truth)])
    # a short model (6 epochs); the full recipes' figures are in benchmarks/bench_real_images.py
    assert agreement >= 0.9 and file_accuracy >= 0.85 and abs(file_accuracy - twin_accuracy) <= 0.05


def test_bfloat16_and_compiled_inference_agree_with_float32(real_run, real_dataset):
    images = real_dataset.val.images[:600]
    reference = bloodcell.load(real_run).predict_proba(images)
    for precision, compile in (("bfloat16", False), ("bfloat16", True)):
        fast = bloodcell.load(real_run, precision=precision, compile=compile)
        probs = fast.predict_proba(images)
        assert probs.dtype == reference.dtype and probs.shape == reference.shape
        assert (probs.argmax(1) == reference.argmax(1)).float().mean() >= 0.99
        assert (probs - reference).abs().max() < 0.1  # bfloat16 keeps about 3 significant digits
    with pytest.raises(BloodcellError, match="unknown precision 'float16'"):
        bloodcell.load(real_run, precision="float16")


def test_predict_folder_prints_differential(real_run, pbc_sample):
    folder = pbc_sample[0]["path"].parents[1] / "platelet"
    result = run_cli("predict", real_run, folder, "--top-k", "2")
    assert result.returncode == 0
    assert "50 of 50 images classified" in result.stdout and "platelets (counted apart)" in result.stdout
    assert result.stdout.count("\tplatelet\t") >= 45


def test_noise_is_flagged_as_unlike_the_training_images(synthetic_run, synthetic_file, tmp_path):
    classifier = bloodcell.load(synthetic_run)
    assert classifier.ood is not None and classifier.record.ood_threshold == pytest.approx(classifier.ood.threshold)
    rng = np.random.default_rng(0)
    noise = [rng.integers(0, 256, (200, 200, 3), dtype=np.uint8) for _ in range(8)]
    records = classifier.predict_images(noise)
    assert all(r["ood_score"] > classifier.ood.threshold for r in records)
    assert all(r["review"] and "unlike the training images" in r["review_reason"] for r in records)
    familiar = bloodmnist.load_npz(synthetic_file).val.images
    _, scores = classifier.logits_and_ood(familiar)
    assert (scores > classifier.ood.threshold).float().mean() <= 0.1  # ~2% by construction, small sample
    metrics = json.loads((synthetic_run / "metrics.json").read_text())
    assert 0 <= metrics["test"]["flagged_fraction"] <= 1


def test_a_broken_ood_file_is_refused(synthetic_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(synthetic_run, run)
    (run / "ood.safetensors").write_bytes(b"junk")
    with pytest.raises(BloodcellError, match="ood.safetensors"):
        bloodcell.load(run)


def test_shards_cover_every_file_once_and_merge_into_one_count(synthetic_run, cell_images, tmp_path):
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(7):
        (folder / f"c{i}.png").write_bytes(cell_images[i % len(cell_images)].read_bytes())
    whole = json.loads(call_cli("predict", synthetic_run, folder, "--json").stdout)
    parts = []
    for index in (1, 2, 3):
        out = call_cli("predict", synthetic_run, folder, "--shard", f"{index}/3", "--json").stdout
        (tmp_path / f"part{index}.json").write_text(out)
        parts.append(tmp_path / f"part{index}.json")
    sizes = [len(json.loads(p.read_text())["records"]) for p in parts]
    assert sizes == [3, 2, 2]
    merged = json.loads(call_cli("merge", *parts, "--json").stdout)
    assert merged["summary"] == whole["summary"] and merged["missing_parts"] == []
    assert sorted(r["path"] for r in merged["records"]) == sorted(r["path"] for r in whole["records"])
    partial = call_cli("merge", *parts[:2], check=False)
    assert partial.returncode == 0 and "parts [3] of 3 are missing" in partial.stderr
    assert call_cli("merge", parts[0], parts[0], check=False).returncode == 1
    assert "part 2 of 8" in call_cli("predict", synthetic_run, folder, "--shard", "9", check=False).stderr
