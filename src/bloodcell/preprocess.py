"""Real image files -> model input, the way MedMNIST made BloodMNIST from the PBC images.

MedMNIST centre-cropped the 360x363 PBC images to 200x200 and resized them to 28x28. Measured
on the 400-image PBC sample (see tests/test_preprocess.py), a centre crop of 200/360 of the short
side followed by PIL's bilinear (antialiased) resize is the closest of the pipelines we tried
(nearest, bilinear, bicubic, Lanczos, box, Hamming; OpenCV's resizers; Gaussian pre-blur;
two-step resizes; crop offsets and sizes 190-363 px). The remaining ~10 grey levels RMS are
not a colour bias; BloodMNIST's pixels show slightly crisper edges than any of those filters.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

MEDMNIST_CROP = 200 / 360  # crop side / short side of the PBC images
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"}
MAX_PIXELS = 50_000_000  # larger files are refused as possible decompression bombs


class ImageError(Exception):
    """A file that cannot be turned into model input; the message names the reason."""


@dataclass(frozen=True)
class Crop:
    """'medmnist' (the MedMNIST geometry scaled to the image), 'none' (largest centred square), or a fraction."""

    fraction: float

    @classmethod
    def parse(cls, spec: str | float) -> Crop:
        if spec == "medmnist":
            return cls(MEDMNIST_CROP)
        if spec == "none":
            return cls(1.0)
        try:
            fraction = float(spec)
        except ValueError:
            raise ValueError(f"crop must be 'medmnist', 'none' or a fraction in (0, 1], got {spec!r}") from None
        if not 0 < fraction <= 1:
            raise ValueError(f"crop fraction must be in (0, 1], got {fraction}")
        return cls(fraction)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode (L, LA, P, RGBA, I;16, I, F, CMYK...) -> 8-bit RGB; transparency onto white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        high = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray((array / high * 255).clip(0, 255).astype(np.uint8))
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB")


def centre_crop(image: Image.Image, crop: Crop) -> Image.Image:
    width, height = image.size
    side = max(1, round(min(width, height) * crop.fraction))
    left, top = (width - side) // 2, (height - side) // 2
    return image.crop((left, top, left + side, top + side))


def prepare(image: Image.Image, size: int = 28, crop: Crop = Crop(MEDMNIST_CROP)) -> np.ndarray:
    """A PIL image -> uint8 (size, size, 3), cropped and resized the MedMNIST way."""
    image = ImageOps.exif_transpose(image)
    square = centre_crop(to_rgb(image), crop)
    return np.asarray(square.resize((size, size), Image.BILINEAR), dtype=np.uint8)


def load_file(path: str | Path, size: int = 28, crop: Crop = Crop(MEDMNIST_CROP)) -> np.ndarray:
    """Read and prepare one file; every failure is an ImageError with a short reason."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise ImageError("empty file (0 bytes)")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if image.width * image.height > MAX_PIXELS:
                    raise ImageError(f"image too large ({image.width}x{image.height}), possible decompression bomb")
                image.load()
                return prepare(image, size, crop)
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError("file not found") from None
    except PermissionError:
        raise ImageError("permission denied") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"possible decompression bomb ({exc})") from None
    except UnidentifiedImageError:
        raise ImageError("not an image file PIL can read") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"cannot decode image ({exc})") from None


def to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    """HWC uint8 arrays -> one uint8 (N, 3, H, W) tensor."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


def find_images(paths: list[str | Path]) -> list[Path]:
    """Expand folders recursively (image suffixes only); files named explicitly are kept as given."""
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            found.append(path)
    return found
