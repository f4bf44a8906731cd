"""How the scale assumed for fields whose red cells cannot be measured moves white-cell finding.

    python experiments/field_scale.py --bccd BCCD_DIR --chula CHULA_DIR [--across 5 6 7 8] [--nucleus 1.2 0]

The field finder measures a field's red cells to set its scale; where it cannot (most fields of
both sets), it guesses a red cell from the field's largest well-stained object
(`fields.NUCLEUS_IN_RED_CELLS` red-cell diameters; 0 switches the guess off), but never smaller
than `fields.RED_CELLS_ACROSS` red cells across the short side allow. For each pair of values
given, this scores white-cell finding alone (no classification) against the boxes, as
`benchmarks/bench_fields.py` does: recall on both sets, precision on BCCD (every white cell
boxed; Chula boxes only the file's own class, so its unmatched finds are not all false), and the
Chula finds not cut by the border (what a differential counts). A smaller assumed red cell admits
smaller, fainter objects and splits touching cells less.

The answer is documented in docs/fields.md#how-cells-are-found.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from bloodcell.evaluation.detection import field_pairs, match, read_boxes
from bloodcell.evaluation.provenance import stamp_line
from bloodcell.images import decode, fields

CHULA_CLASSES = ("neutrophil", "eosinophil", "basophil", "lymphocyte", "monocyte")


def nucleus_ratio(items: list) -> dict:
    """The largest well-stained object's diameter over the median whole red-cell box, per field
    (BCCD boxes every red cell): what `fields.NUCLEUS_IN_RED_CELLS` is set from."""
    ratios = []
    for image, boxes in items:
        inside = [b for b in boxes if b.kind == "red" and b.x0 > 2 and b.y0 > 2]
        inside = [b for b in inside if b.x1 < image.width - 2 and b.y1 < image.height - 2]  # whole ones
        fields.NUCLEUS_IN_RED_CELLS = 1.0
        guessed = fields.first_pass_scale(image)[1]
        if len(inside) >= 3 and guessed:
            ratios.append(guessed / float(np.median([(b.x1 - b.x0 + b.y1 - b.y0) / 2 for b in inside])))
    p10, p50, p90 = np.percentile(ratios, [10, 50, 90])
    return {"fields": len(ratios), "median": p50, "p10": p10, "p90": p90}


def score(items: list, across: float, nucleus: float) -> dict:
    fields.RED_CELLS_ACROSS = across
    fields.NUCLEUS_IN_RED_CELLS = nucleus or float("inf")  # an infinite ratio: no guess above the floor
    found = missed = extra = counted = 0
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
        counted += sum(not c.cut for c in cells)
    return {
        "recall": found / max(found + missed, 1),
        "precision": found / max(found + extra, 1),
        "missed": missed,
        "counted": counted,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bccd", type=Path, required=True)
    parser.add_argument("--chula", type=Path, required=True)
    parser.add_argument("--across", type=float, nargs="+", default=[5.0, 6.0, 7.0, 8.0])
    parser.add_argument("--nucleus", type=float, nargs="+", default=[fields.NUCLEUS_IN_RED_CELLS, 0.0])
    args = parser.parse_args()
    print(stamp_line(), flush=True)
    sets = {"bccd": (field_pairs([args.bccd]), ()), "chula": (field_pairs([args.chula], CHULA_CLASSES), CHULA_CLASSES)}
    loaded = {}
    for name, (pairs, classes) in sets.items():
        loaded[name] = []
        for image_path, box_path in pairs:
            image = decode.open_image(image_path)
            loaded[name].append((image, read_boxes(box_path, image.size, classes)))
    print(json.dumps({"bccd_nucleus_over_red_cell": nucleus_ratio(loaded["bccd"])}), flush=True)
    lines = ["| nucleus guess | red cells across at most | BCCD recall | BCCD precision | Chula recall | Chula missed "
             "| Chula finds not cut |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for nucleus in args.nucleus:
        for across in args.across:
            bccd, chula = score(loaded["bccd"], across, nucleus), score(loaded["chula"], across, nucleus)
            print(json.dumps({"nucleus": nucleus, "across": across, "bccd": bccd, "chula": chula}), flush=True)
            guess = f"{nucleus:g} red cells" if nucleus else "off"
            cells = f"{bccd['recall']:.3f} | {bccd['precision']:.3f} | {chula['recall']:.3f} | {chula['missed']}"
            lines.append(f"| {guess} | {across:g} | {cells} | {chula['counted']} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
