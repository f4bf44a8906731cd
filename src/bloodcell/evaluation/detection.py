"""Scoring white-cell finding in fields against boxes drawn by people.

Each field image has a box file beside it with the same stem: Pascal VOC `.xml` (objects named
`WBC`, `RBC`, `Platelets`, or a class name such as `neutrophil`) or YOLO `.txt` (`class x_centre
y_centre width height`, normalised; the class ids name `box_classes` in order). A found cell
matches a white-cell box when its centre lies inside the box, one to one (the nearest box centre
first). Recall is over the boxes; precision over the found cells, which is meaningful only where
every white cell is boxed (BCCD), not where only some are (Chula). Found cells matched to a box of
a known class are scored for their class too, over the classes present.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from bloodcell.classes import CLASSES, class_named
from bloodcell.errors import BloodcellError
from bloodcell.files import printable
from bloodcell.images import decode

WHITE_CELL_NAMES = {"wbc", "white cell", "white blood cell", "leukocyte", "leucocyte"}
RED_CELL_NAMES = {"rbc", "red cell", "red blood cell", "erythrocyte"}
PLATELET_NAMES = {"platelet", "platelets", "plt", "thrombocyte"}


@dataclass(frozen=True)
class Box:
    """A box drawn on a field, in image pixels: a white cell (with its class, if known), a red
    cell or a platelet."""

    x0: float
    y0: float
    x1: float
    y1: float
    kind: str  # "white", "red" or "platelet"
    label: str | None = None  # the white cell's class, when the box file says it

    def holds(self, x: float, y: float) -> bool:
        return self.x0 <= x <= self.x1 and self.y0 <= y <= self.y1


def box_file(image: Path) -> Path | None:
    """The image's box file: beside it (`x.jpg`, `x.xml` or `x.txt`), or in YOLO's layout
    (`images/x.jpg` with `labels/x.txt`)."""
    candidates = [image.with_suffix(".xml"), image.with_suffix(".txt")]
    if image.parent.name == "images":
        candidates.append(image.parent.parent / "labels" / f"{image.stem}.txt")
    return next((c for c in candidates if c.is_file()), None)


def read_boxes(path: Path, size: tuple[int, int], box_classes: tuple[str, ...] = ()) -> list[Box]:
    """The boxes of one field (`size`: the image's width and height, for YOLO's normalised boxes)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BloodcellError(f"{printable(path)}: cannot read the box file ({exc})") from None
    return _voc(path, text) if path.suffix == ".xml" else _yolo(path, text, size, box_classes)


