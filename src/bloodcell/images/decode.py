"""The one decode path for image inputs: files, uploaded bytes, PIL images and arrays.

Every command that reads a user's image (predict, evaluate, explain, finetune, the server,
build-data, lab folders) goes through `open_image`, so limits are checked once, from the
header before decoding, and every failure is an `ImageError` with a short reason.
"""

from __future__ import annotations

import io
import os
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from bloodcell.errors import BloodcellError
from bloodcell.files import printable

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"}
# The formats a cell image comes in. Pillow can open many more (EPS through Ghostscript, say); an
# upload or a file in a folder of any other format is refused before a decoder sees it.
FORMATS = ("JPEG", "PNG", "BMP", "TIFF", "WEBP", "GIF")
# One limit on every path, checked from the header before decoding: a cell image is well under a
# megapixel and a whole microscope field a few; 16.8 Mpx (4096 x 4096) decodes to 48 MB of RGB.
MAX_PIXELS = 4096 * 4096
MIN_SIDE = 16  # smaller than this cannot hold a recognisable cell
ImageSource = str | Path | bytes | Image.Image | np.ndarray


class ImageError(BloodcellError):
    """An input that cannot be turned into model input; the message is the reason (no file name)."""


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
            with Image.open(handle, formats=FORMATS) as image:
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
        raise ImageError("not an image file bloodcell reads (JPEG, PNG, BMP, TIFF, WebP or GIF)") from None
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


def _can_enter(entry: Path) -> bool:
    """Whether a folder's entries can be reached (a folder without execute permission lists its
    names but opens none of them)."""
    try:
        entry.lstat()
    except PermissionError:
        return False
    except OSError:
        return True  # gone meanwhile, or some other trouble: the file's own error row will say
    return True


def find_images(paths: list[str | Path], problems: list[str] | None = None) -> list[Path]:
    """Expand folders recursively (image suffixes only, sorted); files named explicitly are kept as
    given. What a walk cannot use goes to `problems`, one line each: a folder that cannot be read
    (skipped, the rest is still walked), and per folder the count of files that are not images."""
    found: list[Path] = []
    problems = problems if problems is not None else []
    for path in map(Path, paths):
        if not path.is_dir():
            found.append(path)
            continue
        inside, others = [], Counter()

        def unreadable(error: OSError) -> None:
            problems.append(f"{printable(error.filename)}: cannot read this folder ({error.strerror}); skipped")

        for root, _, names in os.walk(path, onerror=unreadable):
            if names and not _can_enter(Path(root) / names[0]):
                problems.append(f"{printable(root)}: cannot open the files in this folder (permission denied); skipped")
                continue
            for name in names:
                candidate = Path(root) / name
                if candidate.suffix.lower() in IMAGE_SUFFIXES:
                    inside.append(candidate)
                else:
                    others[candidate.suffix.lower() or "no suffix"] += 1
        found += sorted(inside)
        if others:
            kinds = ", ".join(f"{suffix} {n}" for suffix, n in sorted(others.items()))
            problems.append(f"{printable(path)}: skipped {sum(others.values())} files that are not images ({kinds})")
    return found
