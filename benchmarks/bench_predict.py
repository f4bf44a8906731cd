"""End-to-end `predict` throughput on full-size JPEGs (not part of the test suite).

    python benchmarks/bench_predict.py RUN_DIR FOLDER [--repeats 3]

Times Classifier.predict_files (decode in threads + crop/resize + batched inference) and the
`bloodcell predict` CLI as a user runs it (process start-up included); medians of the repeats.
Also times the MedMNIST colour filter on the 28 px renderings, image by image and as one batch
of 64 (how `predict_files` and the server apply it).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

import bloodcell
from bloodcell.evaluation.provenance import stamp_line
from bloodcell.images import crops, decode


def filter_timings(paths: list[str], repeats: int = 5) -> tuple[float, float]:
    """Microseconds per image of the MedMNIST filter: one image at a time, and a batch of 64."""
    weights = crops.medmnist_filter()
    images = np.stack([crops.load(p, emulate=False) for p in decode.find_images(paths)[:64]])
    alone, batched = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        for image in images:
            crops.apply_medmnist_filter(image, weights)
        alone.append(time.perf_counter() - start)
        start = time.perf_counter()
        crops.apply_medmnist_filter(images, weights)
        batched.append(time.perf_counter() - start)
    return 1e6 * statistics.median(alone) / len(images), 1e6 * statistics.median(batched) / len(images)


def main() -> None:
    print(stamp_line(), flush=True)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("folder")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--copies", type=int, default=5, help="pass the folder N times for a longer run")
    args = parser.parse_args()
    torch.set_num_threads(2)
    paths = [args.folder] * args.copies
    n = len(decode.find_images(paths))
    classifier = bloodcell.load(args.run_dir)
    classifier.predict_files(paths[:1])  # warm-up
    api, cli = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        classifier.predict_files(paths)
        api.append(time.perf_counter() - start)
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "bloodcell", "predict", args.run_dir, *paths, "--json"],
            check=True,
            capture_output=True,
        )
        cli.append(time.perf_counter() - start)
    print(f"{n} full-size images, {args.repeats} repeats, 2 threads")
    print(
        f"Python API predict_files: {n / statistics.median(api):,.0f} images/s (median {statistics.median(api):.2f} s)"
    )
    print(
        f"bloodcell predict CLI:    {n / statistics.median(cli):,.0f} images/s (median {statistics.median(cli):.2f} s, "
        "process start-up included)"
    )
    alone, batched = filter_timings(paths[:1])
    print(f"MedMNIST filter: {alone:.0f} us per image alone, {batched:.0f} us per image in a batch of 64")


if __name__ == "__main__":
    main()
