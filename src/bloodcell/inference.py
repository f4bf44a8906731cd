"""Running a trained network: normalisation, batching, test-time augmentation, precision.

Everything `predict`, `evaluate`, `explain`, `serve` and the benchmarks need to turn uint8 images
into logits, and nothing from training: importing this never loads the optimiser, EMA or
checkpoint code.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from bloodcell import models
from bloodcell.augment import dihedral
from bloodcell.errors import BloodcellError
from bloodcell.runs import RunRecord

PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (N,3,H,W) -> float32, normalised per channel (`mean`/`std` in [0, 1] units)."""
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * 255
    std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * 255
    return (images.float() - mean_t) / std_t


def build(record: RunRecord, weights: dict[str, torch.Tensor], precision: str = "float32") -> nn.Module:
    """The network a run describes, with its weights, in eval mode and channels-last memory."""
    if precision not in PRECISIONS:
        raise BloodcellError(f"unknown precision {precision!r}; use {' or '.join(PRECISIONS)}")
    model = models.create(
        record.arch, image_size=record.image_size, num_classes=len(record.classes), **record.arch_args
    )
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise BloodcellError(f"weights do not fit the {record.arch} described in model.json ({first})") from None
    return model.eval().to(memory_format=torch.channels_last, dtype=PRECISIONS[precision])


def compiled(model: nn.Module) -> nn.Module:
    """torch.compile with the weights frozen into the graph (compiles on first call, ~10 s; needs a C++ compiler)."""
    return torch.compile(model, dynamic=False, options={"freezing": True})


@torch.no_grad()
def logits(
    model: nn.Module,
    images: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = 1024,
    tta: bool = False,
) -> torch.Tensor:
    """Float32 logits for uint8 images (N,3,H,W); with `tta`, averaged over the 8 flips/rotations.

    Inputs follow the model's weights: their dtype (bfloat16 models get bfloat16 inputs) and, for
    channels-last convolution weights, channels-last memory (which oneDNN runs fastest on CPU).
    """
    model.eval()
    first = next(model.parameters())
    channels_last = first.is_contiguous(memory_format=torch.channels_last) and any(
        p.ndim == 4 for p in model.parameters()
    )
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    views = range(8) if tta else range(1)
    out = []
    for start in range(0, len(images), batch_size):
        x = normalize(images[start : start + batch_size], mean, std).to(first.dtype)
        per_view = [model(dihedral(x, k).contiguous(memory_format=memory_format)).float() for k in views]
        out.append(torch.stack(per_view).mean(dim=0))
    return torch.cat(out) if out else torch.empty(0, models.NUM_CLASSES)
