"""The study's data visualisations: a sample montage, class distribution, examples per class."""

from __future__ import annotations

from pathlib import Path

import torch

from bloodcell.classes import CLASSES
from bloodcell.datasets.bloodmnist import SPLITS, Dataset
from bloodcell.reporting import plots


def count_table(dataset: Dataset) -> dict[str, dict[str, int]]:
    """{split: {class name: count}}, the table `info` and `explore` print."""
    return {s: dict(zip(CLASSES, dataset.split(s).class_counts())) for s in SPLITS}


def format_count_table(counts: dict[str, dict[str, int]]) -> str:
    width = max(map(len, CLASSES)) + 2
    lines = [f"{'class':<{width}}" + "".join(f"{s:>8}" for s in counts)]
    for name in CLASSES:
        lines.append(f"{name:<{width}}" + "".join(f"{counts[s][name]:>8}" for s in counts))
    lines.append(f"{'total':<{width}}" + "".join(f"{sum(counts[s].values()):>8}" for s in counts))
    return "\n".join(lines)


def explore(dataset: Dataset, out_dir: Path, seed: int = 42, grid: int = 20) -> list[Path]:
    """Write the three exploration PNGs to `out_dir` and return their paths."""
    out_dir = Path(out_dir)
    generator = torch.Generator().manual_seed(seed)
    train = dataset.train
    picks = torch.randperm(len(train), generator=generator)[: grid * grid]
    shuffled = torch.randperm(len(train), generator=generator)
    counts = {s: dataset.split(s).class_counts() for s in SPLITS}
    return [
        plots.montage(train.images[picks], out_dir / "montage.png", n_cols=grid),
        plots.class_distribution(counts, out_dir / "class_distribution.png"),
        plots.examples_per_class(train.images[shuffled], train.labels[shuffled], out_dir / "examples_per_class.png"),
    ]
