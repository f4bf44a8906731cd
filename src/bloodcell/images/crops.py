"""Framing and resizing: a decoded image -> the square model input, the way MedMNIST made BloodMNIST.

MedMNIST centre-cropped the 360x363 PBC images to 200x200 and resized them to 28x28 with an
undocumented filter. Measured on the 400-image PBC sample: a centre crop of 200/360 of the short
side plus PIL's bilinear (antialiased) resize is the closest plain pipeline (9.76 grey levels
mean RMS; nearest, bicubic, Lanczos, box, Hamming, OpenCV's resizers, Gaussian pre-blur, JPEG
draft decoding, two-step resizes, crop offsets and sizes 190-363 px were all worse). The rest is
mostly linear: BloodMNIST pixels are crisper, with slightly mixed colours. A 5x5 colour filter
fitted by least squares on half of the sample (`medmnist_filter.json`, made by
`benchmarks/fit_medmnist_filter.py`) brings the other half to ~6.4 RMS, and is applied at 28 px.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from bloodcell.images import cells
from bloodcell.images.cells import CellFrame
from bloodcell.images.decode import ImageSource, open_image
from bloodcell.runs import MEDMNIST_CROP, Crop

FILTER_FILE = Path(__file__).with_name("medmnist_filter.json")
MEDMNIST = Crop(MEDMNIST_CROP)  # BloodMNIST's own framing: the default for full-size images


def measured(crop: Crop, sources: Sequence[ImageSource]) -> tuple[Crop, cells.LabScale | None]:
    """`crop` with 'cell:measure' resolved: a red cell's size measured over `sources`, one lab's
    images (`cells.lab_red_cell`); each image framed on its own where too few show red cells."""
    if not crop.measure:
        return crop, None
    scale = cells.lab_red_cell(sources)
    return Crop(None, scale.red_cell), scale


def centre_crop(image: Image.Image, fraction: float) -> Image.Image:
    width, height = image.size
    side = max(1, round(min(width, height) * fraction))
    left, top = (width - side) // 2, (height - side) // 2
    return image.crop((left, top, left + side, top + side))


def frame(image: Image.Image, crop: Crop) -> tuple[Image.Image, CellFrame | None]:
    """The square of `image` the model sees, and where the cell was found (for crop 'cell')."""
    if crop.fraction is not None:
        return centre_crop(image, crop.fraction), None
    found = cells.locate(image, crop.red_cell)
    return cells.crop(image, found), found


def _neighbourhoods(images: np.ndarray, radius: int) -> np.ndarray:
    """(N, H, W, 3) -> (N*H*W, 3*(2r+1)^2 + 1): each pixel's colour neighbourhood plus a bias term."""
    n, h, w, _ = images.shape
    padded = np.pad(images.astype(np.float32), ((0, 0), (radius, radius), (radius, radius), (0, 0)), mode="edge")
    side = 2 * radius + 1
    columns = [padded[:, dy : dy + h, dx : dx + w, :] for dy in range(side) for dx in range(side)]
    columns.append(np.ones((n, h, w, 1), np.float32))
    return np.concatenate(columns, axis=3).reshape(n * h * w, -1)


def fit_medmnist_filter(ours: np.ndarray, twins: np.ndarray, radius: int = 2) -> np.ndarray:
    """Least-squares colour filter mapping our resized images onto their BloodMNIST twins."""
    weights, *_ = np.linalg.lstsq(_neighbourhoods(ours, radius), twins.reshape(-1, 3).astype(np.float32), rcond=None)
    return weights


def apply_medmnist_filter(images: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Apply a fitted filter to uint8 (N, H, W, 3) or (H, W, 3) images.

    The fitted map is a 5x5 convolution with edge padding (weights in `_neighbourhoods`' column
    order: offsets x RGB, then the bias), so it runs as one; on a batch of 64 images that is about
    10x faster per image than image by image."""
    single = images.ndim == 3
    batch = images[None] if single else images
    side = int(round(((weights.shape[0] - 1) / 3) ** 0.5))
    radius = (side - 1) // 2
    kernel = torch.from_numpy(np.ascontiguousarray(weights[:-1].reshape(side, side, 3, 3).transpose(3, 2, 0, 1)))
    x = torch.tensor(batch, dtype=torch.float32).permute(0, 3, 1, 2)  # a copy: PIL arrays are read-only
    with torch.no_grad():
        out = F.conv2d(F.pad(x, (radius,) * 4, mode="replicate"), kernel, torch.from_numpy(weights[-1]))
    out = out.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return out[0] if single else out


@cache
def medmnist_filter() -> np.ndarray | None:
    """The shipped 28 px filter weights, or None if the file is absent."""
    if not FILTER_FILE.is_file():
        return None
    return np.asarray(json.loads(FILTER_FILE.read_text())["weights"], dtype=np.float32)


def prepare(image: Image.Image, size: int = 28, crop: Crop = MEDMNIST, emulate: bool = True) -> np.ndarray:
    """An RGB PIL image (from `open_image`) -> uint8 (size, size, 3), cropped and resized the MedMNIST way."""
    return prepare_framed(image, size, crop, emulate)[0]


def prepare_framed(
    image: Image.Image, size: int = 28, crop: Crop = MEDMNIST, emulate: bool = True
) -> tuple[np.ndarray, CellFrame | None]:
    """`prepare`, also returning where the cell was found (crop 'cell').

    `emulate` applies the fitted MedMNIST filter where `emulates_medmnist` says it belongs.
    """
    square, found = frame(image, crop)
    return render(square, size, crop, emulate), found


def render(square: Image.Image, size: int, crop: Crop, emulate: bool = True) -> np.ndarray:
    """A framed square -> the uint8 (size, size, 3) model input: resized, and MedMNIST-filtered
    where `emulates_medmnist` says it belongs."""
    resized = np.asarray(square.resize((size, size), Image.BILINEAR), dtype=np.uint8)
    if emulate and emulates_medmnist(size, crop):
        return apply_medmnist_filter(resized, medmnist_filter())
    return resized


def emulates_medmnist(size: int, crop: Crop) -> bool:
    """Whether the fitted MedMNIST filter applies: at 28 px, to MedMNIST-scale frames (the MedMNIST
    crop, and the cell crop, which frames cells at the same scale), when the filter ships."""
    return size == 28 and crop.fraction in (None, MEDMNIST_CROP) and medmnist_filter() is not None


def load(source: ImageSource, size: int = 28, crop: Crop = MEDMNIST, emulate: bool = True) -> np.ndarray:
    """Decode and prepare one image; every failure is an ImageError with a short reason."""
    return prepare(open_image(source), size, crop, emulate)


def to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    """HWC uint8 arrays -> one uint8 (N, 3, H, W) tensor."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
