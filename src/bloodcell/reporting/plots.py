"""Every figure bloodcell draws, in one style: class names on axes, readable at 100% zoom."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from PIL import Image  # noqa: E402

from bloodcell.datasets.bloodmnist import CLASSES  # noqa: E402
from bloodcell.files import atomic_path  # noqa: E402

plt.rcParams.update(
    {
        "figure.dpi": 100,
        "savefig.dpi": 110,
        "font.size": 10,
        "axes.titlesize": 11,
        "axes.grid": False,
        "axes.spines.top": False,
        "axes.spines.right": False,
    }
)
SPLIT_COLOURS = {"train": "#4C72B0", "val": "#DD8452", "test": "#55A868"}


def _save(fig: plt.Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def _grid(images: torch.Tensor, n_cols: int) -> np.ndarray:
    """Tile uint8 (N, 3, H, W) images into one HWC array, white 1 px gutters."""
    n, _, h, w = images.shape
    n_rows = -(-n // n_cols)
    canvas = np.full((n_rows * (h + 1) - 1, n_cols * (w + 1) - 1, 3), 255, np.uint8)
    hwc = images.permute(0, 2, 3, 1).numpy()
    for i in range(n):
        r, c = divmod(i, n_cols)
        canvas[r * (h + 1) : r * (h + 1) + h, c * (w + 1) : c * (w + 1) + w] = hwc[i]
    return canvas


def montage(images: torch.Tensor, path: Path, n_cols: int = 20, scale: int = 2) -> Path:
    """A plain image grid, upscaled with nearest neighbour so 28 px cells stay crisp."""
    grid = Image.fromarray(_grid(images, n_cols))
    grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        grid.save(tmp, format="png")
    return path


def class_distribution(counts: Mapping[str, Sequence[int]], path: Path) -> Path:
    """Counts and relative frequency per class, the splits side by side."""
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    x = np.arange(len(CLASSES))
    width = 0.8 / len(counts)
    for i, (split, values) in enumerate(counts.items()):
        values = np.asarray(values, float)
        offset = (i - (len(counts) - 1) / 2) * width
        colour = SPLIT_COLOURS.get(split)
        axes[0].bar(x + offset, values, width, label=f"{split} (n={int(values.sum())})", color=colour)
        axes[1].bar(x + offset, values / values.sum(), width, label=split, color=colour)
    for ax, title in zip(axes, ("images per class", "relative frequency per class")):
        ax.set_xticks(x, CLASSES, rotation=30, ha="right")
        ax.set_title(title)
        ax.set_ylim(top=ax.get_ylim()[1] * 1.25)
        ax.legend(loc="upper left")
    return _save(fig, path)


def grouped_bars(values: Mapping[str, Sequence[float]], groups: Sequence[str], path: Path, title: str = "") -> Path:
    """One bar per series (a recipe, say) in each group (a held-out lab), labelled with its value."""
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups) * max(1, len(values)) ** 0.5 + 2), 4.2))
    x = np.arange(len(groups))
    width = 0.8 / max(1, len(values))
    for i, (name, series) in enumerate(values.items()):
        bars = ax.bar(x + (i - (len(values) - 1) / 2) * width, series, width, label=name)
        ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
    ax.set_xticks(x, groups)
    ax.set_ylim(0, 1.08)
    ax.set_title(title)
    ax.legend(loc="lower left", fontsize=8, ncols=min(4, len(values)))
    return _save(fig, path)


def examples_per_class(images: torch.Tensor, labels: torch.Tensor, path: Path, per_class: int = 10) -> Path:
    """One row per class, labelled, the first `per_class` examples of each."""
    fig, axes = plt.subplots(len(CLASSES), 1, figsize=(per_class * 0.9, len(CLASSES) * 1.0))
    for k, ax in enumerate(axes):
        row = images[labels == k][:per_class]
        ax.imshow(_grid(row, per_class), interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(CLASSES[k], rotation=0, ha="right", va="center")
        for side in ax.spines.values():
            side.set_visible(False)
    return _save(fig, path)


def confusion_matrix(
    matrix: np.ndarray, path: Path, title: str = "", rows: Sequence[str] = CLASSES, columns: Sequence[str] = CLASSES
) -> Path:
    """Counts beside the row-normalised matrix (rows: true class, columns: predicted class)."""
    matrix = np.asarray(matrix)
    normalised = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    fig, axes = plt.subplots(1, 2, figsize=(15, 1.6 + 0.6 * len(rows)))
    for ax, values, fmt, name in (
        (axes[0], matrix, "{:.0f}", "counts"),
        (axes[1], normalised, "{:.2f}", "row-normalised"),
    ):
        ax.imshow(values, cmap="Blues", vmin=0)
        ax.set_xticks(np.arange(len(columns)), columns, rotation=35, ha="right")
        ax.set_yticks(np.arange(len(rows)), rows)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{title} ({name})" if title else name)
        high = values.max() / 2
        for (r, c), v in np.ndenumerate(values):
            ax.text(c, r, fmt.format(v), ha="center", va="center", fontsize=8, color="white" if v > high else "black")
    return _save(fig, path)


def learning_curves(curves: Mapping[str, np.ndarray], path: Path, title: str = "") -> Path:
    """Loss and accuracy per epoch, train vs validation; arrays are (folds, epochs), the band is +-1 std.

    A split without curves (fine-tuning has no validation pass) is left out of the plot."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric in zip(axes, ("loss", "acc")):
        for split in ("train", "val"):
            if f"{split}_{metric}" not in curves:
                continue
            values = np.atleast_2d(np.asarray(curves[f"{split}_{metric}"], float))
            epochs = np.arange(1, values.shape[1] + 1)
            mean, std = values.mean(axis=0), values.std(axis=0)
            ax.plot(epochs, mean, marker="o", ms=3, label=split, color=SPLIT_COLOURS[split])
            if values.shape[0] > 1:
                ax.fill_between(epochs, mean - std, mean + std, alpha=0.25, color=SPLIT_COLOURS[split])
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("accuracy" if metric == "acc" else "loss")
        ax.legend()
        ax.grid(alpha=0.3)
    n_folds = np.atleast_2d(np.asarray(curves["train_loss"])).shape[0]
    suffix = f" (mean over {n_folds} folds, band = +-1 std)" if n_folds > 1 else ""
    fig.suptitle(f"{title}{suffix}")
    return _save(fig, path)


