"""`Classifier`: a trained run loaded from its directory, classifying tensors, images and files.

Array outputs (`logits`, `predict_proba`) are float32 torch tensors on the CPU; image inputs give
one record (a dict) per image. Every image input, whatever its form, goes through the same
decode and preprocessing path (`decode.open_image` / `prepare`) and the same `PredictOptions`,
so the CLI, the HTTP server and a notebook classify the same file the same way.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from bloodcell import models, runs
from bloodcell.config import knob
from bloodcell.errors import BloodcellError
from bloodcell.images import cells, crops, decode, fields
from bloodcell.inference import network
from bloodcell.inference.ood import OodModel
from bloodcell.runs import RunRecord


@dataclass(frozen=True)
class PredictOptions:
    """How images are classified; the defaults are `bloodcell predict`'s."""

    crop: str | None = knob(
        None,
        "framing of full-size images: 'cell' (find the white cell, frame it like BloodMNIST), 'cell:PX' "
        "(the same where a red cell is PX pixels across in your images), 'cell:measure' (PX measured once "
        "over all the images given: one lab's at a time), 'medmnist' (the BloodMNIST "
        "geometry), 'none' (largest centred square) or a fraction; default: what the run was trained for",
    )
    tta: bool = knob(False, "average over the 8 flips/rotations")
    top_k: int = knob(3, "classes listed per image")
    min_confidence: float = knob(0.8, "flag images whose top probability is below this for review")
    cells: str = knob(
        "auto",
        "with crop 'cell': auto (an image holding several white cells, or far larger than one cell, is a "
        "field: one record per white cell; otherwise one record for the image), one (one record per image, "
        "its main cell), every (every image read as a field)",
        choices=lambda: ["auto", "one", "every"],
    )
    border_cells: str = knob(
        "skip",
        "white cells of a field cut by the image's border: skip (listed and flagged, not counted: the next "
        "field of a series counts them whole) or count",
        choices=lambda: ["skip", "count"],
    )
    batch_size: int = knob(256, "images per inference batch")
    workers: int | None = knob(None, "image-decoding threads (default: 2 x CPU cores, at most 8)")

    def __post_init__(self):
        if not 1 <= self.top_k <= 1000:
            raise BloodcellError(f"top_k must be at least 1, got {self.top_k}")
        if not (isinstance(self.min_confidence, (int, float)) and 0 <= self.min_confidence <= 1):
            raise BloodcellError(f"min_confidence must be in [0, 1], got {self.min_confidence}")
        if self.batch_size < 1:
            raise BloodcellError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.workers is not None and self.workers < 1:
            raise BloodcellError(f"workers must be at least 1, got {self.workers}")
        if self.crop is not None:
            runs.Crop.parse(self.crop)
        if self.cells not in ("auto", "one", "every") or self.border_cells not in ("skip", "count"):
            raise BloodcellError(f"cells must be auto, one or every and border_cells skip or count, not {self!r}")


def options_with(options: PredictOptions | None, overrides: dict) -> PredictOptions:
    """`options` (or the defaults) with keyword overrides, e.g. `predict_files(paths, tta=True)`."""
    return replace(options or PredictOptions(), **overrides)


EXCLUDED_LOGIT = -1e4  # a class left out by `restricted_to`: probability exactly 0, log-probability finite
ACTIVATION_BUDGET = 2**30  # bytes: what one inference batch's layer outputs may add up to (float32)


