"""The run directory and its typed, versioned record: the one place that knows the file layout.

RUN_DIR/model.safetensors   weights only (never pickled)
RUN_DIR/model.json          the RunRecord: architecture, classes, preprocessing, temperature, provenance
RUN_DIR/ood.safetensors     class centres and precision of the training features (out-of-distribution score)
RUN_DIR/metrics.json        val/test metrics
RUN_DIR/history.csv         per-epoch loss/accuracy
RUN_DIR/checkpoint/         resumable training state while training (see `checkpoint`)

`model.json` is written last, so a folder holding it (and the weights) is a finished run. The
preprocessing a model needs travels with it, the way a model's data config does in timm: any
command that loads a run feeds it images the way it was trained, without being told.
"""

from __future__ import annotations

import fnmatch
import hashlib
import math
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from bloodcell import __version__, models
from bloodcell.errors import BloodcellError
from bloodcell.files import check_writable, load_tensors, printable, read_json, save_tensors, write_json

SCHEMA_VERSION = 2  # 1: the first release's model.json (no "schema" key, "normalize" at the top)
MODEL_WEIGHTS = "model.safetensors"
MODEL_META = "model.json"
OOD_WEIGHTS = "ood.safetensors"
ONNX = "model.onnx"  # written by `bloodcell export` (with model.md, the model card)
METRICS = "metrics.json"
HISTORY = "history.csv"
CHECKPOINT = "checkpoint"
MEDMNIST_CROP = 200 / 360  # crop side / short side of the PBC images: how BloodMNIST framed them
PACKAGED_RUN = Path(__file__).parent / "packaged" / "default"  # the recommended model, shipped in the wheel
RUN_FILES = (MODEL_WEIGHTS, MODEL_META, OOD_WEIGHTS, ONNX, "model.md", METRICS, HISTORY, CHECKPOINT)
# Every other file a bloodcell command writes into a run folder: figures, reports, tables.
RUN_PATTERNS = (
    "confusion_*.png", "reliability_*.png", "learning_curves.png", "robustness.png", "robustness.json",
    "report.html", "lab_images.csv", "MODEL_CARD.md", "PROVENANCE.json", ".*.tmp",
)  # fmt: skip
CHECKPOINT_PATTERNS = ("state.json", "state-*.safetensors", ".*.tmp")


MEASURE = "cell:measure"  # the crop spec that measures a lab's magnification over its images


@dataclass(frozen=True)
class Crop:
    """How a full-size image is framed: 'cell' (find the white cell, frame it like BloodMNIST),
    'cell:PX' (the same, for images where a red cell is PX pixels across: a lab that knows its
    magnification), 'cell:measure' (the same, with PX measured once over all the images given:
    one lab's images at a time), 'medmnist' (the MedMNIST geometry scaled to the image), 'none'
    (largest centred square), or a fraction of the short side, centred."""

    fraction: float | None  # None: find the cell
    red_cell: float | None = None  # with 'cell': a red cell's diameter in the images, in pixels
    measure: bool = False  # with 'cell': measure `red_cell` over the batch (`cells.lab_red_cell`) first

    @classmethod
    def parse(cls, spec: str | float) -> Crop:
        if isinstance(spec, bool) or not isinstance(spec, (str, int, float)):
            raise BloodcellError(
                f"--crop must be 'cell', 'cell:PX', 'cell:measure', 'medmnist', 'none' or a fraction, got {spec!r}"
            )
        if spec == "cell":
            return cls(None)
        if spec == MEASURE:
            return cls(None, measure=True)
        if isinstance(spec, str) and spec.startswith("cell:"):
            try:
                red_cell = float(spec.removeprefix("cell:"))
            except ValueError:
                red_cell = 0.0
            if not 4 <= red_cell <= 1000:
                raise BloodcellError(f"--crop cell:PX needs a red cell's diameter in pixels (4 to 1000), got {spec!r}")
            return cls(None, red_cell)
        if spec == "medmnist":
            return cls(MEDMNIST_CROP)
        if spec == "none":
            return cls(1.0)
        try:
            fraction = float(spec)
        except ValueError:
            raise BloodcellError(
                f"--crop must be 'cell', 'cell:PX', 'cell:measure', 'medmnist', 'none' or a fraction in (0, 1], "
                f"got {spec!r}"
            ) from None
        if not 0 < fraction <= 1:
            raise BloodcellError(f"--crop fraction must be in (0, 1], got {fraction}")
        return cls(fraction)


