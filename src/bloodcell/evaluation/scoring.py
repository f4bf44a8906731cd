"""Scoring a trained classifier: on a split (metrics, per-class table, CI, calibration), and on
labelled images of a lab (accuracy over the classes present, review flags, selective accuracy)."""

from __future__ import annotations

import numpy as np
import torch

from bloodcell.datasets.bloodmnist import Split
from bloodcell.errors import BloodcellError
from bloodcell.evaluation import metrics
from bloodcell.inference.classifier import Classifier, PredictOptions


def evaluate(
    classifier: Classifier,
    split: Split,
    tta: bool = False,
    logits: torch.Tensor | None = None,
    ood_scores: torch.Tensor | None = None,
    min_confidence: float = PredictOptions().min_confidence,
) -> dict:
    """Headline metrics (calibrated and raw), per-class table, accuracy CI, and the share of images
    that would be flagged for review (low confidence, or unlike the training images).

    Callers that already have the split's logits (training, the report) pass them in.
    """
    labels = split.labels.numpy()
    if logits is None:
        logits, ood_scores = classifier.logits_and_ood(split.images, tta=tta)
    raw = torch.softmax(logits, 1).numpy()
    calibrated = classifier.calibrated(logits).numpy()
    preds = calibrated.argmax(1)
    result = metrics.classification_metrics(labels, calibrated)
    uncalibrated = metrics.classification_metrics(labels, raw)
    low, high = metrics.bootstrap_accuracy_ci(labels, preds)
    flagged = calibrated.max(1) < min_confidence
    if ood_scores is not None and classifier.ood is not None:
        flagged |= ood_scores.numpy() > classifier.ood.threshold
    return result | {
        "flagged_fraction": float(flagged.mean()),
        "accuracy_ci95": [low, high],
        "nll_uncalibrated": uncalibrated["nll"],
        "ece_uncalibrated": uncalibrated["ece"],
        "temperature": classifier.temperature,
        "tta": tta,
        "n": len(labels),
        "per_class": metrics.per_class(labels, preds),
        "confusion_matrix": metrics.confusion(labels, preds).tolist(),
    }


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
        f"flagged for review  {result['flagged_fraction']:.1%}",
        "",
        f"{'class':<22}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>9}",
    ]
    for row in result["per_class"]:
        lines.append(
            f"{row['class']:<22}{row['precision']:>10.4f}{row['recall']:>10.4f}{row['f1']:>10.4f}{row['support']:>9}"
        )
    return "\n".join(lines)


def score_records(records: list[dict], labels: list[int], classes: tuple[str, ...], counts: dict[str, int]) -> dict:
    """Scores of predictions on labelled images, over the classes present only.

    Unreadable files count as wrong; a prediction of a class absent from the folder is wrong
    too. `selective_accuracy` is the accuracy of the images not flagged for review.
    """
    if len(records) != len(labels):
        raise BloodcellError(f"{len(records)} records for {len(labels)} labelled images: score one cell per image")
    present = sorted(set(labels))
    predicted = [classes.index(r["class"]) if r["error"] is None else -1 for r in records]
    correct = np.equal(predicted, labels)
    flagged = np.array([r["error"] is not None or bool(r["review"]) for r in records])
    recalls = {classes[k]: float(correct[np.equal(labels, k)].mean()) for k in present}
    matrix = metrics.confusion_matrix_counts(labels, predicted, len(classes))
    per_class = []
    for k in present:
        tp = int(matrix[k, k])
        predicted_k = int(matrix[:, k].sum())
        per_class.append(
            {
                "class": classes[k],
                "support": int(np.equal(labels, k).sum()),
                "recall": recalls[classes[k]],
                "precision": tp / predicted_k if predicted_k else 0.0,
                "flagged": float(flagged[np.equal(labels, k)].mean()),
            }
        )
    kept = ~flagged
    return selective_scores(records, correct) | {
        "n": len(records),
        "classes_present": [classes[k] for k in present],
        "empty_classes": sorted(name for name, n in counts.items() if n == 0),
        "accuracy": float(correct.mean()),
        "macro_recall": float(np.mean(list(recalls.values()))),
        "flagged_fraction": float(flagged.mean()),
        "selective_accuracy": float(correct[kept].mean()) if kept.any() else None,
        "failed": sum(r["error"] is not None for r in records),
        "per_class": per_class,
        "confusion_matrix": matrix.tolist(),
    }


def selective_scores(records: list[dict], correct: np.ndarray) -> dict:
    """How well confidence and the OOD score rank wrong predictions above right ones (AUROC)."""
    from sklearn.metrics import roc_auc_score

    usable = [i for i, r in enumerate(records) if r["error"] is None]
    wrong = ~correct[usable]
    out: dict[str, float | None] = {"auroc_wrong_confidence": None, "auroc_wrong_ood": None}
    if wrong.any() and (~wrong).any():
        out["auroc_wrong_confidence"] = float(roc_auc_score(wrong, [1 - records[i]["probability"] for i in usable]))
        scores = [records[i].get("ood_score") for i in usable]
        if all(s is not None for s in scores):
            out["auroc_wrong_ood"] = float(roc_auc_score(wrong, scores))
    return out


def format_folder_scores(result: dict) -> str:
    selective = result["selective_accuracy"]
    lines = [
        f"images              {result['n']} ({result['failed']} unreadable), classes present: "
        + ", ".join(result["classes_present"]),
        f"accuracy            {result['accuracy']:.4f}",
        f"macro recall        {result['macro_recall']:.4f}  (over the classes present)",
        f"flagged for review  {result['flagged_fraction']:.1%}",
        "selective accuracy  " + (f"{selective:.4f}  (of the images not flagged)" if selective is not None else "n/a"),
        "AUROC wrong/right   "
        + "  ".join(
            f"{name} {result[key]:.3f}"
            for name, key in (("confidence", "auroc_wrong_confidence"), ("OOD score", "auroc_wrong_ood"))
            if result.get(key) is not None
        ),
        "",
        f"{'class':<22}{'support':>9}{'recall':>10}{'precision':>11}{'flagged':>9}",
    ]
    lines += [
        f"{r['class']:<22}{r['support']:>9}{r['recall']:>10.4f}{r['precision']:>11.4f}{r['flagged']:>9.1%}"
        for r in result["per_class"]
    ]
    if result["empty_classes"]:
        lines.append(f"empty class folders: {', '.join(result['empty_classes'])}")
    return "\n".join(lines)
