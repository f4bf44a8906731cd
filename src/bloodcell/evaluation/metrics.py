"""Classification metrics (scikit-learn where it fits), calibration error and bootstrap CIs."""

from __future__ import annotations

import warnings

import numpy as np
from sklearn import metrics as skm

from bloodcell.classes import CLASSES


def classification_metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """Headline metrics for integer `labels` (N,) and class probabilities `probs` (N, C)."""
    labels = np.asarray(labels)
    probs = np.asarray(probs, dtype=np.float64)
    probs = probs / probs.sum(axis=1, keepdims=True)  # float32 softmax rows sum to 1 only approximately
    preds = probs.argmax(axis=1)
    with warnings.catch_warnings():  # a lab without some classes: the mean recall over those present, as meant
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        balanced = skm.balanced_accuracy_score(labels, preds)
    result = {"accuracy": skm.accuracy_score(labels, preds), "balanced_accuracy": balanced}
    for average in ("weighted", "macro"):
        p, r, f, _ = skm.precision_recall_fscore_support(labels, preds, average=average, zero_division=0)
        result |= {f"precision_{average}": p, f"recall_{average}": r, f"f1_{average}": f}
    present = np.unique(labels)
    if len(present) == probs.shape[1]:
        result["auc_macro_ovr"] = skm.roc_auc_score(labels, probs, multi_class="ovr", average="macro")
    result["nll"] = skm.log_loss(labels, np.clip(probs, 1e-12, 1), labels=list(range(probs.shape[1])))
    result["ece"] = expected_calibration_error(labels, probs)
    return {k: float(v) for k, v in result.items()}


def confusion(labels: np.ndarray, preds: np.ndarray) -> np.ndarray:
    return skm.confusion_matrix(labels, preds, labels=list(range(len(CLASSES))))


def confusion_matrix_counts(labels, preds, n_classes: int) -> np.ndarray:
    """Rows: true class; columns: predicted class; a prediction of -1 (no prediction) is dropped."""
    matrix = np.zeros((n_classes, n_classes), dtype=np.int64)
    for true, pred in zip(labels, preds):
        if pred >= 0:
            matrix[true, pred] += 1
    return matrix


def per_class(labels: np.ndarray, preds: np.ndarray) -> list[dict]:
    p, r, f, support = skm.precision_recall_fscore_support(
        labels, preds, labels=list(range(len(CLASSES))), zero_division=0
    )
    return [
        {"class": name, "precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(support[i])}
        for i, name in enumerate(CLASSES)
    ]


def calibration_bins(
    labels: np.ndarray, probs: np.ndarray, bins: int = 15
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per equal-width confidence bin: accuracy, mean confidence (NaN when empty) and share of images."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    which = np.clip(np.digitize(confidence, np.linspace(0, 1, bins + 1)[1:-1], right=True), 0, bins - 1)
    share = np.bincount(which, minlength=bins) / len(labels)
    accuracy = np.array([correct[which == b].mean() if share[b] else np.nan for b in range(bins)])
    mean_confidence = np.array([confidence[which == b].mean() if share[b] else np.nan for b in range(bins)])
    return accuracy, mean_confidence, share


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray, bins: int = 15) -> float:
    """ECE: sum over confidence bins of |accuracy - confidence| x share of images in the bin."""
    accuracy, confidence, share = calibration_bins(labels, probs, bins)
    return float(np.nansum(share * np.abs(accuracy - confidence)))


def bootstrap_accuracy_ci(
    labels: np.ndarray, preds: np.ndarray, n: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval for accuracy (resampling test images with replacement)."""
    correct = (np.asarray(labels) == np.asarray(preds)).astype(np.float64)
    rng = np.random.default_rng(seed)
    samples = rng.integers(0, len(correct), size=(n, len(correct)))
    accuracies = correct[samples].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(accuracies, [tail, 100 - tail])
    return float(low), float(high)


HEADLINE = ("accuracy", "balanced_accuracy", "auc_macro_ovr", "f1_macro", "nll", "ece", "flagged_fraction")


def headline(values: dict) -> dict:
    """The few numbers worth keeping in model.json and printing after training."""
    return {k: values[k] for k in HEADLINE if k in values}


def format_headline(name: str, values: dict) -> str:
    """One line per split, as `train` prints it and the report and model card quote it."""
    auc = values.get("auc_macro_ovr")
    auc_text = f"{auc:.4f}" if auc is not None else "n/a"
    return f"{name:<9} accuracy {values['accuracy']:.4f}  macro AUC {auc_text}  ECE {values['ece']:.4f}"
