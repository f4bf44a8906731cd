"""Every white cell in a field photograph: where each is, how large to frame it, which the border cuts.

Labs photograph fields, not centred cells: a 640 x 480 or 1440 x 900 image with one to a few
white cells (or none) among hundreds of red cells and platelets. `find_white_cells` works in two
passes. The first, at a coarse scale, measures the field's red cells (a red cell is about 7.5 µm
in any smear). The second looks at a scale where a red cell is about 20 px, so the same rules fit
every magnification: stained objects (blue minus green, the nucleus stain) at least
`MIN_AREA` of a red cell's area, whose stain stands out from the ring around them by `MIN_CONTRAST`
grey levels and by `RELATIVE_CONTRAST` of the field's most contrasted object, and at least
`RELATIVE_AREA` of that object's size (platelets are tiny beside a white cell in the same field).
Pieces closer than `MERGE` red-cell diameters are one cell (a neutrophil's lobes). Each cell is
framed as BloodMNIST frames cells: `cells.FRAME_IN_RED_CELLS` red-cell diameters wide.

The constants were chosen on the Chula fields (trainable) and checked on the BCCD fields (the dev
set): `benchmarks/bench_fields.py` measures recall and precision against their boxes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from PIL import Image
from scipy import ndimage

from bloodcell.images.cells import (
    FRAME_IN_CELL_EXTENTS,
    FRAME_IN_RED_CELLS,
    MIN_RED_CELLS,
    CellFrame,
    red_cell_diameters,
)
from bloodcell.images.decode import ImageError

COARSE_SIDE = 160  # short side of the first pass, which measures the red cells
RED_CELL_PX = 20.0  # a red cell's diameter in the second pass
MAX_SIDE = 400  # the second pass's short side at most (a very low magnification)
RED_CELLS_ACROSS = 8.0  # red cells across a field's short side at least: the smallest red cell assumed
NUCLEUS_IN_RED_CELLS = 1.2  # the field's largest well-stained object, in red-cell diameters (BCCD's boxes)
MIN_STAIN = 15.0  # blue minus green, grey levels: the weakest nucleus stain counted at all
STAIN_LEVEL = 0.45  # the stain threshold between the field's median and its 99.5th percentile
MIN_AREA = 0.15  # of a red cell's area
MIN_DARKNESS = 0.0  # grey levels: an object's darkest tenth below the field's median (a nucleus, not a rim)
MIN_CONTRAST = 8.0  # grey levels of stain above the object's surroundings
RELATIVE_CONTRAST = 0.5  # of the most contrasted object in the field
RELATIVE_AREA = 0.3  # of the most contrasted object's area
MERGE = 0.6  # red-cell diameters: pieces closer than this are one cell
FIELD_SIDES = 2.5  # an image this many cell frames across its short side is a field, not a crop
BORDER_MARGIN = 1  # working pixels: a cell this close to the image's edge is cut by it
MIN_NUCLEUS_PX = 8  # first-pass pixels: the smallest object that can set the scale
MAX_CELLS = 40  # more white-cell-like objects than this in one image: debris or not a smear at all
MAX_STAINED = 0.3  # of the image stained like a nucleus (at most 0.15 in the BCCD and Chula fields): debris


@dataclass(frozen=True)
class FieldScan:
    """The white cells found in one image, and how the image was read."""

    cells: tuple[CellFrame, ...]
    red_cell: float | None  # a red cell's diameter in image pixels (None: not measurable)
    is_field: bool  # several cells, or an image far larger than one cell's frame


def _working(image: Image.Image, short_side: float) -> tuple[np.ndarray, float]:
    scale = short_side / min(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return np.asarray(image.resize(size, Image.BILINEAR), dtype=np.float32), scale


def _stain(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The smoothed nucleus-stain map and the mask of pixels stained like a nucleus."""
    stain = ndimage.gaussian_filter(pixels[..., 2] - pixels[..., 1], sigma=0.75)
    low, high = np.percentile(stain, [50, 99.5])
    mask = stain > max(MIN_STAIN, low + STAIN_LEVEL * (high - low))
    mask = ndimage.binary_closing(mask, structure=np.ones((3, 3), bool))
    return stain, ndimage.binary_fill_holes(mask)


def first_pass_scale(image: Image.Image) -> tuple[float | None, float | None]:
    """A red cell's diameter in the image's pixels, measured from whole, round red cells; where too
    few are whole (touching or cut), guessed from the field's largest well-stained object, a white
    cell's nucleus. Returns (measured, guessed); None where neither can be had."""
    pixels, scale = _working(image, COARSE_SIDE)
    stain, mask = _stain(pixels)
    _refuse_debris(mask)
    diameters = red_cell_diameters(pixels, mask)
    if len(diameters) >= MIN_RED_CELLS:
        return float(np.median(diameters)) / scale, None
    labels, count = ndimage.label(mask)
    areas = ndimage.sum(mask, labels, range(1, count + 1)) if count else np.zeros(0)
    strong = _standing_out(stain, labels, mask, [i for i in range(1, count + 1) if areas[i - 1] >= MIN_NUCLEUS_PX])
    if not strong:
        return None, None
    return None, float(2 * np.sqrt(max(areas[i - 1] for i in strong) / np.pi) / scale / NUCLEUS_IN_RED_CELLS)


