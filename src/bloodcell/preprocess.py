"""Real image files -> model input, the way MedMNIST made BloodMNIST from the PBC images.

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

import io
import json
import warnings
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from bloodcell import cells
from bloodcell.cells import CellFrame
from bloodcell.errors import BloodcellError

MEDMNIST_CROP = 200 / 360  # crop side / short side of the PBC images
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"}
# One limit on every path, checked from the header before decoding: a cell image is well under a
# megapixel and a whole microscope field a few; 16.8 Mpx (4096 x 4096) decodes to 48 MB of RGB.
MAX_PIXELS = 4096 * 4096
MIN_SIDE = 16  # smaller than this cannot hold a recognisable cell
FILTER_FILE = Path(__file__).with_name("medmnist_filter.json")
ImageSource = str | Path | bytes | Image.Image | np.ndarray


class ImageError(BloodcellError):
    """An input that cannot be turned into model input; the message is the reason (no file name)."""


@dataclass(frozen=True)
class Crop:
    """How a full-size image is framed: 'cell' (find the white cell, frame it like BloodMNIST),
    'cell:PX' (the same, for images where a red cell is PX pixels across: a lab that knows its
    magnification), 'medmnist' (the MedMNIST geometry scaled to the image), 'none' (largest
    centred square), or a fraction of the short side, centred."""

    fraction: float | None  # None: find the cell
    red_cell: float | None = None  # with 'cell': a red cell's diameter in the images, in pixels

    @classmethod
    def parse(cls, spec: str | float) -> Crop:
        if spec == "cell":
            return cls(None)
        if isinstance(spec, str) and spec.startswith("cell:"):
            try:
                red_cell = float(spec.removeprefix("cell:"))
            except ValueError:
                red_cell = 0.0
            if not 4 <= red_cell <= 1000:
                raise BloodcellError(f"--crop cell:PX needs a red cell's diameter in pixels (4 to 1000), got {spec!r}")
            return cls(None, red_cell)
        if spec == "medmnist":
            return cls(MEDMNIST_CROP)
        if spec == "none":
            return cls(1.0)
        try:
            fraction = float(spec)
        except ValueError:
            raise BloodcellError(
                f"--crop must be 'cell', 'cell:PX', 'medmnist', 'none' or a fraction in (0, 1], got {spec!r}"
            ) from None
        if not 0 < fraction <= 1:
            raise BloodcellError(f"--crop fraction must be in (0, 1], got {fraction}")
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
    return image if image.mode == "RGB" else image.convert("RGB")


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


def prepare(image: Image.Image, size: int = 28, crop: Crop = Crop(MEDMNIST_CROP), emulate: bool = True) -> np.ndarray:
    """An RGB PIL image (from `open_image`) -> uint8 (size, size, 3), cropped and resized the MedMNIST way."""
    return prepare_framed(image, size, crop, emulate)[0]


def prepare_framed(
    image: Image.Image, size: int = 28, crop: Crop = Crop(MEDMNIST_CROP), emulate: bool = True
) -> tuple[np.ndarray, CellFrame | None]:
    """`prepare`, also returning where the cell was found (crop 'cell').

    `emulate` applies the fitted MedMNIST filter where `emulates_medmnist` says it belongs.
    """
    square, found = frame(image, crop)
    resized = np.asarray(square.resize((size, size), Image.BILINEAR), dtype=np.uint8)
    if emulate and emulates_medmnist(size, crop):
        return apply_medmnist_filter(resized, medmnist_filter()), found
    return resized, found


def emulates_medmnist(size: int, crop: Crop) -> bool:
    """Whether the fitted MedMNIST filter applies: at 28 px, to MedMNIST-scale frames (the MedMNIST
    crop, and the cell crop, which frames cells at the same scale), when the filter ships."""
    return size == 28 and crop.fraction in (None, MEDMNIST_CROP) and medmnist_filter() is not None


def open_image(source: ImageSource) -> Image.Image:
    """Any image input -> an upright 8-bit RGB PIL image: the one decode path for files, uploaded
    bytes, PIL images and arrays. Size limits are checked from the header, before decoding."""
    if isinstance(source, Image.Image):
        return _checked(source, loaded=True)
    if isinstance(source, np.ndarray):
        return _checked(_from_array(source), loaded=True)
    try:
        if isinstance(source, bytes):
            if not source:
                raise ImageError("empty file (0 bytes)")
            handle = io.BytesIO(source)
        else:
            path = Path(source)
            if path.is_dir():
                raise ImageError("is a folder, not an image file")
            if path.stat().st_size == 0:
                raise ImageError("empty file (0 bytes)")
            handle = path
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(handle) as image:
                return _checked(image, loaded=False)
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError("file not found") from None
    except PermissionError:
        raise ImageError("permission denied") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"image too large, possible decompression bomb ({exc})") from None
    except UnidentifiedImageError:
        raise ImageError("not an image file PIL can read") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"cannot decode image ({exc})") from None


def _checked(image: Image.Image, loaded: bool) -> Image.Image:
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise ImageError(f"image too large ({width}x{height} px, limit {MAX_PIXELS / 1e6:.1f} Mpx)")
    if min(width, height) < MIN_SIDE:
        raise ImageError(f"image too small to hold a cell ({width}x{height} px, at least {MIN_SIDE} px a side)")
    if not loaded:
        image.load()
    return to_rgb(ImageOps.exif_transpose(image))


def _from_array(array: np.ndarray) -> Image.Image:
    if array.ndim == 3 and array.shape[2] in (3, 4) and array.dtype == np.uint8:
        return Image.fromarray(np.ascontiguousarray(array))
    if array.ndim == 2 and array.dtype == np.uint8:
        return Image.fromarray(array)
    raise ImageError(f"arrays must be uint8 (H, W), (H, W, 3) or (H, W, 4), got {array.dtype} {array.shape}")


def load(source: ImageSource, size: int = 28, crop: Crop = Crop(MEDMNIST_CROP), emulate: bool = True) -> np.ndarray:
    """Decode and prepare one image; every failure is an ImageError with a short reason."""
    return prepare(open_image(source), size, crop, emulate)


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
