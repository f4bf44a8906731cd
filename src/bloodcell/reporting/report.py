"""One self-contained HTML report for a training run (or a `reproduce` output folder).

Figures are drawn by `plots`, PNG-compressed and embedded as base64, so the file can be mailed
or attached to a paper. Metric numbers come from `evaluate.evaluate`, the same code as
`bloodcell evaluate --json`.
"""

from __future__ import annotations

import base64
import html
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from bloodcell import __version__, runs
from bloodcell.classes import CLASSES
from bloodcell.datasets.bloodmnist import SPLITS, Dataset
from bloodcell.evaluation.scoring import evaluate
from bloodcell.files import read_csv, read_json, write_text
from bloodcell.inference.classifier import Classifier
from bloodcell.reporting import explain, plots

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #eef2f8; } td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; height: auto; display: block; margin: 0.6em 0; }
.muted { color: #666; font-size: 0.9em; }
"""


def embedded_image(path: Path, alt: str, root: Path) -> str:
    """Embed a PNG, but only a regular file inside `root`: a symlink planted in a run folder must
    not smuggle another file (a system file, say) into a report that gets mailed around."""
    path = Path(path)
    if path.is_symlink() or not path.is_file() or not path.resolve().is_relative_to(Path(root).resolve()):
        return f"<p class='muted'>{html.escape(path.name)}: skipped (not a regular file in the folder)</p>"
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def html_table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def section(anchor: str, title: str, content: str) -> str:
    return f'<section id="{anchor}"><h2>{html.escape(title)}</h2>{content}</section>'


# Marks the page once loaded with how many images failed to decode, for automated checks.
IMAGE_CHECK = (
    "<script>window.addEventListener('load', () => { const imgs = [...document.images]; "
    "document.body.dataset.images = imgs.length; "
    "document.body.dataset.brokenImages = imgs.filter(i => !i.complete || i.naturalWidth === 0).length; });"
    "</script>"
)


def page(title: str, sections: list[str]) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
        f"<p class='muted'>bloodcell {__version__}, generated {stamp}</p>{''.join(sections)}{IMAGE_CHECK}</body></html>"
    )


def run_report(classifier: Classifier, run_dir: Path, dataset: Dataset, out: Path, gallery_size: int = 12) -> Path:
    """Evaluate the run on the test split and write the HTML report to `out`."""
    run_dir = Path(run_dir)
    record = classifier.record
    test = dataset.test
    logits = classifier.logits(test.images)
    result = evaluate(classifier, test, logits=logits)
    probs = classifier.calibrated(logits).numpy()
    labels, preds = test.labels.numpy(), probs.argmax(1)
    confidence = probs.max(1)
    images_hwc = test.images.permute(0, 2, 3, 1).numpy()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        raw = torch.softmax(logits, 1).numpy()
        figures = {
            "confusion": plots.confusion_matrix(np.array(result["confusion_matrix"]), tmp / "cm.png", "test split"),
            "roc": plots.roc_curves(labels, probs, tmp / "roc.png"),
            "reliability": plots.reliability(labels, raw, probs, tmp / "rel.png"),
        }
        if (run_dir / runs.HISTORY).is_file():
            history = read_csv(run_dir / runs.HISTORY)
            figures["curves"] = plots.history_curves(history, tmp / "curves.png", title=record.arch)
        wrong = np.flatnonzero(preds != labels)
        wrong = wrong[np.argsort(-confidence[wrong])][:gallery_size]
        right = np.flatnonzero(preds == labels)
        right = right[np.argsort(confidence[right])][:gallery_size]
        figures["mistakes"] = plots.gallery(
            [images_hwc[i] for i in wrong],
            [f"#{i} true {CLASSES[labels[i]]}\npred {CLASSES[preds[i]]} {confidence[i]:.2f}" for i in wrong],
            tmp / "mistakes.png",
        )
        figures["unsure"] = plots.gallery(
            [images_hwc[i] for i in right],
            [f"#{i} {CLASSES[labels[i]]}\np={confidence[i]:.2f}" for i in right],
            tmp / "unsure.png",
        )
        cams, captions = [], []
        for k, name in enumerate(CLASSES):
            for i in np.flatnonzero(labels == k)[np.argsort(-probs[labels == k, k])][:2]:
                explanation = explain.explain_image(classifier, images_hwc[i])
                cams.append(plots.heat_overlay(images_hwc[i], explanation.heatmap, side=112))
                captions.append(f"#{i} {name}\npred {CLASSES[explanation.predicted_index]}")
        figures["gradcam"] = plots.gallery(cams, captions, tmp / "gradcam.png", n_cols=4)

        low, high = result["accuracy_ci95"]
        headline = [
            ["accuracy", f"{result['accuracy']:.4f}", f"{low:.4f} - {high:.4f}"],
            ["balanced accuracy", f"{result['balanced_accuracy']:.4f}", ""],
            ["macro AUC (one-vs-rest)", f"{result['auc_macro_ovr']:.4f}", ""],
            ["weighted F1", f"{result['f1_weighted']:.4f}", ""],
            ["macro F1", f"{result['f1_macro']:.4f}", ""],
            ["NLL (uncalibrated -> calibrated)", f"{result['nll_uncalibrated']:.4f} -> {result['nll']:.4f}", ""],
            [
                "ECE, 15 bins (uncalibrated -> calibrated)",
                f"{result['ece_uncalibrated']:.4f} -> {result['ece']:.4f}",
                "",
            ],
        ]
        config_rows = [[k, v] for k, v in record.train_config.items()]
        provenance = [
            ["data file", dataset.path.name],
            ["MD5", f"{dataset.md5} ({'official' if dataset.official else 'not the official file'})"],
            ["split sizes", ", ".join(f"{s} {len(dataset.split(s))}" for s in SPLITS)],
            ["image size", f"{dataset.image_size} px"],
            ["architecture", record.arch],
            ["temperature", f"{classifier.temperature:.4f}"],
            ["training time", f"{record.train_seconds or float('nan'):.0f} s"],
            ["model trained on", f"{record.data.get('md5', 'unknown')}"],
        ]
        sections = [
            section(
                "provenance",
                "Run and data",
                html_table(["item", "value"], provenance) + html_table(["setting", "value"], config_rows),
            ),
            section(
                "metrics",
                "Test metrics",
                html_table(["metric", "value", "95% bootstrap CI"], headline)
                + f"<p class='muted'>n = {result['n']} test images, calibrated probabilities, no TTA.</p>",
            ),
            section(
                "per-class",
                "Per class",
                html_table(
                    ["class", "precision", "recall", "F1", "support"],
                    [
                        [r["class"], f"{r['precision']:.4f}", f"{r['recall']:.4f}", f"{r['f1']:.4f}", r["support"]]
                        for r in result["per_class"]
                    ],
                ),
            ),
            section("confusion", "Confusion matrix", embedded_image(figures["confusion"], "confusion matrix", tmp)),
            section("roc", "ROC curves", embedded_image(figures["roc"], "ROC curves", tmp)),
            section("calibration", "Calibration", embedded_image(figures["reliability"], "reliability diagram", tmp)),
        ]
        if "curves" in figures:
            sections.append(
                section("learning-curves", "Learning curves", embedded_image(figures["curves"], "learning curves", tmp))
            )
        sections += [
            section(
                "mistakes",
                "Most confident mistakes",
                embedded_image(figures["mistakes"], "most confident mistakes", tmp),
            ),
            section(
                "unsure",
                "Least confident correct predictions",
                embedded_image(figures["unsure"], "least confident", tmp),
            ),
            section("gradcam", "Grad-CAM, two per class", embedded_image(figures["gradcam"], "Grad-CAM examples", tmp)),
        ]
        if (run_dir / "robustness.json").is_file():
            sections.append(_robustness_section(read_json(run_dir / "robustness.json"), tmp))
        document = page(f"bloodcell report: {run_dir.name}", sections)
    return write_text(Path(out), document)


def _robustness_section(result: dict, tmp: Path) -> str:
    """`bloodcell robustness` results: the table and the figure, redrawn from the JSON."""
    figure = plots.robustness(result, tmp / "robustness.png")
    rows = [[name, *(f"{v:.4f}" for v in values)] for name, values in result["accuracy"].items()]
    note = (
        f"<p class='muted'>{result['n']} {html.escape(str(result['split']))} images, each enlarged to 224 px, "
        f"corrupted with MedMNIST-C's parameters and reduced again; clean accuracy {result['clean']:.4f}, "
        f"mean over corruptions {result['mean_corrupted']:.4f}.</p>"
    )
    table = html_table(["corruption", *(f"severity {s}" for s in range(1, 6))], rows)
    return section("robustness", "Robustness to corruptions", table + note + embedded_image(figure, "robustness", tmp))
