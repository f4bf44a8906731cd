"""Fit the 28 px MedMNIST emulation filter on half of the PBC sample; report RMS on the other half.

    python experiments/fit_medmnist_filter.py --data-dir ../shared/data [--write]

Fits on the even rows of pbc_sample/labels.csv (25 images per class), evaluates on the odd rows,
and with --write stores the weights in src/bloodcell/images/medmnist_filter.json.

The answer is documented in docs/real-images.md#preprocessing-matched-to-medmnist.
"""

from __future__ import annotations

import argparse
import csv
import json

import numpy as np

from bloodcell.datasets import bloodmnist
from bloodcell.evaluation.provenance import stamp_line
from bloodcell.images import crops


def main() -> None:
    print(stamp_line(), flush=True)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir")
    parser.add_argument("--radius", type=int, default=2)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    folder = bloodmnist.resolve_data_dir(args.data_dir)
    root = folder / "pbc_sample"
    with open(root / "labels.csv") as f:
        rows = list(csv.DictReader(f))
    reference = bloodmnist.load(folder).train.images.permute(0, 2, 3, 1).numpy()
    ours = np.stack([crops.load_file(root / r["file"], emulate=False) for r in rows])
    twins = np.stack([reference[int(r["bloodmnist_index"])] for r in rows])
    fit, held_out = np.arange(0, len(rows), 2), np.arange(1, len(rows), 2)
    weights = crops.fit_medmnist_filter(ours[fit], twins[fit], args.radius)
    filtered = crops.apply_medmnist_filter(ours, weights)

    def rms(a: np.ndarray, idx: np.ndarray) -> float:
        return float(np.sqrt(((a[idx].astype(float) - twins[idx]) ** 2).mean(axis=(1, 2, 3))).mean())

    result = {
        "radius": args.radius,
        "fitted_on": [rows[i]["file"] for i in fit],
        "mean_rms_plain": {"fit": rms(ours, fit), "held_out": rms(ours, held_out)},
        "mean_rms_filtered": {"fit": rms(filtered, fit), "held_out": rms(filtered, held_out)},
    }
    print(json.dumps({k: v for k, v in result.items() if k != "fitted_on"}, indent=2))
    if args.write:
        crops.FILTER_FILE.write_text(json.dumps({**result, "weights": weights.round(6).tolist()}) + "\n")
        print(f"wrote {crops.FILTER_FILE}")


if __name__ == "__main__":
    main()
