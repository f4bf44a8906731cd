"""Cross-lab recipe selection: in-domain validation accuracy beside accuracy on another lab's cells.

    python experiments/cross_lab.py VARIANT [VARIANT ...] --data-dir ../shared/data [--pbc-val DIR]
                                   [--runs KEEP_DIR] [--seeds 42 0 1] [--show-test] [--classes NAMES]

For each variant (a named training recipe below): trains on the training split, then prints one
JSON line with the seconds, validation accuracy (tensors at the recipe's size, plain and TTA), and the
accuracy and macro recall on `ood_dev` (both folders, the five classes present) with the
recipe's own crop. With `--pbc-val DIR` (full-size PBC files of the validation split, as
`bloodcell build-data` lays them out) it also scores those, the in-domain check for real
images. With `--seeds`, each variant is trained once per seed and a summary line gives the
mean +- std and the seeds' runs as one ensemble (averaged probabilities) on `ood_dev`. The
test split is scored by training's own last step and printed only with `--show-test`, for
the final recipe. With `--classes`, `ood_dev` is scored with the answers restricted to those
classes (`bloodcell evaluate --classes`), as for a lab that counts white cells only.

The answer is documented in docs/other-labs.md#single-lab-recipes.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import bloodcell
from bloodcell.datasets import bloodmnist
from bloodcell.datasets.folders import labelled_folders
from bloodcell.evaluation.provenance import mean_std, stamp_line
from bloodcell.evaluation.scoring import score_records
from bloodcell.inference.classifier import PredictOptions
from bloodcell.training.recipe import CROSS_LAB_AUGMENT, PRESETS, TrainConfig
from bloodcell.workflows.pipeline import train_run

FAST = replace(PRESETS["fast"], crop="cell")
DEFAULT = replace(PRESETS["default"], crop="cell")  # res-small, 45 epochs, no label smoothing, blur/sharpen 1
PHOTO = CROSS_LAB_AUGMENT  # stain, brightness, contrast, gamma, saturation, blur, zoom
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
    "fast-cell-lab-photo-zoom": replace(FAST, colour="lab", augment=replace(PHOTO, scale=0.35)),
    "fast-cell-lab-photo-randconv": replace(FAST, colour="lab", augment=replace(PHOTO, randconv=0.5)),
    "fast-cell-lab-photo-mixstyle": replace(FAST, colour="lab", augment=PHOTO, mixstyle=0.5),  # Zhou et al.'s p
    # the crosslab recipe on 64 px images (`build-data`'s file); blur and translation in the same cell units
    "crosslab-64": replace(
        PRESETS["crosslab"], model="res-small-64", image_size=64, augment=replace(PHOTO, translate=4, blur=1.8)
    ),
}


def folder_scores(classifier, folders: list[Path], options: PredictOptions) -> dict:
    files, labels, counts = labelled_folders(folders, classifier.classes)
    records = classifier.predict_files(files, replace(options, cells="one"))  # a labelled image is one cell
    return score_records(records, labels, classifier.classes, counts)


def ensemble_scores(classifiers: list, folders: list[Path]) -> dict:
    """The seeds' runs as one model: calibrated probabilities averaged (each run with its own crop);
    flagged when the averaged top probability is low or any run flags the image for another reason."""
    files, labels, counts = labelled_folders(folders, classifiers[0].classes)
    threshold = PredictOptions().min_confidence
    # every class's probability, and review flags for every reason but confidence (checked on the average)
    options = PredictOptions(top_k=len(classifiers[0].classes), min_confidence=0.0, cells="one")
    runs = [c.predict_files(files, options) for c in classifiers]
    records = []
    for per_run in zip(*runs):
        if any(r["error"] for r in per_run):
            records.append(per_run[0])
            continue
        mean = dict.fromkeys(classifiers[0].classes, 0.0)
        for r in per_run:
            for entry in r["top_k"]:
                mean[entry["class"]] += entry["probability"] / len(per_run)
        best = max(mean, key=mean.get)
        review = mean[best] < threshold or any(r["review"] for r in per_run)
        records.append(per_run[0] | {"class": best, "probability": mean[best], "review": review})
    return score_records(records, labels, classifiers[0].classes, counts)


def answering_among(classifier, classes: list[str]):
    """The classifier that scores `ood_dev`: restricted to `classes` (`--classes`) when any are named."""
    return classifier.restricted_to(classes) if classes else classifier


def score_run(
    classifier, dataset: bloodmnist.Dataset, ood: list[Path], pbc_val: str | None, show_test: bool, classes: list[str]
) -> dict:
    val = [
        (classifier.predict_proba(dataset.val.images, tta).argmax(1) == dataset.val.labels).float().mean().item()
        for tta in (False, True)
    ]
    row = {"val": round(val[0], 4), "val_tta": round(val[1], 4)}
    if show_test:  # computed once by train_run at the end of training; shown only for final recipes
        row["test_tta"] = round(classifier.record.metrics["test_tta"]["accuracy"], 4)
    scores = folder_scores(answering_among(classifier, classes), ood, PredictOptions())
    row |= {
        "ood_acc": round(scores["accuracy"], 4),
        "ood_macro_recall": round(scores["macro_recall"], 4),
        "ood_flagged": round(scores["flagged_fraction"], 3),
        "ood_selective": round(scores["selective_accuracy"], 4),
        "ood_recall": {r["class"]: round(r["recall"], 3) for r in scores["per_class"]},
    }
    if pbc_val:
        for crop in ("cell", "medmnist"):
            pbc = folder_scores(classifier, [Path(pbc_val)], PredictOptions(crop=crop))
            row[f"pbc_val_files_{crop}"] = round(pbc["accuracy"], 4)
    return row


def main() -> None:
    print(stamp_line(), flush=True)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir")
    parser.add_argument("--pbc-val", help="folder of full-size validation-split PBC files, DIR/<class>/*.jpg")
    parser.add_argument("--runs", help="keep each variant's run here (and reuse it when it exists)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42], help="train each variant once per seed")
    parser.add_argument("--show-test", action="store_true", help="also print test TTA accuracy (final recipes only)")
    parser.add_argument("--classes", metavar="NAMES", help="score ood_dev with answers restricted to these classes")
    parser.add_argument("variants", nargs="+", choices=list(VARIANTS))
    args = parser.parse_args()
    classes = args.classes.split(",") if args.classes else []
    root = bloodmnist.resolve_data_dir(args.data_dir)
    datasets: dict[int, bloodmnist.Dataset] = {}
    ood = [root / "ood_dev" / "bccd_crops", root / "ood_dev" / "bccd_fields"]
    for name in args.variants:
        config = VARIANTS[name]
        if config.image_size not in datasets:
            datasets[config.image_size] = bloodmnist.load(args.data_dir, size=config.image_size)
        dataset = datasets[config.image_size]
        rows, classifiers = [], []
        with tempfile.TemporaryDirectory() as tmp:
            for seed in args.seeds:
                folder = name if seed == 42 else f"{name}-seed{seed}"  # seed 42: the runs named before --seeds
                run_dir = Path(args.runs or tmp) / folder
                start = time.perf_counter()
                if not (run_dir / "model.json").is_file():  # val and test are scored by train_run; see --show-test
                    train_run(dataset, run_dir, replace(config, seed=seed), progress=False, overwrite=True)
                classifiers.append(bloodcell.load(run_dir))
                row = {"variant": name, "seed": seed, "seconds": round(time.perf_counter() - start)}
                rows.append(row | score_run(classifiers[-1], dataset, ood, args.pbc_val, args.show_test, classes))
                print(json.dumps(rows[-1]), flush=True)
            if len(rows) > 1:
                summary = {"variant": name, "seeds": args.seeds}
                for key, value in rows[0].items():
                    if isinstance(value, float):
                        values = [r[key] for r in rows]
                        summary[key] = mean_std(values)
                ensemble = ensemble_scores([answering_among(c, classes) for c in classifiers], ood)
                summary["ensemble_ood_acc"] = round(ensemble["accuracy"], 4)
                summary["ensemble_ood_macro_recall"] = round(ensemble["macro_recall"], 4)
                summary["ensemble_ood_selective"] = round(ensemble["selective_accuracy"], 4)
                summary["ensemble_ood_flagged"] = round(ensemble["flagged_fraction"], 3)
                print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
