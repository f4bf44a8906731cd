"""The data layer: data-dir resolution, validation of good and broken files, tensors out."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from bloodcell.datasets import bloodmnist
from bloodcell.errors import BloodcellError
from tests.conftest import write_synthetic_npz


def test_data_dir_resolution_order(monkeypatch, tmp_path):
    monkeypatch.setenv(bloodmnist.DATA_DIR_ENV, str(tmp_path / "env"))
    assert bloodmnist.resolve_data_dir(tmp_path / "opt") == tmp_path / "opt"
    assert bloodmnist.resolve_data_dir(None) == tmp_path / "env"
    monkeypatch.delenv(bloodmnist.DATA_DIR_ENV)
    assert bloodmnist.resolve_data_dir(None) == Path("~/.medmnist").expanduser()


def test_official_files_cover_all_sizes():
    assert set(bloodmnist.OFFICIAL_FILES) == {28, 64, 128, 224}
    assert bloodmnist.official_file(28).md5 == "7053d0359d879ad8a5505303e11de1dc"
    assert bloodmnist.official_file(64).name == "bloodmnist_64.npz"
    with pytest.raises(BloodcellError, match="image size 32"):
        bloodmnist.official_file(32)


def test_synthetic_file_loads_as_uint8_nchw(tmp_path):
    ds = bloodmnist.load_npz(write_synthetic_npz(tmp_path / "s.npz", size=64))
    assert ds.train.images.shape == (64, 3, 64, 64) and ds.train.images.dtype == torch.uint8
    assert ds.train.labels.dtype == torch.int64 and ds.image_size == 64
    assert not ds.official


def _broken(tmp_path: Path, **changes) -> Path:
    good = dict(np.load(write_synthetic_npz(tmp_path / "good.npz")))
    for key, value in changes.items():
        if value is None:
            del good[key]
        else:
            good[key] = value
    path = tmp_path / "broken.npz"
    np.savez(path, **good)
    return path


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"val_labels": None}, "missing key.*val_labels"),
        ({"train_images": np.zeros((64, 28, 28), np.uint8)}, "shape"),
        ({"train_images": np.zeros((64, 28, 28, 3), np.float32)}, "dtype float32"),
        ({"test_labels": np.full((16, 1), 9, np.uint8)}, "outside 0..7"),
        ({"test_labels": np.zeros((5, 1), np.uint8)}, "16 images but 5 labels"),
    ],
)
def test_bad_contents_give_one_line_error(tmp_path, changes, message):
    path = _broken(tmp_path, **changes)
    with pytest.raises(BloodcellError, match=message) as info:
        bloodmnist.load_npz(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_truncated_and_non_npz_files(tmp_path):
    good = write_synthetic_npz(tmp_path / "good.npz").read_bytes()
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good[: len(good) // 2])
    text = tmp_path / "text.npz"
    text.write_text("hello")
    for path in (truncated, text):
        with pytest.raises(BloodcellError, match="truncated or corrupt") as info:
            bloodmnist.load_npz(path)
        assert "pickled" not in str(info.value)


def test_a_header_declaring_terabytes_is_refused_before_reading(tmp_path):
    good = dict(np.load(write_synthetic_npz(tmp_path / "good.npz")))
    path = tmp_path / "huge.npz"
    with zipfile.ZipFile(path, "w") as archive:
        for key, array in good.items():
            if key == "train_images":
                with archive.open("train_images.npy", "w") as f:
                    header = {"descr": "|u1", "fortran_order": False, "shape": (2**40, 28, 28, 3)}
                    np.lib.format.write_array_header_1_0(f, header)
                    f.write(b"\0" * 100)
            else:
                with archive.open(f"{key}.npy", "w") as f:
                    np.lib.format.write_array(f, array)
    with pytest.raises(BloodcellError, match="declares .* bytes but holds"):
        bloodmnist.load_npz(path)


def test_empty_splits_and_tiny_images_are_named(tmp_path):
    path = _broken(tmp_path, val_images=np.zeros((0, 28, 28, 3), np.uint8), val_labels=np.zeros((0, 1), np.uint8))
    with pytest.raises(BloodcellError, match="val split is empty"):
        bloodmnist.load_npz(path)
    tiny = write_synthetic_npz(tmp_path / "tiny.npz", size=1)
    with pytest.raises(BloodcellError, match="1 px, at least 8 px"):
        bloodmnist.load_npz(tiny)


def test_data_dir_problems_are_one_line_errors(tmp_path, monkeypatch):
    a_file = tmp_path / "not_a_folder"
    a_file.write_text("x")
    monkeypatch.setenv(bloodmnist.DATA_DIR_ENV, str(a_file))
    with pytest.raises(BloodcellError, match="is a file, not a folder"):
        bloodmnist.load()
    typo = tmp_path / "sahred" / "data"
    with pytest.raises(BloodcellError, match="folder does not exist"):
        bloodmnist.load(typo)
    assert not typo.exists() and not typo.parent.exists(), "a mistyped --data-dir must not be created"


def test_wrong_md5_is_refused(tmp_path):
    sizes = tuple(bloodmnist.OFFICIAL_SPLIT_SIZES[s] for s in bloodmnist.SPLITS)  # right shape, wrong bytes
    write_synthetic_npz(tmp_path / "bloodmnist.npz", n=sizes)
    with pytest.raises(BloodcellError, match="does not match the official 7053d0"):
        bloodmnist.load(tmp_path)


def test_official_name_with_wrong_split_sizes_is_refused(tmp_path):
    write_synthetic_npz(tmp_path / "bloodmnist.npz")
    with pytest.raises(BloodcellError, match="train has 64 images, expected 11959"):
        bloodmnist.load(tmp_path)


def test_missing_file_without_network_says_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.setitem(
        bloodmnist.OFFICIAL_FILES,
        28,
        bloodmnist.OfficialFile("bloodmnist.npz", "http://127.0.0.1:9/none.npz", "0" * 32),
    )
    with pytest.raises(BloodcellError, match="cannot download bloodmnist.npz.*put it at"):
        bloodmnist.load(tmp_path)
    assert list(tmp_path.iterdir()) == [], "a failed download must leave nothing behind"


def test_real_data_loads_with_official_splits(real_data_dir):
    ds = bloodmnist.load(real_data_dir)
    assert ds.official and ds.md5 == "7053d0359d879ad8a5505303e11de1dc"
    assert [len(ds.split(s)) for s in bloodmnist.SPLITS] == [11959, 1712, 3421]
    assert ds.train.images.shape[1:] == (3, 28, 28)
    assert ds.val.class_counts() == [122, 312, 155, 290, 122, 143, 333, 235]
