"""Colour normalisation: every image's colours moved to the training images' typical colours.

Labs stain, illuminate and photograph smears differently: the same neutrophil is dark violet on
cream in one lab and pale lavender on grey in another. Matching each image's mean and spread in
CIE Lab (Reinhard et al. 2001) to the training set's typical values removes most of that
difference while keeping each image's own contrasts (a red granule stays redder than the
nucleus around it). It is applied the same way to training and to new images, so the model only
ever sees normalised colours; the reference travels in the run record.
"""

from __future__ import annotations

import torch

# sRGB (D65) -> XYZ, and the D65 white point
_XYZ_FROM_RGB = torch.tensor([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
_RGB_FROM_XYZ = torch.linalg.inv(_XYZ_FROM_RGB)
_WHITE = torch.tensor([0.95047, 1.0, 1.08883])
MIN_SPREAD = 2.0  # Lab units: flatter channels are not stretched (a blank image stays blank)
MAX_GAIN = 4.0  # no channel's spread is scaled by more than this


def rgb_to_lab(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) sRGB in [0, 1] -> CIE Lab (L in 0..100)."""
    linear = torch.where(x > 0.04045, ((x + 0.055) / 1.055) ** 2.4, x / 12.92)
    xyz = torch.einsum("ij,njhw->nihw", _XYZ_FROM_RGB.to(x.device), linear) / _WHITE.to(x.device).view(1, 3, 1, 1)
    f = torch.where(xyz > 0.008856, xyz.clamp(min=1e-12) ** (1 / 3), 7.787 * xyz + 16 / 116)
    return torch.stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], dim=1)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """CIE Lab -> (N, 3, H, W) sRGB, clipped to [0, 1]."""
    fy = (lab[:, 0] + 16) / 116
    f = torch.stack([fy + lab[:, 1] / 500, fy, fy - lab[:, 2] / 200], dim=1)
    xyz = torch.where(f > 0.206893, f**3, (f - 16 / 116) / 7.787) * _WHITE.to(lab.device).view(1, 3, 1, 1)
    linear = torch.einsum("ij,njhw->nihw", _RGB_FROM_XYZ.to(lab.device), xyz).clamp(0, 1)
    return torch.where(linear > 0.0031308, 1.055 * linear ** (1 / 2.4) - 0.055, 12.92 * linear).clamp(0, 1)


def reference(images: torch.Tensor, batch: int = 4096) -> list[float]:
    """The typical per-image Lab mean and spread of uint8 images: [L, a, b means, L, a, b stds]."""
    means, stds = [], []
    for start in range(0, len(images), batch):
        lab = rgb_to_lab(images[start : start + batch].float() / 255)
        means.append(lab.mean(dim=(2, 3)))
        stds.append(lab.std(dim=(2, 3)))
    return torch.cat(means).mean(0).tolist() + torch.cat(stds).mean(0).tolist()


def normalize_colours(pixels: torch.Tensor, target: list[float]) -> torch.Tensor:
    """Pixels in [0, 1] (N, 3, H, W) with each image's Lab mean and spread moved to `target`."""
    lab = rgb_to_lab(pixels)
    mean = lab.mean(dim=(2, 3), keepdim=True)
    spread = lab.std(dim=(2, 3), keepdim=True).clamp(min=MIN_SPREAD)
    target_mean = torch.tensor(target[:3], device=pixels.device).view(1, 3, 1, 1)
    gain = (torch.tensor(target[3:], device=pixels.device).view(1, 3, 1, 1) / spread).clamp(max=MAX_GAIN)
    return lab_to_rgb((lab - mean) * gain + target_mean)
