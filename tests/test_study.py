"""`bloodcell reproduce` and `bloodcell tune` end to end on a small real-data subset."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import optuna
import pytest
from PIL import Image

from bloodcell.research.tune import STUDY_NAME
from tests.cli import free_port, run_cli


def test_reproduce_writes_every_output(real_data_dir, tmp_path):
    out = tmp_path / "study"
    result = run_cli(
        "reproduce", "--data-dir", real_data_dir, "--out", out, "--folds", "2", "--epochs", "1", "--subset", "1200",
        "--protocol", "published", "independent", "carried",
    )  # fmt: skip
    assert "baseline (published)" in result.stdout and "baseline (paper)" in result.stdout and "0.914" in result.stdout
    assert "seed-cnn (carried)" in result.stdout and "seed-cnn (independent)" in result.stdout
    summary = json.loads((out / "results.json").read_text())
    for model in ("baseline", "seed-cnn"):
        for protocol in ("published", "independent", "carried"):
            scores = summary["models"][model][protocol]
            acc = scores["accuracy"]
            assert len(acc["folds"]) == 2 and 0 <= acc["std"] and abs(acc["mean"] - sum(acc["folds"]) / 2) < 1e-9
            assert set(scores) >= {"f1_weighted", "balanced_accuracy", "auc_macro_ovr"}
            for name in (f"learning_curves_{model}_{protocol}.png", f"confusion_{model}_{protocol}.png"):
                with Image.open(out / name) as image:
                    assert image.size[0] > 500
        models = summary["models"][model]
        # the published protocol's folds hold the test images: with 2 folds each model trained on about half
        assert 0.3 < models["published"]["test_trained_on"]["mean"] < 0.7
        assert models["independent"]["test_trained_on"]["folds"] == [0.0, 0.0]
        assert models["carried"]["test_trained_on"]["folds"] == [0.0, 0.0]
        # fold 1 is the same run in the carried and independent protocols; fold 2 differs (carried model vs fresh)
        carried, independent = (models[p]["accuracy"]["folds"] for p in ("carried", "independent"))
        assert carried[0] == independent[0] and carried[1] != independent[1]
    # even one epoch on 1,200 images must beat chance (1/8) clearly: the pipeline learns
    assert summary["models"]["seed-cnn"]["independent"]["accuracy"]["mean"] > 0.3
    assert summary["test_images"] == 300
    table = (out / "results.md").read_text()
    assert "| accuracy |" in table and "| test_trained_on | " in table
    Image.open(out / "results.png").verify()
    with open(out / "fold_curves.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 3 * 2 * 1 and {"train_loss", "val_acc", "fold", "model", "protocol"} <= set(rows[0])
    # the carried model starts fold 2 already trained: its first-epoch training loss is lower
    fold2 = {r["protocol"]: float(r["train_loss"]) for r in rows if r["model"] == "seed-cnn" and r["fold"] == "2"}
    assert fold2["carried"] < fold2["independent"]


def test_reproduce_by_default_sets_the_published_protocol_beside_the_honest_one(real_data_dir, tmp_path):
    out = tmp_path / "study"
    run_cli("reproduce", "--data-dir", real_data_dir, "--out", out, "--folds", "2", "--epochs", "1", "--subset", "400")
    summary = json.loads((out / "results.json").read_text())
    assert list(summary["protocols"]) == ["published", "independent"]
    assert "test split" in summary["protocols"]["published"]


def test_tune_resumes_from_its_storage(real_data_dir, tmp_path):
    grid = "batch_size=64,128;max_epochs=1;lr=1e-3"
    common = [
        "tune",
        "--data-dir",
        real_data_dir,
        "--out",
        tmp_path,
        "--grid",
        grid,
        "--folds",
        "2",
        "--subset",
        "400",
        "--json",
    ]
    first = json.loads(run_cli(*common, "--trials", "1").stdout)
    assert first["completed_trials"] == 1
    second = json.loads(run_cli(*common).stdout)  # picks up the same database, runs only what is left
    assert second["completed_trials"] == 2
    study = optuna.load_study(study_name=STUDY_NAME, storage=f"sqlite:///{tmp_path / 'tune.db'}")
    assert sorted(t.params["batch_size"] for t in study.trials) == [64, 128]
    third = json.loads(run_cli(*common).stdout)  # grid done: nothing re-run
    assert len(optuna.load_study(study_name=STUDY_NAME, storage=f"sqlite:///{tmp_path / 'tune.db'}").trials) == 2
    assert third["params"] == second["params"]
    with open(tmp_path / "tune_results.csv") as f:
        scores = [float(r["cv_accuracy"]) for r in csv.DictReader(f)]
    assert scores == sorted(scores, reverse=True)
    Image.open(tmp_path / "tune_results.png").verify()


def _worker(real_data_dir, out, *extra):
    grid = "batch_size=64,128;max_epochs=1;lr=1e-3,1e-2"  # four points
    args = ["tune", "--data-dir", real_data_dir, "--out", out, "--grid", grid, "--folds", "2", "--subset", "400"]
    return subprocess.Popen(
        [sys.executable, "-m", "bloodcell", *map(str, args), *extra, "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _points(storage: str) -> list[tuple]:
    study = optuna.load_study(study_name=STUDY_NAME, storage=storage)
    return sorted(
        (t.params["batch_size"], t.params["lr"]) for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    )


def test_two_workers_share_one_grid_and_run_each_point_once(real_data_dir, tmp_path):
    workers = [_worker(real_data_dir, tmp_path) for _ in range(2)]
    for worker in workers:
        _, err = worker.communicate(timeout=600)
        assert worker.returncode == 0, err[-2000:]
    assert _points(f"sqlite:///{tmp_path / 'tune.db'}") == [(64, 1e-3), (64, 1e-2), (128, 1e-3), (128, 1e-2)]


def test_a_killed_workers_point_is_run_by_another(real_data_dir, tmp_path):
    import time

    storage = f"sqlite:///{tmp_path / 'tune.db'}"
    first = _worker(real_data_dir, tmp_path, "--heartbeat", "1")
    deadline = time.monotonic() + 120
    while True:  # wait until the first worker is inside a trial, then kill it without warning
        try:
            study = optuna.load_study(study_name=STUDY_NAME, storage=storage)
            if study.get_trials(states=(optuna.trial.TrialState.RUNNING,)):
                break
        except KeyError:
            pass
        assert time.monotonic() < deadline, "the first worker never started a trial"
        time.sleep(0.2)
    first.kill()
    first.wait()
    second = _worker(real_data_dir, tmp_path, "--heartbeat", "1")
    _, err = second.communicate(timeout=600)
    assert second.returncode == 0, err[-2000:]
    assert _points(storage) == [(64, 1e-3), (64, 1e-2), (128, 1e-3), (128, 1e-2)]
    states = [t.state for t in optuna.load_study(study_name=STUDY_NAME, storage=storage).trials]
    assert optuna.trial.TrialState.FAIL in states  # the killed worker's trial, failed and queued again


@pytest.fixture()
def postgresql_url():
    """A throwaway PostgreSQL server (Debian's `postgresql` package) in a temporary folder."""
    binaries = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    if not binaries or importlib.util.find_spec("psycopg2") is None:
        pytest.skip("PostgreSQL server binaries or the psycopg2 driver are not installed")
    bin_dir = binaries[-1].parent
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []  # initdb refuses root
    folder = Path(tempfile.mkdtemp(prefix="bloodcell-pg-"))
    if as_postgres:
        shutil.chown(folder, "postgres")
    data, port = folder / "data", free_port()
    subprocess.run(
        [*as_postgres, bin_dir / "initdb", "-D", data, "--auth=trust", "-U", "postgres"],
        check=True,
        capture_output=True,
    )
    server_options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1"
    start = [*as_postgres, bin_dir / "pg_ctl", "-D", data, "-o", server_options, "-l", folder / "log", "-w", "start"]
    subprocess.run(start, check=True, capture_output=True)
    try:
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_postgres, bin_dir / "pg_ctl", "-D", data, "-m", "fast", "stop"], capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


