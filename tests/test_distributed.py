"""`torchrun --nproc-per-node 2 -m bloodcell train`: two processes (gloo, CPU) train one model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import bloodcell
from bloodcell.datasets import bloodmnist

pytestmark = pytest.mark.slow  # two extra Python processes with torch: not for the fast lane


def _torchrun(*args, processes: int = 2) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    return subprocess.run([*command, "-m", "bloodcell", *map(str, args)], capture_output=True, text=True, timeout=600)


def test_two_processes_train_one_model_and_rank_zero_writes_it(synthetic_file, tmp_path):
    out = tmp_path / "ddp"
    result = _torchrun(
        "train",
        "--data-file",
        synthetic_file,
        "--preset",
        "fast",
        "--epochs",
        "3",
        "--batch-size",
        "32",
        "--out",
        out,
        "--json",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    printed = json.loads(result.stdout)  # one JSON document: only rank 0 reports
    assert printed["run_dir"] == str(out)
    classifier = bloodcell.load(out)
    test = bloodmnist.load_npz(synthetic_file).test
    accuracy = (classifier.predict_proba(test.images).argmax(1) == test.labels).float().mean().item()
    assert accuracy > 0.3  # chance is 1/8: the two processes trained one working model
    assert not (out / "checkpoint").exists()


def test_a_batch_that_does_not_divide_among_processes(synthetic_file, tmp_path):
    result = _torchrun(
        "train", "--data-file", synthetic_file, "--epochs", "1", "--batch-size", "33", "--out", tmp_path / "x"
    )
    assert result.returncode != 0
    assert result.stderr.count("bloodcell: error: batch size 33 does not divide among 2 processes") == 1
    assert not (tmp_path / "x").exists()  # nothing half-written
