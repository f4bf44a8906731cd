"""Shared fixtures. Two lanes:

- fast (`pytest -m "not slow"`): synthetic data and tiny models, well under a minute;
- slow (`pytest -m slow`): the real BloodMNIST data, real models, the real CLI end to end.

Tests that use the real data are marked slow automatically (any test using `real_data_dir`).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest

from bloodcell.classes import CLASSES
from bloodcell.datasets import bloodmnist

REPO = Path(__file__).resolve().parents[1]
REAL_FIXTURES = {"real_data_dir", "real_dataset", "real_subset_file", "real_run", "pbc_sample", "ood_dev"}


def pytest_collection_modifyitems(items):
    for item in items:
        if REAL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def _real_data_dir() -> Path:
    return Path(os.environ.get(bloodmnist.DATA_DIR_ENV) or REPO.parent / "shared" / "data").resolve()


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    """The folder with the official bloodmnist.npz; in CI its absence is a failure, not a skip."""
    folder = _real_data_dir()
    if not (folder / "bloodmnist.npz").is_file():
        message = f"real BloodMNIST data not found in {folder} (set {bloodmnist.DATA_DIR_ENV})"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return folder


@pytest.fixture(scope="session")
def real_dataset(real_data_dir):
    return bloodmnist.load(real_data_dir)


def write_synthetic_npz(path: Path, size: int = 28, n: tuple[int, int, int] = (64, 16, 16), seed: int = 0) -> Path:
    """A BloodMNIST-format file: each class is a coloured blob so that models can learn it."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, count in zip(bloodmnist.SPLITS, n):
        labels = np.arange(count) % len(CLASSES)
        images = rng.integers(0, 60, size=(count, size, size, 3), dtype=np.uint8)
        for i, label in enumerate(labels):
            images[i, : size // 2, :, label % 3] += np.uint8(150)
            images[i, :, : size // 2, (label // 3) % 3] += np.uint8(40 * (label % 4))
        arrays[f"{split}_images"] = images
        arrays[f"{split}_labels"] = labels.reshape(-1, 1).astype(np.uint8)
    np.savez(path, **arrays)
    return path


@pytest.fixture(scope="session")
def synthetic_file(tmp_path_factory) -> Path:
    return write_synthetic_npz(tmp_path_factory.mktemp("synthetic") / "bloodmnist_synthetic.npz", n=(128, 32, 32))


@pytest.fixture(scope="session")
def synthetic_run(synthetic_file, tmp_path_factory) -> Path:
    """A finished run trained for two epochs on the synthetic data (a few seconds)."""
    from bloodcell.training.recipe import PRESETS, with_overrides
    from bloodcell.workflows.pipeline import train_run

    run_dir = tmp_path_factory.mktemp("runs") / "synthetic"
    config = with_overrides(PRESETS["fast"], epochs=2, batch_size=32)
    train_run(bloodmnist.load_npz(synthetic_file), run_dir, config, progress=False)
    return run_dir


@pytest.fixture(scope="session")
def cell_images(tmp_path_factory) -> list[Path]:
    """A few synthetic 'microscope' files in several formats and sizes."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("cells")
    rng = np.random.default_rng(1)
    paths = []
    for i, (size, suffix) in enumerate([((360, 363), ".jpg"), ((200, 200), ".png"), ((90, 120), ".bmp")]):
        path = folder / f"cell_{i}{suffix}"
        Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="session")
def real_subset_file(real_data_dir, tmp_path_factory) -> Path:
    """A small BloodMNIST-format file cut from the real data (first 600/200/300 of each split)."""
    path = tmp_path_factory.mktemp("subset") / "bloodmnist_subset.npz"
    with np.load(real_data_dir / "bloodmnist.npz") as full:
        cut = {"train": 600, "val": 200, "test": 300}
        np.savez(path, **{f"{s}_{k}": full[f"{s}_{k}"][:n] for s, n in cut.items() for k in ("images", "labels")})
    return path


@pytest.fixture(scope="session")
def real_run(real_data_dir, tmp_path_factory) -> Path:
    """A model trained by the real CLI on the full real data: the fast preset cut to 6 epochs
    (about 2 minutes on 2 AVX2 cores). The full recipes' accuracy is measured by the benchmarks."""
    from tests.cli import run_cli

    run_dir = tmp_path_factory.mktemp("real") / "run"
    run_cli("train", "--data-dir", real_data_dir, "--preset", "fast", "--epochs", "6", "--out", run_dir)
    return run_dir


@pytest.fixture(scope="session")
def pbc_sample(real_data_dir) -> list[dict]:
    """The 400 full-size PBC images with their class and BloodMNIST training index."""
    root = real_data_dir / "pbc_sample"
    with open(root / "labels.csv") as f:
        rows = list(csv.DictReader(f))
    # labels.csv spells classes with underscores; use the integer label for the class name
    return [{**r, "path": root / r["file"], "class": CLASSES[int(r["label"])]} for r in rows]
