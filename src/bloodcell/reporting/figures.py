"""The figures of one evaluation: confusion matrix and reliability diagram, as PNGs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from bloodcell.datasets.bloodmnist import Split
from bloodcell.inference.classifier import Classifier
from bloodcell.reporting import plots


def write_figures(
    classifier: Classifier, split: Split, result: dict, folder: Path, name: str, logits: torch.Tensor | None = None
) -> list[Path]:
    """The confusion matrix and reliability diagram of an evaluation, as PNGs in `folder`."""
    if logits is None:
        logits = classifier.logits(split.images, tta=result["tta"])
    labels = split.labels.numpy()
    suffix = f"{name}{'_tta' if result['tta'] else ''}"
    return [
        plots.confusion_matrix(
            np.array(result["confusion_matrix"]),
            Path(folder) / f"confusion_{suffix}.png",
            title=f"{name} split{' (TTA)' if result['tta'] else ''}",
        ),
        plots.reliability(
            labels,
            torch.softmax(logits, 1).numpy(),
            classifier.calibrated(logits).numpy(),
            Path(folder) / f"reliability_{suffix}.png",
        ),
    ]
