"""Augmentation and normalisation of whole batches held as tensors (no per-sample PIL work).

Blood-cell images have no preferred orientation, so the eight symmetries of the square
(flips and 90-degree rotations) are free, label-preserving augmentations and TTA views.

Other labs' images differ in stain, illumination, camera, focus and magnification. The
photometric augmentations (stain jitter in haematoxylin-eosin-DAB optical-density space,
brightness, contrast, gamma, saturation, blur) work on raw pixels in [0, 1] before
normalisation; the geometric ones (symmetries, translation, scale) after it. Every one draws
its random values per image from the training generator, so training stays reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bloodcell.config import knob
from bloodcell.images.colour import normalize_colours
from bloodcell.inference.network import dihedral, normalize


@dataclass(frozen=True)
class AugmentConfig:
    """Batch augmentations; 0 switches one off. Defaults: the symmetries and 2 px shifts only."""

    flip: bool = knob(True, "random horizontal flips")
    rot90: bool = knob(True, "random quarter turns")
    translate: int = knob(2, "maximum shift in pixels (reflect-padded)")
    colour: float = knob(0.0, "relative brightness/contrast/saturation jitter on normalised values (first release)")
    sharpness: float = knob(0.0, "maximum unsharp-mask amount (negative: blur); bridges resize differences")
    stain: float = knob(0.0, "stain jitter: relative change of each stain's optical density (HED space)")
    brightness: float = knob(0.0, "maximum relative brightness change")
    contrast: float = knob(0.0, "maximum relative contrast change")
    gamma: float = knob(0.0, "maximum log-gamma change (0.3: gamma in [0.74, 1.35])")
    saturation: float = knob(0.0, "maximum relative saturation change")
    blur: float = knob(0.0, "maximum Gaussian blur sigma, in pixels of the model input")
    scale: float = knob(0.0, "maximum log-zoom (0.2: zoom in [0.82, 1.22], reflect-padded)")
    randconv: float = knob(0.0, "share of images blended with a random convolution of themselves (texture)")
    haze: float = knob(0.0, "maximum veil: share blended toward a flat random colour, then 8-bit noise (flat labs)")

    @property
    def photometric(self) -> bool:
        return any((self.stain, self.brightness, self.contrast, self.gamma, self.saturation, self.blur, self.haze))


def channel_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images, in [0, 1] units."""
    x = images.float().div_(255)
    return x.mean(dim=(0, 2, 3)).tolist(), x.std(dim=(0, 2, 3)).tolist()


def random_dihedral(x: torch.Tensor, generator: torch.Generator, flip: bool, rot90: bool) -> torch.Tensor:
    choices = (8 if flip else 4) if rot90 else (2 if flip else 1)
    if choices == 1:
        return x
    ks = torch.randint(0, choices, (len(x),), generator=generator).to(x.device)
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
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator).to(x.device)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator).to(x.device)
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
        return (1 + (torch.rand(n, 1, 1, 1, generator=generator) * 2 - 1) * strength).to(x.device)

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
    kernel = (kernel[:, None] * kernel[None, :] / 16).expand(x.shape[1], 1, 3, 3).contiguous().to(x.device)
    blurred = torch.nn.functional.conv2d(
        torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate"), kernel, groups=x.shape[1]
    )
    amount = (torch.rand(len(x), 1, 1, 1, generator=generator) * 1.5 * strength - strength / 2).to(x.device)
    return x + amount * (x - blurred)


def _uniform(n: int, low: float, high: float, generator: torch.Generator, device=None) -> torch.Tensor:
    """Per-image uniform values, drawn on the CPU generator (reproducible anywhere), moved to `device`."""
    return (low + (high - low) * torch.rand(n, 1, 1, 1, generator=generator)).to(device)


# Ruifrok & Johnston's stain vectors (rows: haematoxylin, eosin, DAB), as in scikit-image's rgb2hed.
RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
HED_FROM_RGB = torch.linalg.inv(RGB_FROM_HED)


