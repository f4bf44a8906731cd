"""`bloodcell finetune`: a run adapted to a lab's labelled folder is an ordinary run."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

import bloodcell
from bloodcell.datasets import bloodmnist
from bloodcell.errors import BloodcellError
from bloodcell.workflows.finetune import FinetuneConfig, hold_out
from tests.cli import call_cli


@pytest.fixture()
def lab_folder(tmp_path, synthetic_file):
    """A 'lab' with three classes, 5 images each: synthetic training images enlarged to 120 px files."""
    source = bloodmnist.load_npz(synthetic_file).train
    folder = tmp_path / "lab"
    for name, label in (("NEUTROPHIL", 6), ("lymphocytes", 4), ("ig", 3)):
        (folder / name).mkdir(parents=True)
        for i in np.flatnonzero(source.labels.numpy() == label)[:5]:
            pixels = source.images[i].permute(1, 2, 0).numpy()
            Image.fromarray(pixels).resize((120, 120), Image.BILINEAR).save(folder / name / f"{i}.png")
    return folder


def test_finetune_writes_an_ordinary_run(synthetic_run, synthetic_file, lab_folder, tmp_path):
    out = tmp_path / "tuned"
    args = ["finetune", synthetic_run, lab_folder, "--out", out, "--data-file", synthetic_file]
    result = call_cli(*args, "--epochs", "1", "--replay", "64", "--json")
    summary = json.loads(result.stdout)
    assert summary["lab_images"] == 15 and summary["held_out"] == 3 and summary["trained_on"] == 12
    assert summary["per_class"] == {"neutrophil": 5, "lymphocyte": 5, "immature granulocyte": 5}
    tuned = bloodcell.load(out)
    assert tuned.classes == bloodcell.load(synthetic_run).classes  # all eight classes kept
    assert tuned.record.data["finetuned_from"] == str(synthetic_run.resolve())
    with open(out / "lab_images.csv") as f:
        uses = [row["use"] for row in csv.DictReader(f)]
    assert uses.count("held out") == 3
    assert call_cli("predict", out, lab_folder).returncode == 0  # every command accepts it
    refused = call_cli(*args, check=False)
    assert refused.returncode == 1 and "use --overwrite" in refused.stderr


def test_unknown_class_folders_are_one_line_errors(synthetic_run, synthetic_file, lab_folder, tmp_path):
    (lab_folder / "bands").mkdir()
    result = call_cli(
        "finetune", synthetic_run, lab_folder, "--out", tmp_path / "x", "--data-file", synthetic_file, check=False
    )
    assert result.returncode == 1 and "unknown class folder(s) 'bands'" in result.stderr and "aliases" in result.stderr
    assert not (tmp_path / "x").exists()


def test_hold_out_keeps_small_classes_whole():
    import torch

    labels = torch.tensor([0] * 10 + [1] * 2 + [2] * 5)
    train, held = hold_out(labels, 0.2, seed=0)
    assert len(held) == 2 + 0 + 1 and len(train) + len(held) == len(labels)
    assert set(train.tolist()).isdisjoint(held.tolist())
    with pytest.raises(BloodcellError):
        FinetuneConfig(holdout=1.5)


def test_a_lab_folder_is_scored_answering_only_among_the_named_classes(synthetic_run, synthetic_file, lab_folder):
    args = ["evaluate", synthetic_run, "--images", lab_folder, "--data-file", synthetic_file]
    restricted = json.loads(call_cli(*args, "--classes", "neutrophil,lymphocyte,ig", "--json").stdout)
    assert restricted["answerable"] == ["immature granulocyte", "lymphocyte", "neutrophil"]
    assert {r["class"] for r in restricted["records"]} <= set(restricted["answerable"])
    assert len(restricted["records"]) == 15
    text = call_cli(*args, "--classes", "neutrophil,lymphocyte,ig").stdout
    assert "answering only among: immature granulocyte, lymphocyte, neutrophil (--classes)" in text
    assert "answering only" not in call_cli(*args).stdout
