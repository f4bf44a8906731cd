"""Grad-CAM: which part of the image drove a prediction.

Hooks the last convolutional stage, weights its feature maps by the spatially averaged
gradient of the class score, keeps the positive part and upsamples it to the input size
(Selvaraju et al., 2017). A small implementation, because the maintained library
(pytorch-grad-cam) depends on torchvision, which has no CPU build here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bloodcell import runs
from bloodcell.errors import BloodcellError
from bloodcell.images import crops, decode
from bloodcell.inference.classifier import Classifier, PredictOptions
from bloodcell.inference.network import model_input
from bloodcell.reporting import plots


@dataclass(frozen=True)
class Explanation:
    """A heat map in [0, 1] at input resolution, for one image and one class."""

    heatmap: np.ndarray  # (H, W)
    class_index: int
    probability: float  # calibrated probability of that class
    predicted_index: int


def target_layer(model: nn.Module) -> nn.Module:
    """The model's last convolutional stage (its own `last_conv_stage`, else the last Conv2d)."""
    if hasattr(model, "last_conv_stage"):
        return model.last_conv_stage
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise BloodcellError("Grad-CAM needs a convolutional model; this one has no Conv2d layer")
    return convs[-1]


def grad_cam(
    model: nn.Module,
    x: torch.Tensor,
    class_index: int | None = None,
    temperature: float = 1.0,
    restrict: Callable[[torch.Tensor], torch.Tensor] = lambda logits: logits,
) -> Explanation:
    """Grad-CAM for one normalised float image `x` (1, 3, H, W); `restrict` limits the classes
    that can be predicted (`Classifier.masked`), so the map explains what `predict` answers."""
    layer = target_layer(model)
    captured: dict[str, torch.Tensor] = {}

    def keep(_module, _inputs, output):
        output.retain_grad()
        captured["activation"] = output

    handle = layer.register_forward_hook(keep)
    try:
        model.eval()
        with torch.enable_grad():
            logits = restrict(model(x.requires_grad_(True)))
            predicted = int(logits.argmax(1))
            target = predicted if class_index is None else class_index
            model.zero_grad(set_to_none=True)
            logits[0, target].backward()
    finally:
        handle.remove()
    activation = captured["activation"]
    weights = activation.grad.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * activation).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[0, 0].detach()
    cam = cam / cam.max() if cam.max() > 0 else cam
    probability = torch.softmax(logits.detach() / temperature, 1)[0, target].item()
    return Explanation(cam.numpy(), target, probability, predicted)


def explain_image(classifier: Classifier, image: np.ndarray, class_name: str | None = None) -> Explanation:
    """Grad-CAM for one uint8 HWC image already at the classifier's input size."""
    class_index = None
    if class_name is not None:
        if class_name not in classifier.answerable:
            raise BloodcellError(f"unknown class {class_name!r}; choose one of {', '.join(classifier.answerable)}")
        class_index = classifier.classes.index(class_name)
    p = classifier.record.preprocessing
    pixels = torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1)[None]
    x = model_input(pixels, p.mean, p.std, p.colour_target)
    return grad_cam(classifier.model, x, class_index, classifier.temperature, classifier.masked)


def _free_name(out_dir: Path, stem: str, suffix: str, taken: Sequence[Path]) -> Path:
    """`<stem><suffix>`, numbered if another file of this run already took the name."""
    target, n = Path(out_dir) / f"{stem}{suffix}", 1
    while target in taken:
        n += 1
        target = Path(out_dir) / f"{stem}-{n}{suffix}"
    return target


def explain_file(
    classifier: Classifier,
    path: Path,
    out_dir: Path,
    class_name: str | None = None,
    crop: str | None = None,
    taken: Sequence[Path] = (),
) -> list[Path]:
    """Explain a full-size image file; the overlay is drawn on the cropped original at full resolution.

    The file goes through the same decode path (and size checks) as `predict`, decoded once. A
    crop's figure is `<stem>_gradcam.png`. A field (an image `predict` would read as several white
    cells) gets `<stem>_cells.png`, every cell's box with its class, and one Grad-CAM figure per
    cell, `<stem>_cell<k>_gradcam.png`, so that each count can be traced to what drove it.
    """
    try:
        image = decode.open_image(path)
    except decode.ImageError as exc:
        raise BloodcellError(f"{path}: {exc}") from None
    crop = crop or classifier.record.preprocessing.crop
    prepared = classifier.prepare_cells(image, PredictOptions(crop=crop))
    whole = np.asarray(image)
    if prepared.field:
        records = classifier.classify_prepared([str(path)], [prepared], PredictOptions(crop=crop))
        written = [plots.field_boxes(whole, records, _free_name(out_dir, Path(path).stem, "_cells.png", taken),
                                     f"{Path(path).name}: {len(prepared.cells)} white cells")]  # fmt: skip
        for k, (cell_input, frame) in enumerate(prepared.cells, start=1):
            explanation = explain_image(classifier, cell_input, class_name)
            target = _free_name(out_dir, f"{Path(path).stem}_cell{k}", "_gradcam.png", [*taken, *written])
            original = (whole, frame.box(), f"cell {k} of {len(prepared.cells)}")
            written.append(render(classifier, explanation, cell_input, target, f"{path} cell {k}", original))
        return written
    model_input, found = prepared.cells[0]  # a crop: its one cell, as `predict` framed it
    square, _ = crops.frame(image, runs.Crop.parse(crop))
    explanation = explain_image(classifier, model_input, class_name)
    target = _free_name(out_dir, Path(path).stem, "_gradcam.png", taken)
    source = (whole, found.box(), "cell found" if found.found else "no cell found") if found else None
    return [render(classifier, explanation, np.asarray(square), target, str(path), source)]


def render(
    classifier: Classifier,
    explanation: Explanation,
    shown: np.ndarray,
    path: Path,
    source: str,
    original: tuple[np.ndarray, tuple[int, int, int, int], str] | None = None,
) -> Path:
    """The Grad-CAM figure; with `original` (image, frame box, caption), the whole image with the
    frame the cell finder chose is drawn beside it."""
    predicted = classifier.classes[explanation.predicted_index]
    target = classifier.classes[explanation.class_index]
    title = f"{Path(source).name}: predicted {predicted}"
    if target != predicted:
        title += f"; map for {target}"
    title += f" (p={explanation.probability:.3f})"
    return plots.gradcam(shown, explanation.heatmap, path, title, original=original)
