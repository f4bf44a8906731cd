"""BloodMNIST on disk -> validated uint8 tensors in memory.

The whole dataset is small (17,092 images), so it is held as one uint8 tensor per split
(N, 3, H, W); training indexes batches straight out of it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from bloodcell.classes import CLASSES
from bloodcell.errors import BloodcellError
from bloodcell.files import FILE_MODE

SPLITS: tuple[str, ...] = ("train", "val", "test")
OFFICIAL_SPLIT_SIZES = {"train": 11959, "val": 1712, "test": 3421}
BUILD_KEY = "bloodcell_build"  # extra array in files made by `bloodcell build-data`
MIN_IMAGE_SIZE = 8  # the residual models pool three times; smaller images cannot be trained on
DATA_DIR_ENV = "BLOODCELL_DATA_DIR"
DEFAULT_DATA_DIR = Path("~/.medmnist")  # the medmnist package's cache: reuse its downloads


@dataclass(frozen=True)
class OfficialFile:
    """One file MedMNIST publishes, with the MD5 it publishes for it."""

    name: str
    url: str
    md5: str


_PLUS = "https://zenodo.org/records/10519652/files/"
OFFICIAL_FILES: dict[int, OfficialFile] = {
    28: OfficialFile(
        "bloodmnist.npz",
        "https://zenodo.org/record/6496656/files/bloodmnist.npz?download=1",
        "7053d0359d879ad8a5505303e11de1dc",
    ),
    64: OfficialFile("bloodmnist_64.npz", _PLUS + "bloodmnist_64.npz?download=1", "2b94928a2ae4916078ca51e05b6b800b"),
    128: OfficialFile(
        "bloodmnist_128.npz", _PLUS + "bloodmnist_128.npz?download=1", "adace1e0ed228fccda1f39692059dd4c"
    ),
    224: OfficialFile(
        "bloodmnist_224.npz", _PLUS + "bloodmnist_224.npz?download=1", "b718ff6835fcbdb22ba9eacccd7b2601"
    ),
}


@dataclass(frozen=True)
class Split:
    """One split: uint8 images (N, 3, H, W) and int64 labels (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor | slice) -> Split:
        return Split(self.images[index], self.labels[index])

    def class_counts(self) -> list[int]:
        return torch.bincount(self.labels, minlength=len(CLASSES)).tolist()


@dataclass(frozen=True)
class Dataset:
    """The three splits plus where they came from (for provenance in every run)."""

    path: Path
    md5: str
    official: bool
    image_size: int
    train: Split
    val: Split
    test: Split
    build: dict | None = None  # for a file made by `bloodcell build-data`: its summary

    def split(self, name: str) -> Split:
        if name not in SPLITS:
            raise BloodcellError(f"unknown split {name!r}; choose one of {', '.join(SPLITS)}")
        return getattr(self, name)

    def provenance(self) -> dict:
        return {
            "file": str(self.path),
            "md5": self.md5,
            "official": self.official,
            "image_size": self.image_size,
            "split_sizes": {s: len(self.split(s)) for s in SPLITS},
            "build": self.build,
        }

    def describe_source(self) -> str:
        if self.official:
            return "official"
        if self.build is not None:
            state = "complete" if self.build.get("complete") else f"partial: {self.build.get('filled')} images"
            return f"built from the PBC images by bloodcell build-data, official split and order ({state})"
        return "NOT the official file"


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """`--data-dir` beats `$BLOODCELL_DATA_DIR` beats `~/.medmnist`."""
    chosen = data_dir or os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR
    return Path(chosen).expanduser()


