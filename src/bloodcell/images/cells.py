"""Finding the white cell in a microscope image and framing it the way BloodMNIST frames cells.

BloodMNIST's images are the central 200 x 200 px of the PBC images (360 x 363 px), each taken
with one cell in the middle at one magnification: a red cell there is about 73 px across, so the
frame is 2.74 red-cell diameters wide. Other labs' images are framed differently (tight crops
around the cell, whole fields with the cell anywhere among red cells) and magnified differently.
`locate` finds the white cell from its stained nucleus and cytoplasm and measures the
magnification from the red cells around it (a red cell is about 7.5 um across in any lab's
smear), so the crop shows the cell where and at the size the model knows. Without enough whole
red cells to measure (a tight crop), the stained cell's own extent sets the scale, unless the
caller states a red cell's size in its images (`--crop cell:PX`) or lets `lab_red_cell` measure it
once over many images of one lab (`--crop cell:measure`), where single crops hold too few.

The constants were measured on the 400 PBC images of `pbc_sample` by
`benchmarks/cell_framing.py`, which also reports how close the frames come to MedMNIST's crop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from bloodcell.images import decode

WORKING_SIDE = 100  # images are analysed at this short side (pixels); a red cell is ~20 px there
FRAME_IN_RED_CELLS = 200 / 73.0  # BloodMNIST's frame, in red-cell diameters
FRAME_IN_CELL_EXTENTS = 200 / 119.0  # the same frame, in extents of the stained white cell (PBC median)
MIN_STAIN = 40.0  # blue minus green, grey levels: weaker is not a stained nucleus
MIN_RED_CELLS = 3  # whole, round red cells needed to trust the magnification estimate
MIN_RED_CELL_AREA = 25  # working pixels (6 px across): smaller round things are platelets or granules
# A stained cell spanning more of the short side than this is in a crop cut around it
# (its extent: PBC images p95 0.46, BCCD crops p5 0.62).
TIGHT_CROP = 0.55
# A lab's magnification from many of its images (`lab_red_cell`): measured on at most this many,
# spread evenly, and trusted only where red cells can be measured in this share of them (tight
# crops yield fragments that would give a wildly wrong scale: BCCD's crops, 4% measurable).
LAB_SAMPLE = 200
LAB_MIN_MEASURABLE = 0.25


@dataclass(frozen=True)
class CellFrame:
    """The square that frames the cell: centre and side in pixels of the original image."""

    centre_x: float
    centre_y: float
    side: float
    found: bool  # a stained cell was found (else: the image's centre, at the image's own scale)
    candidates: int  # stained objects as large as a white cell
    scale_from: str  # "red cells", "stated red cell", "cell extent" or "image"
    extent: float = 0.0  # the stained cell's larger side in pixels (0: none found)
    cut: bool = False  # the cell reaches the image's border (a field's cell half out of view)
    index: int = 0  # its place among the white cells of its image (fields), in reading order

    def box(self) -> tuple[int, int, int, int]:
        half = self.side / 2
        return (
            round(self.centre_x - half),
            round(self.centre_y - half),
            round(self.centre_x + half),
            round(self.centre_y + half),
        )

    def describe(self) -> dict:
        left, top, right, bottom = self.box()
        return {
            "found": self.found,
            "box": [left, top, right, bottom],
            "white_cells": self.candidates,
            "scale_from": self.scale_from,
            "cut": self.cut,
            "index": self.index,
        }


def locate(image: Image.Image, red_cell: float | None = None) -> CellFrame:
    """Find the white cell in an RGB image and the square that frames it like BloodMNIST.

    `red_cell`: a red cell's diameter in this image's pixels, for a lab that knows its
    magnification; it replaces the measurement (and the tight-crop rule).
    """
    scale = WORKING_SIDE / min(image.size)
    pixels = _working_pixels(image, scale)
    stained = _stained_mask(pixels)
    labels, count = ndimage.label(stained)
    if count == 0:
        return _fallback(image, red_cell)
    areas = ndimage.sum(stained, labels, range(1, count + 1))
    main = int(np.argmax(areas * _subject_weight(labels, stained.shape))) + 1
    rows, cols = ndimage.find_objects(labels)[main - 1]
    extent = max(rows.stop - rows.start, cols.stop - cols.start)
    centre_y, centre_x = ndimage.center_of_mass(labels == main)
    measured = red_cell_diameters(pixels, labels == main) if red_cell is None else []
    if red_cell is not None:
        side, scale_from = FRAME_IN_RED_CELLS * red_cell * scale, "stated red cell"
    elif len(measured) >= MIN_RED_CELLS:
        side, scale_from = FRAME_IN_RED_CELLS * float(np.median(measured)), "red cells"
    elif extent > TIGHT_CROP * min(stained.shape):
        side, scale_from = FRAME_IN_CELL_EXTENTS * extent, "cell extent"
    else:  # a field whose red cells could not be measured: assume PBC's magnification
        side, scale_from = min(stained.shape) * 200 / 360, "image"
    # other stained objects at least half as large as the cell (in frame units) are more white cells
    candidates = int(np.sum(areas / side**2 >= 0.5 * areas[main - 1] / side**2))
    return CellFrame(
        centre_x=float(centre_x + 0.5) / scale,
        centre_y=float(centre_y + 0.5) / scale,
        side=float(side) / scale,
        found=True,
        candidates=max(1, candidates),
        scale_from=scale_from,
        extent=float(extent) / scale,
    )


def red_cells_in(image: Image.Image) -> list[float]:
    """Diameters (image pixels) of the whole, round red cells in an image away from stained cells:
    how a lab's magnification is measured from its whole fields."""
    scale = WORKING_SIDE / min(image.size)
    pixels = _working_pixels(image, scale)
    return [d / scale for d in red_cell_diameters(pixels, _stained_mask(pixels))]


