"""The run format: round trips, the first release's layout, newer schemas, and bad run folders."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import bloodcell
from bloodcell import runs
from bloodcell.errors import BloodcellError
from bloodcell.runs import Preprocessing, RunRecord
from tests.cli import call_cli

RECORD = RunRecord(
    arch="res-small",
    arch_args={"widths": [32, 64, 128], "blocks": 1, "stem": 24},
    classes=("a", "b", "c", "d", "e", "f", "g", "h"),
    preprocessing=Preprocessing(28, (0.8, 0.7, 0.7), (0.2, 0.2, 0.1)),
    temperature=1.2,
    train_config={"epochs": 3},
    data={"file": "x.npz", "md5": "0" * 32},
    metrics={"test": {"accuracy": 0.9}},
    train_seconds=12.5,
)


def test_record_round_trips_through_json():
    text = json.dumps(RECORD.to_json())
    assert RunRecord.from_json(json.loads(text)) == RECORD
    assert RECORD.with_temperature(0.5).temperature == 0.5 and RECORD.temperature == 1.2  # a new value


def test_first_release_layout_still_loads():
    v1 = {k: v for k, v in RECORD.to_json().items() if k not in ("preprocessing", "schema")}
    v1 |= {"image_size": 28, "normalize": {"mean": [0.8, 0.7, 0.7], "std": [0.2, 0.2, 0.1]}}
    assert RunRecord.from_json(v1) == RECORD


def test_newer_schema_is_a_one_line_error():
    with pytest.raises(BloodcellError, match="newer bloodcell.*upgrade") as info:
        RunRecord.from_json(RECORD.to_json() | {"schema": runs.SCHEMA_VERSION + 1}, "run/model.json")
    assert "\n" not in str(info.value) and "run/model.json" in str(info.value)


def _bad(**changes) -> dict:
    values = json.loads(json.dumps(RECORD.to_json()))
    for key, value in changes.items():
        if "." in key:
            outer, inner = key.split(".")
            if value is None:
                del values[outer][inner]
            else:
                values[outer][inner] = value
        elif value is None:
            del values[key]
        else:
            values[key] = value
    return values


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ([1, 2, 3], "expected a JSON object"),
        (_bad(**{"preprocessing.image_size": "28"}), "image_size must be a whole number"),
        (_bad(preprocessing=None), "missing field 'preprocessing'"),
        (_bad(**{"preprocessing.std": [0.2, 0.0, 0.1]}), "std must be positive"),
        (_bad(**{"preprocessing.mean": [0.1, "x", 0.3]}), "three finite numbers"),
        (_bad(temperature="hot"), "temperature must be a positive number"),
        (_bad(temperature=0), "temperature must be a positive number"),
        (_bad(temperature=-1.0), "temperature must be a positive number"),
        (_bad(temperature=float("nan")), "temperature must be a positive number"),
        (_bad(classes="abc"), "classes must be a list"),
        (_bad(classes=["a", "a"]), "distinct"),
        (_bad(arch="resnet-9000"), "unknown architecture"),
        (_bad(arch_args={"widths": [10_000_000]}), "outside"),
        (_bad(arch_args={"blocks": 1000}), "outside"),
        (_bad(arch_args=[1]), "arch_args must be a JSON object"),
        (_bad(**{"preprocessing.crop": "sideways"}), "unknown crop"),
        (_bad(schema="two"), "bad schema version"),
    ],
)
def test_bad_records_are_refused_with_one_line(values, message):
    with pytest.raises(BloodcellError, match=message) as info:
        RunRecord.from_json(values, "run/model.json")
    assert "\n" not in str(info.value)


def _copy_run(run, tmp_path):
    target = tmp_path / "run"
    shutil.copytree(run, target)
    return target


def test_edited_run_folders_are_refused_at_load(synthetic_run, tmp_path):
    run = _copy_run(synthetic_run, tmp_path)
    meta = json.loads((run / runs.MODEL_META).read_text())

    (run / runs.MODEL_META).write_text(json.dumps(meta | {"classes": meta["classes"][:3]}))
    with pytest.raises(BloodcellError, match="do not fit this network"):  # the review score's centres, first
        bloodcell.load(run)
    (run / runs.MODEL_META).write_text(json.dumps(meta | {"classes": meta["classes"][:3], "ood_threshold": None}))
    with pytest.raises(BloodcellError, match="weights do not fit"):
        bloodcell.load(run)

    (run / runs.MODEL_META).write_text(json.dumps(meta))
    weights = runs.read_weights(synthetic_run)
    first_float = next(k for k, v in weights.items() if v.is_floating_point())
    weights[first_float][...] = float("nan")
    runs.write_model(run, RunRecord.from_json(meta), weights)
    with pytest.raises(BloodcellError, match="NaN or infinite"):
        bloodcell.load(run)

    (run / runs.MODEL_WEIGHTS).write_bytes(b"not safetensors")
    with pytest.raises(BloodcellError, match="not a valid safetensors"):
        bloodcell.load(run)


def test_overwrite_replaces_runs_but_never_foreign_folders(synthetic_run, tmp_path):
    run = _copy_run(synthetic_run, tmp_path)
    runs.prepare_run_dir(run, overwrite=True)
    assert run.is_dir() and not any(run.iterdir())

    mine = tmp_path / "thesis"
    mine.mkdir()
    (mine / "chapter1.tex").write_text("precious")
    with pytest.raises(BloodcellError, match="not a bloodcell run.*refusing to delete it"):
        runs.prepare_run_dir(mine, overwrite=True)
    assert (mine / "chapter1.tex").read_text() == "precious"

    started = tmp_path / "started"
    (started / runs.CHECKPOINT).mkdir(parents=True)
    (started / runs.CHECKPOINT / "state.json").write_text(
        '{"epoch": 1, "tensors": "state-1.safetensors", "config": {}}'
    )
    (started / runs.CHECKPOINT / "state-1.safetensors").write_bytes(b"x")
    runs.prepare_run_dir(started, overwrite=True)  # a started run (a checkpoint only) may be replaced
    assert not any(started.iterdir())
    with pytest.raises(BloodcellError, match="use --overwrite or --resume"):
        runs.prepare_run_dir(mine)
    with pytest.raises(BloodcellError, match="nothing to resume"):
        runs.prepare_run_dir(tmp_path / "typo", resume=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(BloodcellError, match="not a folder"):
        runs.prepare_run_dir(tmp_path / "file")


def test_overwrite_looks_at_what_files_are_not_at_their_names(synthetic_run, tmp_path):
    """The probe's case: figures and a checkpoint folder by name only, with a user's file inside."""
    probe = tmp_path / "u"
    (probe / runs.CHECKPOINT).mkdir(parents=True)
    for name in ("a.png", "b.png", "metrics.json"):
        (probe / name).write_text("mine")
    (probe / runs.CHECKPOINT / "thesis.docx").write_text("x")
    with pytest.raises(BloodcellError, match="not a bloodcell run"):
        runs.prepare_run_dir(probe, overwrite=True)
    assert (probe / runs.CHECKPOINT / "thesis.docx").read_text() == "x" and (probe / "a.png").is_file()

    run = _copy_run(synthetic_run, tmp_path)  # a real run with a user's files beside its own
    (run / "holiday.png").write_text("mine")
    (run / runs.CHECKPOINT).mkdir()
    (run / runs.CHECKPOINT / "notes.txt").write_text("mine")
    with pytest.raises(BloodcellError, match=r"holds files bloodcell did not write \(holiday.png, .*notes.txt\)"):
        runs.prepare_run_dir(run, overwrite=True)
    assert (run / "holiday.png").is_file() and (run / runs.MODEL_META).is_file()
    (run / "holiday.png").unlink()
    (run / runs.CHECKPOINT / "notes.txt").unlink()
    (run / "confusion_lab.png").write_bytes(b"")  # what `evaluate --images` writes into the run
    runs.prepare_run_dir(run, overwrite=True)
    assert not any(run.iterdir())


def test_a_damaged_run_is_never_taken_for_another_model_or_an_image_folder(synthetic_run, cell_images, tmp_path):
    run = _copy_run(synthetic_run, tmp_path)
    (run / runs.MODEL_WEIGHTS).unlink()
    result = call_cli("predict", run, cell_images[0], check=False)
    assert result.returncode == 1 and "a damaged or unfinished run (no model.safetensors)" in result.stderr
    assert "packaged" not in result.stderr and result.stdout == ""


def test_run_files_get_normal_permissions(synthetic_run):
    for path in synthetic_run.iterdir():
        if path.is_file():
            assert path.stat().st_mode & 0o044 == 0o044, f"{path.name} is not readable by others (umask 022)"


def test_a_run_predicts_finite_probabilities(synthetic_run):
    probs = bloodcell.load(synthetic_run).predict_proba(torch.zeros(2, 3, 28, 28, dtype=torch.uint8))
    assert probs.shape == (2, 8) and torch.isfinite(probs).all()
