"""End-to-end `predict` throughput on full-size JPEGs (not part of the test suite).

    python benchmarks/bench_predict.py RUN_DIR FOLDER [--repeats 3]

Times Classifier.predict_files (decode in threads + crop/resize + batched inference) and the
`bloodcell predict` CLI as a user runs it (process start-up included); medians of the repeats.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import torch

import bloodcell
from bloodcell import preprocess


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("folder")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--copies", type=int, default=5, help="pass the folder N times for a longer run")
    args = parser.parse_args()
    torch.set_num_threads(2)
    paths = [args.folder] * args.copies
    n = len(preprocess.find_images(paths))
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


if __name__ == "__main__":
    main()
