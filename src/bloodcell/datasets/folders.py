"""Labelled folders of a lab's own images: DIR/<class>/*.jpg, one sub-folder per class."""

from __future__ import annotations

from pathlib import Path

from bloodcell.classes import CLASS_ALIASES, class_named
from bloodcell.errors import BloodcellError
from bloodcell.images.decode import find_images


def labelled_folders(folders, classes: tuple[str, ...]) -> tuple[list[Path], list[int], dict[str, int]]:
    """Image files under `folder/<class>/` for each folder, pooled, with their class index, and the
    number of images per class.

    Folder names are matched to `classes` case-insensitively, with aliases (`ig`, `NEUTROPHIL`,
    `basophils` ...); an unknown name is a one-line error listing what is understood.
    """
    files, labels, counts = [], [], {}
    for folder in map(Path, folders):
        found = _labelled_folder(folder, classes, counts)
        files += found[0]
        labels += found[1]
    if not files:
        shown = ", ".join(map(str, folders))
        raise BloodcellError(f"{shown}: no images in class sub-folders (expected DIR/<class>/*.jpg ...)")
    return files, labels, counts


def _labelled_folder(folder: Path, classes: tuple[str, ...], counts: dict[str, int]) -> tuple[list[Path], list[int]]:
    if not folder.is_dir():
        raise BloodcellError(f"{folder}: not a folder of class sub-folders")
    files, labels = [], []
    unknown = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        name = class_named(sub.name)
        if name is None or name not in classes:
            unknown.append(sub.name)
            continue
        found = find_images([sub])
        counts[name] = counts.get(name, 0) + len(found)
        files += found
        labels += [classes.index(name)] * len(found)
    if unknown:
        known = "; ".join(f"{c} ({', '.join(CLASS_ALIASES.get(c, ()))})" for c in classes)
        raise BloodcellError(
            f"{folder}: unknown class folder(s) {', '.join(map(repr, unknown))}; known names and aliases: {known}"
        )
    return files, labels
