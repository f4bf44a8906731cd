"""`Classifier`: a trained run loaded from its directory, predicting on tensors and arrays."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bloodcell import models, runs
from bloodcell.errors import BloodcellError
from bloodcell.train import predict_logits


@dataclass
class Classifier:
    """A model plus everything needed to feed it: classes, image size, normalisation, temperature."""

    model: nn.Module
    meta: dict

    @classmethod
    def from_run(cls, run_dir: str | Path) -> Classifier:
        run_dir = Path(run_dir)
        if not runs.is_run_dir(run_dir):
            raise BloodcellError(
                f"{run_dir}: not a bloodcell run directory (no {runs.MODEL_META} / {runs.MODEL_WEIGHTS})"
            )
        meta = runs.read_json(run_dir / runs.MODEL_META)
        meta.setdefault("temperature", 1.0)  # runs made before calibration existed
        try:
            model = models.create(meta["arch"], image_size=meta["image_size"], **meta.get("arch_args", {}))
            model.load_state_dict(runs.load_tensors(run_dir / runs.MODEL_WEIGHTS))
        except (KeyError, RuntimeError, TypeError) as exc:
            raise BloodcellError(f"{run_dir}: model files do not match ({exc})") from None
        model.eval()
        return cls(model, meta)

    @property
    def classes(self) -> list[str]:
        return self.meta["classes"]

    @property
    def image_size(self) -> int:
        return self.meta["image_size"]

    @property
    def temperature(self) -> float:
        return float(self.meta.get("temperature", 1.0))

    def as_uint8_nchw(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Accept uint8 or [0,1] float images, NCHW tensors or NHWC arrays (single images too)."""
        x = torch.as_tensor(np.asarray(images) if not torch.is_tensor(images) else images)
        if x.ndim == 3:
            x = x.unsqueeze(0)
        if x.ndim != 4:
            raise BloodcellError(f"expected images of shape (N, 3, H, W) or (N, H, W, 3), got {tuple(x.shape)}")
        if x.shape[1] != 3 and x.shape[-1] == 3:
            x = x.permute(0, 3, 1, 2)
        if x.dtype.is_floating_point:
            x = (x.clamp(0, 1) * 255).round().to(torch.uint8)
        if tuple(x.shape[2:]) != (self.image_size, self.image_size):
            raise BloodcellError(
                f"images are {tuple(x.shape[2:])} px but this model takes {self.image_size}x{self.image_size}; "
                "use predict_files / predict_images to resize full-size images"
            )
        return x.to(torch.uint8).contiguous()

    def logits(self, images: torch.Tensor | np.ndarray, tta: bool = False, batch_size: int = 1024) -> torch.Tensor:
        """Uncalibrated logits."""
        norm = self.meta["normalize"]
        return predict_logits(self.model, self.as_uint8_nchw(images), norm["mean"], norm["std"], batch_size, tta)

    def predict_proba(self, images: torch.Tensor | np.ndarray, tta: bool = False) -> torch.Tensor:
        """Calibrated class probabilities (softmax of logits / temperature)."""
        return torch.softmax(self.logits(images, tta) / self.temperature, dim=1)

    def predict(self, images: torch.Tensor | np.ndarray, tta: bool = False) -> list[str]:
        return [self.classes[i] for i in self.predict_proba(images, tta).argmax(1).tolist()]


def load(run_dir: str | Path) -> Classifier:
    """Load a trained run for use in Python: `bloodcell.load("runs/default").predict(images)`."""
    return Classifier.from_run(run_dir)
