"""Scoring a trained classifier on a split: metrics, per-class table, CI, calibration, figures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from bloodcell import metrics, plots
from bloodcell.data import Split
from bloodcell.predict import Classifier


def evaluate(classifier: Classifier, split: Split, tta: bool = False, logits: torch.Tensor | None = None) -> dict:
    """Headline metrics (calibrated and raw), per-class table and accuracy CI.

    Callers that already have the split's logits (training, the report) pass them in.
    """
    labels = split.labels.numpy()
    if logits is None:
        logits = classifier.logits(split.images, tta=tta)
    raw = torch.softmax(logits, 1).numpy()
    calibrated = classifier.calibrated(logits).numpy()
    preds = calibrated.argmax(1)
    result = metrics.classification_metrics(labels, calibrated)
    uncalibrated = metrics.classification_metrics(labels, raw)
    low, high = metrics.bootstrap_accuracy_ci(labels, preds)
    return result | {
        "accuracy_ci95": [low, high],
        "nll_uncalibrated": uncalibrated["nll"],
        "ece_uncalibrated": uncalibrated["ece"],
        "temperature": classifier.temperature,
        "tta": tta,
        "n": len(labels),
        "per_class": metrics.per_class(labels, preds),
        "confusion_matrix": metrics.confusion(labels, preds).tolist(),
    }


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


def format_metrics(result: dict) -> str:
    """The human-readable summary `bloodcell evaluate` prints."""
    low, high = result["accuracy_ci95"]
    lines = [
        f"accuracy            {result['accuracy']:.4f}  (95% CI {low:.4f}-{high:.4f}, n={result['n']})",
        f"balanced accuracy   {result['balanced_accuracy']:.4f}",
        f"macro AUC (OvR)     {result.get('auc_macro_ovr', float('nan')):.4f}",
        f"weighted P / R / F1 {result['precision_weighted']:.4f} / {result['recall_weighted']:.4f} / "
        f"{result['f1_weighted']:.4f}",
        f"macro P / R / F1    {result['precision_macro']:.4f} / {result['recall_macro']:.4f} / "
        f"{result['f1_macro']:.4f}",
        f"NLL                 {result['nll_uncalibrated']:.4f} -> {result['nll']:.4f} calibrated "
        f"(T={result['temperature']:.3f})",
        f"ECE (15 bins)       {result['ece_uncalibrated']:.4f} -> {result['ece']:.4f} calibrated",
        "",
        f"{'class':<22}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>9}",
    ]
    for row in result["per_class"]:
        lines.append(
            f"{row['class']:<22}{row['precision']:>10.4f}{row['recall']:>10.4f}{row['f1']:>10.4f}{row['support']:>9}"
        )
    return "\n".join(lines)