def _voc(path: Path, text: str) -> list[Box]:
    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        raise BloodcellError(f"{printable(path)}: not a Pascal VOC box file ({exc})") from None
    boxes = []
    for obj in root.iter("object"):
        name = (obj.findtext("name") or "").strip()
        box = obj.find("bndbox")
        try:
            x0, y0, x1, y1 = (float(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
        except (AttributeError, TypeError, ValueError):
            raise BloodcellError(f"{printable(path)}: an object {name!r} has no valid bndbox") from None
        kind, label = _kind(name)
        if kind is not None:
            boxes.append(Box(x0, y0, x1, y1, kind, label))
    return boxes


def _yolo(path: Path, text: str, size: tuple[int, int], box_classes: tuple[str, ...]) -> list[Box]:
    width, height = size
    boxes = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            index, cx, cy, w, h = int(parts[0]), *(float(v) for v in parts[1:])
            if len(parts) != 5 or not all(0 <= v <= 1.0001 for v in (cx, cy, w, h)):
                raise ValueError
        except (ValueError, IndexError):
            raise BloodcellError(f"{printable(path)}: line {number} is not 'class x y width height' (0..1)") from None
        if box_classes and not 0 <= index < len(box_classes):
            raise BloodcellError(f"{printable(path)}: line {number}: class {index} beyond --box-classes")
        label = box_classes[index] if box_classes else None
        boxes.append(Box((cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height,
                         "white", label))  # fmt: skip
    return boxes


def _kind(name: str) -> tuple[str | None, str | None]:
    folded = name.lower().replace("_", " ")
    if folded in WHITE_CELL_NAMES:
        return "white", None
    if folded in RED_CELL_NAMES:
        return "red", None
    if folded in PLATELET_NAMES:
        return "platelet", None
    label = class_named(name)
    return ("white", label) if label else (None, None)


def match(centres: list[tuple[float, float]], boxes: list[Box]) -> dict[int, int]:
    """Found cell index -> white-cell box index: centre inside the box, one to one, nearest first."""
    pairs = sorted(
        ((x - (b.x0 + b.x1) / 2) ** 2 + (y - (b.y0 + b.y1) / 2) ** 2, i, j)
        for i, (x, y) in enumerate(centres)
        for j, b in enumerate(boxes)
        if b.kind == "white" and b.holds(x, y)
    )
    found_to_box: dict[int, int] = {}
    taken = set()
    for _, i, j in pairs:
        if i not in found_to_box and j not in taken:
            found_to_box[i] = j
            taken.add(j)
    return found_to_box


def field_pairs(folders: list[Path], box_classes: tuple[str, ...] = ()) -> list[tuple[Path, Path]]:
    """(image, box file) for every field image under the folders; images without one are left out
    (Chula has fields that nobody boxed)."""
    pairs = [(image, box_file(image)) for image in decode.find_images(folders)]
    pairs = [(image, boxes) for image, boxes in pairs if boxes is not None]
    if not pairs:
        raise BloodcellError(f"{' '.join(map(printable, folders))}: no field images with a .xml or .txt box file")
    return pairs


def _size(image: Path) -> tuple[int, int]:
    try:
        with Image.open(image) as opened:
            return opened.size
    except (OSError, ValueError) as exc:
        raise BloodcellError(f"{printable(image)}: cannot read the image's size ({exc})") from None


def score_fields(records: list[dict], pairs: list[tuple[Path, Path]], box_classes: tuple[str, ...] = ()) -> dict:
    """Finding (recall, precision) and classification (over matched cells of known class) of the
    records `predict` gave for the field images in `pairs`."""
    by_image: dict[str, list[dict]] = {}
    for record in records:
        by_image.setdefault(record["path"], []).append(record)
    boxed = found = matched = 0
    right, labelled, per_class, confusion = 0, 0, Counter(), Counter()
    for image, box_path in pairs:
        cells = [r for r in by_image.get(str(image), []) if r.get("cell") and r["cell"].get("found")]
        size = _size(image)
        boxes = read_boxes(box_path, size, box_classes)
        whites = [b for b in boxes if b.kind == "white"]
        centres = [((r["cell"]["box"][0] + r["cell"]["box"][2]) / 2, (r["cell"]["box"][1] + r["cell"]["box"][3]) / 2)
                   for r in cells]  # fmt: skip
        pairs_ = match(centres, boxes)
        boxed, found, matched = boxed + len(whites), found + len(cells), matched + len(pairs_)
        for i, j in pairs_.items():
            label = boxes[j].label
            if label is not None and cells[i]["class"] is not None:
                labelled += 1
                per_class[label] += 1
                right += cells[i]["class"] == label
                confusion[(label, cells[i]["class"])] += 1
    recalls = {c: confusion[(c, c)] / n for c, n in per_class.items()}
    return {
        "fields": len(pairs),
        "white_cell_boxes": boxed,
        "found": found,
        "matched": matched,
        "recall": matched / boxed if boxed else None,
        "precision": matched / found if found else None,
        "classified_cells": labelled,
        "accuracy": right / labelled if labelled else None,
        "macro_recall": sum(recalls.values()) / len(recalls) if recalls else None,
        "per_class_recall": {c: recalls[c] for c in CLASSES if c in recalls},
    }
