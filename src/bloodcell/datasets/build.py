"""BloodMNIST at other sizes, rebuilt from the PBC source images with the official split and order.

MedMNIST made BloodMNIST by centre-cropping the PBC images (Acevedo et al. 2020) to 200 x 200
px and resizing them to 28 x 28. The larger MedMNIST+ files are not always reachable, but the
PBC images are public. `build` renders every source file the way `predict` renders a full-size
image (the MedMNIST crop, then PIL's antialiased bilinear resize), finds the official 28 px
image each one became (nearest neighbour over all 17,092, after the fitted MedMNIST filter; the
labels must agree), and writes `bloodmnist_{size}.npz` with the official split membership and
order: test image i at 64 px is test image i at 28 px. Every file gets a provenance row; a slot
that no file fills, or a file that matches badly or ambiguously, is reported, never filled
silently, and without `partial=True` nothing is written unless every slot is filled.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from bloodcell import runs
from bloodcell.classes import CLASSES, class_named
from bloodcell.datasets import bloodmnist
from bloodcell.errors import BloodcellError
from bloodcell.files import atomic_path, write_csv
from bloodcell.images import crops, decode

MAX_RMS = 15.0  # grey levels: a true match is about 6.5 (at most 8.4 on pbc_sample); others are 19+ away
MIN_RATIO = 1.4  # the second-best distinct image must be this many times further away (near-blank
# platelet images are the closest pairs: 5.3 vs 9.6 on pbc_sample)


@dataclass(frozen=True)
class SourceImage:
    path: Path
    label: int
    digest: str  # of the file's bytes: byte-identical duplicates share it


def find_sources(pbc_dir: Path) -> tuple[list[SourceImage], list[dict]]:
    """The PBC images by class folder, and one problem row per file or folder that is not one."""
    pbc_dir = Path(pbc_dir)
    if not pbc_dir.is_dir():
        raise BloodcellError(f"{pbc_dir}: not a folder (expected PBC_dataset_normal_DIB/<class>/*.jpg)")
    sources, problems = [], []
    for folder in sorted(p for p in pbc_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        name = class_named(folder.name)
        if name is None:
            problems.append({"file": str(folder), "status": "unknown class folder"})
            continue
        for path in sorted(folder.iterdir()):
            if path.name.startswith("."):
                problems.append({"file": str(path), "status": "hidden file, skipped"})
            elif path.suffix.lower() not in decode.IMAGE_SUFFIXES or not path.is_file():
                problems.append({"file": str(path), "status": "not an image file, skipped"})
            else:
                digest = hashlib.sha1(path.read_bytes()).hexdigest()
                sources.append(SourceImage(path, CLASSES.index(name), digest))
    missing = sorted(set(CLASSES) - {CLASSES[s.label] for s in sources})
    for name in missing:
        problems.append({"file": str(pbc_dir / name), "status": "class folder missing"})
    if not sources:
        raise BloodcellError(f"{pbc_dir}: no images in class folders (expected {pbc_dir}/<class>/*.jpg)")
    return sources, problems


def _render(source: SourceImage, sizes: tuple[int, ...]) -> dict[int, np.ndarray] | str:
    """The file at 28 px (MedMNIST-filtered, for matching) and at each size, or why it cannot be read."""
    try:
        image = decode.open_image(source.path)
    except decode.ImageError as exc:
        return str(exc)
    crop = runs.Crop.parse("medmnist")
    return {size: crops.prepare(image, size, crop, emulate=size == 28) for size in (28, *sizes)}


def render_all(sources: list[SourceImage], sizes: tuple[int, ...], progress: bool = True) -> list:
    workers = min(8, (os.cpu_count() or 2) * 2)
    with ThreadPoolExecutor(workers) as pool:
        renders = pool.map(lambda s: _render(s, sizes), sources)
        return list(tqdm(renders, total=len(sources), desc="rendering", unit="img", disable=not progress))


def nearest_two(queries: np.ndarray, reference: np.ndarray, block: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """For each query row: RMS distance (grey levels) to every reference row's nearest and the
    indices, as (N, 2) arrays of [best, second best]."""
    ref = reference.reshape(len(reference), -1).astype(np.float32)
    ref_norms = (ref**2).sum(1)
    dims = ref.shape[1]
    distances, indices = [], []
    for start in range(0, len(queries), block):
        q = queries[start : start + block].reshape(-1, dims).astype(np.float32)
        squared = (q**2).sum(1)[:, None] - 2 * q @ ref.T + ref_norms[None]
        order = np.argsort(squared, axis=1)[:, :2]
        distances.append(np.sqrt(np.maximum(np.take_along_axis(squared, order, 1), 0) / dims))
        indices.append(order)
    return np.concatenate(distances), np.concatenate(indices)


def build(
    pbc_dir: Path,
    official: bloodmnist.Dataset,
    sizes: tuple[int, ...],
    out_dir: Path,
    partial: bool = False,
    progress=True,
) -> dict:
    """Match, report and (if complete, or `partial`) write the npz files and the provenance CSV."""
    if official.image_size != 28 or not official.official:
        raise BloodcellError("build-data matches against the official 28 px bloodmnist.npz; point --data-dir at it")
    sizes = tuple(sorted(set(sizes)))
    bad_sizes = [s for s in sizes if s not in (64, 128, 224)]
    if bad_sizes:
        raise BloodcellError(f"--size must be 64, 128 or 224, got {bad_sizes}")
    sources, rows = find_sources(pbc_dir)
    renders = render_all(sources, sizes, progress)

    slots = [(split, i) for split in bloodmnist.SPLITS for i in range(len(official.split(split)))]
    slot_images = np.concatenate([official.split(s).images.permute(0, 2, 3, 1).numpy() for s in bloodmnist.SPLITS])
    slot_labels = np.concatenate([official.split(s).labels.numpy() for s in bloodmnist.SPLITS])
    # slots with identical pixels (the dataset's own duplicates) form one group
    group_of = {}
    slot_group = np.array([group_of.setdefault(img.tobytes(), len(group_of)) for img in slot_images])

    readable = [i for i, r in enumerate(renders) if not isinstance(r, str)]
    for i, r in enumerate(renders):
        if isinstance(r, str):
            rows.append({"file": str(sources[i].path), "status": f"unreadable: {r}"})
    distances, nearest = nearest_two(np.stack([renders[i][28] for i in readable]), slot_images)

    # distinct second best: if the runner-up is an identical copy of the best, look one further
    claims: dict[int, list[int]] = defaultdict(list)  # slot group -> source indices
    status: dict[int, dict] = {}
    best_slot: dict[int, int] = {}
    for row, i in enumerate(readable):
        best, second = nearest[row]
        margin = distances[row, 1] - distances[row, 0]
        if slot_group[second] == slot_group[best]:
            margin = float("inf")  # only identical images are closer than the rest
        entry = {"distance": round(float(distances[row, 0]), 3), "margin": round(float(margin), 3)}
        best_slot[i] = best
        if distances[row, 0] > MAX_RMS:
            entry["status"] = "unmatched"
        elif distances[row, 1] < MIN_RATIO * distances[row, 0] and slot_group[second] != slot_group[best]:
            entry["status"] = "ambiguous"
        else:
            entry["status"] = "matched"
            claims[slot_group[best]].append(i)
        status[i] = entry

    # hand each group's slots to the files that claimed it, labels agreeing
    filled: dict[int, int] = {}  # slot index -> source index
    for group, claimants in claims.items():
        members = list(np.flatnonzero(slot_group == group))
        for i in sorted(claimants, key=lambda k: str(sources[k].path)):
            same_label = [m for m in members if slot_labels[m] == sources[i].label]
            if not same_label:
                status[i]["status"] = "label mismatch" if members else "duplicate with no slot left"
                continue
            filled[same_label[0]] = i
            members.remove(same_label[0])
    # an ambiguous file (a near-duplicate image nearby) whose best slot nobody else filled takes it
    ambiguous = sorted(
        (i for i, e in status.items() if e["status"] == "ambiguous"), key=lambda i: status[i]["distance"]
    )
    for i in ambiguous:
        slot = best_slot[i]
        if slot not in filled and slot_labels[slot] == sources[i].label:
            filled[slot] = i
            status[i]["status"] = "matched by elimination"
    for slot, i in filled.items():
        status[i] |= {"split": slots[slot][0], "index": slots[slot][1]}
    for i, entry in status.items():
        if entry["status"].startswith("matched") and "split" not in entry:
            entry["status"] = "duplicate with no slot left"
        rows.append({"file": str(sources[i].path), **entry})

    empty = [slots[s] for s in range(len(slots)) if s not in filled]
    summary = {
        "source": str(Path(pbc_dir).resolve()),
        "files": len(sources),
        "slots": len(slots),
        "filled": len(filled),
        "empty_slots": len(empty),
        "problems": sum(not r.get("status", "").startswith("matched") for r in rows),
        "by_elimination": sum(r.get("status") == "matched by elimination" for r in rows),
        "complete": not empty,
        "sizes": list(sizes),
    }
    out_dir = Path(out_dir)
    columns = ["file", "split", "index", "distance", "margin", "status"]
    provenance = write_csv(
        out_dir / "bloodmnist_build.csv", [{c: r.get(c, "") for c in columns} for r in sorted(rows, key=str)]
    )
    summary["provenance"] = str(provenance)
    if empty and not partial:
        summary["written"] = []
        return summary
    summary["written"] = [
        str(_write_npz(out_dir, size, renders, filled, slots, slot_labels, summary)) for size in sizes
    ]
    return summary


def _write_npz(out_dir: Path, size: int, renders, filled: dict, slots, slot_labels, summary: dict) -> Path:
    arrays = {}
    for split in bloodmnist.SPLITS:
        members = [s for s in range(len(slots)) if slots[s][0] == split and s in filled]
        images = [renders[filled[s]][size] for s in members]
        arrays[f"{split}_images"] = np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8)
        arrays[f"{split}_labels"] = slot_labels[members].reshape(-1, 1).astype(np.uint8)
    arrays[bloodmnist.BUILD_KEY] = np.array(json.dumps({k: v for k, v in summary.items() if k != "written"}))
    path = out_dir / f"bloodmnist_{size}.npz"
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)  # uncompressed: JPEG-derived pixels barely compress, and loading is 10x faster
    return path
