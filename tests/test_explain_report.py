"""Grad-CAM (shape, normalisation, localisation on a toy model), `explain`, and the HTML report."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from bloodcell import models
from bloodcell.reporting import explain
from tests.cli import call_cli, run_cli

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--virtual-time-budget=5000",
]


class RedDetector(nn.Module):
    """Class 1 = 'there is red here': a fixed conv that responds to the red channel, then pooling."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.bias.zero_()
            self.conv.weight[1, 0] = 1.0  # channel 1 sums the red neighbourhood
            self.conv.weight[0, 2] = 1.0  # channel 0 sums the blue neighbourhood
        self.head = nn.Linear(2, 2)
        with torch.no_grad():
            self.head.weight.copy_(torch.eye(2))
            self.head.bias.zero_()

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def test_gradcam_highlights_the_region_that_decides_the_class():
    x = torch.zeros(1, 3, 28, 28)
    x[0, 2] = 0.2  # faint blue everywhere
    x[0, 0, 4:10, 18:24] = 1.0  # a red patch top-right
    cam = explain.grad_cam(RedDetector(), x, class_index=1)
    assert cam.heatmap.shape == (28, 28)
    assert cam.heatmap.min() >= 0 and cam.heatmap.max() == pytest.approx(1.0)
    peak_row, peak_col = divmod(int(cam.heatmap.argmax()), 28)
    assert 3 <= peak_row <= 10 and 17 <= peak_col <= 24
    assert cam.heatmap[4:10, 18:24].mean() > 5 * cam.heatmap[15:, :12].mean()


@pytest.mark.parametrize("name", [n for n in models.names() if n != "baseline"])
def test_gradcam_works_for_every_conv_model(name):
    size = 128 if name.endswith("-128") else 64 if name.endswith("-64") else 28
    model = models.create(name, image_size=size)
    cam = explain.grad_cam(model, torch.randn(1, 3, size, size))
    assert cam.heatmap.shape == (size, size) and 0 <= cam.heatmap.min() <= cam.heatmap.max() <= 1
    assert 0 <= cam.probability <= 1


def test_explain_on_files_folders_and_dataset_indices(synthetic_run, synthetic_file, cell_images, tmp_path):
    folder = tmp_path / "more"
    (folder / "deeper").mkdir(parents=True)
    (folder / "deeper" / cell_images[0].name).write_bytes(cell_images[0].read_bytes())  # same name as a file
    result = call_cli(
        "explain",
        synthetic_run,
        *cell_images,
        folder,
        "--index",
        "0",
        "7",
        "--data-file",
        synthetic_file,
        "--out",
        tmp_path / "out",
        "--json",
    )
    figures = json.loads(result.stdout)["figures"]
    assert len(figures) == len(cell_images) + 1 + 2 and len(set(figures)) == len(figures)
    for path in figures:
        with Image.open(path) as image:
            assert image.size[0] >= 600
    bad = call_cli(
        "explain", synthetic_run, "--index", "99999", "--data-file", synthetic_file, "--out", tmp_path, check=False
    )
    assert bad.returncode == 1 and "outside the test split" in bad.stderr


def test_explain_restricted_to_some_classes_explains_what_predict_answers(synthetic_run, synthetic_file, tmp_path):
    import bloodcell
    from bloodcell.datasets import bloodmnist

    only = bloodcell.load(synthetic_run).restricted_to(["lymphocyte", "monocyte"])
    images = bloodmnist.load(data_file=synthetic_file).test.images[:6]
    answers = only.predict(images)
    for image, answer in zip(images, answers):
        explanation = explain.explain_image(only, image.permute(1, 2, 0).numpy())
        assert only.classes[explanation.predicted_index] == answer and answer in ("lymphocyte", "monocyte")
    refused = call_cli(
        "explain", synthetic_run, "--index", "0", "--classes", "lymphocyte", "--class", "platelet",
        "--data-file", synthetic_file, "--out", tmp_path, check=False,
    )  # fmt: skip
    assert refused.returncode == 1 and "unknown class 'platelet'; choose one of lymphocyte" in refused.stderr


def test_report_embeds_only_regular_files_inside_the_folder(synthetic_file, tmp_path):
    from bloodcell.reporting import report

    secret = tmp_path / "secret.png"
    secret.write_bytes(b"\x89PNG not for the report")
    study = tmp_path / "study"
    study.mkdir()
    (study / "learning_curves_baseline_study.png").symlink_to(secret)
    html = report.embedded_image(study / "learning_curves_baseline_study.png", "x", study)
    assert "skipped" in html and "base64" not in html
    (study / "real.png").write_bytes(b"\x89PNG")
    assert "base64" in report.embedded_image(study / "real.png", "x", study)


