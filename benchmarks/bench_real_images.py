"""How a trained run does on real full-size microscope images (not part of the test suite).

    python benchmarks/bench_real_images.py RUN_DIR --data-dir ../shared/data

Classifies the 400 PBC files of `pbc_sample/` and their 28 px BloodMNIST twins (training images
with known indices), and prints how often the two predictions agree and the accuracy of each.
"""

from __future__ import annotations

import argparse
import csv

import numpy as np

import bloodcell
from bloodcell.classes import CLASSES
from bloodcell.datasets import bloodmnist
from bloodcell.evaluation.provenance import stamp_line


def main() -> None:
    print(stamp_line(), flush=True)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--data-dir")
    args = parser.parse_args()
    root = bloodmnist.resolve_data_dir(args.data_dir) / "pbc_sample"
    with open(root / "labels.csv") as f:
        rows = list(csv.DictReader(f))
    truth = [CLASSES[int(r["label"])] for r in rows]
    classifier = bloodcell.load(args.run_dir)
    from_files = [r["class"] for r in classifier.predict_files([root / r["file"] for r in rows])]
    twins = bloodmnist.load(args.data_dir).train.images[[int(r["bloodmnist_index"]) for r in rows]]
    from_twins = classifier.predict(twins)
    print(f"{len(rows)} files: agreement with their 28 px twins {np.mean(np.equal(from_files, from_twins)):.2%}")
    print(f"accuracy on the files {np.mean(np.equal(from_files, truth)):.2%}, on the twins ", end="")
    print(f"{np.mean(np.equal(from_twins, truth)):.2%}")


if __name__ == "__main__":
    main()