def checked_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The data folder, checked: a folder the user named must exist (a typo is not silently created
    as an empty folder); only the default cache folder is created on first use."""
    folder = resolve_data_dir(data_dir)
    named = data_dir or os.environ.get(DATA_DIR_ENV)
    source = "--data-dir" if data_dir else f"${DATA_DIR_ENV}"
    if folder.exists() and not folder.is_dir():
        raise BloodcellError(f"{folder}: is a file, not a folder ({source if named else 'default data folder'})")
    if not folder.exists():
        if named:
            raise BloodcellError(f"{folder}: folder does not exist ({source})")
        folder.mkdir(parents=True, exist_ok=True)
    if not os.access(folder, os.R_OK | os.X_OK):
        raise BloodcellError(f"{folder}: permission denied")
    return folder


def official_file(size: int) -> OfficialFile:
    if size not in OFFICIAL_FILES:
        sizes = ", ".join(map(str, OFFICIAL_FILES))
        raise BloodcellError(f"no BloodMNIST file for image size {size}; choose one of {sizes}")
    return OFFICIAL_FILES[size]


def md5_of(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download(url: str, target: Path, md5: str) -> Path:
    """Download to a temporary file beside `target`, verify the MD5, then rename atomically.

    A failed or interrupted download leaves nothing at `target`.
    """
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {target.name}") as bar:
                for chunk in iter(lambda: response.read(1 << 20), b""):
                    out.write(chunk)
                    bar.update(len(chunk))
        got = md5_of(tmp)
        if got != md5:
            raise BloodcellError(f"{url}: downloaded file has MD5 {got}, expected {md5}")
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, target)
        return target
    except (urllib.error.URLError, OSError) as exc:
        raise BloodcellError(
            f"cannot download {target.name} ({exc}); download it from {url} "
            f"and put it at {target}, or point --data-dir / ${DATA_DIR_ENV} at a folder holding it"
        ) from None
    finally:
        tmp.unlink(missing_ok=True)


def _check_headers(path: Path) -> None:
    """Read every array's header before any data: a corrupt or hostile header cannot make us
    allocate more than the file holds (one declaring 214 TiB is refused here, in microseconds)."""
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            with archive.open(info) as f:
                version = np.lib.format.read_magic(f)
                read_header = (
                    np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                )
                shape, _, dtype = read_header(f)
            if dtype.hasobject:
                raise BloodcellError(f"{path}: {info.filename} holds Python objects (pickled data); refused")
            declared = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
            if declared > info.file_size:
                raise BloodcellError(
                    f"{path}: {info.filename} declares {declared:,} bytes but holds {info.file_size:,}: "
                    "truncated or corrupt"
                )


def _validate_split(path: Path, npz, split: str, size: int | None, partial: bool = False) -> Split:
    images, labels = npz[f"{split}_images"], npz[f"{split}_labels"]
    if (len(images) == 0 or len(labels) == 0) and not partial:
        raise BloodcellError(f"{path}: {split} split is empty")
    if images.dtype != np.uint8:
        raise BloodcellError(f"{path}: {split}_images has dtype {images.dtype}, expected uint8")
    if images.ndim != 4 or images.shape[3] != 3 or images.shape[1] != images.shape[2]:
        raise BloodcellError(f"{path}: {split}_images has shape {images.shape}, expected (N, H, H, 3)")
    if images.shape[1] < MIN_IMAGE_SIZE:
        raise BloodcellError(f"{path}: {split}_images are {images.shape[1]} px, at least {MIN_IMAGE_SIZE} px needed")
    if size is not None and images.shape[1] != size:
        raise BloodcellError(f"{path}: {split}_images are {images.shape[1]} px, expected {size} px")
    labels = labels.reshape(len(labels), -1) if len(labels) else labels.reshape(0, 1)
    if labels.shape[1] != 1 or labels.dtype.kind not in "iu":
        raise BloodcellError(f"{path}: {split}_labels has shape {labels.shape} / dtype {labels.dtype}")
    labels = labels[:, 0].astype(np.int64)
    if len(labels) != len(images):
        raise BloodcellError(f"{path}: {split} has {len(images)} images but {len(labels)} labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= len(CLASSES)):
        raise BloodcellError(f"{path}: {split}_labels outside 0..{len(CLASSES) - 1}")
    tensor = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    return Split(tensor, torch.from_numpy(labels))


def load_npz(path: str | os.PathLike, size: int | None = None, expected_md5: str | None = None) -> Dataset:
    """Load and validate a BloodMNIST-format npz; every problem is one BloodcellError line."""
    path = Path(path)
    if not path.is_file():
        raise BloodcellError(f"{path}: file not found" if not path.exists() else f"{path}: not a file")
    if not os.access(path, os.R_OK):
        raise BloodcellError(f"{path}: permission denied")
    if not zipfile.is_zipfile(path):
        raise BloodcellError(f"{path}: not an .npz file (no zip archive inside): truncated or corrupt")
    try:
        _check_headers(path)
        with np.load(path, allow_pickle=False) as npz:
            missing = [f"{s}_{k}" for s in SPLITS for k in ("images", "labels") if f"{s}_{k}" not in npz]
            if missing:
                raise BloodcellError(f"{path}: missing key(s) {', '.join(missing)}")
            build = _build_info(path, npz)
            partial = build is not None and not build.get("complete")
            splits = {s: _validate_split(path, npz, s, size, partial) for s in SPLITS}
    except BloodcellError:
        raise
    except (zipfile.BadZipFile, EOFError, ValueError, OSError) as exc:
        raise BloodcellError(f"{path}: not a readable .npz file, truncated or corrupt ({exc})") from None
    sizes = {s.images.shape[2] for s in splits.values()}
    if len(sizes) != 1:
        raise BloodcellError(f"{path}: splits have different image sizes {sorted(sizes)}")
    complete = build is None or build.get("complete")
    if expected_md5 is not None and complete:  # an official file name: its split sizes are known
        for name, split in splits.items():
            if len(split) != OFFICIAL_SPLIT_SIZES[name]:
                raise BloodcellError(f"{path}: {name} has {len(split)} images, expected {OFFICIAL_SPLIT_SIZES[name]}")
    md5 = md5_of(path)
    if expected_md5 is not None and md5 != expected_md5 and build is None:
        raise BloodcellError(
            f"{path}: MD5 {md5} does not match the official {expected_md5}; "
            "delete it to download a fresh copy, or use --data-file for your own file"
        )
    official = any(f.md5 == md5 for f in OFFICIAL_FILES.values())
    return Dataset(path, md5, official, sizes.pop(), **splits, build=build)


def _build_info(path: Path, npz) -> dict | None:
    """The summary `bloodcell build-data` stores in the files it writes, or None."""
    if BUILD_KEY not in npz:
        return None
    try:
        info = json.loads(str(npz[BUILD_KEY]))
    except (ValueError, TypeError):
        raise BloodcellError(f"{path}: {BUILD_KEY} is not valid JSON") from None
    if not isinstance(info, dict):
        raise BloodcellError(f"{path}: {BUILD_KEY} is not a JSON object")
    return info


def load(
    data_dir: str | os.PathLike | None = None,
    size: int = 28,
    data_file: str | os.PathLike | None = None,
) -> Dataset:
    """The dataset at `size` px: the official file (downloaded if missing) or `data_file`."""
    if data_file is not None:
        return load_npz(data_file, size=None)
    spec = official_file(size)
    path = checked_data_dir(data_dir) / spec.name
    if not path.exists():
        download(spec.url, path, spec.md5)
    return load_npz(path, size=size, expected_md5=spec.md5)