@dataclass(frozen=True)
class Preprocessing:
    """How pixels become model input. `crop` and `medmnist_filter` apply to full-size image files."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop: str = "medmnist"  # framing of full-size images: cell | medmnist | none | a fraction
    medmnist_filter: bool = True  # the fitted 28 px filter that mimics MedMNIST's resize
    colour_target: tuple[float, ...] | None = None  # Lab means and stds every image is moved to (None: off)


@dataclass(frozen=True)
class RunRecord:
    """Everything needed to rebuild, feed and describe a trained model (model.json)."""

    arch: str
    classes: tuple[str, ...]
    preprocessing: Preprocessing
    arch_args: dict = field(default_factory=dict)
    temperature: float = 1.0
    ood_threshold: float | None = None  # review images whose OOD score is above this (ood.safetensors)
    train_config: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)  # provenance: file, md5, official
    metrics: dict = field(default_factory=dict)  # headline numbers per split
    train_seconds: float | None = None
    warnings: tuple[str, ...] = ()  # shown whenever the run classifies full-size images
    bloodcell_version: str = __version__
    schema: int = SCHEMA_VERSION

    @property
    def image_size(self) -> int:
        return self.preprocessing.image_size

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, values, source: str | Path = "model.json") -> RunRecord:
        """Validate and build; every problem is one line naming `source`."""
        if not isinstance(values, dict):
            raise BloodcellError(f"{source}: expected a JSON object, got {type(values).__name__}")
        schema = values.get("schema", 1)
        if not isinstance(schema, int) or schema < 1:
            raise BloodcellError(f"{source}: bad schema version {schema!r}")
        if schema > SCHEMA_VERSION:
            raise BloodcellError(
                f"{source}: written by a newer bloodcell (run format {schema}, this is {__version__} "
                f"reading format {SCHEMA_VERSION}); upgrade bloodcell to use this run"
            )
        if schema == 1:
            values = _upgrade_v1(values, source)
        try:
            classes = values["classes"]
            if not isinstance(classes, (list, tuple)):
                raise BloodcellError(f"{source}: classes must be a list of names, got {type(classes).__name__}")
            preprocessing = Preprocessing(**_as_dict(values["preprocessing"], "preprocessing", source))
            preprocessing = replace(
                preprocessing,
                mean=_tuple(preprocessing.mean),
                std=_tuple(preprocessing.std),
                colour_target=_tuple(preprocessing.colour_target),
            )
            record = cls(
                arch=values["arch"],
                classes=tuple(classes),
                preprocessing=preprocessing,
                arch_args=_as_dict(values.get("arch_args", {}), "arch_args", source),
                temperature=values.get("temperature", 1.0),
                ood_threshold=values.get("ood_threshold"),
                train_config=_as_dict(values.get("train_config", {}), "train_config", source),
                data=_as_dict(values.get("data", {}), "data", source),
                metrics=_as_dict(values.get("metrics", {}), "metrics", source),
                train_seconds=values.get("train_seconds"),
                warnings=_strings(values.get("warnings", []), "warnings", source),
                bloodcell_version=str(values.get("bloodcell_version", "unknown")),
                schema=SCHEMA_VERSION,
            )
        except KeyError as exc:
            raise BloodcellError(f"{source}: missing field {exc}") from None
        except TypeError as exc:
            raise BloodcellError(f"{source}: malformed field ({exc})") from None
        record.validate(source)
        return record

    def validate(self, source: str | Path = "model.json") -> None:
        """Refuse values that would crash later or silently give wrong probabilities."""
        if self.arch not in models.names():
            raise BloodcellError(f"{source}: unknown architecture {self.arch!r}")
        if not all(isinstance(c, str) and c and len(c) <= 64 and c.isprintable() for c in self.classes):
            raise BloodcellError(f"{source}: class names must be printable strings of 1 to 64 characters")
        if len(self.classes) < 2 or len(set(self.classes)) != len(self.classes):
            raise BloodcellError(f"{source}: classes must be at least two distinct names")
        if not all(isinstance(w, str) for w in self.warnings):
            raise BloodcellError(f"{source}: warnings must be a list of strings")
        reserved = sorted({"image_size", "num_classes", "name"} & set(self.arch_args))
        if reserved:
            raise BloodcellError(f"{source}: arch_args may not set {', '.join(reserved)} (they come from the record)")
        p = self.preprocessing
        if not _is_int(p.image_size) or not 8 <= p.image_size <= 1024:
            raise BloodcellError(f"{source}: image_size must be a whole number from 8 to 1024, got {p.image_size!r}")
        for name, values in (("mean", p.mean), ("std", p.std)):
            if not (isinstance(values, (list, tuple)) and len(values) == 3 and all(map(_is_finite, values))):
                raise BloodcellError(f"{source}: normalisation {name} must be three finite numbers, got {values!r}")
        if min(p.std) <= 0:
            raise BloodcellError(f"{source}: normalisation std must be positive, got {p.std!r}")
        target = p.colour_target
        if target is not None and not (
            isinstance(target, (list, tuple))
            and len(target) == 6
            and all(map(_is_finite, target))
            and min(target[3:]) > 0
        ):
            raise BloodcellError(f"{source}: colour_target must be six finite numbers (Lab means, stds > 0)")
        if not isinstance(p.medmnist_filter, bool):
            raise BloodcellError(f"{source}: medmnist_filter must be true or false, got {p.medmnist_filter!r}")
        try:
            Crop.parse(p.crop)
        except BloodcellError:
            raise BloodcellError(f"{source}: unknown crop {p.crop!r}") from None
        if not (_is_finite(self.temperature) and self.temperature > 0):
            raise BloodcellError(f"{source}: temperature must be a positive number, got {self.temperature!r}")
        if self.ood_threshold is not None and not (_is_finite(self.ood_threshold) and self.ood_threshold > 0):
            raise BloodcellError(f"{source}: ood_threshold must be a positive number, got {self.ood_threshold!r}")
        try:  # bounded arguments, and a network of bounded size: built on the meta device, no memory
            models.footprint(self.arch, p.image_size, num_classes=len(self.classes), **self.arch_args)
        except BloodcellError as exc:
            raise BloodcellError(f"{source}: {exc}") from None

    def describe(self) -> str:
        """What `bloodcell info RUN` prints: the model, what it was trained on, its headline scores."""
        p = self.preprocessing
        lines = [
            f"model       {self.arch}, {p.image_size} px, crop {p.crop}"
            + (", Lab colour normalisation" if p.colour_target else ""),
            f"classes     {', '.join(self.classes)}",
            f"trained on  {Path(str(self.data.get('file', '?'))).name} (MD5 {self.data.get('md5', '?')})"
            + ("" if self.data.get("bloodmnist", True) else " (its images not trained on: lab folders alone)"),
        ]
        for lab in self.data.get("labs", []):
            per_class = ", ".join(f"{name} {n}" for name, n in lab.get("per_class", {}).items())
            lines.append(
                f"            {lab.get('name')}: {lab.get('images')} images ({per_class}) in {lab.get('groups')} "
                f"groups; trained on {lab.get('trained_on')}, held out {lab.get('held_out')}"
            )
        if self.train_seconds:
            lines.append(f"training    {self.train_seconds / 60:.1f} min, bloodcell {self.bloodcell_version}")
        for split, values in self.metrics.items():
            flagged = values.get("flagged_fraction")
            lines.append(
                f"{split:<11} accuracy {values.get('accuracy', float('nan')):.4f}"
                + (f", {flagged:.1%} flagged for review" if flagged is not None else "")
            )
        lines += [f"warning     {w}" for w in self.warnings]
        return "\n".join(lines)

    def with_temperature(self, temperature: float) -> RunRecord:
        return replace(self, temperature=float(temperature))


def _strings(values, name: str, source) -> tuple[str, ...]:
    if not isinstance(values, (list, tuple)) or not all(isinstance(v, str) for v in values):
        raise BloodcellError(f"{source}: {name} must be a list of strings, got {type(values).__name__}")
    return tuple(values)


def _tuple(values):
    return tuple(values) if isinstance(values, (list, tuple)) else values


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _as_dict(value, name: str, source) -> dict:
    if not isinstance(value, dict):
        raise BloodcellError(f"{source}: {name} must be a JSON object, got {type(value).__name__}")
    return value


def _upgrade_v1(values: dict, source) -> dict:
    """The first release's layout: image_size and normalize at the top, crop implied."""
    try:
        norm = _as_dict(values["normalize"], "normalize", source)
        preprocessing = {"image_size": values["image_size"], "mean": norm["mean"], "std": norm["std"]}
    except KeyError as exc:
        raise BloodcellError(f"{source}: missing field {exc}") from None
    upgraded = {k: v for k, v in values.items() if k not in ("normalize", "image_size")}
    return upgraded | {"preprocessing": preprocessing}


