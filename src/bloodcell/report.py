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

from bloodcell import __version__, explain, plots, runs
from bloodcell.data import CLASSES, SPLITS, Dataset
from bloodcell.errors import BloodcellError
from bloodcell.evaluate import evaluate
from bloodcell.files import read_csv, read_json, write_text
from bloodcell.predict import Classifier

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #eef2f8; } td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; height: auto; display: block; margin: 0.6em 0; }
.muted { color: #666; font-size: 0.9em; }
"""


def _img(path: Path, alt: str, root: Path) -> str:
    """Embed a PNG, but only a regular file inside `root`: a symlink planted in a run folder must
    not smuggle another file (a system file, say) into a report that gets mailed around."""
    path = Path(path)
    if path.is_symlink() or not path.is_file() or not path.resolve().is_relative_to(Path(root).resolve()):
        return f"<p class='muted'>{html.escape(path.name)}: skipped (not a regular file in the folder)</p>"
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _section(anchor: str, title: str, content: str) -> str:
    return f'<section id="{anchor}"><h2>{html.escape(title)}</h2>{content}</section>'


# Marks the page once loaded with how many images failed to decode, for automated checks.
IMAGE_CHECK = (
    "<script>window.addEventListener('load', () => { const imgs = [...document.images]; "
    "document.body.dataset.images = imgs.length; "
    "document.body.dataset.brokenImages = imgs.filter(i => !i.complete || i.naturalWidth === 0).length; });"
    "</script>"
)


def _page(title: str, sections: list[str]) -> str:
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
            _section(
                "provenance",
                "Run and data",
                _table(["item", "value"], provenance) + _table(["setting", "value"], config_rows),
            ),
            _section(
                "metrics",
                "Test metrics",
                _table(["metric", "value", "95% bootstrap CI"], headline)
                + f"<p class='muted'>n = {result['n']} test images, calibrated probabilities, no TTA.</p>",
            ),
            _section(
                "per-class",
                "Per class",
                _table(
                    ["class", "precision", "recall", "F1", "support"],
                    [
                        [r["class"], f"{r['precision']:.4f}", f"{r['recall']:.4f}", f"{r['f1']:.4f}", r["support"]]
                        for r in result["per_class"]
                    ],
                ),
            ),
            _section("confusion", "Confusion matrix", _img(figures["confusion"], "confusion matrix", tmp)),
            _section("roc", "ROC curves", _img(figures["roc"], "ROC curves", tmp)),
            _section("calibration", "Calibration", _img(figures["reliability"], "reliability diagram", tmp)),
        ]
        if "curves" in figures:
            sections.append(
                _section("learning-curves", "Learning curves", _img(figures["curves"], "learning curves", tmp))
            )
        sections += [
            _section("mistakes", "Most confident mistakes", _img(figures["mistakes"], "most confident mistakes", tmp)),
            _section("unsure", "Least confident correct predictions", _img(figures["unsure"], "least confident", tmp)),
            _section("gradcam", "Grad-CAM, two per class", _img(figures["gradcam"], "Grad-CAM examples", tmp)),
        ]
        if (run_dir / "robustness.json").is_file():
            sections.append(_robustness_section(read_json(run_dir / "robustness.json"), tmp))
        document = _page(f"bloodcell report: {run_dir.name}", sections)
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
    table = _table(["corruption", *(f"severity {s}" for s in range(1, 6))], rows)
    return _section("robustness", "Robustness to corruptions", table + note + _img(figure, "robustness", tmp))


def study_report(study_dir: Path, out: Path) -> Path:
    """Report for a `bloodcell reproduce` folder: the baseline-vs-CNN table beside the published numbers."""
    from bloodcell.study import MODELS, results_table

    study_dir = Path(study_dir)
    summary = read_json(study_dir / "results.json")
    if "protocols" not in summary:
        raise BloodcellError(f"{study_dir / 'results.json'}: made by an older bloodcell; rerun `bloodcell reproduce`")
    header, rows = results_table(summary["models"])
    protocols = "".join(
        f"<li><b>{html.escape(name)}</b>: {html.escape(text)}</li>" for name, text in summary["protocols"].items()
    )
    config = [[k, v] for k, v in summary["config"].items()] + [["runtime", f"{summary['runtime_seconds']:.0f} s"]]
    sections = [
        _section(
            "provenance",
            "Protocol and data",
            _table(["setting", "value"], config)
            + f"<p class='muted'>data: {html.escape(str(summary['data']['file']))}, MD5 "
            f"{summary['data']['md5']}</p>",
        ),
        _section(
            "comparison",
            "Baseline vs CNN vs published",
            _table(header, rows)
            + "<p class='muted'>Test metrics, mean +- std over the fold models; every fold model is scored "
            f"on the full official test split.</p><ul>{protocols}</ul>",
        ),
    ]
    for model in MODELS:
        figures = "".join(
            _img(study_dir / name, name, study_dir)
            for protocol in summary["protocols"]
            for name in (f"learning_curves_{model}_{protocol}.png", f"confusion_{model}_{protocol}.png")
            if (study_dir / name).is_file()
        )
        sections.append(_section(f"model-{model}", model, figures))
    return write_text(Path(out), _page(f"bloodcell study reproduction: {study_dir.name}", sections))
