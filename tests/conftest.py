"""Shared fixtures: the real data (must exist in CI) and small synthetic npz files."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from bloodcell import data

REPO = Path(__file__).resolve().parents[1]


def _real_data_dir() -> Path:
    return Path(os.environ.get(data.DATA_DIR_ENV) or REPO.parent / "shared" / "data").resolve()


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    """The folder with the official bloodmnist.npz; in CI its absence is a failure, not a skip."""
    folder = _real_data_dir()
    if not (folder / "bloodmnist.npz").is_file():
        message = f"real BloodMNIST data not found in {folder} (set {data.DATA_DIR_ENV})"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return folder


@pytest.fixture(scope="session")
def real_dataset(real_data_dir):
    return data.load(real_data_dir)


def write_synthetic_npz(path: Path, size: int = 28, n: tuple[int, int, int] = (64, 16, 16), seed: int = 0) -> Path:
    """A BloodMNIST-format file: each class is a coloured blob so that models can learn it."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, count in zip(data.SPLITS, n):
        labels = np.arange(count) % len(data.CLASSES)
        images = rng.integers(0, 60, size=(count, size, size, 3), dtype=np.uint8)
        for i, label in enumerate(labels):
            images[i, : size // 2, :, label % 3] += np.uint8(150)
            images[i, :, : size // 2, (label // 3) % 3] += np.uint8(40 * (label % 4))
        arrays[f"{split}_images"] = images
        arrays[f"{split}_labels"] = labels.reshape(-1, 1).astype(np.uint8)
    np.savez(path, **arrays)
    return path


@pytest.fixture(scope="session")
def real_subset_file(real_data_dir, tmp_path_factory) -> Path:
    """A small BloodMNIST-format file cut from the real data (first 600/200/300 of each split)."""
    path = tmp_path_factory.mktemp("subset") / "bloodmnist_subset.npz"
    with np.load(real_data_dir / "bloodmnist.npz") as full:
        cut = {"train": 600, "val": 200, "test": 300}
        np.savez(path, **{f"{s}_{k}": full[f"{s}_{k}"][:n] for s, n in cut.items() for k in ("images", "labels")})
    return path


@pytest.fixture(scope="session")
def default_run(real_data_dir, tmp_path_factory) -> Path:
    """The recommended recipe, unshortened, on the full real data (~5 min): the model users get,
    so the real-image targets are checked on it; shared by the predict/explain/report/serve tests.
    (A 16-epoch res-small missed the 0.5-point file-vs-twin accuracy target: 1.0 points.)"""
    from bloodcell.pipeline import train_run
    from bloodcell.train import PRESETS

    run_dir = tmp_path_factory.mktemp("default") / "run"
    train_run(data.load(real_data_dir), run_dir, PRESETS["default"], progress=False)
    return run_dir


@pytest.fixture(scope="session")
def pbc_sample(real_data_dir) -> list[dict]:
    """The 400 full-size PBC images with their class and BloodMNIST training index."""
    import csv

    root = real_data_dir / "pbc_sample"
    with open(root / "labels.csv") as f:
        rows = list(csv.DictReader(f))
    # labels.csv spells classes with underscores; use the integer label for the class name
    return [{**r, "path": root / r["file"], "class": data.CLASSES[int(r["label"])]} for r in rows]
