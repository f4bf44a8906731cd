"""Exporting a run for software outside Python: an ONNX graph with its preprocessing inside.

Lab software is often C#, Java or C++ on the analyser's PC. The exported graph takes raw pixels
(float32, N x 3 x H x W, RGB, 0..255, H = W = the run's image size) and does the run's own colour
and channel normalisation, so nothing has to be re-implemented outside; it returns calibrated
probabilities, logits and (for the residual family) the features the out-of-distribution score
uses. Classes, image size, crop, normalisation, temperature and the OOD threshold are stored as
ONNX metadata. A model card (Markdown) written from the run's record goes beside it. What is
left to the calling program is framing the cell (see `cells`) and resizing to the image size.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from bloodcell import __version__, runs
from bloodcell.errors import BloodcellError
from bloodcell.files import atomic_path, write_text
from bloodcell.inference.classifier import Classifier
from bloodcell.inference.network import model_input

OPSET = 18
OUTPUTS = ("probabilities", "logits", "features")
RECIPE_KEYS = ("epochs", "batch_size", "lr", "label_smoothing", "colour", "image_size")


class PixelsToProbabilities(nn.Module):
    """The run's whole input path and network as one module: raw pixels in, three outputs."""

    def __init__(self, classifier: Classifier):
        super().__init__()
        self.network = classifier.model.float().eval()
        p = classifier.record.preprocessing
        self.mean, self.std, self.colour_target = list(p.mean), list(p.std), p.colour_target
        self.temperature = classifier.temperature

    def forward(self, pixels: torch.Tensor):
        x = model_input(pixels, self.mean, self.std, self.colour_target)
        net = self.network
        if hasattr(net, "embed"):  # the residual and EfficientNet families: expose the features
            features = net.embed(x)
            logits = net.head(net.dropout(features))
        else:
            logits = net(x)
            features = logits
        return torch.softmax(logits / self.temperature, dim=1), logits, features


def metadata(classifier: Classifier) -> dict[str, str]:
    """Everything a caller needs, as ONNX metadata (strings; JSON where structured)."""
    record = classifier.record
    p = record.preprocessing
    return {
        "bloodcell_version": __version__,
        "classes": json.dumps(list(record.classes)),
        "image_size": str(p.image_size),
        "input": "float32 N x 3 x H x W, RGB, raw pixel values 0..255 (normalisation is inside the graph)",
        "crop": p.crop,
        "medmnist_filter": json.dumps(p.medmnist_filter),
        "mean": json.dumps(list(p.mean)),
        "std": json.dumps(list(p.std)),
        "colour_target": json.dumps(list(p.colour_target) if p.colour_target else None),
        "temperature": repr(record.temperature),
        "ood_threshold": json.dumps(record.ood_threshold),
        "arch": record.arch,
        "opset": str(OPSET),
    }


def export_onnx(run_dir: Path, out: Path) -> dict:
    """Write `out` (.onnx) and the model card beside it (`out` with .md); returns what was written."""
    try:
        import onnx
    except ImportError:
        raise BloodcellError("exporting needs onnx: pip install 'bloodcell[export]'") from None
    classifier = Classifier.from_run(run_dir)
    graph = PixelsToProbabilities(classifier).eval()
    example = torch.zeros(2, 3, classifier.image_size, classifier.image_size)
    batch = torch.export.Dim("batch", min=1, max=65536)
    try:
        program = torch.onnx.export(
            graph,
            (example,),
            dynamic_shapes={"pixels": {0: batch}},
            input_names=["pixels"],
            output_names=list(OUTPUTS),
            opset_version=OPSET,
            dynamo=True,
            verbose=False,
        )
    except Exception as exc:  # the exporter raises many types; the message is what helps
        raise BloodcellError(f"{run_dir}: ONNX export failed ({str(exc).splitlines()[0]})") from None
    model = program.model_proto
    for key, value in metadata(classifier).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model)
    out = Path(out)
    with atomic_path(out) as tmp:
        onnx.save(model, str(tmp))
    card = write_text(out.with_suffix(".md"), model_card(classifier, run_dir, out))
    return {"onnx": str(out), "model_card": str(card), "opset": OPSET, "bytes": out.stat().st_size}


