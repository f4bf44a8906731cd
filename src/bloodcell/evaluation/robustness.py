"""Accuracy under image corruptions: MedMNIST-C's families for blood, at five severities.

MedMNIST-C (Di Salvo et al. 2024) corrupts BloodMNIST with pixelation, JPEG compression,
defocus and motion blur, brightness, contrast, saturation, stain deposits and bubbles, with
severities set for 224 px images. Its package pins medmnist (which needs torchvision) and uses
ImageMagick, so the same families are implemented here with PIL, NumPy and SciPy, using its
severity parameters. Corruptions happen where they happen in a lab, at acquisition resolution:
each image is enlarged to 224 px, corrupted, and reduced back to the model's size the way
`predict` reduces a full-size image. Every corruption draws from a seeded generator, so a run
is repeatable.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageEnhance
from scipy import ndimage, signal
from tqdm import tqdm

SIDE = 224  # the resolution MedMNIST-C's severities are defined at
Corruption = Callable[[Image.Image, object, np.random.Generator], Image.Image]


def pixelate(image: Image.Image, factor: float, rng: np.random.Generator) -> Image.Image:
    small = image.resize((int(SIDE * factor), int(SIDE * factor)), Image.BOX)
    return small.resize(image.size, Image.BOX)


def jpeg(image: Image.Image, quality: int, rng: np.random.Generator) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def _convolve(image: Image.Image, kernel: np.ndarray) -> Image.Image:
    pad = kernel.shape[0] // 2
    pixels = np.pad(np.asarray(image, dtype=np.float32), ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    out = signal.fftconvolve(pixels, kernel[..., None], mode="valid", axes=(0, 1))
    return Image.fromarray(np.clip(out, 0, 255).round().astype(np.uint8))


def defocus_blur(image: Image.Image, params: tuple[float, float], rng: np.random.Generator) -> Image.Image:
    radius, alias_sigma = params
    span = np.arange(-int(radius) - 1, int(radius) + 2)
    disk = (span[:, None] ** 2 + span[None, :] ** 2 <= radius**2).astype(np.float32)
    disk = ndimage.gaussian_filter(disk, alias_sigma)
    return _convolve(image, disk / disk.sum())


def motion_blur(image: Image.Image, params: tuple[float, float], rng: np.random.Generator) -> Image.Image:
    """A one-sided streak of Gaussian weights (length `radius`, spread `sigma`) at a random angle."""
    radius, sigma = params
    angle = np.deg2rad(rng.uniform(-45, 45))
    size = 2 * int(radius) + 1
    kernel = np.zeros((size, size), np.float32)
    for step in np.linspace(0, radius, 4 * int(radius) + 1):
        row, col = int(round(radius - step * np.sin(angle))), int(round(radius + step * np.cos(angle)))
        kernel[row, col] += np.exp(-(step**2) / (2 * sigma**2))
    return _convolve(image, kernel / kernel.sum())


def brightness(image: Image.Image, factor: float, rng: np.random.Generator) -> Image.Image:
    return ImageEnhance.Brightness(image).enhance(factor)


def contrast(image: Image.Image, factor: float, rng: np.random.Generator) -> Image.Image:
    return ImageEnhance.Contrast(image).enhance(factor)


def saturate(image: Image.Image, shift: float, rng: np.random.Generator) -> Image.Image:
    hsv = np.asarray(image.convert("HSV"), dtype=np.float32)
    hsv[..., 1] = np.clip(hsv[..., 1] + shift * 255, 0, 255)
    return Image.fromarray(hsv.round().astype(np.uint8), "HSV").convert("RGB")


def stain_deposit(image: Image.Image, max_marks: int, rng: np.random.Generator) -> Image.Image:
    """Dark, irregular blots of stain precipitate, up to `max_marks` of them."""
    pixels = np.asarray(image, dtype=np.float32)
    for _ in range(int(rng.integers(1, max_marks + 1))):
        side = int(rng.integers(24, 48))
        blob = ndimage.gaussian_filter(rng.random((side, side)), side / 8)
        ink = np.clip((blob - blob.mean()) / (blob.std() + 1e-6), 0, None)
        ink = np.clip(ink * ndimage.gaussian_filter(_disk(side), 2), 0, 0.9)
        top, left = (int(rng.integers(10, SIDE - side - 10)) for _ in range(2))
        pixels[top : top + side, left : left + side] *= 1 - ink[..., None]
    return Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8))


def _disk(side: int) -> np.ndarray:
    span = np.arange(side) - (side - 1) / 2
    return (span[:, None] ** 2 + span[None, :] ** 2 <= (side / 2) ** 2).astype(np.float32)


def bubble(image: Image.Image, params: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """Translucent air bubbles with a brighter rim, as under a badly laid coverslip."""
    max_radius, max_bubbles = params
    layer = Image.new("RGBA", image.size, (255, 255, 255, 0))
    draw = ImageDraw.Draw(layer)
    for _ in range(int(rng.integers(7, max_bubbles + 1))):
        radius = int(rng.integers(3, max_radius + 1))
        x, y = (int(rng.integers(radius, SIDE - radius)) for _ in range(2))
        draw.ellipse((x - radius - 2, y - radius - 2, x + radius + 2, y + radius + 2), fill=(255, 255, 255, 130))
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=(255, 255, 255, 100))
    out = image.convert("RGBA")
    out.alpha_composite(layer)
    return out.convert("RGB")


@dataclass(frozen=True)
class Family:
    corrupt: Corruption
    severities: tuple  # MedMNIST-C's parameters for BloodMNIST, mildest first


FAMILIES: dict[str, Family] = {
    "pixelate": Family(pixelate, (0.6, 0.5, 0.4, 0.3, 0.25)),
    "jpeg": Family(jpeg, (50, 30, 15, 10, 7)),
    "defocus_blur": Family(defocus_blur, ((2, 0.01), (3, 0.1), (4, 0.1), (5, 0.1), (6, 0.1))),
    "motion_blur": Family(motion_blur, ((3, 3), (5, 5), (10, 5), (10, 7), (10, 9))),
    "brightness_up": Family(brightness, (1.1, 1.2, 1.3, 1.35, 1.4)),
    "brightness_down": Family(brightness, (0.9, 0.8, 0.7, 0.6, 0.5)),
    "contrast_up": Family(contrast, (1.1, 1.15, 1.2, 1.25, 1.3)),
    "contrast_down": Family(contrast, (0.9, 0.8, 0.7, 0.6, 0.5)),
    "saturate": Family(saturate, (0.05, 0.10, 0.15, 0.17, 0.20)),
    "stain_deposit": Family(stain_deposit, (1, 2, 3, 3, 3)),
    "bubble": Family(bubble, ((5, 10), (7, 10), (10, 10), (12, 12), (15, 12))),
}


def corrupt_batch(images: torch.Tensor, family: str, severity: int, seed: int = 0) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> the same images corrupted at `severity` (1..5), at acquisition size."""
    spec = FAMILIES[family]
    rng = np.random.default_rng([seed, severity, list(FAMILIES).index(family)])
    size = images.shape[-1]
    out = []
    for pixels in images.permute(0, 2, 3, 1).numpy():
        large = Image.fromarray(pixels).resize((SIDE, SIDE), Image.BICUBIC)
        corrupted = spec.corrupt(large, spec.severities[severity - 1], rng)
        out.append(np.asarray(corrupted.convert("RGB").resize((size, size), Image.BILINEAR)))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


def evaluate_corruptions(
    classifier, images: torch.Tensor, labels: torch.Tensor, families=tuple(FAMILIES), seed=0, progress=True
) -> dict:
    """Accuracy per family and severity, the clean accuracy, and their means."""
    clean = (classifier.predict_proba(images).argmax(1) == labels).float().mean().item()
    table: dict[str, list[float]] = {}
    with tqdm(total=len(families) * 5, desc="corruptions", unit="set", disable=not progress) as bar:
        for family in families:
            table[family] = []
            for severity in range(1, 6):
                corrupted = corrupt_batch(images, family, severity, seed)
                table[family].append((classifier.predict_proba(corrupted).argmax(1) == labels).float().mean().item())
                bar.update()
    mean = float(np.mean([np.mean(v) for v in table.values()]))
    return {"clean": clean, "accuracy": table, "mean_corrupted": mean, "relative": mean / clean if clean else None}