@dataclass(frozen=True)
class LabScale:
    """A lab's red-cell diameter measured over many of its images, or why it could not be."""

    red_cell: float | None  # pixels (None: too few images with measurable red cells)
    images: int  # images looked at
    measurable: int  # of them, images with at least one whole, round red cell
    red_cells: int  # red cells measured, pooled

    def describe(self) -> str:
        found = f"red cells measurable in {self.measurable} of {self.images} images"
        if self.red_cell is None:
            return f"{found}: too few to state a magnification, each image framed on its own"
        return f"{found}: a red cell is {self.red_cell:.1f} px across ({self.red_cells} measured)"


def lab_red_cell(sources: Sequence[decode.ImageSource]) -> LabScale:
    """Measure one lab's magnification: the median diameter of the whole, round red cells of many of
    its images, pooled. A crop rarely holds the three whole red cells `locate` needs, but a lab's
    images share one magnification, so together they do. Unreadable images are passed over."""
    step = max(1, len(sources) // LAB_SAMPLE)
    sample = []
    for source in sources[::step][:LAB_SAMPLE]:
        try:
            sample.append(decode.open_image(source))
        except decode.ImageError:
            continue
    measured = [red_cells_in(image) for image in sample]
    diameters = [d for found in measured for d in found]
    measurable = sum(1 for found in measured if found)
    trusted = bool(sample) and measurable >= LAB_MIN_MEASURABLE * len(sample)
    red_cell = float(np.median(diameters)) if trusted else None
    return LabScale(red_cell, len(sample), measurable, len(diameters))


def _working_pixels(image: Image.Image, scale: float) -> np.ndarray:
    small = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BILINEAR)
    return np.asarray(small, dtype=np.float32)


