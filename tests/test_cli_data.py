"""End-to-end: the real `bloodcell` CLI on the real data, checked as a user would."""

from __future__ import annotations

import json

from PIL import Image

from tests.cli import call_cli, run_cli
from tests.conftest import write_synthetic_npz


def test_info_json_reports_official_split_sizes(real_data_dir):
    info = json.loads(run_cli("info", "--data-dir", str(real_data_dir), "--json").stdout)
    assert info["split_sizes"] == {"train": 11959, "val": 1712, "test": 3421}
    assert info["md5"] == "7053d0359d879ad8a5505303e11de1dc" and info["official"] is True
    assert info["counts"]["test"]["neutrophil"] == 666


def test_info_table(real_data_dir):
    out = run_cli("info", "--data-dir", str(real_data_dir)).stdout
    assert "(official)" in out and "11959" in out and "immature granulocyte" in out


def test_explore_writes_three_figures(real_data_dir, tmp_path):
    out = run_cli("explore", "--data-dir", str(real_data_dir), "--out", str(tmp_path)).stdout
    assert "total" in out and "3421" in out
    sizes = {}
    for name in ("montage.png", "class_distribution.png", "examples_per_class.png"):
        with Image.open(tmp_path / name) as image:
            image.verify()
            sizes[name] = image.size
    assert sizes["montage.png"][0] >= 20 * 28 * 2  # 20 columns, upscaled x2
    assert all(w >= 400 and h >= 300 for w, h in sizes.values())


def test_bad_file_is_one_line_error_and_nonzero_exit(tmp_path):
    broken = tmp_path / "bloodmnist.npz"
    broken.write_bytes(write_synthetic_npz(tmp_path / "x.npz").read_bytes()[:100])
    result = call_cli("info", "--data-dir", str(tmp_path), check=False)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and str(broken) in result.stderr
    assert "Traceback" not in result.stderr


def test_data_file_option_accepts_other_sizes(tmp_path):
    path = write_synthetic_npz(tmp_path / "mine_64.npz", size=64)
    info = json.loads(call_cli("info", "--data-file", str(path), "--json").stdout)
    assert info["image_size"] == 64 and info["official"] is False