def model_card(
    classifier: Classifier, run_dir: Path, onnx_path: Path | None = None, licences: dict[str, str] | None = None
) -> str:
    """A short Markdown card from the run's record: data (each lab folder too, with its licence where
    `licences` names it), recipe, metrics, calibration, limits."""
    record = classifier.record
    labs = record.data.get("labs", [])
    licences = licences or {}
    config = record.train_config
    metrics = record.metrics
    lines = [
        f"# bloodcell model card: {Path(run_dir).name}",
        "",
        (
            f"- File: `{onnx_path.name}` (ONNX opset {OPSET}); bloodcell {record.bloodcell_version}."
            if onnx_path
            else f"- Files: a bloodcell run directory (weights in safetensors, record in JSON); bloodcell "
            f"{record.bloodcell_version}."
        ),
        f"- Task: classify one peripheral blood cell per image into {len(record.classes)} classes: "
        + ", ".join(record.classes)
        + ".",
        f"- Input: RGB pixels 0..255, {record.image_size} x {record.image_size}, the cell framed with crop "
        f"`{record.preprocessing.crop}`; colour and channel normalisation are "
        + ("inside the graph." if onnx_path else "applied by bloodcell (recorded in model.json)."),
        f"- Architecture: `{record.arch}` {json.dumps(record.arch_args)}; recipe: "
        + ", ".join(
            f"{k}={config[k]}" for k in ("epochs", "batch_size", "lr", "label_smoothing", "colour") if k in config
        )
        + ".",
        f"- Training data: {record.data.get('file', 'unknown')} (MD5 {record.data.get('md5', '?')}). BloodMNIST "
        "(MedMNIST v2, CC BY 4.0; Yang et al. 2023) from the PBC dataset (Acevedo et al. 2020, CC BY 4.0)"
        + (", and these labs' labelled cells:" if labs else "."),
        *(
            f"  - {lab['name']}: {lab['images']} images ({_counts(lab['per_class'])}), {lab['groups']} groups; "
            f"trained on {lab['trained_on']}, {lab['held_out']} held out to calibrate and score. "
            f"Licence: {licences.get(lab['name'], 'as its source states')}."
            for lab in labs
        ),
        "",
        "## Test metrics",
        "",
        "| split | accuracy | macro AUC | ECE | flagged for review |",
        "|---|---|---|---|---|",
    ]
    for split, values in metrics.items():
        auc = values.get("auc_macro_ovr")
        flagged = values.get("flagged_fraction")
        lines.append(
            f"| {split} | {values['accuracy']:.4f} | {auc:.4f} | {values['ece']:.4f} | "
            + (f"{flagged:.1%}" if flagged is not None else "-")
            + " |"
            if auc is not None
            else f"| {split} | {values['accuracy']:.4f} | - | {values['ece']:.4f} | - |"
        )
    ci = _test_ci(run_dir)
    if ci:
        lines += ["", f"95% bootstrap interval of test accuracy: {ci[0]:.4f} - {ci[1]:.4f}."]
    lines += [
        "",
        "## Calibration and review",
        "",
        f"Probabilities are softmax(logits / {record.temperature:.3f}), the temperature fitted on the validation "
        "split. Flag a cell for review when its top probability is below 0.8"
        + (
            f", or when its out-of-distribution score (squared Mahalanobis distance of `features` to the nearest "
            f"training class centre, computed by bloodcell) is above {record.ood_threshold:.1f}."
            if record.ood_threshold
            else "."
        ),
        "",
        "## Known limits",
        "",
        (
            f"- Trained on {1 + len(labs)} labs' images; on a lab it has not seen (another microscope, camera or "
            "stain) accuracy is lower: see docs/other-labs.md for the leave-one-lab-out figures"
            if labs
            else "- Trained on one lab's images (the PBC dataset: CellaVision DM96, May-Grünwald Giemsa). On other "
            "labs' microscopes, stains and framings accuracy is lower: see docs/other-labs.md"
        )
        + ". Measure it on a few hundred of your own labelled cells (`bloodcell evaluate --images`) and fine-tune "
        "with `bloodcell finetune`.",
        "- Fields: with crop `cell`, every white cell of a field photograph is found and classified; cells cut by "
        "the border are listed, not counted.",
        "- Not a medical device: a reviewer confirms every count.",
        *(f"- {warning}" for warning in record.warnings),
    ]
    return "\n".join(lines) + "\n"


def _counts(per_class: dict[str, int]) -> str:
    return ", ".join(f"{name} {n}" for name, n in per_class.items())


def _test_ci(run_dir: Path) -> list[float] | None:
    try:
        return json.loads((Path(run_dir) / runs.METRICS).read_text())["test"]["accuracy_ci95"]
    except (OSError, KeyError, ValueError):
        return None