def test_two_workers_on_a_real_postgresql_server(real_data_dir, tmp_path, postgresql_url):
    workers = [_worker(real_data_dir, tmp_path / str(i), "--storage", postgresql_url) for i in range(2)]
    for worker in workers:
        _, err = worker.communicate(timeout=600)
        assert worker.returncode == 0, err[-2000:]
    assert _points(postgresql_url) == [(64, 1e-3), (64, 1e-2), (128, 1e-3), (128, 1e-2)]


def _open_storage_after(barrier, url: str, results) -> None:
    from bloodcell.research.tune import _connect

    barrier.wait()
    try:
        _connect(url, heartbeat=1.0)
        results.put("ok")
    except Exception as exc:  # reported to the parent, which asserts on it
        results.put(f"{type(exc).__name__}: {exc}")


@pytest.mark.slow
def test_workers_that_open_a_new_storage_at_once_all_get_in(tmp_path):
    """Workers that create the storage's tables at the same moment: the loser retries (it used to exit)."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    for attempt in range(5):
        barrier, results = context.Barrier(2), context.Queue()
        url = f"sqlite:///{tmp_path / f'race{attempt}.db'}"
        workers = [context.Process(target=_open_storage_after, args=(barrier, url, results)) for _ in range(2)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=60)
        assert [results.get(timeout=5) for _ in workers] == ["ok", "ok"]


@pytest.mark.slow
def test_a_point_taken_by_a_worker_killed_before_its_first_heartbeat_is_run_again(tmp_path):
    """The window the kill test hits only by chance: a running trial that never sent a heartbeat."""
    import threading

    from bloodcell.research.tune import TuneConfig, _params, open_study, work_through_grid

    config = TuneConfig(grid={"batch_size": [64], "max_epochs": [1], "lr": [1e-3, 1e-2]}, heartbeat=0.5)
    study = open_study(f"sqlite:///{tmp_path / 'tune.db'}", config)
    study.ask()  # a worker takes the first point and dies before its heartbeat thread starts
    worker = threading.Thread(
        target=work_through_grid,
        args=(study, lambda trial: _params(trial, config)["lr"], None, 0.2),
        daemon=True,
    )
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "the worker waits forever for a trial nobody runs"
    trials = study.get_trials()
    assert sorted(t.params["lr"] for t in trials if t.state == optuna.trial.TrialState.COMPLETE) == [1e-3, 1e-2]
    assert optuna.trial.TrialState.FAIL in [t.state for t in trials]