def history_curves(history: Sequence[Mapping], path: Path, title: str = "") -> Path:
    """Learning curves of one run from its per-epoch rows (fit's history or history.csv)."""
    keys = [k for k in ("train_loss", "train_acc", "val_loss", "val_acc") if history and k in history[0]]
    return learning_curves({k: np.array([[float(row[k]) for row in history]]) for k in keys}, path, title)


def table(rows: Sequence[Sequence[str]], header: Sequence[str], path: Path, title: str = "") -> Path:
    """A results table as an image, for slides and reports."""
    fig, ax = plt.subplots(figsize=(max(6, 2.3 * len(header)), 0.45 * (len(rows) + 2)))
    ax.axis("off")
    cells = ax.table(cellText=[list(r) for r in rows], colLabels=list(header), loc="center", cellLoc="center")
    cells.auto_set_font_size(False)
    cells.set_fontsize(10)
    cells.scale(1, 1.4)
    for (r, _), cell in cells.get_celld().items():
        if r == 0:
            cell.set_text_props(weight="bold")
            cell.set_facecolor("#E8EEF7")
    if title:
        ax.set_title(title)
    return _save(fig, path)


def reliability(labels: np.ndarray, raw: np.ndarray, calibrated: np.ndarray, path: Path, bins: int = 15) -> Path:
    """Reliability diagram: accuracy vs confidence per bin, before and after temperature scaling."""
    from bloodcell.evaluation.metrics import calibration_bins, expected_calibration_error

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.4), sharey=True)
    edges = np.linspace(0, 1, bins + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    for ax, probs, name in ((axes[0], raw, "before calibration"), (axes[1], calibrated, "after calibration")):
        accuracy, _, share = calibration_bins(labels, probs, bins)
        ax.bar(centres, accuracy, width=1 / bins, edgecolor="black", color="#4C72B0", alpha=0.8, label="accuracy")
        ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
        ax.bar(centres, share, width=1 / bins, color="#DD8452", alpha=0.6, label="share of images")
        ece = expected_calibration_error(labels, probs, bins)
        ax.set_title(f"{name} (ECE {ece:.4f})")
        ax.set_xlabel("confidence")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("accuracy")
    axes[0].legend(loc="upper left")
    return _save(fig, path)


def _upscale(image: np.ndarray, side: int) -> np.ndarray:
    """uint8 HWC -> side x side; nearest for tiny inputs (crisp pixels), bilinear for photos."""
    filter_ = Image.NEAREST if image.shape[0] < side / 3 else Image.BILINEAR
    return np.asarray(Image.fromarray(image).resize((side, side), filter_))


def heat_overlay(image: np.ndarray, heatmap: np.ndarray, side: int) -> np.ndarray:
    """`image` (uint8 HWC) at side x side with its heat map (values in [0, 1]) blended in, jet colours."""
    base = _upscale(image, side).astype(np.float32)
    heat = np.asarray(Image.fromarray(heatmap.astype(np.float32)).resize((side, side), Image.BILINEAR))
    colours = matplotlib.colormaps["jet"](np.clip(heat, 0, 1))[..., :3] * 255
    return (0.55 * base + 0.45 * colours).astype(np.uint8)


def gradcam(
    image: np.ndarray,
    heatmap: np.ndarray,
    path: Path,
    title: str,
    side: int = 280,
    original: tuple[np.ndarray, tuple[int, int, int, int], str] | None = None,
) -> Path:
    """The input beside its Grad-CAM overlay, both at a visible size; with `original` (the whole
    image, the frame's box, a caption), the whole image with the frame drawn comes first."""
    panels = 3 if original is not None else 2
    fig, axes = plt.subplots(1, panels, figsize=(3.75 * panels, 4.1))
    if original is not None:
        whole, (left, top, right, bottom), caption = original
        axes[0].imshow(whole)
        axes[0].add_patch(Rectangle((left, top), right - left, bottom - top, fill=False, color="lime", lw=2))
        axes[0].set_xlim(min(0, left) - 2, max(whole.shape[1], right) + 2)
        axes[0].set_ylim(max(whole.shape[0], bottom) + 2, min(0, top) - 2)
        axes[0].set_title(caption)
    axes[-2].imshow(_upscale(image, side))
    axes[-2].set_title("input")
    axes[-1].imshow(heat_overlay(image, heatmap, side))
    axes[-1].set_title("Grad-CAM")
    scale = matplotlib.cm.ScalarMappable(norm=matplotlib.colors.Normalize(0, 1), cmap="jet")
    fig.colorbar(scale, ax=axes[-1], fraction=0.046, pad=0.04)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def field_boxes(field: np.ndarray, records: list[dict], path: Path, title: str) -> Path:
    """A field with every white cell's box and its class: green counted, orange flagged for review,
    dashed grey cut by the border and left out of the count."""
    height, width = field.shape[:2]
    fig, ax = plt.subplots(figsize=(min(12.0, 2.0 + 8.0 * width / max(height, 1)), 8.4))
    ax.imshow(field)
    for record in records:
        if not record.get("cell"):
            continue
        left, top, right, bottom = record["cell"]["box"]
        colour = "grey" if not record.get("counted") else "orange" if record.get("review") else "lime"
        style = "--" if not record.get("counted") else "-"
        ax.add_patch(Rectangle((left, top), right - left, bottom - top, fill=False, color=colour, lw=2, ls=style))
        number = record["cell"].get("index")
        label = (
            f"{'' if number is None else number + 1} {record.get('class') or '?'} {record.get('probability') or 0:.2f}"
        )
        ax.text(left, top - 4, label.strip(), color="black", fontsize=8,
                bbox={"facecolor": colour, "alpha": 0.85, "pad": 1.5, "lw": 0})  # fmt: skip
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def roc_curves(labels: np.ndarray, probs: np.ndarray, path: Path) -> Path:
    """One-vs-rest ROC curve per class, AUC in the legend."""
    from sklearn.metrics import roc_auc_score, roc_curve

    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    for k, name in enumerate(CLASSES):
        positive = labels == k
        if positive.any() and not positive.all():
            fpr, tpr, _ = roc_curve(positive, probs[:, k])
            ax.plot(fpr, tpr, label=f"{name} (AUC {roc_auc_score(positive, probs[:, k]):.4f})")
    ax.plot([0, 1], [0, 1], "--", color="grey")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("one-vs-rest ROC, test split")
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, path)