def random_stain(x: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """HED jitter (Tellez et al. 2018): scale and shift each stain's optical density per image."""
    if strength <= 0:
        return x
    n = len(x)
    density = -torch.log(x.clamp(min=1 / 255)).permute(0, 2, 3, 1) @ HED_FROM_RGB.to(x.device)  # (N, H, W, stains)
    scale = (1 + (torch.rand(n, 1, 1, 3, generator=generator) * 2 - 1) * strength).to(x.device)
    shift = ((torch.rand(n, 1, 1, 3, generator=generator) * 2 - 1) * strength * 0.1).to(x.device)
    density = density * scale + shift
    return torch.exp(-(density @ RGB_FROM_HED.to(x.device))).permute(0, 3, 1, 2).clamp(0, 1)


def random_photometric(x: torch.Tensor, config: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Brightness, contrast, gamma and saturation per image, on pixels in [0, 1]."""
    n = len(x)
    if config.brightness:
        x = x * _uniform(n, 1 - config.brightness, 1 + config.brightness, generator, x.device)
    if config.contrast:
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = mean + (x - mean) * _uniform(n, 1 - config.contrast, 1 + config.contrast, generator, x.device)
    if config.gamma:
        x = x.clamp(1e-4, 1) ** torch.exp(_uniform(n, -config.gamma, config.gamma, generator, x.device))
    if config.saturation:
        grey = x.mean(dim=1, keepdim=True)
        x = grey + (x - grey) * _uniform(n, 1 - config.saturation, 1 + config.saturation, generator, x.device)
    return x.clamp(0, 1)


def random_haze(x: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """A veil over each image: blended toward a flat random colour by U(0, strength), then stored
    as 8 bits with a little sensor noise.

    Soft-focus, low-contrast photographs (some labs' whole image spans 6 L units where PBC's spans
    22) reach the model after colour normalisation has stretched them up to 4x, noise and 8-bit
    steps included. Colour normalisation undoes the veil itself; what it leaves is that stretch.
    """
    if strength <= 0:
        return x
    n = len(x)
    weight = _uniform(n, 0, strength, generator, x.device)
    veil = (0.4 + 0.4 * torch.rand(n, 3, 1, 1, generator=generator)).to(x.device)
    noise = torch.randn(x.shape, generator=generator).to(x.device) / 255
    return ((1 - weight) * x + weight * veil + noise).mul(255).round().div(255).clamp(0, 1)


def random_blur(x: torch.Tensor, max_sigma: float, generator: torch.Generator, levels: int = 4) -> torch.Tensor:
    """Gaussian blur with a per-image sigma in [0, max_sigma] (quantised to a few levels)."""
    if max_sigma <= 0:
        return x
    which = torch.randint(0, levels + 1, (len(x),), generator=generator).to(x.device)
    out = x.clone()
    for level in which.unique().tolist():
        if level == 0:
            continue
        sigma = max_sigma * level / levels
        radius = max(1, math.ceil(2 * sigma))
        taps = torch.exp(-(torch.arange(-radius, radius + 1, dtype=torch.float32) ** 2) / (2 * sigma**2))
        taps = (taps / taps.sum()).to(x.device)
        idx = (which == level).nonzero().squeeze(1)
        channels = x.shape[1]
        padded = F.pad(x[idx], (radius,) * 4, mode="replicate")
        rows = F.conv2d(padded, taps.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
        out[idx] = F.conv2d(rows, taps.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)
    return out


def random_convolution(
    x: torch.Tensor, share: float, generator: torch.Generator, sizes: Sequence[int] = (1, 3, 5)
) -> torch.Tensor:
    """RandConv (Xu et al. 2021): blend a share of the images with a random convolution of themselves.

    Each chosen image gets its own random kernel (size from `sizes`, Kaiming-normal weights), its
    output standardised per channel and mixed in with a random weight: new colours and textures
    with the shapes kept, so the model leans on shape, which is what carries over between labs.
    """
    if share <= 0:
        return x
    chosen = (torch.rand(len(x), generator=generator) < share).nonzero().squeeze(1)
    if len(chosen) == 0:
        return x
    out = x.clone()
    sizes_drawn = torch.randint(0, len(sizes), (len(chosen),), generator=generator)
    for which, size in enumerate(sizes):
        idx = chosen[sizes_drawn == which]
        if len(idx) == 0:
            continue
        n, c, h, w = len(idx), *x.shape[1:]
        weight = torch.randn(n * c, c, size, size, generator=generator) / math.sqrt(c * size * size)
        padded = F.pad(x[idx], (size // 2,) * 4, mode="reflect").reshape(1, n * c, h + size - 1, w + size - 1)
        convolved = F.conv2d(padded, weight.to(x.device), groups=n).reshape(n, c, h, w)  # one kernel per image
        mean, spread = convolved.mean(dim=(2, 3), keepdim=True), convolved.std(dim=(2, 3), keepdim=True)
        convolved = (convolved - mean) / (spread + 1e-5)
        mix = torch.rand(n, 1, 1, 1, generator=generator).to(x.device)
        out[idx] = mix * x[idx] + (1 - mix) * convolved
    return out


def random_scale(x: torch.Tensor, max_log_zoom: float, generator: torch.Generator) -> torch.Tensor:
    """Zoom each image in or out by exp(U(-max, max)) about its centre (reflect-padded when out)."""
    if max_log_zoom <= 0:
        return x
    zoom = torch.exp((torch.rand(len(x), generator=generator) * 2 - 1) * max_log_zoom).to(x.device)
    theta = torch.zeros(len(x), 2, 3, device=x.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1 / zoom
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def augment_batch(
    images: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    config: AugmentConfig,
    generator: torch.Generator,
    colour_target: Sequence[float] | None = None,
) -> torch.Tensor:
    """uint8 batch -> augmented, normalised float batch: photometric changes on raw pixels (if any
    are on), colour normalisation (with a `colour_target`), mean/std normalisation, then
    symmetries, translation, scale, blur/sharpen and colour jitter."""
    if config.photometric or colour_target is not None:
        pixels = random_stain(images.float() / 255, config.stain, generator)
        pixels = random_photometric(pixels, config, generator)
        pixels = random_blur(pixels, config.blur, generator)
        pixels = random_haze(pixels, config.haze, generator)
        if colour_target is not None:
            pixels = normalize_colours(pixels, colour_target)
        x = normalize(pixels * 255, mean, std)
    else:
        x = normalize(images, mean, std)
    x = random_convolution(x, config.randconv, generator)
    x = random_dihedral(x, generator, config.flip, config.rot90)
    x = random_translate(x, config.translate, generator)
    x = random_scale(x, config.scale, generator)
    x = random_sharpness(x, config.sharpness, generator)
    return random_colour(x, config.colour, generator)
