"""`bloodcell train` / `evaluate`, checkpoints and resume, the Python API, other image sizes."""

from __future__ import annotations

import csv
import json

import pytest
import torch

import bloodcell
from bloodcell import data, runs
from bloodcell.pipeline import train_run
from bloodcell.train import PRESETS, mixup_batch, with_overrides
from tests.cli import run_cli
from tests.conftest import write_synthetic_npz

QUICK = ["--preset", "fast", "--epochs", "2"]  # two epochs: a check of the machinery, not of accuracy


@pytest.fixture(scope="module")
def trained_run(real_subset_file, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "quick"
    result = run_cli("train", "--data-file", real_subset_file, "--out", run_dir, *QUICK, "--json")
    return run_dir, json.loads(result.stdout)


def test_train_writes_a_complete_run_directory(trained_run):
    run_dir, printed = trained_run
    for name in (
        "model.safetensors",
        "model.json",
        "metrics.json",
        "history.csv",
        "learning_curves.png",
        "confusion_test.png",
        "reliability_test.png",
    ):
        assert (run_dir / name).is_file(), name
    assert not (run_dir / "checkpoint").exists()
    meta = json.loads((run_dir / "model.json").read_text())
    assert meta["arch"] == "res-small" and meta["image_size"] == 28 and len(meta["classes"]) == 8
    assert meta["temperature"] > 0 and len(meta["normalize"]["mean"]) == 3
    assert meta["train_config"]["epochs"] == 2 and meta["bloodcell_version"] == bloodcell.__version__
    with open(run_dir / "history.csv") as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [1, 2]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["test"]["n"] == 300 and printed["test"]["accuracy"] == metrics["test"]["accuracy"]


def test_train_refuses_to_overwrite(trained_run, real_subset_file):
    run_dir, _ = trained_run
    before = (run_dir / "model.safetensors").read_bytes()
    result = run_cli("train", "--data-file", real_subset_file, "--out", run_dir, *QUICK, check=False)
    assert result.returncode == 1 and "use --overwrite or --resume" in result.stderr
    assert (run_dir / "model.safetensors").read_bytes() == before


def test_evaluate_json_matches_the_run(trained_run, real_subset_file):
    run_dir, _ = trained_run
    result = json.loads(run_cli("evaluate", run_dir, "--data-file", real_subset_file, "--json").stdout)
    stored = json.loads((run_dir / "metrics.json").read_text())["test"]
    assert result["accuracy"] == pytest.approx(stored["accuracy"])
    low, high = result["accuracy_ci95"]
    assert low <= result["accuracy"] <= high
    assert {"auc_macro_ovr", "balanced_accuracy", "f1_weighted", "precision_macro", "ece", "nll"} <= set(result)
    assert len(result["per_class"]) == 8 and sum(r["support"] for r in result["per_class"]) == 300
    text = run_cli("evaluate", run_dir, "--data-file", real_subset_file, "--tta").stdout
    assert "95% CI" in text and "immature granulocyte" in text


def test_python_api_predicts_on_uint8_and_float(trained_run, real_subset_file):
    run_dir, _ = trained_run
    classifier = bloodcell.load(run_dir)
    images = data.load_npz(real_subset_file).test.images[:16]
    probs = classifier.predict_proba(images)
    assert probs.shape == (16, 8) and torch.allclose(probs.sum(1), torch.ones(16), atol=1e-5)
    as_float_nhwc = images.permute(0, 2, 3, 1).float().numpy() / 255
    assert torch.allclose(classifier.predict_proba(as_float_nhwc), probs, atol=1e-5)
    assert set(classifier.predict(images)) <= set(data.CLASSES)


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(real_subset_file, tmp_path):
    dataset = data.load_npz(real_subset_file)
    config = with_overrides(PRESETS["fast"], epochs=3, ema_decay=0.9, mixup=0.2)  # every RNG consumer on
    train_run(dataset, tmp_path / "straight", config, progress=False)
    assert train_run(dataset, tmp_path / "interrupted", config, progress=False, stop_after_epochs=1) is None
    assert (tmp_path / "interrupted" / "checkpoint" / "state.json").is_file()
    assert not runs.is_run_dir(tmp_path / "interrupted")
    train_run(dataset, tmp_path / "interrupted", config, progress=False, resume=True)
    straight = runs.load_tensors(tmp_path / "straight" / "model.safetensors")
    resumed = runs.load_tensors(tmp_path / "interrupted" / "model.safetensors")
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    a = json.loads((tmp_path / "straight" / "metrics.json").read_text())["test"]["accuracy"]
    b = json.loads((tmp_path / "interrupted" / "metrics.json").read_text())["test"]["accuracy"]
    assert a == b


def test_training_at_64_px_on_synthetic_data(tmp_path):
    path = write_synthetic_npz(tmp_path / "bloodmnist_64.npz", size=64, n=(64, 16, 16))
    run_dir = tmp_path / "run64"
    run_cli("train", "--data-file", path, "--out", run_dir, "--preset", "fast", "--epochs", "1")
    assert json.loads((run_dir / "model.json").read_text())["image_size"] == 64
    assert bloodcell.load(run_dir).predict_proba(torch.zeros(2, 3, 64, 64, dtype=torch.uint8)).shape == (2, 8)


def test_mixup_blends_each_image_with_one_partner():
    images = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 3, 2, 2)
    generator = torch.Generator().manual_seed(0)
    unchanged, no_partner, full_weight = mixup_batch(images, 0.0, generator)
    assert unchanged is images and no_partner is None and full_weight == 1.0
    torch.manual_seed(0)
    mixed, partner, weight = mixup_batch(images, 0.4, generator)
    assert 0 < weight < 1 and sorted(partner.tolist()) == [0, 1, 2, 3]
    assert torch.allclose(mixed, weight * images + (1 - weight) * images[partner])
