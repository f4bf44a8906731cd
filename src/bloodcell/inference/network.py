"""Running a trained network: normalisation, batching, test-time augmentation, precision.

Everything `predict`, `evaluate`, `explain`, `serve` and the benchmarks need to turn uint8 images
into logits, and nothing from training: importing this never loads the optimiser, EMA or
checkpoint code. Training reuses `normalize` and `dihedral` from here, so a model sees its
inputs the same way in both.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from bloodcell import models
from bloodcell.errors import BloodcellError
from bloodcell.images.colour import normalize_colours
from bloodcell.runs import RunRecord

PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DEVICES = ("auto", "cpu", "cuda", "mps")


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (N,3,H,W) -> float32, normalised per channel (`mean`/`std` in [0, 1] units)."""
    mean_t = torch.tensor(mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1) * 255
    std_t = torch.tensor(std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1) * 255
    return (images.float() - mean_t) / std_t


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th of the 8 symmetries of the square (k in 0..7): rotate by k%4 quarter turns, flip if k>=4."""
    if k >= 4:
        x = x.flip(-1)
    return torch.rot90(x, k % 4, dims=(-2, -1))


def resolve_device(spec: str = "cpu") -> torch.device:
    """'auto' -> a CUDA GPU if PyTorch sees one, else Apple's MPS, else the CPU; a named device must exist."""
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if spec == "auto":
        return torch.device("cuda" if cuda else "mps" if mps else "cpu")
    if spec not in DEVICES:
        raise BloodcellError(f"unknown device {spec!r}; use {', '.join(DEVICES)}")
    if (spec == "cuda" and not cuda) or (spec == "mps" and not mps):
        raise BloodcellError(f"--device {spec}: PyTorch sees no such device here (use auto or cpu)")
    return torch.device(spec)


def build(
    record: RunRecord, weights: dict[str, torch.Tensor], precision: str = "float32", device: str = "cpu"
) -> nn.Module:
    """The network a run describes, with its weights, in eval mode and channels-last memory."""
    if precision not in PRECISIONS:
        raise BloodcellError(f"unknown precision {precision!r}; use {' or '.join(PRECISIONS)}")
    model = models.create(
        record.arch, image_size=record.image_size, num_classes=len(record.classes), **record.arch_args
    )
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise BloodcellError(f"weights do not fit the {record.arch} described in model.json ({first})") from None
    return model.eval().to(resolve_device(device), memory_format=torch.channels_last, dtype=PRECISIONS[precision])


def compiled(model: nn.Module) -> nn.Module:
    """torch.compile with the weights frozen into the graph (compiles on first call, ~10 s; needs a C++ compiler)."""
    return torch.compile(model, dynamic=False, options={"freezing": True})


def model_input(
    images: torch.Tensor, mean: Sequence[float], std: Sequence[float], colour_target: Sequence[float] | None = None
) -> torch.Tensor:
    """uint8 images -> the float tensor a network takes: colours normalised (with a
    `colour_target`, see `colour`), then per-channel mean/std normalisation."""
    if colour_target is None:
        return normalize(images, mean, std)
    return normalize(normalize_colours(images.float() / 255, colour_target) * 255, mean, std)


def final_linear(model: nn.Module) -> nn.Linear:
    """The layer whose input is the network's image features (the head)."""
    linears = [m for m in getattr(model, "_orig_mod", model).modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise BloodcellError("this model has no final linear layer to read features from")
    return linears[-1]


@torch.no_grad()
def logits(
    model: nn.Module,
    images: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = 1024,
    tta: bool = False,
    colour_target: Sequence[float] | None = None,
    features: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Float32 logits for uint8 images (N,3,H,W); with `tta`, averaged over the 8 flips/rotations.
    With `features`, also the input of the final linear layer (averaged the same way).

    Inputs follow the model's weights: their dtype (bfloat16 models get bfloat16 inputs) and, for
    channels-last convolution weights, channels-last memory (which oneDNN runs fastest on CPU).
    """
    model.eval()
    first = next(model.parameters())
    channels_last = first.is_contiguous(memory_format=torch.channels_last) and any(
        p.ndim == 4 for p in model.parameters()
    )
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    views = range(8) if tta else range(1)
    captured: list[torch.Tensor] = []
    hook = final_linear(model).register_forward_hook(lambda m, i, o: captured.append(i[0])) if features else None
    # a compiled graph may not call the hook: then features come from the eager module
    eager = getattr(model, "_orig_mod", model)
    out, feats = [], []
    try:
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size].to(first.device)
            x = model_input(batch, mean, std, colour_target).to(first.dtype)
            per_view, per_view_features = [], []
            for k in views:
                view = dihedral(x, k).contiguous(memory_format=memory_format)
                captured.clear()
                per_view.append(model(view).float().cpu())
                if features:
                    if not captured:
                        eager(view)
                    per_view_features.append(captured[-1].float().cpu())
            out.append(torch.stack(per_view).mean(dim=0))
            if features:
                feats.append(torch.stack(per_view_features).mean(dim=0))
    finally:
        if hook is not None:
            hook.remove()
    result = torch.cat(out) if out else torch.empty(0, models.NUM_CLASSES)
    if not features:
        return result
    return result, (torch.cat(feats) if feats else torch.empty(0, 0))


class OnnxNetwork:
    """A run exported by `bloodcell export` (pixels in, normalisation inside), run by onnxruntime."""

    def __init__(self, path, threads: int | None = None):
        try:
            import onnxruntime
        except ImportError:
            raise BloodcellError("the onnx backend needs onnxruntime: pip install 'bloodcell[export]'") from None
        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.runtime = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime's own error types
            raise BloodcellError(f"{path}: not a loadable ONNX model ({str(exc).splitlines()[0]})") from None
        self.metadata = self.runtime.get_modelmeta().custom_metadata_map

    @torch.no_grad()
    def logits(self, images: torch.Tensor, batch_size: int = 1024, tta: bool = False, features: bool = False):
        """The same contract as `logits` above, for uint8 images, on onnxruntime."""
        views = range(8) if tta else range(1)
        out, feats = [], []
        for start in range(0, len(images), batch_size):
            pixels = images[start : start + batch_size].float()
            results = [self.runtime.run(None, {"pixels": dihedral(pixels, k).contiguous().numpy()}) for k in views]
            out.append(torch.from_numpy(np.mean([r[1] for r in results], axis=0)))
            feats.append(torch.from_numpy(np.mean([r[2] for r in results], axis=0)))
        result = torch.cat(out) if out else torch.empty(0, models.NUM_CLASSES)
        return (result, torch.cat(feats) if feats else torch.empty(0, 0)) if features else result
