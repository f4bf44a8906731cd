"""Augmentation and normalisation of whole batches held as tensors (no per-sample PIL work).

Blood-cell images have no preferred orientation, so the eight symmetries of the square
(flips and 90-degree rotations) are free, label-preserving augmentations and TTA views.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AugmentConfig:
    flip: bool = True
    rot90: bool = True
    translate: int = 2  # max shift in pixels, reflect-padded
    colour: float = 0.0  # max relative brightness/contrast/saturation jitter, 0 = off
    sharpness: float = 0.0  # max unsharp-mask amount (negative = blur), 0 = off; bridges scanner/resize differences


def channel_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images, in [0, 1] units."""
    x = images.float().div_(255)
    return x.mean(dim=(0, 2, 3)).tolist(), x.std(dim=(0, 2, 3)).tolist()


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th of the 8 symmetries of the square (k in 0..7): rotate by k%4 quarter turns, flip if k>=4."""
    if k >= 4:
        x = x.flip(-1)
    return torch.rot90(x, k % 4, dims=(-2, -1))


def random_dihedral(x: torch.Tensor, generator: torch.Generator, flip: bool, rot90: bool) -> torch.Tensor:
    choices = (8 if flip else 4) if rot90 else (2 if flip else 1)
    if choices == 1:
        return x
    ks = torch.randint(0, choices, (len(x),), generator=generator)
    if not rot90:
        ks = ks * 4  # 0 = identity, 4 = flip
    out = torch.empty_like(x)
    for k in ks.unique().tolist():
        idx = (ks == k).nonzero().squeeze(1)
        out[idx] = dihedral(x[idx], k)
    return out


def random_translate(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by up to `max_shift` px in x and y, filling with reflected pixels."""
    if max_shift <= 0:
        return x
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (max_shift,) * 4, mode="reflect")
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    out = torch.empty_like(x)
    for oy in range(2 * max_shift + 1):
        for ox in range(2 * max_shift + 1):
            idx = ((dy == oy) & (dx == ox)).nonzero().squeeze(1)
            if len(idx):
                out[idx] = padded[idx, :, oy : oy + h, ox : ox + w]
    return out


def random_colour(x: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Per-image brightness, contrast and saturation jitter on normalised floats (stain variation)."""
    if strength <= 0:
        return x
    n = len(x)

    def factor() -> torch.Tensor:
        return 1 + (torch.rand(n, 1, 1, 1, generator=generator) * 2 - 1) * strength

    grey = x.mean(dim=1, keepdim=True)
    x = grey + (x - grey) * factor()
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = mean + (x - mean) * factor()
    return x + (factor() - 1)


def random_sharpness(x: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """x + a * (x - blur(x)) with a per-image a in [-strength/2, strength]: blur or sharpen each image.

    Real images resized by another pipeline are softer or crisper than BloodMNIST's; this makes the
    model care less.
    """
    if strength <= 0:
        return x
    kernel = torch.tensor([1.0, 2.0, 1.0])
    kernel = (kernel[:, None] * kernel[None, :] / 16).expand(x.shape[1], 1, 3, 3).contiguous()
    blurred = torch.nn.functional.conv2d(
        torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate"), kernel, groups=x.shape[1]
    )
    amount = torch.rand(len(x), 1, 1, 1, generator=generator) * 1.5 * strength - strength / 2
    return x + amount * (x - blurred)


def augment_batch(x: torch.Tensor, config: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Augment a normalised float batch: symmetries, translation, optional colour jitter."""
    x = random_dihedral(x, generator, config.flip, config.rot90)
    x = random_translate(x, config.translate, generator)
    x = random_sharpness(x, config.sharpness, generator)
    return random_colour(x, config.colour, generator)
