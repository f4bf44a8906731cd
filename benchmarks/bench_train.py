"""Benchmark the training recipes and inference speed on this machine (not part of the test suite).

    python benchmarks/bench_train.py --data-dir DIR [--seeds 0 1 2] [--presets fast default default-64]
                                     [--full-size VAL_DIR TEST_DIR] [--runs KEEP_DIR] [--bf16]
                                     [--teacher RUN] [--reuse]

Prints the CPU model and the instruction set PyTorch uses (run it with ONEDNN_MAX_CPU_ISA=AVX2
to see what CPUs without AVX-512 get). For each preset and seed: training time, test accuracy
(plain and with 8-view TTA) and macro AUC, each run touching the test split once at its end;
inference throughput on uint8 tensors of the preset's size (batch 1024, median of 5 timings);
with --full-size, `predict` on the full-size PBC files of the validation split (and, once at the
end, the test split): accuracy and images/s. With --teacher, every preset is trained as a student
of that run (distillation weight as `train --teacher`). With --reuse, runs already in --runs
(PRESET-SEED) are read instead of retrained, so seeds trained on different days make one table.
Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import bloodcell
from bloodcell.datasets import bloodmnist
from bloodcell.datasets.folders import labelled_folders
from bloodcell.evaluation.provenance import mean_std, stamp_line
from bloodcell.evaluation.scoring import score_records
from bloodcell.runs import read_record
from bloodcell.training.recipe import PRESETS, RECOMMENDED_DISTILL, with_overrides
from bloodcell.workflows.pipeline import train_run


def bench_inference(classifier, images: torch.Tensor, repeats: int = 5) -> float:
    classifier.logits(images, batch_size=1024)  # warm-up (and compilation, for every batch shape)
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        classifier.logits(images, batch_size=1024)
        timings.append(time.perf_counter() - start)
    return len(images) / statistics.median(timings)


def files_score(classifier, folder: Path) -> tuple[float, float]:
    """Accuracy and images/s of `predict_files` on a DIR/<class>/ folder of full-size images."""
    files, labels, counts = labelled_folders([folder], classifier.classes)
    start = time.perf_counter()
    records = classifier.predict_files(files, cells="one")  # a labelled image is one cell
    seconds = time.perf_counter() - start
    return score_records(records, labels, classifier.classes, counts)["accuracy"], len(files) / seconds


def main() -> None:
    print(stamp_line(), flush=True)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--presets", nargs="+", default=["fast", "default"], choices=list(PRESETS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", help="keep the runs in this folder (default: a temporary folder)")
    parser.add_argument(
        "--full-size",
        nargs=2,
        metavar=("VAL_DIR", "TEST_DIR"),
        help="full-size PBC files of the val and test splits (DIR/<class>/*.jpg): score predict on them",
    )
    parser.add_argument("--bf16", action="store_true", help="also time bfloat16 + torch.compile (AVX512-BF16/AMX CPUs)")
    parser.add_argument("--teacher", metavar="RUN", help="train each preset as a student of this run")
    parser.add_argument("--reuse", action="store_true", help="read runs already in --runs instead of retraining")
    args = parser.parse_args()
    teacher = None
    if args.teacher:
        teacher = (Path(args.teacher), bloodmnist.load(args.data_dir, size=read_record(args.teacher).image_size))
        print(f"teacher: {args.teacher} ({teacher[1].image_size} px), distillation weight {RECOMMENDED_DISTILL}")
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, bloodcell {bloodcell.__version__}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.runs or tmp)
        for preset in args.presets:
            dataset = bloodmnist.load(args.data_dir, size=PRESETS[preset].image_size)
            results = []
            for seed in args.seeds:
                config = with_overrides(PRESETS[preset], seed=seed, distill=RECOMMENDED_DISTILL if teacher else None)
                run_dir = root / f"{preset}-{seed}"
                start = time.perf_counter()
                reused = args.reuse and (run_dir / "model.json").exists()
                if reused:
                    metrics = read_record(run_dir).metrics  # scored on test once, when it was trained
                else:
                    metrics = train_run(dataset, run_dir, config, progress=False, overwrite=True, teacher=teacher)
                wall = time.perf_counter() - start
                classifier = bloodcell.load(run_dir)
                files = files_score(classifier, Path(args.full_size[0])) if args.full_size else (None, None)
                results.append((wall, classifier.record.train_seconds, metrics, files))
                print(
                    f"{preset} seed {seed}: train {classifier.record.train_seconds:.0f} s "
                    + ("(an existing run), " if reused else f"(wall incl. eval {wall:.0f} s), ")
                    + f"test acc {metrics['test']['accuracy']:.4f}, TTA {metrics['test_tta']['accuracy']:.4f}, "
                    f"AUC {metrics['test_tta']['auc_macro_ovr']:.5f}"
                    + (f", full-size val files {files[0]:.4f} at {files[1]:,.0f} img/s" if files[0] else ""),
                    flush=True,
                )
            first = bloodcell.load(root / f"{preset}-{args.seeds[0]}")
            fp32 = bench_inference(first, dataset.test.images.repeat(3, 1, 1, 1))
            row = [
                preset + (" (student)" if teacher else ""),
                PRESETS[preset].model,
                str(PRESETS[preset].image_size),
                f"{statistics.median(r[1] for r in results):.0f}",
                mean_std([r[2]["test"]["accuracy"] for r in results]),
                mean_std([r[2]["test_tta"]["accuracy"] for r in results]),
                mean_std([r[2]["test_tta"]["auc_macro_ovr"] for r in results]),
                f"{fp32:,.0f}",
            ]
            if args.full_size:
                test_files = [
                    files_score(bloodcell.load(root / f"{preset}-{s}"), Path(args.full_size[1])) for s in args.seeds
                ]
                row += [
                    mean_std([r[3][0] for r in results]),
                    mean_std([t[0] for t in test_files]),
                    f"{statistics.median(t[1] for t in test_files):,.0f}",
                ]
            if args.bf16:
                fast = bloodcell.load(root / f"{preset}-{args.seeds[0]}", precision="bfloat16", compile=True)
                row.append(f"{bench_inference(fast, dataset.test.images.repeat(3, 1, 1, 1)):,.0f}")
            rows.append(row)
    header = [
        "preset",
        "model",
        "px",
        "median train s",
        "test acc",
        "test acc (TTA)",
        "macro AUC (TTA)",
        "img/s (tensors)",
    ]
    if args.full_size:
        header += ["full-size val files acc", "full-size test files acc", "predict img/s (files)"]
    if args.bf16:
        header.append("img/s bf16 compiled")
    print()
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
