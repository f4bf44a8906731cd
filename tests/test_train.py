"""The training loop on tiny synthetic tensors, checkpoints and exact resume, and `train` end to end."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
import torch

import bloodcell
from bloodcell import files, models, runs
from bloodcell.datasets import bloodmnist
from bloodcell.errors import BloodcellError
from bloodcell.training import checkpoint
from bloodcell.training.loop import (
    build_model,
    fit,
    make_optimizer,
    make_scheduler,
    mix_feature_styles,
    mixup_batch,
    stage_ends,
    style_mixing,
)
from bloodcell.training.recipe import PRESETS, TrainConfig, with_overrides
from bloodcell.workflows.pipeline import train_run
from tests.cli import call_cli, run_cli

TINY = with_overrides(PRESETS["fast"], epochs=2, batch_size=32)


@pytest.fixture(scope="module")
def synthetic(synthetic_file):
    return bloodmnist.load_npz(synthetic_file)


def test_fit_learns_the_synthetic_classes(synthetic):
    config = with_overrides(TINY, epochs=3)
    result = fit(build_model(config, 28), synthetic.train, synthetic.val, config, progress=False)
    assert [row["epoch"] for row in result.history] == [1, 2, 3] and result.finished
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert result.history[-1]["val_acc"] > 0.3  # chance is 1/8


def test_early_stopping_keeps_the_best_epoch(synthetic):
    config = with_overrides(TINY, epochs=4, patience=1, lr=0.5)  # a wild learning rate: val loss gets worse
    result = fit(build_model(config, 28), synthetic.train, synthetic.val, config, progress=False)
    losses = [row["val_loss"] for row in result.history]
    assert result.best_epoch == 1 + losses.index(min(losses))
    assert len(result.history) <= 4


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(synthetic, tmp_path):
    config = with_overrides(TINY, ema_decay=0.9, mixup=0.2, mixstyle=0.5)  # every RNG consumer on
    train_run(synthetic, tmp_path / "straight", config, progress=False)
    assert train_run(synthetic, tmp_path / "cut", config, progress=False, stop_after_epochs=1) is None
    assert (tmp_path / "cut" / "checkpoint" / "state.json").is_file() and not runs.is_run_dir(tmp_path / "cut")
    train_run(synthetic, tmp_path / "cut", config, progress=False, resume=True)
    straight = files.load_tensors(tmp_path / "straight" / runs.MODEL_WEIGHTS)
    resumed = files.load_tensors(tmp_path / "cut" / runs.MODEL_WEIGHTS)
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)
    metrics = [json.loads((tmp_path / name / runs.METRICS).read_text())["test"] for name in ("straight", "cut")]
    assert metrics[0] == metrics[1]
    assert not (tmp_path / "cut" / "checkpoint").exists()


@pytest.fixture()
def interrupted(synthetic, tmp_path):
    train_run(synthetic, tmp_path / "run", TINY, progress=False, stop_after_epochs=1)
    return tmp_path / "run" / runs.CHECKPOINT


DELETED = object()  # a change that removes the field


def _resume(synthetic, folder, config=TINY):
    return train_run(synthetic, folder.parent, config, progress=False, resume=True)


def test_a_deleted_state_file_is_reported_not_restarted(synthetic, interrupted):
    (interrupted / checkpoint.STATE).unlink()
    with pytest.raises(BloodcellError, match="nothing to resume"):
        _resume(synthetic, interrupted)
    with pytest.raises(BloodcellError, match="incomplete"):
        checkpoint.load(interrupted, TINY.epochs)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"tensors": "../../../etc/passwd"}, "not a checkpoint file in this folder"),
        ({"tensors": "/tmp/state-1.safetensors"}, "not a checkpoint file in this folder"),
        ({"epoch": 99}, "does not fit a run of 2 epochs"),
        ({"epoch": "1"}, "does not fit a run of 2 epochs"),
        ({"history": DELETED}, "not a bloodcell checkpoint"),
        ({"history": None}, "history is not a list"),
        ({"history": {"epoch": 1}}, "history is not a list"),
    ],
)
def test_edited_state_files_are_refused(synthetic, interrupted, change, message):
    state = json.loads((interrupted / checkpoint.STATE).read_text())
    for key, value in change.items():
        if value is DELETED:
            del state[key]
        else:
            state[key] = value
    (interrupted / checkpoint.STATE).write_text(json.dumps(state))
    with pytest.raises(BloodcellError, match=message):
        _resume(synthetic, interrupted)


def test_foreign_tensors_and_other_configs_are_refused(synthetic, interrupted):
    with pytest.raises(BloodcellError, match=r"different recipe \(lr 0.006 -> 0.001\)"):
        _resume(synthetic, interrupted, with_overrides(TINY, lr=1e-3))
    name = json.loads((interrupted / checkpoint.STATE).read_text())["tensors"]
    tensors = files.load_tensors(interrupted / name)
    foreign = {k.replace("model.features", "model.body"): v for k, v in tensors.items()}
    files.save_tensors(interrupted / name, foreign)
    with pytest.raises(BloodcellError, match="checkpoint does not fit this model"):
        _resume(synthetic, interrupted)
    (interrupted / name).write_bytes(b"garbage")
    with pytest.raises(BloodcellError, match="not a valid safetensors"):
        _resume(synthetic, interrupted)


def test_config_round_trips_and_reads_the_first_release(tmp_path):
    config = with_overrides(PRESETS["default"], epochs=7, mixup=0.2)
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert TrainConfig.from_dict(config.to_dict() | {"model_args": {}}) == config  # first release's key
    with pytest.raises(BloodcellError, match="unknown or malformed"):
        TrainConfig.from_dict(config.to_dict() | {"learning_speed": 3})


def test_mixup_blends_each_image_with_one_partner():
    images = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 3, 2, 2)
    generator = torch.Generator().manual_seed(0)
    unchanged, no_partner, full_weight = mixup_batch(images, 0.0, generator)
    assert unchanged is images and no_partner is None and full_weight == 1.0
    torch.manual_seed(0)
    mixed, partner, weight = mixup_batch(images, 0.4, generator)
    assert 0 < weight < 1 and sorted(partner.tolist()) == [0, 1, 2, 3]
    assert torch.allclose(mixed, weight * images + (1 - weight) * images[partner])


def test_mixstyle_blends_each_images_channel_statistics_with_a_partners():
    x = torch.randn(6, 4, 5, 5) * torch.arange(1.0, 7.0).view(6, 1, 1, 1) + torch.arange(6.0).view(6, 1, 1, 1)
    torch.manual_seed(0)
    mixed = mix_feature_styles(x)
    assert mixed.shape == x.shape and not torch.allclose(mixed, x)
    means, new_means = x.mean(dim=(2, 3)), mixed.mean(dim=(2, 3))
    assert torch.all(new_means >= means.min(0).values - 1e-4) and torch.all(new_means <= means.max(0).values + 1e-4)
    # each image keeps its own standardised pattern: only the channel statistics moved
    assert torch.allclose(_standardised(mixed), _standardised(x), atol=1e-3)


def _standardised(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean(dim=(2, 3), keepdim=True)) / x.std(dim=(2, 3), keepdim=True)


def test_mixstyle_acts_only_while_training_and_leaves_the_model_as_it_was():
    model, x = models.create("res-small").train(), torch.randn(8, 3, 28, 28)
    plain = model(x)
    with style_mixing(model, 1.0):
        mixed = model(x)
        model.eval()
        evaluated = model(x)
    assert not torch.allclose(mixed, plain)
    assert torch.equal(evaluated, model(x)) and torch.allclose(model.train()(x), plain)
    not_residual = models.create("seed-cnn")
    with pytest.raises(BloodcellError, match="mixstyle needs a residual model"), style_mixing(not_residual, 0.5):
        pass
    with pytest.raises(BloodcellError, match="mixstyle must be in"):
        TrainConfig(mixstyle=1.5)


def test_mixstyle_hooks_the_output_of_every_stage_but_the_last():
    large = models.create("res-large")  # two residual blocks per stage, three stages
    blocks = [m for m in large.modules() if isinstance(m, models.ResidualBlock)]
    assert stage_ends(large) == [blocks[1], blocks[3], blocks[5]]
    with style_mixing(large, 0.5):
        hooked = [block for block in blocks if block._forward_hooks]
    assert hooked == [blocks[1], blocks[3]] and not any(block._forward_hooks for block in blocks)


@pytest.mark.parametrize("total_steps", range(1, 13))
def test_every_run_length_gets_a_schedule_it_can_step_through(total_steps):
    model = torch.nn.Linear(2, 2)
    optimizer = make_optimizer(model, PRESETS["default"])
    scheduler = make_scheduler(optimizer, PRESETS["default"], total_steps)  # 4 steps used to divide by zero
    for _ in range(total_steps):
        optimizer.step()
        scheduler.step()
    is_onecycle = isinstance(scheduler, torch.optim.lr_scheduler.OneCycleLR)
    assert is_onecycle == (total_steps != 4)


def test_a_relu_run_trained_with_mixstyle_reloads_as_the_network_it_trained(synthetic, tmp_path):
    config = with_overrides(TINY, model="res-small-relu", mixstyle=0.5, epochs=1)
    train_run(synthetic, tmp_path / "relu", config, progress=False)
    record = runs.read_record(tmp_path / "relu")
    assert record.arch == "res-small-relu" and record.arch_args["act"] == "relu"
    assert record.train_config["mixstyle"] == 0.5
    layers = {type(m) for m in bloodcell.load(tmp_path / "relu").model.modules()}
    assert torch.nn.ReLU in layers and torch.nn.GELU not in layers


def test_train_cli_on_synthetic_data_at_64_px(tmp_path):
    from tests.conftest import write_synthetic_npz

    path = write_synthetic_npz(tmp_path / "bloodmnist_64.npz", size=64, n=(64, 16, 16))
    run_dir = tmp_path / "run64"
    result = call_cli("train", "--data-file", path, "--out", run_dir, "--preset", "fast", "--epochs", "1", "--json")
    assert json.loads(result.stdout)["test"]["accuracy"] >= 0
    assert json.loads((run_dir / "model.json").read_text())["preprocessing"]["image_size"] == 64
    assert bloodcell.load(run_dir).predict_proba(torch.zeros(2, 3, 64, 64, dtype=torch.uint8)).shape == (2, 8)


# ---------------------------------------------------------------- slow lane: the real data


QUICK = ["--preset", "fast", "--epochs", "2"]  # two epochs: a check of the machinery, not of accuracy


@pytest.fixture(scope="module")
def subset_run(real_subset_file, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "quick"
    result = run_cli("train", "--data-file", real_subset_file, "--out", run_dir, *QUICK, "--json")
    return run_dir, json.loads(result.stdout)


def test_train_writes_a_complete_run_directory(subset_run):
    run_dir, printed = subset_run
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
    record = runs.read_record(run_dir)
    assert record.arch == "res-small" and record.image_size == 28 and len(record.classes) == 8
    assert record.temperature > 0 and len(record.preprocessing.mean) == 3 and record.schema == runs.SCHEMA_VERSION
    assert record.train_config["epochs"] == 2 and record.bloodcell_version == bloodcell.__version__
    with open(run_dir / "history.csv") as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [1, 2]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["test"]["n"] == 300 and printed["test"]["accuracy"] == metrics["test"]["accuracy"]


def test_train_refuses_to_overwrite(subset_run, real_subset_file):
    run_dir, _ = subset_run
    before = (run_dir / "model.safetensors").read_bytes()
    result = run_cli("train", "--data-file", real_subset_file, "--out", run_dir, *QUICK, check=False)
    assert result.returncode == 1 and "use --overwrite or --resume" in result.stderr
    assert (run_dir / "model.safetensors").read_bytes() == before


def test_evaluate_json_matches_the_run_and_lists_its_figures(subset_run, real_subset_file, tmp_path):
    run_dir, _ = subset_run
    result = json.loads(run_cli("evaluate", run_dir, "--data-file", real_subset_file, "--json").stdout)
    stored = json.loads((run_dir / "metrics.json").read_text())["test"]
    assert result["accuracy"] == pytest.approx(stored["accuracy"])
    low, high = result["accuracy_ci95"]
    assert low <= result["accuracy"] <= high
    assert {"auc_macro_ovr", "balanced_accuracy", "f1_weighted", "precision_macro", "ece", "nll"} <= set(result)
    assert len(result["per_class"]) == 8 and sum(r["support"] for r in result["per_class"]) == 300
    text = run_cli("evaluate", run_dir, "--data-file", real_subset_file, "--tta", "--out", tmp_path).stdout
    assert "95% CI" in text and "immature granulocyte" in text
    assert f"wrote {tmp_path / 'confusion_test_tta.png'}" in text
    again = run_cli("evaluate", run_dir, "--data-file", real_subset_file, "--tta", "--out", tmp_path).stdout
    assert f"rewrote {tmp_path / 'confusion_test_tta.png'}" in again


def test_resume_through_the_cli_on_real_data(real_subset_file, tmp_path):
    copy = tmp_path / "subset.npz"
    shutil.copy(real_subset_file, copy)
    run_dir = tmp_path / "run"
    dataset = bloodmnist.load_npz(copy)
    train_run(dataset, run_dir, with_overrides(PRESETS["fast"], epochs=2), progress=False, stop_after_epochs=1)
    result = run_cli("train", "--data-file", copy, "--out", run_dir, *QUICK, "--resume", "--json")
    assert json.loads(result.stdout)["test"]["accuracy"] > 0.3