@pytest.fixture(scope="module")
def report_file(real_run, real_data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "report.html"
    run_cli("report", real_run, "--data-dir", real_data_dir, "--out", out)
    return out


def test_report_sections_and_numbers_match_evaluate(report_file, real_run, real_data_dir):
    page = report_file.read_text()
    for anchor in (
        "provenance",
        "metrics",
        "per-class",
        "confusion",
        "roc",
        "calibration",
        "learning-curves",
        "mistakes",
        "unsure",
        "gradcam",
    ):
        assert f'id="{anchor}"' in page, anchor
    evaluated = json.loads(run_cli("evaluate", real_run, "--data-dir", real_data_dir, "--json").stdout)
    assert f"<td>accuracy</td><td>{evaluated['accuracy']:.4f}</td>" in page
    assert f"{evaluated['auc_macro_ovr']:.4f}" in page and "7053d0359d879ad8a5505303e11de1dc" in page
    assert len(re.findall(r'src="data:image/png;base64,', page)) == 7  # every figure section
    assert report_file.stat().st_size < 5_000_000


def test_report_renders_in_a_real_browser(report_file, tmp_path):
    if CHROMIUM is None:
        pytest.fail("chromium is not installed (.ci/run installs Debian's chromium)")
    shot = tmp_path / "shot.png"
    flags = [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    subprocess.run(
        [CHROMIUM, *flags, "--window-size=1200,2400", f"--screenshot={shot}", report_file.as_uri()],
        check=True,
        capture_output=True,
        timeout=120,
    )
    dom = subprocess.run(
        [CHROMIUM, *flags, "--dump-dom", report_file.as_uri()], check=True, capture_output=True, text=True, timeout=120
    ).stdout
    assert re.search(r'data-broken-images="0"', dom), "some images did not decode"
    assert int(re.search(r'data-images="(\d+)"', dom).group(1)) == 7
    assert "Test metrics" in dom and "Grad-CAM, two per class" in dom
    with Image.open(shot) as image:
        assert image.size == (1200, 2400)
        assert len(np.unique(np.asarray(image.convert("L").resize((60, 120))))) > 20  # not a blank page


def test_report_for_a_study_folder(real_data_dir, tmp_path):
    study = tmp_path / "study"
    run_cli(
        "reproduce", "--data-dir", real_data_dir, "--out", study, "--folds", "2", "--epochs", "1", "--subset", "600"
    )
    run_cli("report", study)
    page = (study / "report.html").read_text()
    assert (
        'id="comparison"' in page and "0.914" in page and "seed-cnn (published)" in page and "seed-cnn (paper)" in page
    )


@pytest.mark.slow  # 5 s of corruptions at 224 px: kept out of the one-minute fast lane
def test_robustness_command_and_its_report_section(synthetic_run, synthetic_file, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(synthetic_run, run)
    args = ("robustness", run, "--data-file", synthetic_file, "--limit", "16", "--families", "pixelate", "bubble")
    result = json.loads(call_cli(*args, "--json").stdout)
    assert set(result["accuracy"]) == {"pixelate", "bubble"} and all(len(v) == 5 for v in result["accuracy"].values())
    assert result["n"] == 16 and 0 <= result["mean_corrupted"] <= 1
    with Image.open(run / "robustness.png") as image:
        assert image.size[0] > 500
    assert json.loads(call_cli(*args, "--json").stdout) == result  # seeded: the same corruptions each time
    page = call_cli("report", run, "--data-file", synthetic_file, "--out", tmp_path / "r.html")
    assert page.returncode == 0 and 'id="robustness"' in (tmp_path / "r.html").read_text()
    bad = call_cli("robustness", run, "--data-file", synthetic_file, "--families", "rain", check=False)
    assert bad.returncode == 1 and "unknown corruption family" in bad.stderr


def test_corruptions_change_images_more_with_severity():
    from bloodcell.evaluation import robustness

    coarse = torch.rand(4, 3, 4, 4) * 200 + 30  # smooth images: they survive the 28 -> 224 -> 28 round trip
    images = torch.nn.functional.interpolate(coarse, size=28, mode="bilinear").round().to(torch.uint8)
    for family in robustness.FAMILIES:
        changes = [
            (robustness.corrupt_batch(images, family, s).float() - images.float()).abs().mean().item() for s in (1, 5)
        ]
        assert changes[1] >= changes[0] * 0.9, family  # severity 5 changes the image at least as much
