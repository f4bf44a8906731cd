"""The command line: options generated from the config classes, rendering, and a corpus of bad
inputs that must each give one line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from bloodcell import runs
from bloodcell.app import cli
from bloodcell.inference.classifier import PredictOptions
from bloodcell.training.recipe import TrainConfig
from tests.cli import call_cli, run_cli
from tests.conftest import write_synthetic_npz


def test_train_options_mirror_the_config_fields():
    parser = cli.build_parser("train")
    args = parser.parse_args(["train", "--epochs", "3", "--label-smoothing", "0.1", "--no-channels-last"])
    values = cli.config_values(TrainConfig, args)
    assert values["epochs"] == 3 and values["label_smoothing"] == 0.1 and values["channels_last"] is False
    assert values["lr"] is None  # unset: the preset's value stays
    flags = {a.flags[0] for a in cli.options_for(TrainConfig)}
    assert flags == {f"--{f.name.replace('_', '-')}" for f in TrainConfig.options()}


def test_predict_options_mirror_predict_options():
    args = cli.build_parser("predict").parse_args(["predict", "run", "x.png", "--tta", "--min-confidence", "0.6"])
    assert cli._prediction_options(args) == PredictOptions(tta=True, min_confidence=0.6)
    assert cli._prediction_options(cli.build_parser("predict").parse_args(["predict", "r", "x"])) == PredictOptions()


def test_help_of_every_command_works():
    for name in cli.COMMANDS:
        result = call_cli(name, "--help", check=False)
        assert result.returncode == 0 and "usage: bloodcell" in result.stdout


def test_json_output_is_strict_json():
    assert "NaN" not in cli.to_json({"a": float("nan"), "b": [float("inf")]})
    assert json.loads(cli.to_json({"a": float("nan")})) == {"a": None}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, synthetic_run, cell_images):
    """Bad inputs, by name: each a folder or file a user might point bloodcell at. Built once for
    all the cases (every case writes only under its own tmp_path, and each checks that the
    foreign folder survived)."""
    tmp_path = tmp_path_factory.mktemp("corpus")
    paths = {}
    paths["text_npz"] = tmp_path / "bloodmnist.npz"
    paths["text_npz"].write_text("hello")
    paths["a_file"] = tmp_path / "plain_file"
    paths["a_file"].write_text("x")
    paths["foreign"] = tmp_path / "thesis"
    paths["foreign"].mkdir()
    (paths["foreign"] / "chapter1.tex").write_text("precious")
    for name, change in {
        "list_meta": [1, 2],
        "string_size": {"preprocessing": {"image_size": "28"}},
        "hot": {"temperature": "hot"},
        "zero_t": {"temperature": 0},
        "huge": {"arch_args": {"widths": [10_000_000]}},
        "newer": {"schema": 99},
    }.items():
        run = tmp_path / name
        shutil.copytree(synthetic_run, run)
        meta = json.loads((run / runs.MODEL_META).read_text())
        if isinstance(change, dict):
            for key, value in change.items():
                meta[key] = meta[key] | value if isinstance(value, dict) and key in meta else value
        else:
            meta = change
        (run / runs.MODEL_META).write_text(json.dumps(meta))
        paths[name] = run
    for name, change in {
        "reserved_arch_arg": {"arch_args": {"image_size": 64}},
        "named_arch_arg": {"arch_args": {"name": "x"}},
        "escaped_classes": {"classes": ["basophil\x1b[2J", *[f"c{i}" for i in range(7)]]},
        "newline_class": {"classes": ["a\nb", *[f"c{i}" for i in range(7)]]},
        "warnings_text": {"warnings": "abc"},
        "wide_and_deep": {"arch_args": {"widths": [1024] * 6, "blocks": 8, "stem": 24}},
        "giant_baseline": {"arch": "baseline", "arch_args": {}, "preprocessing": {"image_size": 1024},
                           "classes": [f"c{i}" for i in range(1000)], "ood_threshold": None},
    }.items():  # fmt: skip
        run = tmp_path / name
        shutil.copytree(synthetic_run, run)
        meta = json.loads((run / runs.MODEL_META).read_text())
        for key, value in change.items():
            merge = isinstance(value, dict) and isinstance(meta.get(key), dict) and key != "arch_args"
            meta[key] = meta[key] | value if merge else value
        (run / runs.MODEL_META).write_text(json.dumps(meta))
        paths[name] = run
    for name, tensors in {
        "ood_means": {"means": torch.zeros(8, 10)},
        "ood_precision": {"precision": torch.zeros(3, 3)},
    }.items():
        run = tmp_path / name
        shutil.copytree(synthetic_run, run)
        ood = load_file(run / runs.OOD_WEIGHTS) | tensors
        save_file(ood, run / runs.OOD_WEIGHTS)
        paths[name] = run
    paths["probe"] = tmp_path / "probe"  # the probe's folder: figures and a checkpoint folder by name only
    (paths["probe"] / "checkpoint").mkdir(parents=True)
    for name in ("a.png", "b.png"):
        (paths["probe"] / name).write_bytes(b"mine")
    (paths["probe"] / "checkpoint" / "thesis.docx").write_text("x")
    paths["damaged"] = tmp_path / "damaged"
    shutil.copytree(synthetic_run, paths["damaged"])
    (paths["damaged"] / runs.MODEL_WEIGHTS).unlink()
    paths["unreadable_lab"] = tmp_path / "unreadable_lab"
    (paths["unreadable_lab"] / "neutrophil").mkdir(parents=True)
    for i in range(3):
        (paths["unreadable_lab"] / "neutrophil" / f"{i}.png").write_bytes(b"not a png")
    paths["eps"] = tmp_path / "cell.eps"
    paths["eps"].write_text("%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 100 100\nshowpage\n")
    paths["huge_image"] = tmp_path / "huge.png"
    Image.new("1", (12_000, 9_000)).save(paths["huge_image"])
    paths["tiny_set"] = write_synthetic_npz(tmp_path / "tiny.npz", size=1)
    paths["image"] = cell_images[0]
    paths["run"] = synthetic_run
    return paths


CASES = {
    "missing data folder": (["info", "--data-dir", "{tmp}/nowhere"], "folder does not exist"),
    "data dir is a file": (["info", "--data-dir", "{a_file}"], "is a file, not a folder"),
    "text file as npz": (["info", "--data-file", "{text_npz}"], "truncated or corrupt"),
    "1x1 px dataset": (["train", "--data-file", "{tiny_set}", "--out", "{tmp}/r1"], "at least 8 px"),
    "overwrite a foreign folder": (
        ["train", "--data-file", "{text_npz}", "--out", "{foreign}", "--overwrite"],
        "not a bloodcell run (no readable model.json or checkpoint/state.json); refusing to delete it",
    ),
    "resume a mistyped run": (["train", "--out", "{tmp}/typo", "--resume", "--data-dir", "{tmp}"], "nothing to resume"),
    "zero epochs": (["train", "--epochs", "0", "--out", "{tmp}/r2"], "epochs must be"),
    "evaluate a non-run": (["evaluate", "{foreign}"], "not a bloodcell run directory"),
    "predict with a list model.json": (["predict", "{list_meta}", "{image}"], "expected a JSON object"),
    "image size as a string": (["predict", "{string_size}", "{image}"], "image_size must be a whole number"),
    "temperature hot": (["predict", "{hot}", "{image}"], "temperature must be a positive number"),
    "temperature zero": (["predict", "{zero_t}", "{image}"], "temperature must be a positive number"),
    "huge architecture": (["predict", "{huge}", "{image}"], "outside"),
    "newer run format": (["predict", "{newer}", "{image}"], "newer bloodcell"),
    "unknown crop": (["predict", "{run}", "{image}", "--crop", "sideways"], "--crop must be"),
    "red cell size not a number": (["predict", "{run}", "{image}", "--crop", "cell:big"], "--crop cell:PX needs"),
    "confidence above 1": (["predict", "{run}", "{image}", "--min-confidence", "2"], "min_confidence must be"),
    "explain a 108 Mpx image": (["explain", "{run}", "{huge_image}", "--out", "{tmp}/x"], "too large"),
    "explain nothing": (["explain", "{run}", "--out", "{tmp}/x"], "nothing to explain"),
    "report a foreign folder": (["report", "{foreign}"], "not a bloodcell run directory"),
    # the hostile probe's cases
    "overwrite figures by name": (
        ["train", "--data-file", "{tiny_set}", "--out", "{probe}", "--overwrite"],
        "not a bloodcell run (no readable model.json or checkpoint/state.json); refusing to delete it",
    ),
    "predict with a damaged run": (
        ["predict", "{damaged}", "{image}"],
        "damaged or unfinished run (no model.safetensors)",
    ),
    "evaluate a damaged run": (["evaluate", "{damaged}"], "damaged or unfinished run (no model.safetensors)"),
    "giant baseline": (["predict", "{giant_baseline}", "{image}"], "parameters (limit 50,000,000)"),
    "huge widths": (
        ["train", "--out", "{tmp}/r3", "--data-file", "{tiny_set}", "--model", "res-small"],
        "at least 8 px",
    ),
    "image_size in arch_args": (["predict", "{reserved_arch_arg}", "{image}"], "arch_args may not set image_size"),
    "name in arch_args": (["predict", "{named_arch_arg}", "{image}"], "arch_args may not set name"),
    "class names with escapes": (["predict", "{escaped_classes}", "{image}"], "class names must be printable"),
    "class names with newlines": (["info", "{newline_class}"], "class names must be printable"),
    "warnings as a string": (["predict", "{warnings_text}", "{image}"], "warnings must be a list of strings"),
    "OOD centres of the wrong size": (["predict", "{ood_means}", "{image}"], "do not fit this network"),
    "OOD precision of the wrong size": (["predict", "{ood_precision}", "{image}"], "does not fit"),
    "csv is a folder": (["predict", "{run}", "{image}", "--csv", "{tmp}"], "is a folder; give a file name"),
    "csv under /proc": (["predict", "{run}", "{image}", "--csv", "/proc/bloodcell/x.csv"], "cannot write"),
    "csv under a file": (["predict", "{run}", "{image}", "--csv", "{a_file}/x.csv"], "is not a folder"),
    "export to a folder": (["export", "{run}", "--out", "{tmp}"], "is a folder; give a file name"),
    "report under /proc": (["report", "{run}", "--out", "/proc/bloodcell/r.html"], "cannot write"),
    "explain into a file": (["explain", "{run}", "{image}", "--out", "{a_file}"], "exists and is not a folder"),
    "train under /proc": (["train", "--data-file", "{tiny_set}", "--out", "/proc/bloodcell/run"], "cannot write"),
    "build-data into a file": (
        ["build-data", "{tmp}", "--size", "64", "--out", "{a_file}", "--data-file", "{text_npz}"],
        "truncated or corrupt",
    ),
    "merge csv under /proc": (["merge", "{a_file}", "--csv", "/proc/bloodcell/m.csv"], "cannot write"),
    "evaluate unreadable images": (["evaluate", "{run}", "--images", "{unreadable_lab}"], "none of the 3 images"),
    "an EPS file": (["explain", "{run}", "{eps}", "--out", "{tmp}/x"], "not an image file bloodcell reads"),
    "csv over an input image": (["predict", "{run}", "{image}", "--csv", "{image}"], "is one of the inputs"),
    "merge csv over a part": (["merge", "{a_file}", "--csv", "{a_file}"], "is one of the inputs"),
    "lab folder name too long": (["evaluate", "{run}", "--images", "x" * 300], "File name too long"),
    "image name too long": (["predict", "{run}", "y" * 300 + ".png"], "File name too long"),
    "run name too long": (["train", "--data-file", "{tiny_set}", "--out", "{tmp}/" + "z" * 300], "name too long"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gives_one_line_and_a_nonzero_exit(case, corpus, tmp_path, monkeypatch):
    monkeypatch.delenv("BLOODCELL_DATA_DIR", raising=False)
    argv, message = CASES[case]
    values = {k: str(v) for k, v in corpus.items()} | {"tmp": str(tmp_path)}
    result = call_cli(*[a.format(**values) for a in argv], check=False)
    assert result.returncode == 1, (result.returncode, result.stdout[-500:], result.stderr[-500:])
    lines = [line for line in result.stderr.splitlines() if line.startswith("bloodcell: error:")]
    assert len(lines) == 1 and message in lines[0], result.stderr[-800:]
    assert "Traceback" not in result.stderr
    assert (corpus["foreign"] / "chapter1.tex").read_text() == "precious"


def test_data_dir_from_the_environment_pointing_at_a_file(corpus, monkeypatch):
    monkeypatch.setenv("BLOODCELL_DATA_DIR", str(corpus["a_file"]))
    result = call_cli("info", check=False)
    assert result.returncode == 1 and "is a file, not a folder" in result.stderr


def test_bad_thread_count_and_bad_usage(monkeypatch):
    monkeypatch.setenv("BLOODCELL_THREADS", "many")
    result = call_cli("info", check=False)
    assert result.returncode == 1 and "BLOODCELL_THREADS" in result.stderr
    monkeypatch.delenv("BLOODCELL_THREADS")
    assert call_cli("predict", check=False).returncode == 2  # argparse: missing arguments


@pytest.mark.slow  # a fresh Python process importing torch: 3 s of the one-minute fast lane
def test_the_installed_command_runs_as_a_subprocess(synthetic_run, cell_images):
    result = run_cli("predict", synthetic_run, cell_images[0], "--top-k", "1")
    assert "1 of 1 images classified" in result.stdout