def _standing_out(stain: np.ndarray, labels: np.ndarray, stained: np.ndarray, candidates: list[int]) -> list[int]:
    """The objects whose stain stands out from their surroundings, absolutely and beside the field's
    most contrasted object, most contrasted first."""
    contrast = {i: _contrast(stain, labels == i, stained) for i in candidates}
    best = max(contrast.values(), default=0.0)
    kept = [i for i in candidates if contrast[i] >= max(MIN_CONTRAST, RELATIVE_CONTRAST * best)]
    return sorted(kept, key=lambda i: -contrast[i])


def _refuse_debris(mask: np.ndarray) -> None:
    if mask.mean() > MAX_STAINED:
        raise ImageError(
            f"{mask.mean():.0%} of the image is stained like nuclei (at most {MAX_STAINED:.0%}): debris or no smear"
        )


def find_white_cells(image: Image.Image, red_cell: float | None = None) -> FieldScan:
    """Every white cell in an RGB image, each framed like BloodMNIST; `red_cell` (pixels) replaces
    the measurement for a lab that knows its magnification."""
    stated = red_cell is not None
    guessed = None
    if not stated:
        red_cell, guessed = first_pass_scale(image)
    # unmeasured: from the largest nucleus, but never a red cell smaller than RED_CELLS_ACROSS allow
    assumed = red_cell or max(guessed or 0.0, min(image.size) / RED_CELLS_ACROSS)
    pixels, scale = _working(image, min(min(image.size) * RED_CELL_PX / assumed, MAX_SIDE))
    stain, mask = _stain(pixels)
    _refuse_debris(mask)
    labels, count = ndimage.label(mask)
    areas = ndimage.sum(mask, labels, range(1, count + 1)) if count else np.zeros(0)
    red_area = np.pi / 4 * (assumed * scale) ** 2
    brightness = pixels.mean(axis=2)
    field_level = float(np.median(brightness))
    candidates = [
        i
        for i in range(1, count + 1)
        if areas[i - 1] >= MIN_AREA * red_area
        and field_level - np.percentile(brightness[labels == i], 10) >= MIN_DARKNESS
    ]
    kept = _standing_out(stain, labels, mask, candidates)
    if kept:  # kept[0] is the most contrasted: platelets are tiny beside it
        kept = [i for i in kept if areas[i - 1] >= RELATIVE_AREA * areas[kept[0] - 1]]
    scale_from = "stated red cell" if stated else "red cells" if red_cell else "cell extent"
    if len(kept) > MAX_CELLS:
        raise ImageError(
            f"{len(kept)} white-cell-like objects in one image (at most {MAX_CELLS}): debris, or not a smear"
        )
    frames = []
    for group in _groups(kept, labels, MERGE * assumed * scale, areas):
        points = np.argwhere(np.isin(labels, group))
        (top, left), (bottom, right) = points.min(axis=0), points.max(axis=0) + 1
        centre = points.mean(axis=0)
        extent = max(bottom - top, right - left) / scale
        side = FRAME_IN_RED_CELLS * red_cell if red_cell else FRAME_IN_CELL_EXTENTS * extent
        edge = BORDER_MARGIN  # a cell cut by the border often stains a pixel short of the very edge
        cut = min(top, left) <= edge or bottom >= mask.shape[0] - edge or right >= mask.shape[1] - edge
        frames.append(
            CellFrame(
                centre_x=float(centre[1] + 0.5) / scale,
                centre_y=float(centre[0] + 0.5) / scale,
                side=float(side),
                found=True,
                candidates=0,
                scale_from=scale_from,
                extent=float(extent),
                cut=bool(cut),
            )
        )
    frames.sort(key=lambda f: (round(f.centre_y), f.centre_x))  # reading order: top to bottom, left to right
    frames = [replace(f, candidates=len(frames), index=i) for i, f in enumerate(frames)]
    # a field: several cells, or an image many cell frames across (the cells' own, else a red cell's)
    frame_side = float(np.median([f.side for f in frames])) if frames else FRAME_IN_RED_CELLS * assumed
    is_field = len(frames) >= 2 or min(image.size) >= FIELD_SIDES * frame_side
    return FieldScan(tuple(frames), red_cell, is_field)


def _contrast(stain: np.ndarray, component: np.ndarray, stained: np.ndarray) -> float:
    """How far an object's mean stain stands above the unstained ring around it."""
    ring = ndimage.binary_dilation(component, iterations=3) & ~stained
    around = stain[ring].mean() if ring.any() else float(np.median(stain))
    return float(stain[component].mean() - around)


def _groups(kept: list[int], labels: np.ndarray, radius: float, areas: np.ndarray) -> list[list[int]]:
    """Objects within `radius` of a larger one's centre belong to it (lobes of one nucleus)."""
    centres = {i: np.array(ndimage.center_of_mass(labels == i)) for i in kept}
    groups, used = [], set()
    for i in sorted(kept, key=lambda k: -areas[k - 1]):
        if i in used:
            continue
        group = [j for j in kept if j not in used and np.linalg.norm(centres[i] - centres[j]) <= radius]
        used |= set(group)
        groups.append(group)
    return groups
