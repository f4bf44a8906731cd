"""Training on several labs: lab folders, group hold-out, balanced batches, provenance, the review threshold."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

import bloodcell
from bloodcell.classes import CLASSES
from bloodcell.datasets import bloodmnist
from bloodcell.datasets.labs import hold_out_groups, read_lab
from bloodcell.errors import BloodcellError
from bloodcell.images import cells
from bloodcell.inference import ood
from bloodcell.training import sampling
from bloodcell.training.recipe import PRESETS, TrainConfig, with_overrides
from bloodcell.workflows.pipeline import TrainingData, train_run
from tests.cli import call_cli

WHITE = ("basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil")


def make_lab(root, name="lab_a", per_class=6, cells_per_group=2, seed=0, classes=WHITE):
    """A lab folder of coloured-blob 'cells' (one colour per class) with a manifest of groups."""
    rng = np.random.default_rng(seed)
    folder = root / name
    rows = []
    for k, cls in enumerate(classes):
        (folder / cls).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(150, 200, (48, 48, 3), dtype=np.uint8)
            pixels[12:36, 12:36, k % 3] = 40 + 30 * k
            path = f"{cls}/{i}.png"
            Image.fromarray(pixels).save(folder / path)
            rows.append({"file": path, "class": cls, "group": f"{cls}-{i // cells_per_group}"})
    with open(folder / "manifest.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["file", "class", "group"])
        writer.writeheader()
        writer.writerows(rows)
    return folder


def test_a_lab_folder_is_framed_as_model_input_with_its_groups(tmp_path):
    folder = make_lab(tmp_path)
    lab = read_lab(folder, 28, "none")
    assert lab.images.dtype == torch.uint8 and tuple(lab.images.shape) == (30, 3, 28, 28)
    assert lab.class_counts() == dict.fromkeys(WHITE, 6)
    assert len(set(lab.groups)) == 15 and lab.groups[0] == "basophil-0"
    assert "lab_a: 30 images" in lab.describe() and "15 groups" in lab.describe()


def test_a_lab_folder_framed_with_its_measured_magnification(tmp_path):
    from tests.test_cells import crop_of_a_lab

    folder = tmp_path / "lab_b"
    (folder / "neutrophil").mkdir(parents=True)
    for seed in range(10):
        crop_of_a_lab(seed, red_diameter=60).save(folder / "neutrophil" / f"{seed}.png")
    measured = read_lab(folder, 28, "cell:measure")
    stated = read_lab(folder, 28, f"cell:{cells.lab_red_cell(sorted(folder.glob('*/*.png'))).red_cell}")
    assert torch.equal(measured.images, stated.images)  # the lab's one magnification frames every crop
    assert not torch.equal(measured.images, read_lab(folder, 28, "cell").images)


def test_held_out_groups_never_straddle_the_split(tmp_path):
    lab = read_lab(make_lab(tmp_path, per_class=10), 28, "none")
    train, held = hold_out_groups(lab, 0.3)
    assert set(train.groups).isdisjoint(held.groups)
    assert len(train) + len(held) == len(lab)
    for k in set(lab.labels.tolist()):  # every class keeps images on both sides (5 groups each: 2 held out)
        assert (held.labels == k).sum() == 4 and (train.labels == k).sum() == 6
    assert hold_out_groups(lab, 0.3)[1].files == held.files  # the same split every time


def test_problems_in_a_lab_folder_are_one_line_each_and_never_silent(tmp_path):
    folder = make_lab(tmp_path)
    (folder / "basophil" / "broken.png").write_bytes(b"not an image")
    (folder / "eosinophils").mkdir()  # an empty class folder (plural name: the same class)
    lab = read_lab(folder, 28, "none")
    assert any("broken.png" in p and "left out" in p for p in lab.problems)
    assert any("eosinophils: empty class folder" in p for p in lab.problems)
    assert all("\n" not in p for p in lab.problems)
    for path in (folder / "monocyte").iterdir():  # a class none of whose images can be read is an error
        path.write_bytes(b"junk")
    with pytest.raises(BloodcellError, match="none of the images of monocyte"):
        read_lab(folder, 28, "none")


def test_unknown_class_folders_and_bad_manifests_are_refused(tmp_path):
    folder = make_lab(tmp_path)
    (folder / "macrophage").mkdir()
    with pytest.raises(BloodcellError, match="unknown class folder.*macrophage"):
        read_lab(folder, 28, "none")
    other = make_lab(tmp_path, name="lab_b")
    (other / "manifest.csv").write_text("name,cluster\nx,y\n")
    with pytest.raises(BloodcellError, match="needs the columns file and group"):
        read_lab(other, 28, "none")


def test_one_source_batches_are_the_plain_permutation():
    generator, reference = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    batches = sampling.epoch_batches(100, 32, generator)
    order = torch.randperm(100, generator=reference)
    assert [b.tolist() for b in batches] == [order[i : i + 32].tolist() for i in range(0, 100, 32)]


def test_every_batch_takes_fixed_shares_of_each_source():
    sources = torch.cat([torch.zeros(1000), torch.ones(40), torch.full((10,), 2)]).long()
    shares = sampling.shares(2, 0.5, with_bloodmnist=True)
    assert shares == (0.5, 0.25, 0.25)
    batches = sampling.epoch_batches(len(sources), 64, torch.Generator().manual_seed(0), sources, shares)
    assert len(batches) == sampling.steps_per_epoch(len(sources), 64, sources, shares) == 32  # 1000 / 32
    for batch in batches[:-1]:
        assert sources[batch].bincount(minlength=3).tolist() == [32, 16, 16]
    assert sources[batches[-1]].bincount(minlength=3).tolist() == [8, 16, 16]  # the rest of the first source
    first = torch.cat(batches)[sources[torch.cat(batches)] == 0]
    assert sorted(first.tolist()) == list(range(1000))  # the first source: each image once per epoch
    again = sampling.epoch_batches(len(sources), 64, torch.Generator().manual_seed(0), sources, shares)
    assert all(torch.equal(a, b) for a, b in zip(batches, again))  # the generator decides everything


def test_the_review_threshold_flags_at_most_one_percent_of_every_training_lab():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(600, 4, generator=generator)
    labels = torch.arange(600) % 3
    val = torch.cat([torch.randn(300, 4, generator=generator), 3 + torch.randn(100, 4, generator=generator)])
    sources = torch.cat([torch.zeros(300), torch.ones(100)]).long()
    pooled = ood.fit(features, labels, val)
    per_lab = ood.fit(features, labels, val, val_sources=sources)
    scores = per_lab.score(val)
    assert (scores[sources == 1] > per_lab.threshold).float().mean() <= 0.01
    assert per_lab.threshold > pooled.threshold  # the far lab would have had most of its images flagged


def test_a_lab_without_some_classes_gets_centres_only_for_those_it_has():
    features, labels = torch.randn(50, 3), torch.tensor([4, 6] * 25)
    model = ood.fit(features, labels, torch.randn(10, 3))
    assert model.means.shape == (2, 3) and torch.isfinite(model.score(torch.randn(5, 3))).all()


def test_training_on_bloodmnist_and_two_labs_records_its_provenance(synthetic_file, tmp_path):
    labs = [str(make_lab(tmp_path, "lab_a")), str(make_lab(tmp_path, "lab_b", seed=1))]
    config = with_overrides(PRESETS["fast"], epochs=2, batch_size=32, crop="none", labs=labs)
    run_dir = tmp_path / "run"
    scores = train_run(bloodmnist.load_npz(synthetic_file), run_dir, config, progress=False)
    assert {"val", "test", "test_tta", "val_lab_a", "val_lab_b"} <= set(scores)
    record = json.loads((run_dir / "model.json").read_text())
    provenance = {lab["name"]: lab for lab in record["data"]["labs"]}
    assert provenance["lab_a"]["images"] == 30 and provenance["lab_a"]["per_class"]["monocyte"] == 6
    assert provenance["lab_a"]["trained_on"] + provenance["lab_a"]["held_out"] == 30
    assert record["train_config"]["labs"] == labs
    info = call_cli("info", run_dir)
    assert "lab_a: 30 images" in info.stdout and "trained on" in info.stdout
    assert bloodcell.load(run_dir).predict_files([tmp_path / "lab_a" / "basophil"])  # an ordinary run


def test_training_on_the_lab_folders_alone(synthetic_file, tmp_path):
    labs = [str(make_lab(tmp_path, "lab_a")), str(make_lab(tmp_path, "lab_b", seed=1))]
    config = with_overrides(PRESETS["fast"], epochs=2, batch_size=32, crop="none", labs=labs, bloodmnist=False)
    dataset = bloodmnist.load_npz(synthetic_file)
    data = TrainingData.assemble(dataset, [read_lab(d, 28, "none") for d in labs], config)
    assert set(data.train.labels.tolist()) <= {CLASSES.index(c) for c in WHITE}  # no BloodMNIST image
    scores = train_run(dataset, tmp_path / "run", config, progress=False)
    assert "test" not in scores and {"val", "val_lab_a", "val_lab_b"} <= set(scores)


def test_a_recipe_without_bloodmnist_needs_labs_and_labs_must_be_folders():
    with pytest.raises(BloodcellError, match="needs --labs"):
        TrainConfig(bloodmnist=False)
    with pytest.raises(BloodcellError, match="labs must be a list of folders"):
        TrainConfig(labs=("",))
    assert TrainConfig.from_dict(TrainConfig(labs=("a", "b")).to_dict() | {"labs": ["a", "b"]}) == TrainConfig(
        labs=("a", "b")
    )


def test_a_bad_lab_folder_is_one_line_and_writes_nothing(synthetic_file, tmp_path):
    folder = make_lab(tmp_path)
    (folder / "macrophage").mkdir()
    out = tmp_path / "run"
    result = call_cli(
        "train", "--data-file", synthetic_file, "--preset", "fast", "--epochs", "1", "--labs", folder, "--out", out,
        check=False,
    )  # fmt: skip
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and "macrophage" in result.stderr
    assert not out.exists()


def test_the_multilab_preset_without_lab_folders_is_one_line(synthetic_file, tmp_path):
    out = tmp_path / "run"
    result = call_cli("train", "--data-file", synthetic_file, "--preset", "multilab", "--out", out, check=False)
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and "--labs DIR" in result.stderr
    assert not out.exists()