@dataclass(frozen=True)
class Classifier:
    """A network plus its run record (classes, preprocessing, temperature)."""

    model: nn.Module
    record: RunRecord
    ood: OodModel | None = None  # scores how unlike the training images an input is
    only: tuple[int, ...] | None = None  # the classes it may answer (`restricted_to`); None: all

    @classmethod
    def from_run(
        cls,
        run_dir: str | Path | None = None,
        precision: str = "float32",
        compile: bool = False,
        backend: str = "torch",
        device: str = "cpu",
    ) -> Classifier:
        """Load a run. `precision="bfloat16"` is about 2.5x faster for bulk 28 px inference on CPUs
        with AVX512-BF16 or AMX (not on plain AVX2); `compile=True` (torch.compile, frozen weights,
        ~10 s on first use, needs a C++ compiler) helps wider models more. See
        `benchmarks/bench_inference.py`. `backend="onnx"` runs the run's exported `model.onnx`
        (`bloodcell export`) on onnxruntime instead of PyTorch; `device` ('auto', 'cpu', 'cuda',
        'mps') chooses where a PyTorch model runs. Without `run_dir`, the packaged default model."""
        run_dir = Path(run_dir) if run_dir is not None else runs.PACKAGED_RUN
        record = runs.read_record(run_dir)
        ood_tensors = runs.read_ood(run_dir, record)
        ood = OodModel.from_tensors(ood_tensors) if ood_tensors is not None else None
        if backend == "onnx":
            exported = run_dir / runs.ONNX
            if not exported.is_file():
                raise BloodcellError(f"{run_dir}: no {runs.ONNX}; export it first: bloodcell export {run_dir}")
            return cls(network.OnnxNetwork(exported), record, ood)
        if backend != "torch":
            raise BloodcellError(f"unknown backend {backend!r}; use torch or onnx")
        try:
            model = network.build(record, runs.read_weights(run_dir), precision, device)
        except BloodcellError as exc:
            raise BloodcellError(f"{run_dir}: {exc}") from None
        return cls(network.compiled(model) if compile else model, record, ood)

    def restricted_to(self, names: Iterable[str]) -> Classifier:
        """The same classifier, answering only among the named classes (aliases as for folders).

        For a lab whose images can hold only some classes, for example a white-cell differential
        with no platelets or erythroblasts: the other classes get probability 0 and the named ones
        share what the model gave, so every output (class, top-k, review) is among them.
        """
        from bloodcell.classes import class_named

        names = [n.strip() for n in names if n.strip()]
        if not names:
            raise BloodcellError("--classes: name at least one class to answer among")
        resolved = [class_named(n) for n in names]
        unknown = [repr(n) for n, c in zip(names, resolved) if c not in self.classes]
        if unknown:
            raise BloodcellError(
                f"--classes: unknown class name(s) {', '.join(unknown)}; "
                f"the run's classes are {', '.join(self.classes)}"
            )
        return replace(self, only=tuple(sorted({self.classes.index(c) for c in resolved})))

    def masked(self, logits: torch.Tensor) -> torch.Tensor:
        """`logits` with the classes it may not answer pushed out of reach (see `restricted_to`)."""
        if self.only is None:
            return logits
        excluded = torch.ones(logits.shape[1], dtype=torch.bool)
        excluded[list(self.only)] = False
        return logits.masked_fill(excluded, EXCLUDED_LOGIT)

    @property
    def classes(self) -> tuple[str, ...]:
        return self.record.classes

    @cached_property
    def batch_limit(self) -> int:
        """The most images one forward pass may take: a large input size (a run file may ask for up
        to 1024 px) must not turn a batch into gigabytes of activations."""
        r = self.record
        _, elements = models.footprint(
            r.arch, r.image_size, activations=True, num_classes=len(r.classes), **r.arch_args
        )
        return max(1, ACTIVATION_BUDGET // (4 * max(1, elements)))

    @property
    def answerable(self) -> tuple[str, ...]:
        """The classes it may answer: the run's, or those it was `restricted_to`."""
        return self.classes if self.only is None else tuple(self.classes[k] for k in self.only)

    @property
    def image_size(self) -> int:
        return self.record.image_size

    @property
    def temperature(self) -> float:
        return self.record.temperature

    def as_uint8_nchw(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Accept uint8 images, or floats in [0, 1]; NCHW tensors or NHWC arrays; single images too.

        Float input outside [0, 1] (for instance already mean/std-normalised) is an error: the
        classifier normalises by itself, and clamping such input gives nonsense.
        """
        x = images if torch.is_tensor(images) else torch.as_tensor(np.asarray(images))
        if x.ndim == 3:
            x = x.unsqueeze(0)
        if x.ndim != 4:
            raise BloodcellError(f"expected images of shape (N, 3, H, W) or (N, H, W, 3), got {tuple(x.shape)}")
        if x.shape[1] != 3 and x.shape[-1] == 3:
            x = x.permute(0, 3, 1, 2)
        if x.dtype.is_floating_point:
            if len(x) and (not torch.isfinite(x).all() or x.min() < 0 or x.max() > 1):
                raise BloodcellError(
                    "float images must hold raw pixels in [0, 1] (got values outside it; pass uint8 or "
                    "unnormalised floats: the classifier applies its own normalisation)"
                )
            x = (x * 255).round().to(torch.uint8)
        elif x.dtype != torch.uint8:
            raise BloodcellError(f"images must be uint8 or float in [0, 1], got {x.dtype}")
        if tuple(x.shape[1:]) != (3, self.image_size, self.image_size):
            raise BloodcellError(
                f"images are {tuple(x.shape[1:])} but this model takes (3, {self.image_size}, {self.image_size}); "
                "use predict_files / predict_images to resize full-size images"
            )
        return x.contiguous()

    def logits(self, images: torch.Tensor | np.ndarray, tta: bool = False, batch_size: int = 1024) -> torch.Tensor:
        """Uncalibrated logits, (N, classes) float32."""
        batch_size = min(batch_size, self.batch_limit)
        if isinstance(self.model, network.OnnxNetwork):
            return self.masked(self.model.logits(self.as_uint8_nchw(images), batch_size, tta))
        p = self.record.preprocessing
        images = self.as_uint8_nchw(images)
        return self.masked(network.logits(self.model, images, p.mean, p.std, batch_size, tta, p.colour_target))

    def logits_and_ood(
        self, images: torch.Tensor | np.ndarray, tta: bool = False, batch_size: int = 1024
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits and, if the run has an out-of-distribution model, each image's OOD score."""
        if self.ood is None:
            return self.logits(images, tta, batch_size), None
        logits, features = self.logits_and_features(images, tta, batch_size)
        return logits, self.ood.score(features)

    def logits_and_features(
        self, images: torch.Tensor | np.ndarray, tta: bool = False, batch_size: int = 1024
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (as `logits` gives them) and the pooled features the head reads, which the
        out-of-distribution model and fine-tuning's refit score."""
        batch_size = min(batch_size, self.batch_limit)
        images = self.as_uint8_nchw(images)
        if isinstance(self.model, network.OnnxNetwork):
            logits, features = self.model.logits(images, batch_size, tta, features=True)
        else:
            p = self.record.preprocessing
            logits, features = network.logits(
                self.model, images, p.mean, p.std, batch_size, tta, p.colour_target, features=True
            )
        return self.masked(logits), features

    def calibrated(self, logits: torch.Tensor) -> torch.Tensor:
        """softmax(logits / temperature): the probabilities every output reports."""
        return torch.softmax(logits / self.temperature, dim=1)

    def predict_proba(self, images: torch.Tensor | np.ndarray, tta: bool = False) -> torch.Tensor:
        """Calibrated class probabilities, (N, classes) float32."""
        return self.calibrated(self.logits(images, tta))

    def predict(self, images: torch.Tensor | np.ndarray, tta: bool = False) -> list[str]:
        return [self.classes[i] for i in self.predict_proba(images, tta).argmax(1).tolist()]

    # ------------------------------------------------------------ full-size images

    def prepare(
        self, source: decode.ImageSource, crop: str | None = None, medmnist_filter: bool = True
    ) -> tuple[np.ndarray, cells.CellFrame | None]:
        """One image (path, bytes, PIL image or HWC array) -> the uint8 HWC model input, and where
        the cell was found (crop 'cell'). `medmnist_filter=False` leaves the run's MedMNIST filter
        to the caller (`prepare_sources` applies it to a whole batch)."""
        p = self.record.preprocessing
        crop_mode = runs.Crop.parse(crop or p.crop)
        emulate = p.medmnist_filter and medmnist_filter
        return crops.prepare_framed(decode.open_image(source), p.image_size, crop_mode, emulate)

    def predict_files(
        self, paths: Iterable[str | Path], options: PredictOptions | None = None, progress: bool = False, **overrides
    ) -> list[dict]:
        """Classify image files (folders are searched recursively). A file that cannot be read gets
        a record with `error` set instead of stopping the batch."""
        files = decode.find_images(list(paths))
        return self.predict_sources([(str(p), p) for p in files], options_with(options, overrides), progress)

    def predict_images(self, images: list, options: PredictOptions | None = None, **overrides) -> list[dict]:
        """Full-size PIL images or HWC uint8 arrays; records are named image-0, image-1, ..."""
        named = [(f"image-{i}", image) for i, image in enumerate(images)]
        return self.predict_sources(named, options_with(options, overrides))

    def predict_uploads(
        self, uploads: list[tuple[str, bytes]], options: PredictOptions | None = None, **overrides
    ) -> list[dict]:
        """(name, content) pairs already in memory, as `bloodcell serve` receives them."""
        return self.predict_sources(uploads, options_with(options, overrides))

    def measured_options(
        self, sources: list[decode.ImageSource], options: PredictOptions
    ) -> tuple[PredictOptions, cells.LabScale | None]:
        """`options` with a 'cell:measure' crop (given, or the run's) resolved over `sources`: a red
        cell's size measured once over all of them (one lab's images), stated for every image."""
        crop, scale = crops.measured(runs.Crop.parse(options.crop or self.record.preprocessing.crop), sources)
        if scale is None:
            return options, None
        return replace(options, crop=f"cell:{crop.red_cell:.2f}" if crop.red_cell else "cell"), scale

    def predict_sources(
        self, named: list[tuple[str, decode.ImageSource]], options: PredictOptions, progress: bool = False
    ) -> list[dict]:
        """The one pipeline: decode in threads, preprocess, classify in batches; one record per
        image, or per white cell of a field."""
        options, _ = self.measured_options([source for _, source in named], options)
        records: list[dict] = []
        with tqdm(total=len(named), unit="img", disable=not progress) as bar:
            for start in range(0, len(named), options.batch_size):
                chunk = named[start : start + options.batch_size]
                prepared = self.prepare_sources(chunk, options)
                records += self.classify_prepared([name for name, _ in chunk], prepared, options)
                bar.update(len(chunk))
        return records

    def prepare_cells(
        self, source: decode.ImageSource, options: PredictOptions, medmnist_filter: bool = True
    ) -> Prepared:
        """One image -> its cells as model input. With crop 'cell' an image is a field when it holds
        several white cells or is far larger than one cell's frame (`options.cells` can say so
        instead); a field gives every white cell found in it, a crop its one cell, as ever."""
        p = self.record.preprocessing
        crop = runs.Crop.parse(options.crop or p.crop)
        emulate = p.medmnist_filter and medmnist_filter
        image = decode.open_image(source)
        if crop.fraction is not None or options.cells == "one":
            return Prepared((crops.prepare_framed(image, p.image_size, crop, emulate),))
        if options.cells == "auto":
            main = cells.locate(image, crop.red_cell)  # cheap, and decides most crops on its own
            measured = main.scale_from in ("red cells", "stated red cell")
            if main.found and main.candidates <= 1 and measured and fields.FIELD_SIDES * main.side > min(image.size):
                return Prepared(((crops.render(cells.crop(image, main), p.image_size, crop, emulate), main),))
        scan = fields.find_white_cells(image, crop.red_cell)
        if options.cells == "auto" and not scan.is_field:
            return Prepared((crops.prepare_framed(image, p.image_size, crop, emulate),))
        framed = [(crops.render(cells.crop(image, f), p.image_size, crop, emulate), f) for f in scan.cells]
        return Prepared(tuple(framed), field=True)

    def prepare_sources(self, named: list[tuple[str, decode.ImageSource]], options: PredictOptions) -> list:
        """Decode and frame images in threads: per input, its `Prepared` cells or why it failed.

        The MedMNIST filter runs once over the whole batch afterwards (a convolution: far cheaper
        on the batch than image by image inside the threads)."""
        options, _ = self.measured_options([source for _, source in named], options)
        workers = options.workers or min(8, (os.cpu_count() or 2) * 2)
        p = self.record.preprocessing
        crop = runs.Crop.parse(options.crop or p.crop)
        filter_batch = p.medmnist_filter and crops.emulates_medmnist(p.image_size, crop)

        def prepared_or_reason(source) -> Prepared | str:
            try:
                return self.prepare_cells(source, options, medmnist_filter=not filter_batch)
            except decode.ImageError as exc:
                return str(exc)

        with ThreadPoolExecutor(workers) as pool:
            prepared = list(pool.map(prepared_or_reason, [source for _, source in named]))
        places = [
            (i, k) for i, item in enumerate(prepared) if not isinstance(item, str) for k in range(len(item.cells))
        ]
        if filter_batch and places:
            pixels = np.stack([prepared[i].cells[k][0] for i, k in places])
            filtered = crops.apply_medmnist_filter(pixels, crops.medmnist_filter())
            for (i, k), pixels_ in zip(places, filtered):
                cells_ = list(prepared[i].cells)
                cells_[k] = (pixels_, cells_[k][1])
                prepared[i] = replace(prepared[i], cells=tuple(cells_))
        return prepared

    def classify_prepared(self, names: list[str], prepared: list, options: PredictOptions) -> list[dict]:
        """Records for the inputs of `prepare_sources`: one per image (or per white cell of a field,
        or one saying a field holds none), or the reason an image has none."""
        places = [
            (i, k) for i, item in enumerate(prepared) if not isinstance(item, str) for k in range(len(item.cells))
        ]
        results: dict[tuple[int, int], dict] = {}
        if places:
            inputs = crops.to_tensor([prepared[i].cells[k][0] for i, k in places])
            logits, scores = self.logits_and_ood(inputs, options.tta)
            frames = [prepared[i].cells[k][1] for i, k in places]
            fields_ = [prepared[i].field for i, _ in places]
            results = dict(zip(places, self.describe(self.calibrated(logits), options, frames, scores, fields_)))
        out = []
        for i, name in enumerate(names):
            item = prepared[i]
            if isinstance(item, str):
                out.append(
                    {"path": name, **NO_ANSWER, "cell": None, "image_kind": None, "counted": False, "error": item}
                )
                continue
            kind = "field" if item.field else "cell"
            if not item.cells:
                empty = {"review": True, "review_reason": "no white cell found in this field"}
                out.append({"path": name, **NO_ANSWER, **empty, "cell": None, "image_kind": kind, "counted": False,
                            "error": None})  # fmt: skip
            for k in range(len(item.cells)):
                result = results[(i, k)]
                if not math.isfinite(result["probability"]):
                    error = "the model gave non-finite probabilities"
                    out.append({"path": name, **NO_ANSWER, "cell": result["cell"], "image_kind": kind,
                                "counted": False, "error": error})  # fmt: skip
                    continue
                cut = item.field and item.cells[k][1].cut
                counted = not (cut and options.border_cells == "skip")
                out.append({"path": name, **result, "image_kind": kind, "counted": counted, "error": None})
        return out

    def describe(
        self,
        probs: torch.Tensor,
        options: PredictOptions,
        frames: list | None = None,
        ood_scores: torch.Tensor | None = None,
        in_field: list[bool] | None = None,
    ) -> list[dict]:
        """Per cell: the class, its probability, the top-k classes, the review flag and its reasons,
        the out-of-distribution score, and where the cell was found (crop 'cell')."""
        top = probs.topk(min(options.top_k, probs.shape[1]), dim=1)
        frames = frames or [None] * len(probs)
        in_field = in_field or [False] * len(probs)
        scores = ood_scores.tolist() if ood_scores is not None else [None] * len(probs)
        threshold = self.ood.threshold if self.ood is not None else None
        records = []
        for values, indices, found, score, field in zip(
            top.values.tolist(), top.indices.tolist(), frames, scores, in_field
        ):
            reasons = review_reasons(values[0], options.min_confidence, found, score, threshold, field)
            records.append(
                {
                    "class": self.classes[indices[0]],
                    "probability": values[0],
                    "top_k": [{"class": self.classes[i], "probability": v} for i, v in zip(indices, values)],
                    "review": bool(reasons),
                    "review_reason": "; ".join(reasons) or None,
                    "ood_score": score,
                    "cell": found.describe() if found is not None else None,
                }
            )
        return records


NO_ANSWER = {"class": None, "probability": None, "top_k": [], "review": False, "review_reason": None, "ood_score": None}


@dataclass(frozen=True)
class Prepared:
    """One image ready for the network: each cell's uint8 HWC input with its frame, and whether
    the image was read as a field (several cells, or none)."""

    cells: tuple[tuple[np.ndarray, cells.CellFrame | None], ...]
    field: bool = False


def review_reasons(
    probability: float,
    min_confidence: float,
    found: cells.CellFrame | None = None,
    ood_score: float | None = None,
    ood_threshold: float | None = None,
    in_field: bool = False,
) -> list[str]:
    """Why a cell should be looked at by a person (empty: no reason)."""
    reasons = []
    if probability < min_confidence:
        reasons.append(f"low confidence ({probability:.2f} < {min_confidence:.2f})")
    if ood_score is not None and ood_threshold is not None and ood_score > ood_threshold:
        reasons.append(f"unlike the training images (OOD score {ood_score:.0f} > {ood_threshold:.0f})")
    if found is not None and not found.found:
        reasons.append("no white cell found")
    if found is not None and found.candidates > 1 and not in_field:
        reasons.append(f"{found.candidates} white cells in the image")
    if found is not None and found.cut and in_field:
        reasons.append("cut by the image border")
    return reasons
