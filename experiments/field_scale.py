"""Would assuming another magnification find more of the Chula fields' white cells?

    python experiments/field_scale.py --bccd BCCD_DIR --chula CHULA_DIR [--across 5 6 7 8]

The field finder measures a field's red cells to set its scale; where it cannot (most fields of
both sets), it assumes `fields.RED_CELLS_ACROSS` red cells across the short side. For each value
given, this scores white-cell finding alone (no classification) against the boxes, as
`benchmarks/bench_fields.py` does: recall on both sets, precision on BCCD (every white cell
boxed; Chula boxes only the file's own class, so its unmatched finds are not all false). A
smaller assumed red cell admits smaller, fainter objects and splits touching cells less.

The answer is documented in docs/fields.md#how-cells-are-found.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bloodcell.evaluation.detection import field_pairs, match, read_boxes
from bloodcell.evaluation.provenance import stamp_line
from bloodcell.images import decode, fields

CHULA_CLASSES = ("neutrophil", "eosinophil", "basophil", "lymphocyte", "monocyte")


def score(items: list, across: float) -> dict:
    fields.RED_CELLS_ACROSS = across
    found = missed = extra = 0
    for image, boxes in items:
        white = [b for b in boxes if b.kind == "white"]
        try:
            cells = fields.find_white_cells(image).cells
        except decode.ImageError:
            cells = ()
        matched = match([(c.centre_x, c.centre_y) for c in cells], white)
        found += len(matched)
        missed += len(white) - len(matched)
        extra += len(cells) - len(matched)
    return {"recall": found / max(found + missed, 1), "precision": found / max(found + extra, 1), "missed": missed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bccd", type=Path, required=True)
    parser.add_argument("--chula", type=Path, required=True)
    parser.add_argument("--across", type=float, nargs="+", default=[5.0, 6.0, 7.0, 8.0])
    args = parser.parse_args()
    print(stamp_line(), flush=True)
    sets = {"bccd": (field_pairs([args.bccd]), ()), "chula": (field_pairs([args.chula], CHULA_CLASSES), CHULA_CLASSES)}
    loaded = {}
    for name, (pairs, classes) in sets.items():
        loaded[name] = []
        for image_path, box_path in pairs:
            image = decode.open_image(image_path)
            loaded[name].append((image, read_boxes(box_path, image.size, classes)))
    print("| red cells across | BCCD recall | BCCD precision | Chula recall | Chula missed |")
    print("|---|---|---|---|---|")
    for across in args.across:
        bccd, chula = score(loaded["bccd"], across), score(loaded["chula"], across)
        print(json.dumps({"across": across, "bccd": bccd, "chula": chula}), flush=True)
        cells = f"{bccd['recall']:.3f} | {bccd['precision']:.3f} | {chula['recall']:.3f} | {chula['missed']}"
        print(f"| {across:g} | {cells} |")


if __name__ == "__main__":
    main()
