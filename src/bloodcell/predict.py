"""`Classifier`: a trained run loaded from its directory, predicting on tensors and arrays."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm import tqdm

from bloodcell import models, preprocess, runs
from bloodcell.errors import BloodcellError
from bloodcell.train import predict_logits

PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16}
LEUKOCYTES = ("basophil", "eosinophil", "immature granulocyte", "lymphocyte", "monocyte", "neutrophil")


@dataclass
class Classifier:
    """A model plus everything needed to feed it: classes, image size, normalisation, temperature."""

    model: nn.Module
    meta: dict

    @classmethod
    def from_run(cls, run_dir: str | Path, precision: str = "float32", compile: bool = False) -> Classifier:
        """Load a run. For bulk inference on 28 px tensors, `precision="bfloat16"` (fast on CPUs
        with AVX512-BF16 or AMX) is about 2.5x faster; `compile=True` (torch.compile with weights
        frozen into the graph; compiles on first use, about 10 s, and needs a C++ compiler) helps
        wider models more. `benchmarks/bench_inference.py` compares the ways side by side."""
        if precision not in PRECISIONS:
            raise BloodcellError(f"unknown precision {precision!r}; use {' or '.join(PRECISIONS)}")
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
        model = model.eval().to(memory_format=torch.channels_last, dtype=PRECISIONS[precision])
        if compile:
            model = torch.compile(model, dynamic=False, options={"freezing": True})
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

    def records(self, probs: torch.Tensor, top_k: int = 3, min_confidence: float = 0.0) -> list[dict]:
        """One record per image: predicted class, probability, top-k and a review flag."""
        top = probs.topk(min(top_k, probs.shape[1]), dim=1)
        return [
            {
                "class": self.classes[indices[0]],
                "probability": values[0],
                "top_k": [{"class": self.classes[i], "probability": v} for i, v in zip(indices, values)],
                "review": values[0] < min_confidence,
            }
            for values, indices in zip(top.values.tolist(), top.indices.tolist())
        ]

    def predict_images(
        self,
        images: list[Image.Image | np.ndarray],
        crop: str | float = "medmnist",
        tta: bool = False,
        top_k: int = 3,
        min_confidence: float = 0.0,
    ) -> list[dict]:
        """Full-size PIL images or HWC uint8 arrays, preprocessed like `predict_files`."""
        crop_spec = preprocess.Crop.parse(crop)
        prepared = [
            preprocess.prepare(
                im if isinstance(im, Image.Image) else Image.fromarray(np.asarray(im)), self.image_size, crop_spec
            )
            for im in images
        ]
        return self.records(self.predict_proba(preprocess.to_tensor(prepared), tta), top_k, min_confidence)

    def predict_files(
        self,
        paths: list[str | Path],
        crop: str | float = "medmnist",
        tta: bool = False,
        top_k: int = 3,
        min_confidence: float = 0.0,
        batch_size: int = 256,
        workers: int | None = None,
        progress: bool = False,
    ) -> list[dict]:
        """Classify image files (folders are searched recursively). A file that cannot be read gets
        a record with `error` set instead of stopping the batch."""
        crop_spec = preprocess.Crop.parse(crop)
        files = preprocess.find_images(paths)
        records: list[dict] = []
        workers = workers or min(8, (os.cpu_count() or 2) * 2)

        def load(path: Path) -> np.ndarray | str:
            return _prepared_or_reason(preprocess.load_file, path, self.image_size, crop_spec)

        with ThreadPoolExecutor(workers) as pool, tqdm(total=len(files), unit="img", disable=not progress) as bar:
            for start in range(0, len(files), batch_size):
                chunk = files[start : start + batch_size]
                records += self._file_records(
                    [str(p) for p in chunk], list(pool.map(load, chunk)), tta, top_k, min_confidence
                )
                bar.update(len(chunk))
        return records

    def predict_uploads(
        self,
        uploads: list[tuple[str, bytes]],
        crop: str | float = "medmnist",
        tta: bool = False,
        top_k: int = 3,
        min_confidence: float = 0.0,
    ) -> list[dict]:
        """`predict_files` for (name, content) pairs already in memory, as `bloodcell serve` receives them."""
        crop_spec = preprocess.Crop.parse(crop)
        loaded = [
            _prepared_or_reason(preprocess.load_bytes, content, self.image_size, crop_spec) for _, content in uploads
        ]
        return self._file_records([name for name, _ in uploads], loaded, tta, top_k, min_confidence)

    def _file_records(
        self, names: list[str], loaded: list[np.ndarray | str], tta: bool, top_k: int, min_confidence: float
    ) -> list[dict]:
        """One record per file: the prediction, or `error` (the reason as a string) if it could not be read."""
        good = [i for i, item in enumerate(loaded) if not isinstance(item, str)]
        results = {}
        if good:
            probs = self.predict_proba(preprocess.to_tensor([loaded[i] for i in good]), tta)
            results = dict(zip(good, self.records(probs, top_k, min_confidence)))
        failed = {"class": None, "probability": None, "top_k": [], "review": False}
        return [
            {"path": name, **results[i], "error": None}
            if i in results
            else {"path": name, **failed, "error": loaded[i]}
            for i, name in enumerate(names)
        ]


def _prepared_or_reason(load, source, size: int, crop: preprocess.Crop) -> np.ndarray | str:
    """The prepared image, or why it could not be read (which becomes the record's `error`)."""
    try:
        return load(source, size, crop)
    except preprocess.ImageError as exc:
        return str(exc)


def differential(records: list[dict], classes: list[str]) -> dict:
    """The differential count a lab reads: per class, white cells, erythroblasts per 100 WBC, platelets."""
    classified = [r for r in records if r.get("error") is None]
    counts = {name: sum(r["class"] == name for r in classified) for name in classes}
    total = len(classified)
    wbc = sum(counts[name] for name in LEUKOCYTES if name in counts)
    return {
        "images": len(records),
        "classified": total,
        "failed": len(records) - total,
        "flagged_for_review": sum(bool(r["review"]) for r in classified),
        "per_class": {name: {"count": n, "percent": 100 * n / total if total else 0.0} for name, n in counts.items()},
        "white_cells": wbc,
        "white_cell_differential": {
            name: {"count": counts[name], "percent": 100 * counts[name] / wbc if wbc else 0.0}
            for name in LEUKOCYTES
            if name in counts
        },
        "erythroblasts_per_100_wbc": 100 * counts.get("erythroblast", 0) / wbc if wbc else None,
        "platelets": counts.get("platelet", 0),
    }
