"""Finding the white cell and framing it like BloodMNIST, on drawn smears and on real PBC images."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from bloodcell import runs
from bloodcell.errors import BloodcellError
from bloodcell.images import cells, crops, decode

BACKGROUND = (240, 228, 210)
RED_CELL = (205, 160, 165)
NUCLEUS = (70, 40, 130)


def smear(size=(360, 363), red_diameter=73, white_at=(180, 181), white_diameter=60, reds=12, seed=0) -> Image.Image:
    """A drawn PBC-like field: pink red cells (some at the border) around a violet white cell."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", size, BACKGROUND)
    draw = ImageDraw.Draw(image)
    r = red_diameter / 2
    centres: list[tuple[float, float]] = []
    for _ in range(2000):
        if len(centres) == reds:
            break
        x, y = rng.uniform(0, size[0]), rng.uniform(0, size[1])
        if np.hypot(x - white_at[0], y - white_at[1]) < r + white_diameter / 2 + 10:
            continue
        if any(np.hypot(x - cx, y - cy) < 2 * r + 4 for cx, cy in centres):
            continue  # red cells in a good smear's reading area lie side by side
        centres.append((x, y))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=RED_CELL)
    w = white_diameter / 2
    draw.ellipse((white_at[0] - w, white_at[1] - w, white_at[0] + w, white_at[1] + w), fill=NUCLEUS)
    return image


def test_a_pbc_like_field_is_framed_like_medmnist():
    frame = cells.locate(smear())
    assert frame.found and frame.scale_from == "red cells" and frame.candidates == 1
    assert frame.side == pytest.approx(200, rel=0.08)
    assert abs(frame.centre_x - 180) < 4 and abs(frame.centre_y - 181) < 4


def test_half_magnification_and_an_off_centre_cell():
    frame = cells.locate(smear(size=(640, 480), red_diameter=36, white_at=(450, 130), white_diameter=30, reds=40))
    assert frame.scale_from == "red cells" and frame.side == pytest.approx(100, rel=0.12)
    assert abs(frame.centre_x - 450) < 4 and abs(frame.centre_y - 130) < 4


def test_a_tight_crop_is_framed_by_the_cell_and_padded_with_background():
    image = Image.new("RGB", (150, 150), (225, 225, 230))
    ImageDraw.Draw(image).ellipse((15, 15, 135, 135), fill=NUCLEUS)
    frame = cells.locate(image)
    assert frame.scale_from == "cell extent" and frame.side > 150
    assert frame.extent == pytest.approx(120, rel=0.05)  # the drawn cell, in pixels of the image
    assert frame.side == pytest.approx(cells.FRAME_IN_CELL_EXTENTS * frame.extent)
    square = cells.crop(image, frame)
    assert square.size[0] == square.size[1] and square.size[0] > 150
    assert np.asarray(square)[0, 0].tolist() == list(cells.background_colour(image))


def test_a_stated_red_cell_size_sets_the_frame_of_a_tight_crop():
    image = Image.new("RGB", (150, 150), (225, 225, 230))
    ImageDraw.Draw(image).ellipse((15, 15, 135, 135), fill=NUCLEUS)
    crop = runs.Crop.parse("cell:40")
    frame = cells.locate(image, crop.red_cell)
    assert frame.found and frame.scale_from == "stated red cell"
    assert frame.side == pytest.approx(cells.FRAME_IN_RED_CELLS * 40)  # not the cell extent's 1.68 x 120
    field = cells.locate(smear(), red_cell=50.0)  # stated beats measured (73 px red cells drawn)
    assert field.scale_from == "stated red cell" and field.side == pytest.approx(cells.FRAME_IN_RED_CELLS * 50)
    for bad in ("cell:", "cell:abc", "cell:0", "cell:-5", "cell:5000"):
        with pytest.raises(BloodcellError, match="cell:PX"):
            runs.Crop.parse(bad)


def test_red_cells_are_measured_in_image_pixels():
    diameters = cells.red_cells_in(smear(size=(720, 726), red_diameter=146, reds=12))
    assert len(diameters) >= 6 and np.median(diameters) == pytest.approx(146, rel=0.08)


def test_two_white_cells_are_counted_and_a_blank_image_has_none():
    image = smear(white_at=(100, 180))
    ImageDraw.Draw(image).ellipse((230, 150, 290, 210), fill=NUCLEUS)
    assert cells.locate(image).candidates == 2
    blank = cells.locate(Image.new("RGB", (300, 300), BACKGROUND))
    assert not blank.found and blank.scale_from == "image"


def test_cell_crop_through_preprocess(tmp_path):
    path = tmp_path / "field.png"
    smear().save(path)
    pixels, frame = crops.prepare_framed(decode.open_image(path), 28, runs.Crop.parse("cell"))
    assert pixels.shape == (28, 28, 3) and frame is not None and frame.found
    centre = pixels[10:18, 10:18].reshape(-1, 3).mean(0)
    assert centre[2] > centre[1] + 40  # the violet cell is in the middle of the model's input


def crop_of_a_lab(seed: int, red_diameter: float = 60, side: int = 260) -> Image.Image:
    """A crop cut around a white cell, too small to hold the three whole red cells `locate` needs."""
    return smear(size=(side, side), red_diameter=red_diameter, white_at=(side / 2, side / 2), reds=3, seed=seed)


def test_a_labs_magnification_is_measured_over_its_crops_together():
    crops_ = [crop_of_a_lab(seed) for seed in range(12)]
    assert all(cells.locate(c).scale_from != "red cells" for c in crops_)  # alone, none can be measured
    scale = cells.lab_red_cell(crops_)
    assert scale.images == 12 and scale.measurable >= 3
    assert scale.red_cell == pytest.approx(60, rel=0.1)
    assert "a red cell is" in scale.describe()
    crop, measured = crops.measured(runs.Crop.parse(runs.MEASURE), crops_)
    assert measured == scale and crop.red_cell == scale.red_cell and not crop.measure
    assert crops.measured(runs.Crop.parse("cell"), crops_) == (runs.Crop(None), None)


def test_tight_crops_state_no_magnification():
    tight = []
    for seed in range(8):
        image = Image.new("RGB", (150, 150), (225, 225, 230))
        ImageDraw.Draw(image).ellipse((15 + seed, 15, 135, 135 - seed), fill=NUCLEUS)
        tight.append(image)
    scale = cells.lab_red_cell(tight + [b"not an image"])  # an unreadable one is passed over
    assert scale.red_cell is None and scale.images == 8 and scale.measurable == 0
    assert "too few to state a magnification" in scale.describe()
    crop, _ = crops.measured(runs.Crop.parse(runs.MEASURE), tight)
    assert crop == runs.Crop(None)  # each image framed on its own, as with 'cell'