def gallery(images: Sequence[np.ndarray], captions: Sequence[str], path: Path, n_cols: int = 6) -> Path:
    """Labelled thumbnails (uint8 HWC), e.g. the most confident mistakes."""
    n_rows = max(1, -(-len(images) // n_cols))
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(2.1 * n_cols, 2.5 * n_rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, caption in zip(axes.flat, images, captions):
        ax.imshow(image, interpolation="nearest")
        ax.set_title(caption, fontsize=7.5)
    return _save(fig, path)


def robustness(result: dict, path: Path, title: str = "") -> Path:
    """Accuracy against corruption severity, one line per family, clean accuracy dashed."""
    fig, ax = plt.subplots(figsize=(8.5, 5))
    severities = np.arange(1, 6)
    for i, (family, values) in enumerate(result["accuracy"].items()):
        line = "-" if i < 10 else ":"  # the colour cycle has ten colours: the eleventh family is dotted
        ax.plot(severities, values, marker="o", ms=3, ls=line, label=family.replace("_", " "))
    ax.axhline(result["clean"], color="black", ls="--", lw=1, label="clean")
    ax.set_xticks(severities)
    ax.set_xlabel("severity (MedMNIST-C)")
    ax.set_ylabel("accuracy")
    ax.set_title(title or f"corrupted test images: mean {result['mean_corrupted']:.3f} vs clean {result['clean']:.3f}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2, loc="lower left")
    return _save(fig, path)