def _subject_weight(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """How likely each stained object is the image's subject, besides its size: a cell cut by the
    border rarely is, and of two similar cells the more central one is."""
    boxes = ndimage.find_objects(labels)
    centres = np.array(ndimage.center_of_mass(labels > 0, labels, range(1, len(boxes) + 1)))
    distance = np.hypot(centres[:, 0] - shape[0] / 2, centres[:, 1] - shape[1] / 2) / np.hypot(*shape)
    cut = np.array([_touches_border(box, shape) for box in boxes])
    return (1 - distance) * np.where(cut, 0.3, 1.0)


def _touches_border(box: tuple[slice, slice], shape: tuple[int, int]) -> bool:
    rows, cols = box
    return rows.start == 0 or cols.start == 0 or rows.stop == shape[0] or cols.stop == shape[1]


def _stained_mask(pixels: np.ndarray) -> np.ndarray:
    """Pixels stained like a nucleus: blue well above green, relative to the image's own range.

    The stain map is smoothed first, so a granular cell (a basophil, say) comes out as one blob.
    """
    stain = ndimage.gaussian_filter(pixels[..., 2] - pixels[..., 1], sigma=0.75)
    low, high = np.percentile(stain, [50, 99.5])
    mask = stain > max(MIN_STAIN, low + 0.4 * (high - low))
    mask = ndimage.binary_closing(mask, structure=np.ones((3, 3), bool))
    return ndimage.binary_fill_holes(mask)


def red_cell_diameters(pixels: np.ndarray, white_cell: np.ndarray) -> list[float]:
    """Diameters (in `pixels`' pixels) of the whole, round red cells away from the white cell.

    Touching or cut cells are skipped rather than guessed at: a wrong scale is worse than none.
    """
    brightness = pixels.mean(axis=2)
    background = np.percentile(brightness, 95)
    darker = brightness < background - max(12.0, 0.2 * (background - np.percentile(brightness, 5)))
    cells = ndimage.binary_opening(ndimage.binary_fill_holes(darker), iterations=1)
    near_white_cell = ndimage.binary_dilation(white_cell, iterations=2)
    labels, _ = ndimage.label(cells)
    diameters = []
    for index, box in enumerate(ndimage.find_objects(labels), start=1):
        if _touches_border(box, cells.shape):
            continue  # cut by the border: not whole
        rows, cols = box
        h, w = rows.stop - rows.start, cols.stop - cols.start
        component = labels[box] == index
        area = component.sum()
        if (component & near_white_cell[box]).any() or area < MIN_RED_CELL_AREA:
            continue
        if max(h, w) > 1.3 * min(h, w) or area < 0.65 * h * w:
            continue  # not round: touching cells or debris
        diameters.append(float(2 * np.sqrt(area / np.pi)))
    return diameters


def _fallback(image: Image.Image, red_cell: float | None) -> CellFrame:
    if red_cell is None:
        side, scale_from = min(image.size) * 200 / 360, "image"
    else:
        side, scale_from = FRAME_IN_RED_CELLS * red_cell, "stated red cell"
    return CellFrame(image.width / 2, image.height / 2, side, found=False, candidates=0, scale_from=scale_from)


def crop(image: Image.Image, frame: CellFrame) -> Image.Image:
    """The framed square; where it reaches past the image, the slide's background colour fills in."""
    left, top, right, bottom = frame.box()
    if left >= 0 and top >= 0 and right <= image.width and bottom <= image.height:
        return image.crop((left, top, right, bottom))
    canvas = Image.new("RGB", (right - left, bottom - top), background_colour(image))
    canvas.paste(image, (-left, -top))
    return canvas


def background_colour(image: Image.Image) -> tuple[int, int, int]:
    """The slide's colour: the median of the brightest fifth of the pixels."""
    pixels = np.asarray(image.resize((64, 64), Image.BILINEAR), dtype=np.float32).reshape(-1, 3)
    brightness = pixels.mean(axis=1)
    bright = pixels[brightness >= np.percentile(brightness, 80)]
    return tuple(int(v) for v in np.median(bright, axis=0).round())
