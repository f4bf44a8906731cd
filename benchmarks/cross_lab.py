"""Cross-lab recipe selection: in-domain validation accuracy beside accuracy on another lab's cells.

    python benchmarks/cross_lab.py --data-dir ../shared/data VARIANT [VARIANT ...] [--pbc-val DIR]

For each variant (a named training recipe below): trains on the training split, then prints one
JSON line with the seconds, validation accuracy (28 px tensors, plain and TTA), and the
accuracy and macro recall on `ood_dev` (both folders, the five classes present) with the
recipe's own crop. With `--pbc-val DIR` (full-size PBC files of the validation split, as
`bloodcell build-data` lays them out) it also scores those, the in-domain check for real
images. The test split is never read here.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import bloodcell
from bloodcell import data
from bloodcell.augment import AugmentConfig
from bloodcell.evaluate import labelled_folders, score_records
from bloodcell.pipeline import train_run
from bloodcell.predict import PredictOptions
from bloodcell.train import PRESETS, TrainConfig

FAST = replace(PRESETS["fast"], crop="cell")
DEFAULT = replace(PRESETS["default"], crop="cell")  # res-small, 45 epochs, no label smoothing, blur/sharpen 1
PHOTO = AugmentConfig(stain=0.15, brightness=0.15, contrast=0.15, gamma=0.2, saturation=0.25, blur=0.8, scale=0.15)
STRONG = replace(PHOTO, stain=0.3, brightness=0.25, contrast=0.25, gamma=0.3, saturation=0.4, blur=1.0, scale=0.2)
VARIANTS: dict[str, TrainConfig] = {
    "fast-cell": FAST,
    "fast-cell-lab": replace(FAST, colour="lab"),
    "fast-cell-lab-photo": replace(FAST, colour="lab", augment=PHOTO),
    "fast-cell-photo": replace(FAST, augment=PHOTO),
    "fast-cell-lab-photo-sharp": replace(FAST, colour="lab", augment=replace(PHOTO, sharpness=1.0)),
    "fast-cell-lab-strong": replace(FAST, colour="lab", augment=replace(STRONG, colour=0.1)),
    "fast-cell-lab-strong-sharp": replace(FAST, colour="lab", augment=replace(STRONG, colour=0.1, sharpness=1.0)),
    "default-cell-lab": replace(DEFAULT, colour="lab"),
    "default-cell-lab-photo": replace(DEFAULT, colour="lab", augment=replace(PHOTO, sharpness=1.0)),
}


def folder_scores(classifier, folders: list[Path], options: PredictOptions) -> dict:
    files, labels, counts = labelled_folders(folders, classifier.classes)
    return score_records(classifier.predict_files(files, options), labels, classifier.classes, counts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir")
    parser.add_argument("--pbc-val", help="folder of full-size validation-split PBC files, DIR/<class>/*.jpg")
    parser.add_argument("--runs", help="keep each variant's run here (and reuse it when it exists)")
    parser.add_argument("variants", nargs="+", choices=list(VARIANTS))
    args = parser.parse_args()
    root = data.resolve_data_dir(args.data_dir)
    dataset = data.load(args.data_dir)
    ood = [root / "ood_dev" / "bccd_crops", root / "ood_dev" / "bccd_fields"]
    for name in args.variants:
        config = VARIANTS[name]
        with tempfile.TemporaryDirectory() as tmp:
            run_dir = Path(args.runs) / name if args.runs else Path(tmp) / "run"
            start = time.perf_counter()
            if not (run_dir / "model.json").is_file():  # val and test are scored by train_run; only val is shown
                train_run(dataset, run_dir, config, progress=False, overwrite=True)
            seconds = time.perf_counter() - start
            classifier = bloodcell.load(run_dir)
        val = [
            (classifier.predict_proba(dataset.val.images, tta).argmax(1) == dataset.val.labels).float().mean().item()
            for tta in (False, True)
        ]
        row = {"variant": name, "seconds": round(seconds), "val": round(val[0], 4), "val_tta": round(val[1], 4)}
        scores = folder_scores(classifier, ood, PredictOptions())
        row |= {
            "ood_acc": round(scores["accuracy"], 4),
            "ood_macro_recall": round(scores["macro_recall"], 4),
            "ood_flagged": round(scores["flagged_fraction"], 3),
            "ood_recall": {r["class"]: round(r["recall"], 3) for r in scores["per_class"]},
        }
        if args.pbc_val:
            for crop in ("cell", "medmnist"):
                pbc = folder_scores(classifier, [Path(args.pbc_val)], PredictOptions(crop=crop))
                row[f"pbc_val_files_{crop}"] = round(pbc["accuracy"], 4)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
