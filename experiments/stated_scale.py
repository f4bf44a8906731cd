"""Does a known magnification fix other labs' tight crops? (not part of the test suite)

    python experiments/stated_scale.py RUN [RUN...] --data-dir ../shared/data

Tight crops have no whole red cells, so `--crop cell` sizes their frame from the white cell's own
extent, which takes away cell size as a cue. A lab that knows its magnification can state a red
cell's diameter instead (`--crop cell:PX`). This measures BCCD's: the whole, round red cells of
its 71 fields, pooled (few fields have enough on their own), scaled so that the same measurement
on `pbc_sample` gives BloodMNIST's 73 px; the crops are cut from larger photos than the fields, so
their magnification relative to the fields comes from the white cells' median extents, class by
class. Then each folder is scored with the cell finder's own scale and with the stated one;
with several runs (seeds), mean +- std.

The answer is documented in docs/other-labs.md#single-lab-recipes.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import numpy as np
from PIL import Image

import bloodcell
from bloodcell.datasets import bloodmnist
from bloodcell.datasets.folders import labelled_folders
from bloodcell.evaluation.provenance import mean_std, stamp_line
from bloodcell.evaluation.scoring import score_records
from bloodcell.images import cells
from bloodcell.inference.classifier import PredictOptions

PBC_RED_CELL = 200 / cells.FRAME_IN_RED_CELLS  # 73 px: the red cell in BloodMNIST's source images


def median_red_cell(files: list[Path]) -> float:
    diameters = [d for f in files for d in cells.red_cells_in(Image.open(f).convert("RGB"))]
    if not diameters:
        raise SystemExit(f"no whole red cells to measure in {len(files)} images")
    return float(np.median(diameters))


def median_extents(folder: Path) -> dict[str, float]:
    """Per class, the median extent of the white cell the finder frames."""
    return {
        sub.name: float(np.median([cells.locate(Image.open(f).convert("RGB")).extent for f in sorted(sub.iterdir())]))
        for sub in sorted(folder.iterdir())
        if sub.is_dir()
    }


def main() -> None:
    print(stamp_line(), flush=True)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--data-dir")
    args = parser.parse_args()
    root = bloodmnist.resolve_data_dir(args.data_dir)
    fields, crops = root / "ood_dev" / "bccd_fields", root / "ood_dev" / "bccd_crops"

    calibration = PBC_RED_CELL / median_red_cell(sorted((root / "pbc_sample").glob("*/*.jpg")))
    field_red_cell = median_red_cell(sorted(fields.glob("*/*"))) * calibration
    field_extents, crop_extents = median_extents(fields), median_extents(crops)
    ratios = {c: crop_extents[c] / field_extents[c] for c in field_extents if c in crop_extents}
    crop_red_cell = field_red_cell * statistics.median(ratios.values())
    print(f"measurement calibration on pbc_sample: x{calibration:.3f}")
    print(f"BCCD fields: a red cell is {field_red_cell:.1f} px")
    print("crops / fields, white-cell extent per class: " + ", ".join(f"{c} {r:.2f}" for c, r in ratios.items()))
    print(f"BCCD crops: a red cell is {crop_red_cell:.1f} px")

    stated = {fields: f"cell:{field_red_cell:.1f}", crops: f"cell:{crop_red_cell:.1f}"}
    classifiers = [bloodcell.load(run) for run in args.runs]
    print(f"\n{len(classifiers)} run(s); mean +- std over runs\n")
    print("| folder | crop | accuracy | macro recall | recall per class |")
    print("|---|---|---|---|---|")
    for folder in (crops, fields):
        files, labels, counts = labelled_folders([folder], classifiers[0].classes)
        for crop in ("cell", stated[folder]):
            scores = [
                score_records(c.predict_files(files, PredictOptions(crop=crop, cells="one")), labels, c.classes, counts)
                for c in classifiers
            ]
            recall = np.mean([[r["recall"] for r in s["per_class"]] for s in scores], axis=0)
            names = [r["class"] for r in scores[0]["per_class"]]
            print(
                f"| {folder.name} | `{crop}` | {mean_std([s['accuracy'] for s in scores])} "
                f"| {mean_std([s['macro_recall'] for s in scores])} "
                f"| {', '.join(f'{c} {r:.2f}' for c, r in zip(names, recall))} |"
            )


if __name__ == "__main__":
    main()
