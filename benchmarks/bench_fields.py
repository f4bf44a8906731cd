"""Finding every white cell in field photographs, and the time a lab's batch of fields takes.

    python benchmarks/bench_fields.py RUN --bccd BCCD_DIR --chula CHULA_DIR [--timed 100]

BCCD_DIR holds BCCD's JPEGImages/ and Annotations/ (VOC; every white cell boxed: recall and
precision); CHULA_DIR the Chula fields with their YOLO labels (only the file's own class is
boxed: recall only), as the public repositories lay them out (`../shared/data/fields/` has small
samples of both). Every field goes through `bloodcell evaluate RUN --fields`'s path: `predict`
with `--cells every` and the run's crop (forced to `cell`), then matching against the boxes (a
found cell's centre inside a box, one to one). Also: the classification of the cells found, over
the classes present (Chula's boxes carry their class), and the end-to-end time of `predict` on
`--timed` Chula fields (1440 x 900): per-cell records and the differential, in one process and
through the `bloodcell predict` command.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bloodcell
from bloodcell.evaluation.detection import field_pairs, score_fields
from bloodcell.evaluation.provenance import stamp, stamp_line
from bloodcell.inference.classifier import PredictOptions
from bloodcell.inference.differential import differential

CHULA_CLASSES = ("neutrophil", "eosinophil", "basophil", "lymphocyte", "monocyte")  # the YOLO class ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--bccd", type=Path, required=True)
    parser.add_argument("--chula", type=Path, required=True)
    parser.add_argument("--timed", type=int, default=100, help="Chula fields for the end-to-end time")
    args = parser.parse_args()
    print(stamp_line(), flush=True)
    classifier = bloodcell.load(args.run)
    options = PredictOptions(crop="cell", cells="every")
    results = {"stamp": stamp()}
    for name, folder, classes in (("bccd", args.bccd, ()), ("chula", args.chula, CHULA_CLASSES)):
        pairs = field_pairs([folder], classes)
        started = time.perf_counter()
        records = classifier.predict_files([image for image, _ in pairs], options)
        seconds = time.perf_counter() - started
        scores = score_fields(records, pairs, classes) | {"images_per_second": len(pairs) / seconds}
        results[name] = scores
        print(json.dumps({name: scores}), flush=True)

    chula = [image for image, _ in field_pairs([args.chula], CHULA_CLASSES)][: args.timed]
    started = time.perf_counter()
    records = classifier.predict_files(chula, PredictOptions(crop="cell"))  # auto: each image decided alone
    summary = differential(records, classifier.classes)
    in_process = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as tmp:
        listing = Path(tmp) / "fields"
        listing.mkdir()
        for image in chula:
            (listing / image.name).symlink_to(image.resolve())
        started = time.perf_counter()
        command_line = [sys.executable, "-m", "bloodcell", "predict", args.run, str(listing), "--crop", "cell"]
        subprocess.run(command_line, check=True, capture_output=True)
        command = time.perf_counter() - started
    results["end_to_end"] = {
        "fields": len(chula),
        "cells_counted": summary["classified"],
        "seconds_in_process": in_process,
        "seconds_command": command,
    }
    print(json.dumps({"end_to_end": results["end_to_end"]}), flush=True)
    print()
    print("| set | fields | white-cell boxes | found | recall | precision | fields/s | cells classified | accuracy |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in ("bccd", "chula"):
        r = results[name]
        precision = f"{r['precision']:.3f}" if name == "bccd" else "-"
        accuracy = f"{r['accuracy']:.3f}" if r["accuracy"] is not None else "-"
        print(f"| {name} | {r['fields']} | {r['white_cell_boxes']} | {r['found']} | {r['recall']:.3f} | {precision} "
              f"| {r['images_per_second']:.1f} | {r['classified_cells']} | {accuracy} |")  # fmt: skip
    e = results["end_to_end"]
    times = f"{e['seconds_in_process']:.1f} s in one process, {e['seconds_command']:.1f} s through `bloodcell predict`"
    print(f"\n{e['fields']} Chula fields (1440 x 900) -> {e['cells_counted']} cells and the differential: {times}")


if __name__ == "__main__":
    main()
