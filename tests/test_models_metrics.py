"""Architectures (shapes, parameter counts), metrics against hand-computed cases, augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bloodcell import models
from bloodcell.errors import BloodcellError
from bloodcell.evaluation import metrics
from bloodcell.inference.calibrate import fit_temperature


def test_study_architectures_match_the_paper():
    # baseline: 3*28*28*8 + 8; CNN: conv 3*64*4+64, conv 64*64*4+64, dense 9216*64+64, out 64*8+8
    assert models.parameter_count(models.create("baseline")) == 3 * 28 * 28 * 8 + 8
    expected_cnn = (3 * 64 * 4 + 64) + (64 * 64 * 4 + 64) + (64 * 12 * 12 * 64 + 64) + (64 * 8 + 8)
    assert models.parameter_count(models.create("seed-cnn")) == expected_cnn


@pytest.mark.parametrize("name", models.names())
@pytest.mark.parametrize("size", [28, 64, 128])
def test_every_model_gives_eight_logits(name, size):
    if name.endswith("-128") and size < 128 or name.endswith("-64") and size < 64:
        pytest.skip("stems that downsample early are for large images")
    model = models.create(name, image_size=size).eval()
    assert model(torch.zeros(2, 3, size, size)).shape == (2, 8)


def test_unknown_model_is_a_clear_error():
    with pytest.raises(BloodcellError, match="unknown model 'resnet-9000'"):
        models.create("resnet-9000")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"widths": [10_000_000]}, "outside"),
        ({"widths": [32] * 20}, "1 to 6"),
        ({"blocks": 9}, "outside"),
        ({"stem": 0}, "outside"),
        ({"image_size": 4}, "outside"),
        ({"colour": "blue"}, "bad arguments"),
        ({"act": "swish"}, "unknown activation"),
        ({"act": ["relu"]}, "bad arguments"),
    ],
)
def test_architecture_arguments_are_bounded(args, message):
    with pytest.raises(BloodcellError, match=message):
        models.create("res-small", **args)


def test_resolved_args_rebuild_the_same_network():
    args = models.resolved_args("res-small")
    a, b = models.create("res-small"), models.create("res-small", **args)
    assert models.parameter_count(a) == models.parameter_count(b) == 490_240


def test_the_relu_variant_is_the_same_network_with_a_cheaper_activation():
    gelu, relu = models.create("res-small"), models.create("res-small-relu")
    assert models.parameter_count(gelu) == models.parameter_count(relu)
    assert {type(m) for m in gelu.modules()} - {type(m) for m in relu.modules()} == {torch.nn.GELU}
    assert {type(m) for m in relu.modules()} - {type(m) for m in gelu.modules()} == {torch.nn.ReLU}
    assert models.resolved_args("res-small-relu")["act"] == "relu"


def test_the_tiny_variant_is_res_small_at_three_quarters_of_the_width():
    tiny, small = models.create("res-tiny"), models.create("res-small")
    assert models.resolved_args("res-tiny") == {"widths": (24, 48, 96), "blocks": 1, "stem": 16}
    assert models.parameter_count(tiny) == 276_040 < models.parameter_count(small)
    assert [type(m) for m in tiny.modules()] == [type(m) for m in small.modules()]
    assert tiny(torch.zeros(2, 3, 28, 28)).shape == (2, 8)
    assert 0.5 < _forward_flops(tiny) / _forward_flops(small) < 0.6  # what makes its steps cheaper


def _forward_flops(model: torch.nn.Module) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, 28, 28))
    return counter.get_total_flops()


def test_metrics_against_hand_computed_case():
    labels = np.array([0, 0, 1, 1, 2, 2, 2, 2])
    preds = np.array([0, 1, 1, 1, 2, 2, 0, 2])
    probs = np.full((8, 8), 0.01)
    probs[np.arange(8), preds] = 0.93
    m = metrics.classification_metrics(labels, probs)
    assert m["accuracy"] == pytest.approx(6 / 8)
    # per class precision: c0 1/2, c1 2/3, c2 3/3; recall: c0 1/2, c1 2/2, c2 3/4
    assert m["precision_macro"] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    assert m["recall_macro"] == pytest.approx((1 / 2 + 1 + 3 / 4) / 3)
    assert m["balanced_accuracy"] == pytest.approx((1 / 2 + 1 + 3 / 4) / 3)
    assert m["precision_weighted"] == pytest.approx((2 * 1 / 2 + 2 * 2 / 3 + 4 * 1) / 8)
    assert m["recall_weighted"] == pytest.approx(m["accuracy"])  # always true: why the study's 0.738 is odd
    f1 = [2 * p * r / (p + r) for p, r in ((1 / 2, 1 / 2), (2 / 3, 1), (1, 3 / 4))]
    assert m["f1_weighted"] == pytest.approx((2 * f1[0] + 2 * f1[1] + 4 * f1[2]) / 8)


def test_ece_hand_computed():
    labels = np.array([0, 0, 0, 0])
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.9, 0.1], [0.1, 0.9]])
    # all four in the 0.9 bin: accuracy 3/4, confidence 0.9 -> ECE 0.15
    assert metrics.expected_calibration_error(labels, probs) == pytest.approx(0.15)


def test_bootstrap_ci_brackets_accuracy():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 8, 1000)
    preds = np.where(rng.random(1000) < 0.9, labels, (labels + 1) % 8)
    low, high = metrics.bootstrap_accuracy_ci(labels, preds)
    accuracy = (labels == preds).mean()
    assert low < accuracy < high and high - low < 0.05


def test_temperature_scaling_lowers_nll_of_overconfident_logits():
    torch.manual_seed(0)
    labels = torch.randint(0, 8, (2000,))
    logits = torch.randn(2000, 8)
    logits[torch.arange(2000), labels] += 2.0
    logits *= 5  # overconfident
    t = fit_temperature(logits, labels)
    nll = torch.nn.functional.cross_entropy
    assert t > 1.5 and nll(logits / t, labels) < nll(logits, labels)


def test_early_downsampling_stems_reach_the_same_stage_size():
    x64, x128 = torch.zeros(2, 3, 64, 64), torch.zeros(2, 3, 128, 128)
    small_28 = models.create("res-small").features(torch.zeros(2, 3, 32, 32))
    assert models.create("res-small-64").features(x64).shape == small_28.shape
    assert models.create("res-small-128").features(x128).shape == small_28.shape


def test_device_selection(monkeypatch):
    from bloodcell.inference import network

    assert network.resolve_device("cpu").type == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert network.resolve_device("auto").type == "cpu"
    with pytest.raises(BloodcellError, match="no such device"):
        network.resolve_device("cuda")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert network.resolve_device("auto").type == "mps"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert network.resolve_device("auto").type == "cuda" and network.resolve_device("cuda").type == "cuda"
    with pytest.raises(BloodcellError, match="unknown device"):
        network.resolve_device("tpu")
