"""`bloodcell export`: an ONNX graph with the preprocessing inside, equal to the PyTorch run."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch

import bloodcell
from bloodcell.datasets import bloodmnist
from bloodcell.inference.classifier import Classifier
from tests.cli import call_cli


@pytest.fixture(scope="module")
def exported(synthetic_run, tmp_path_factory):
    run = tmp_path_factory.mktemp("export") / "run"
    shutil.copytree(synthetic_run, run)
    result = json.loads(call_cli("export", run, "--json").stdout)
    return run, result


def test_onnx_logits_equal_torch_logits(exported, synthetic_file):
    run, result = exported
    assert result["opset"] == 18 and (run / "model.onnx").is_file() and (run / "model.md").is_file()
    images = bloodmnist.load_npz(synthetic_file).test.images
    torch_run, onnx_run = bloodcell.load(run), Classifier.from_run(run, backend="onnx")
    a, b = torch_run.logits(images), onnx_run.logits(images)
    assert (a - b).abs().max().item() <= 1e-4 and torch.equal(a.argmax(1), b.argmax(1))
    _, torch_ood = torch_run.logits_and_ood(images[:8])
    _, onnx_ood = onnx_run.logits_and_ood(images[:8])
    assert torch.allclose(torch_ood, onnx_ood, rtol=1e-3)
    meta = onnx_run.model.metadata
    assert json.loads(meta["classes"]) == list(torch_run.classes) and float(meta["temperature"]) > 0
    assert int(meta["image_size"]) == 28 and "0..255" in meta["input"]


def test_predict_with_the_onnx_backend(exported, cell_images):
    run, _ = exported
    torch_records = json.loads(call_cli("predict", run, *cell_images, "--json").stdout)["records"]
    onnx_records = json.loads(call_cli("predict", run, *cell_images, "--json", "--backend", "onnx").stdout)["records"]
    assert [r["class"] for r in torch_records] == [r["class"] for r in onnx_records]
    card = (run / "model.md").read_text()
    assert "Known limits" in card and "CC BY 4.0" in card and "temperature" not in card.split("Known limits")[1][:0]


def test_bad_exports_are_one_line_errors(synthetic_run, tmp_path, monkeypatch):
    result = call_cli("export", tmp_path, check=False)
    assert result.returncode == 1 and "not a bloodcell run directory" in result.stderr
    no_onnx = call_cli("predict", synthetic_run, tmp_path, "--backend", "onnx", check=False)
    assert no_onnx.returncode == 1 and "export it first" in no_onnx.stderr
    monkeypatch.setitem(sys.modules, "onnx", None)  # as if the export extra were not installed
    missing = call_cli("export", synthetic_run, "--out", tmp_path / "m.onnx", check=False)
    assert missing.returncode == 1 and "pip install 'bloodcell[export]'" in missing.stderr
    assert not (tmp_path / "m.onnx").exists()
