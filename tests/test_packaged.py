"""The model shipped inside the package: what it is, that commands use it without a RUN, that the wheel has it."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from dataclasses import replace

import pytest

import bloodcell
from bloodcell import runs
from bloodcell.datasets import bloodmnist
from bloodcell.datasets.labs import hold_out_groups, read_lab
from bloodcell.evaluation.scoring import evaluate
from bloodcell.training.recipe import PRESETS, TrainConfig
from tests.cli import call_cli

PACKAGED_FILES = ("model.json", "model.safetensors", "ood.safetensors", "metrics.json", "MODEL_CARD.md")


def test_packaged_model_is_the_multilab_recipe_of_the_recorded_command():
    record = runs.read_record(runs.PACKAGED_RUN)
    # settings added since it was trained read back as their defaults, which must leave the recipe as it was
    assert TrainConfig.from_dict(record.train_config) == replace(PRESETS["multilab"], labs=("labs/chula", "labs/lisc"))
    provenance = json.loads((runs.PACKAGED_RUN / "PROVENANCE.json").read_text())
    assert provenance["command"].startswith("bloodcell train --preset multilab --labs DIR/labs/chula DIR/labs/lisc")
    assert provenance["metrics"] == record.metrics
    card = (runs.PACKAGED_RUN / "MODEL_CARD.md").read_text()
    assert "CC BY 4.0" in card and "Acevedo" in card and f"{record.metrics['test']['accuracy']:.4f}" in card
    assert "chula: " in card and "lisc: " in card and "research use only" in card
    assert "Leave one lab out" in card
    # no path from the machine that built it
    assert not record.data["file"].startswith("/")
    assert [lab["folder"] for lab in record.data["labs"]] == ["labs/chula", "labs/lisc"]
    classifier = bloodcell.load()
    assert classifier.ood is not None and classifier.record.temperature > 0


def test_predict_and_explain_without_a_run_use_the_packaged_model(cell_images, tmp_path):
    folder = cell_images[0].parent
    packaged = call_cli("predict", folder, "--json")
    named = call_cli("predict", runs.PACKAGED_RUN, folder, "--json")
    assert "packaged with bloodcell" in packaged.stderr and "packaged" not in named.stderr
    assert [r["class"] for r in json.loads(packaged.stdout)["records"]] == [
        r["class"] for r in json.loads(named.stdout)["records"]
    ]
    # the whole image as one cell: the fixture's pixels are noise, which the field finder may read as many
    explained = call_cli("explain", cell_images[0], "--crop", "none", "--out", tmp_path / "cams")
    assert "packaged with bloodcell" in explained.stderr and len(list((tmp_path / "cams").glob("*.png"))) == 1


def test_evaluate_without_a_run_scores_a_labs_folder_with_the_packaged_model(cell_images, tmp_path, monkeypatch):
    lab = tmp_path / "lab"
    (lab / "neutrophil").mkdir(parents=True)
    for image in cell_images[:3]:
        (lab / "neutrophil" / image.name).write_bytes(image.read_bytes())
    monkeypatch.chdir(tmp_path)  # the figures of the packaged model go here, never into the package
    result = call_cli("evaluate", "--images", lab, "--crop", "none", "--json")
    assert "packaged with bloodcell" in result.stderr
    scored = json.loads(result.stdout)
    assert scored["n"] == 3 and scored["figures"] == ["confusion_lab.png"]
    assert (tmp_path / "confusion_lab.png").is_file()
    assert not list(runs.PACKAGED_RUN.glob("confusion_*.png"))


def test_a_misnamed_or_misplaced_run_is_a_one_line_error(cell_images, synthetic_run):
    folder = cell_images[0].parent
    typo = call_cli("predict", folder.parent / "no-such-run", folder, check=False)
    assert typo.returncode == 1 and "no such run directory, image file or folder" in typo.stderr
    only_run = call_cli("predict", synthetic_run, check=False)  # a run but no images
    assert only_run.returncode == 1 and "is a run directory" in only_run.stderr


def test_packaged_weights_reproduce_the_recorded_lab_metrics(real_data_dir):
    """Each lab's held-out groups, read and framed afresh from the data folder's labs/, score as recorded."""
    recorded = json.loads((runs.PACKAGED_RUN / runs.METRICS).read_text())
    classifier = bloodcell.load()
    size, crop = classifier.record.image_size, classifier.record.preprocessing.crop
    for name in ("chula", "lisc"):
        lab = read_lab(real_data_dir / "labs" / name, size, crop)
        held_out = hold_out_groups(lab, classifier.record.train_config["lab_holdout"])[1].split()
        scored = evaluate(classifier, held_out)
        # the same predictions up to one image: another CPU's float rounding may flip a near-tie
        assert abs(scored["accuracy"] - recorded[f"val_{name}"]["accuracy"]) <= 1.01 / len(held_out)


def test_packaged_weights_reproduce_the_recorded_bloodmnist_metrics(real_data_dir):
    """The 64 px BloodMNIST file is built with `bloodcell build-data` (not in CI's data folder)."""
    recorded = json.loads((runs.PACKAGED_RUN / runs.METRICS).read_text())
    classifier = bloodcell.load()
    if not (real_data_dir / f"bloodmnist_{classifier.record.image_size}.npz").exists():
        pytest.skip(f"no bloodmnist_{classifier.record.image_size}.npz in {real_data_dir} (bloodcell build-data)")
    dataset = bloodmnist.load(real_data_dir, size=classifier.record.image_size)
    for split in ("val", "test"):
        scored = evaluate(classifier, dataset.split(split))
        assert abs(scored["accuracy"] - recorded[split]["accuracy"]) <= 1.01 / len(dataset.split(split))
        assert scored["auc_macro_ovr"] == pytest.approx(recorded[split]["auc_macro_ovr"], abs=2e-4)


@pytest.mark.slow
def test_a_wheel_built_from_the_checkout_contains_the_packaged_model(tmp_path):
    root = runs.PACKAGED_RUN.parents[3]
    command = [sys.executable, "-m", "pip", "wheel", str(root), "--no-deps", "--no-build-isolation", "-w", tmp_path]
    subprocess.run(command, check=True, capture_output=True)
    (wheel,) = tmp_path.glob("bloodcell-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"bloodcell/packaged/default/{name}" for name in PACKAGED_FILES} <= names
