"""Labelled cells from other labs, to train on beside BloodMNIST.

A lab folder is `DIR/<class>/<images>`, the layout `evaluate --images` reads. An optional
`manifest.csv` beside the class folders (columns `file`, `class`, `group`) says which images must
stay together on one side of a split: the shifted copies of one cell, the frames of one slide.
Without one, every image is its own group.

Every image is framed exactly as `predict` will frame images at run time (the run's crop, image
size and MedMNIST filter, through `crops.prepare_framed`) and kept as a uint8 tensor like the rest
of the training data. Problems are reported one line each (an empty class folder, an unreadable
file, images where no white cell was found), and a class none of whose images can be used is an
error, never a silent skip.
"""

from __future__ import annotations

import csv
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from bloodcell.classes import CLASSES, class_named
from bloodcell.datasets.bloodmnist import Split
from bloodcell.datasets.folders import labelled_folders
from bloodcell.errors import BloodcellError
from bloodcell.files import printable
from bloodcell.images import crops, decode
from bloodcell.runs import Crop

MANIFEST = "manifest.csv"
SPLIT_SEED = 0  # the held-out groups are the same for every training seed: seeds vary the training only


@dataclass(frozen=True)
class LabImages:
    """One lab's labelled cells as model input, with the group of each image and what went wrong."""

    name: str
    folder: str
    images: torch.Tensor  # uint8 (N, 3, H, W)
    labels: torch.Tensor  # int64 (N,), indices into CLASSES
    groups: tuple[str, ...]
    files: tuple[str, ...]
    problems: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> LabImages:
        keep = index.tolist()
        return LabImages(
            self.name,
            self.folder,
            self.images[index],
            self.labels[index],
            tuple(self.groups[i] for i in keep),
            tuple(self.files[i] for i in keep),
            self.problems,
        )

    def split(self) -> Split:
        return Split(self.images, self.labels)

    def class_counts(self) -> dict[str, int]:
        counts = Counter(CLASSES[k] for k in self.labels.tolist())
        return {name: counts[name] for name in CLASSES if counts[name]}

    def describe(self) -> str:
        per_class = ", ".join(f"{name} {n}" for name, n in self.class_counts().items())
        return f"{self.name}: {len(self)} images ({per_class}) in {len(set(self.groups))} groups"


def read_lab(folder: str | Path, size: int, crop: str, progress: bool = False) -> LabImages:
    """A lab folder's images framed for a run of `size` px with `crop`; problems one line each."""
    folder = Path(folder)
    files, labels, counts = labelled_folders([folder], CLASSES)
    name = folder.resolve().name
    problems = [
        f"{printable(sub)}: empty class folder"
        for sub in sorted(p for p in folder.iterdir() if p.is_dir() and class_named(p.name))
        if not decode.find_images([sub])
    ]
    groups = groups_of(folder, files)
    framing, _ = crops.measured(Crop.parse(crop), files)  # 'cell:measure': this lab's magnification

    def framed(path: Path):
        try:
            return crops.prepare_framed(decode.open_image(path), size, framing)
        except decode.ImageError as exc:
            return str(exc)

    workers = min(8, (os.cpu_count() or 2) * 2)
    with ThreadPoolExecutor(workers) as pool:
        results = list(tqdm(pool.map(framed, files), total=len(files), desc=f"framing {name}", disable=not progress))
    kept, unfound = [], Counter()
    for path, label, result in zip(files, labels, results):
        if isinstance(result, str):
            problems.append(f"{printable(path)}: {result}; left out")
            continue
        if result[1] is not None and not result[1].found:
            unfound[CLASSES[label]] += 1  # kept: predict frames such an image the same way
        kept.append((path, label, result[0]))
    if unfound:
        shown = ", ".join(f"{c} {n}" for c, n in sorted(unfound.items()))
        problems.append(
            f"{name}: no white cell found in {sum(unfound.values())} images ({shown}); framed at the centre"
        )
    used = Counter(CLASSES[label] for _, label, _ in kept)
    lost = [c for c, n in counts.items() if n and not used[c]]
    if lost:
        raise BloodcellError(f"{folder}: none of the images of {', '.join(lost)} could be used ({problems[-1]})")
    return LabImages(
        name=name,
        folder=str(folder),
        images=torch.from_numpy(np.stack([pixels for _, _, pixels in kept])).permute(0, 3, 1, 2).contiguous(),
        labels=torch.tensor([label for _, label, _ in kept]),
        groups=tuple(groups[path] for path, _, _ in kept),
        files=tuple(str(path) for path, _, _ in kept),
        problems=tuple(problems),
    )


def groups_of(folder: Path, files: list[Path]) -> dict[Path, str]:
    """Each file's group from `manifest.csv` (relative `file` paths), else the file itself."""
    groups = {path: str(path.relative_to(folder)) for path in files}
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return groups
    try:
        with open(manifest, newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise BloodcellError(f"{manifest}: not a readable CSV file ({exc})") from None
    if rows and not {"file", "group"} <= set(rows[0]):
        raise BloodcellError(f"{manifest}: needs the columns file and group, has {', '.join(rows[0])}")
    named = {row["file"]: row["group"] for row in rows}
    for path in files:
        groups[path] = named.get(str(path.relative_to(folder)), groups[path])
    return groups


def hold_out_groups(lab: LabImages, share: float, seed: int = SPLIT_SEED) -> tuple[LabImages, LabImages]:
    """(training, held out): about `share` of each class's groups held out, at least one where a
    class has two or more groups, none where it has one; copies of one group never straddle."""
    rng = np.random.default_rng(seed)
    held: set[str] = set()
    for k in sorted(set(lab.labels.tolist())):
        class_groups = sorted({g for g, label in zip(lab.groups, lab.labels.tolist()) if label == k})
        rng.shuffle(class_groups)
        n_held = max(1, round(share * len(class_groups))) if len(class_groups) >= 2 and share > 0 else 0
        held |= set(class_groups[:n_held])
    is_held = torch.tensor([g in held for g in lab.groups])
    return lab.subset(torch.nonzero(~is_held).squeeze(1)), lab.subset(torch.nonzero(is_held).squeeze(1))


def provenance(lab: LabImages, trained_on: LabImages, held_out: LabImages) -> dict:
    """What the run record says about a lab it was trained on."""
    return {
        "name": lab.name,
        "folder": lab.folder,
        "images": len(lab),
        "groups": len(set(lab.groups)),
        "per_class": lab.class_counts(),
        "trained_on": len(trained_on),
        "held_out": len(held_out),
        "problems": list(lab.problems),
    }
