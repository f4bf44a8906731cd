"""Benchmark the training recipes and inference speed on this machine (not part of the test suite).

    python benchmarks/bench_train.py --data-dir ../shared/data [--seeds 0 1 2] [--presets fast default]

For each preset and seed: training wall time, test accuracy (plain and with 8-view TTA) and
macro AUC, each run touching the test split once at its end. Then inference throughput on
28 px uint8 tensors (batch 1024, 2 threads), median of 5 timings, in float32 and in bfloat16
with torch.compile, and the test accuracy (TTA) of the bfloat16 model, so that the speed-up's
cost in accuracy is measured too. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

import bloodcell
from bloodcell import data
from bloodcell.pipeline import train_run
from bloodcell.train import PRESETS, with_overrides


def cpu_description() -> str:
    """The CPU model, the instruction set PyTorch uses, and a oneDNN cap if one is set."""
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA")
    return f"{model}, {torch.backends.cpu.get_cpu_capability()}" + (f", oneDNN capped to {cap}" if cap else "")


def mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} +- {std:.4f}"


def bench_inference(classifier, images: torch.Tensor, repeats: int = 5) -> float:
    classifier.logits(images, batch_size=1024)  # warm-up (and compilation, for every batch shape)
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        classifier.logits(images, batch_size=1024)
        timings.append(time.perf_counter() - start)
    return len(images) / statistics.median(timings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--presets", nargs="+", default=["fast", "default"], choices=list(PRESETS))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dataset = data.load(args.data_dir)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, bloodcell {bloodcell.__version__}")
    print(f"CPU: {cpu_description()}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets:
            results = []
            for seed in args.seeds:
                config = with_overrides(PRESETS[preset], seed=seed)
                run_dir = Path(tmp) / f"{preset}-{seed}"
                start = time.perf_counter()
                metrics = train_run(dataset, run_dir, config, progress=False)
                wall = time.perf_counter() - start
                train_seconds = bloodcell.load(run_dir).record.train_seconds
                results.append((wall, train_seconds, metrics))
                print(
                    f"{preset} seed {seed}: train {train_seconds:.0f} s (wall incl. eval {wall:.0f} s), "
                    f"test acc {metrics['test']['accuracy']:.4f}, TTA {metrics['test_tta']['accuracy']:.4f}, "
                    f"AUC {metrics['test_tta']['auc_macro_ovr']:.5f}",
                    flush=True,
                )
            images = dataset.test.images.repeat(3, 1, 1, 1)
            first_run = Path(tmp) / f"{preset}-{args.seeds[0]}"
            fp32 = bench_inference(bloodcell.load(first_run), images)
            fast = {
                seed: bloodcell.load(Path(tmp) / f"{preset}-{seed}", precision="bfloat16", compile=True)
                for seed in args.seeds
            }
            bf16 = bench_inference(fast[args.seeds[0]], images)
            bf16_accuracy = [
                (c.logits(dataset.test.images, tta=True).argmax(1) == dataset.test.labels).float().mean().item()
                for c in fast.values()
            ]
            rows.append(
                [
                    preset,
                    PRESETS[preset].model,
                    f"{statistics.median(r[1] for r in results):.0f}",
                    mean_std([r[2]["test"]["accuracy"] for r in results]),
                    mean_std([r[2]["test_tta"]["accuracy"] for r in results]),
                    mean_std([r[2]["test_tta"]["auc_macro_ovr"] for r in results]),
                    f"{sum(r[2]['test_tta']['accuracy'] >= 0.970 for r in results)}/{len(results)}",
                    mean_std(bf16_accuracy),
                    f"{fp32:,.0f}",
                    f"{bf16:,.0f}",
                ]
            )
    header = [
        "preset",
        "model",
        "median train s",
        "test acc",
        "test acc (TTA)",
        "macro AUC (TTA)",
        "seeds >= 0.970 (TTA)",
        "test acc (TTA, bf16)",
        "img/s float32",
        "img/s bf16 compiled",
    ]
    print()
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
