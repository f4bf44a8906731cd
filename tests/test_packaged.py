"""The model shipped inside the package: what it is, that commands use it without a RUN, that the wheel has it."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile

import pytest

import bloodcell
from bloodcell import runs
from bloodcell.evaluation.scoring import evaluate
from bloodcell.training.recipe import PRESETS, TrainConfig
from tests.cli import call_cli

PACKAGED_FILES = ("model.json", "model.safetensors", "ood.safetensors", "metrics.json", "MODEL_CARD.md")


def test_packaged_model_is_the_default_recipe_of_the_recorded_command():
    record = runs.read_record(runs.PACKAGED_RUN)
    # settings added since it was trained read back as their defaults, which must leave the recipe as it was
    assert TrainConfig.from_dict(record.train_config) == PRESETS["default"]
    provenance = json.loads((runs.PACKAGED_RUN / "PROVENANCE.json").read_text())
    assert provenance["command"] == "bloodcell train --seed 42"
    assert provenance["metrics"] == record.metrics
    card = (runs.PACKAGED_RUN / "MODEL_CARD.md").read_text()
    assert "CC BY 4.0" in card and "Acevedo" in card and f"{record.metrics['test']['accuracy']:.4f}" in card
    assert not record.data["file"].startswith("/")  # no path from the machine that built it
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
    explained = call_cli("explain", cell_images[0], "--out", tmp_path / "cams")
    assert "packaged with bloodcell" in explained.stderr and len(list((tmp_path / "cams").glob("*.png"))) == 1


def test_a_misnamed_or_misplaced_run_is_a_one_line_error(cell_images, synthetic_run):
    folder = cell_images[0].parent
    typo = call_cli("predict", folder.parent / "no-such-run", folder, check=False)
    assert typo.returncode == 1 and "no such run directory, image file or folder" in typo.stderr
    only_run = call_cli("predict", synthetic_run, check=False)  # a run but no images
    assert only_run.returncode == 1 and "is a run directory" in only_run.stderr


def test_packaged_weights_reproduce_the_recorded_metrics(real_dataset):
    recorded = json.loads((runs.PACKAGED_RUN / runs.METRICS).read_text())
    classifier = bloodcell.load()
    for split in ("val", "test"):
        scored = evaluate(classifier, real_dataset.split(split))
        # the same predictions up to one image: another CPU's float rounding may flip a near-tie
        assert abs(scored["accuracy"] - recorded[split]["accuracy"]) <= 1.01 / len(real_dataset.split(split))
        assert scored["auc_macro_ovr"] == pytest.approx(recorded[split]["auc_macro_ovr"], abs=2e-4)


@pytest.mark.slow
def test_a_wheel_built_from_the_checkout_contains_the_packaged_model(tmp_path):
    root = runs.PACKAGED_RUN.parents[3]
    command = [sys.executable, "-m", "pip", "wheel", str(root), "--no-deps", "--no-build-isolation", "-w", tmp_path]
    subprocess.run(command, check=True, capture_output=True)
    (wheel,) = tmp_path.glob("bloodcell-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"bloodcell/packaged/default/{name}" for name in PACKAGED_FILES} <= names