# ---------------------------------------------------------------- reading and writing a run


def is_run_dir(path: str | Path) -> bool:
    return (Path(path) / MODEL_META).is_file() and (Path(path) / MODEL_WEIGHTS).is_file()


def digest(run_dir: str | Path) -> str:
    """SHA-256 of the run's weights and record: two outputs with the same digest came from one model."""
    hasher = hashlib.sha256()
    for name in (MODEL_WEIGHTS, MODEL_META):
        with open(Path(run_dir) / name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                hasher.update(chunk)
    return hasher.hexdigest()


def looks_like_run(path: str | Path) -> bool:
    """A folder holding any file only a run has: a finished run, or a damaged or unfinished one."""
    path = Path(path)
    return path.is_dir() and any(
        (path / name).exists() for name in (MODEL_META, MODEL_WEIGHTS, OOD_WEIGHTS, CHECKPOINT)
    )


def read_record(run_dir: str | Path) -> RunRecord:
    run_dir = Path(run_dir)
    if not is_run_dir(run_dir):
        missing = [name for name in (MODEL_META, MODEL_WEIGHTS) if not (run_dir / name).is_file()]
        if looks_like_run(run_dir):
            raise BloodcellError(f"{printable(run_dir)}: a damaged or unfinished run (no {' or '.join(missing)})")
        raise BloodcellError(f"{printable(run_dir)}: not a bloodcell run directory (no {MODEL_META} / {MODEL_WEIGHTS})")
    return RunRecord.from_json(read_json(run_dir / MODEL_META), run_dir / MODEL_META)


def read_weights(run_dir: str | Path) -> dict[str, torch.Tensor]:
    """The weights, refused if any value is NaN or infinite (they would give NaN probabilities)."""
    path = Path(run_dir) / MODEL_WEIGHTS
    weights = load_tensors(path)
    for name, tensor in weights.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise BloodcellError(f"{path}: weight {name} has NaN or infinite values")
    return weights


def read_ood(run_dir: str | Path, record: RunRecord) -> dict[str, torch.Tensor] | None:
    """The out-of-distribution model's tensors, if the record has a threshold: finite, and shaped
    for this network (class centres of its feature size, a square precision matrix)."""
    if record.ood_threshold is None:
        return None
    path = Path(run_dir) / OOD_WEIGHTS
    tensors = load_tensors(path)
    if {"means", "precision", "threshold"} - set(tensors) or not all(torch.isfinite(t).all() for t in tensors.values()):
        raise BloodcellError(f"{path}: not a valid out-of-distribution model (missing or non-finite values)")
    means, precision, threshold = tensors["means"], tensors["precision"], tensors["threshold"]
    features = models.feature_size(record.arch, record.image_size, num_classes=len(record.classes), **record.arch_args)
    if means.ndim != 2 or not 1 <= len(means) <= len(record.classes) or means.shape[1] != features:
        raise BloodcellError(f"{path}: class centres of shape {tuple(means.shape)} do not fit this network's "
                             f"{features} features and {len(record.classes)} classes")  # fmt: skip
    if tuple(precision.shape) != (features, features) or threshold.numel() != 1:
        raise BloodcellError(f"{path}: precision of shape {tuple(precision.shape)} does not fit {features} features")
    return tensors


def write_model(
    run_dir: str | Path,
    record: RunRecord,
    weights: dict[str, torch.Tensor],
    ood: dict[str, torch.Tensor] | None = None,
) -> None:
    """Tensors first, then the record: a folder with model.json is always a complete model."""
    save_tensors(Path(run_dir) / MODEL_WEIGHTS, weights)
    if ood is not None:
        save_tensors(Path(run_dir) / OOD_WEIGHTS, ood)
    write_json(Path(run_dir) / MODEL_META, record.to_json())


def check_run_dir(path: str | Path, overwrite: bool = False, resume: bool = False) -> None:
    """Refuse, touching nothing, what `prepare_run_dir` would refuse (so the CLI can fail before
    loading or downloading any data)."""
    path = Path(path)
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise BloodcellError(f"{printable(path)}: exists and is not a folder")
    if resume:
        if not is_run_dir(path) and not (path / CHECKPOINT / "state.json").is_file():
            raise BloodcellError(f"{printable(path)}: nothing to resume (no {CHECKPOINT}/state.json); drop --resume")
        return
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise BloodcellError(
                f"{printable(path)}: run directory exists and is not empty; use --overwrite or --resume"
            )
        if not _marked_as_run(path):
            raise BloodcellError(
                f"{printable(path)}: not a bloodcell run (no readable {MODEL_META} or {CHECKPOINT}/state.json); "
                "refusing to delete it"
            )
        foreign = _foreign_entries(path)
        if foreign:
            shown = ", ".join(printable(p.relative_to(path)) for p in foreign[:3]) + (
                ", ..." if len(foreign) > 3 else ""
            )
            raise BloodcellError(
                f"{printable(path)}: holds files bloodcell did not write ({shown}); refusing to delete it"
            )
    check_writable(path / MODEL_META)


def prepare_run_dir(path: str | Path, overwrite: bool = False, resume: bool = False) -> Path:
    """Create a run directory, refusing to touch anything the user did not ask to replace.

    `resume` needs a checkpoint to continue from; `overwrite` replaces only a bloodcell run (or a
    started one, holding its checkpoint) whose every file is one bloodcell writes, never a folder
    holding anything else.
    """
    path = Path(path)
    check_run_dir(path, overwrite, resume)
    try:
        if not resume and path.is_dir() and any(path.iterdir()):
            shutil.rmtree(path)
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BloodcellError(f"{printable(path)}: cannot prepare the run folder ({exc.strerror or exc})") from None
    return path


def _marked_as_run(path: Path) -> bool:
    """The folder carries a record or a checkpoint that reads as bloodcell's (names alone are not enough)."""
    for marker, required in (
        (path / MODEL_META, {"arch", "classes"}),
        (path / CHECKPOINT / "state.json", {"epoch", "tensors", "config"}),
    ):
        try:
            values = read_json(marker) if marker.is_file() else None
        except BloodcellError:
            continue
        if isinstance(values, dict) and required <= set(values):
            return True
    return False


def _foreign_entries(path: Path) -> list[Path]:
    """Entries of a run folder that no bloodcell command writes there."""

    def ours(entry: Path, names: tuple[str, ...], patterns: tuple[str, ...]) -> bool:
        if entry.is_symlink():
            return False
        if entry.name in names:
            return entry.is_file() or (entry.name == CHECKPOINT and entry.is_dir())
        return entry.is_file() and any(fnmatch.fnmatchcase(entry.name, p) for p in patterns)

    foreign = [e for e in sorted(path.iterdir()) if not ours(e, RUN_FILES, RUN_PATTERNS)]
    checkpoint = path / CHECKPOINT
    if checkpoint.is_dir() and not checkpoint.is_symlink():
        foreign += [e for e in sorted(checkpoint.iterdir()) if not ours(e, (), CHECKPOINT_PATTERNS)]
    return foreign
