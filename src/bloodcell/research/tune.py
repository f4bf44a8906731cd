"""Hyper-parameter search with Optuna, scored by k-fold CV accuracy with early stopping.

Trials live in an Optuna storage (SQLite by default; PostgreSQL or MySQL to share one between
machines), so a search can be interrupted and resumed, and any number of `bloodcell tune`
processes can work on it together. For a grid, the worker that creates the study puts every grid
point in the storage's queue once; workers take the next queued point (an atomic operation of
the storage), so no point is run twice. Each running trial sends a heartbeat; a worker that is
killed stops sending, and the next worker to look fails its trial and queues the point again
(`RetryFailedTrialCallback`), so no point is lost. `trials=N` without a grid runs a TPE search.
"""

from __future__ import annotations

import itertools
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import StratifiedKFold

from bloodcell.datasets.bloodmnist import Dataset
from bloodcell.errors import BloodcellError
from bloodcell.files import write_csv, write_json
from bloodcell.reporting import plots
from bloodcell.research.study import pooled_train_val
from bloodcell.training.loop import build_model, fit
from bloodcell.training.recipe import PRESETS, with_overrides

try:
    import optuna
except ImportError:  # an optional extra: `predict` and `serve` installs do without it
    raise BloodcellError("tuning needs Optuna: pip install 'bloodcell[tune]'") from None

# the heartbeat and retry API we rely on is marked experimental; users need not read that on every run
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning, module="bloodcell.tune")

STUDY_GRID = {"batch_size": [64, 128, 256], "max_epochs": [30, 50], "lr": [1e-3, 1e-2, 1e-1]}
STUDY_NAME = "bloodcell-tune"


@dataclass(frozen=True)
class TuneConfig:
    model: str = "seed-cnn"
    grid: dict | None = None  # None: TPE over ranges
    trials: int | None = None  # TPE trials, or at most this many grid points in this call
    folds: int = 5
    max_epochs: int | None = None  # caps every trial's epochs (a quick look at the grid)
    patience: int = 5
    seed: int = 42
    subset: int | None = None
    heartbeat: float = 60.0  # seconds between a running trial's heartbeats; silent for 3x this: failed and retried


def parse_grid(spec: str) -> dict:
    """'study' or 'batch_size=64,128;max_epochs=30;lr=1e-3,1e-2' -> {name: [values]}."""
    if spec == "study":
        return STUDY_GRID
    grid = {}
    for part in filter(None, spec.split(";")):
        name, _, values = part.partition("=")
        if name not in STUDY_GRID or not values:
            raise BloodcellError(f"bad grid entry {part!r}; expected NAME=V1,V2 with NAME in {', '.join(STUDY_GRID)}")
        cast = float if name == "lr" else int
        grid[name] = [cast(v) for v in values.split(",")]
    missing = set(STUDY_GRID) - set(grid)
    if missing:
        raise BloodcellError(f"grid is missing {', '.join(sorted(missing))}")
    return grid


def _params(trial: optuna.Trial, config: TuneConfig) -> dict:
    if config.grid is not None:
        return {name: trial.suggest_categorical(name, values) for name, values in config.grid.items()}
    return {
        "batch_size": trial.suggest_categorical("batch_size", [64, 128, 256]),
        "max_epochs": trial.suggest_int("max_epochs", 10, 50, step=10),
        "lr": trial.suggest_float("lr", 1e-4, 1e-1, log=True),
    }


def cv_score(dataset: Dataset, params: dict, config: TuneConfig) -> dict:
    """Mean validation accuracy over k stratified folds of train+val (the test split is never used)."""
    pool, _ = pooled_train_val(dataset, config.subset, config.seed)
    epochs = min(params["max_epochs"], config.max_epochs or params["max_epochs"])
    train_config = with_overrides(
        PRESETS["study"],
        model=config.model,
        batch_size=params["batch_size"],
        lr=params["lr"],
        epochs=epochs,
        patience=config.patience,
    )
    folds = StratifiedKFold(n_splits=config.folds, shuffle=True, random_state=config.seed)
    accuracies, stopped = [], []
    for fold, (train_idx, val_idx) in enumerate(folds.split(np.zeros(len(pool)), pool.labels.numpy())):
        fold_config = with_overrides(train_config, seed=config.seed + fold)
        val = pool.subset(torch.from_numpy(val_idx))
        result = fit(
            build_model(fold_config, pool.images.shape[-1]),
            pool.subset(torch.from_numpy(train_idx)),
            val,
            fold_config,
            progress=False,
        )
        accuracies.append(result.history[result.best_epoch - 1]["val_acc"])
        stopped.append(len(result.history))
    return {"accuracy": float(np.mean(accuracies)), "std": float(np.std(accuracies)), "epochs_run": stopped}


def _connect(storage: str, heartbeat: float, attempts: int = 5) -> optuna.storages.RDBStorage:
    """Open the storage; workers starting together race to create its tables, so a lost race is retried."""
    import sqlalchemy.exc

    retry = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)  # Optuna >= 4.9
    callback = (
        {"heartbeat_stale_trial_callback": retry(max_retry=2)}
        if retry is not None
        else {"failed_trial_callback": optuna.storages.RetryFailedTrialCallback(max_retry=2)}
    )
    timing = {"heartbeat_interval": max(1, round(heartbeat)), "grace_period": max(2, round(3 * heartbeat))}
    for attempt in itertools.count():
        try:
            with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna, and say so every time
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(storage, **timing, **callback)
        except (ImportError, ValueError) as exc:  # bad URL, missing database driver
            raise BloodcellError(f"cannot use storage {storage!r} ({str(exc).splitlines()[0]})") from None
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.OperationalError) as exc:
            # another worker creating the tables or the version row at the same moment (SQLite also
            # says "locked"), or a database server that is not up: try again, then give up
            if attempt == attempts - 1:
                raise BloodcellError(f"cannot reach storage {storage!r} ({type(exc).__name__})") from None
            time.sleep(0.2 * (attempt + 1))
        except Exception as exc:  # any other SQLAlchemy error
            raise BloodcellError(f"cannot reach storage {storage!r} ({type(exc).__name__})") from None


def open_study(storage: str, config: TuneConfig) -> optuna.Study:
    """Create or join the study; for a grid, the creator queues every point once."""
    storage_obj = _connect(storage, config.heartbeat)
    sampler = QueueOnly() if config.grid is not None else optuna.samplers.TPESampler(seed=config.seed)
    try:
        study = optuna.create_study(study_name=STUDY_NAME, storage=storage_obj, sampler=sampler, direction="maximize")
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=STUDY_NAME, storage=storage_obj, sampler=sampler)
        if config.grid is not None:
            _wait_for_grid(study, config.grid)
        return study
    if config.grid is not None:
        points = [dict(zip(config.grid, values)) for values in itertools.product(*config.grid.values())]
        for point in points:
            study.enqueue_trial(point, skip_if_exists=True)
        study.set_user_attr("grid", config.grid)  # set last: marks the queue as complete
    return study


def _wait_for_grid(study: optuna.Study, grid: dict, timeout: float = 60.0) -> None:
    """Joining a grid study: wait until its creator has queued every point, and check it is our grid."""
    deadline = time.monotonic() + timeout
    while "grid" not in study.user_attrs:
        if time.monotonic() > deadline:
            raise BloodcellError("the study in this storage has no complete grid queue; use a fresh --storage")
        time.sleep(0.5)
    stored = study.user_attrs["grid"]
    if {k: [float(v) for v in vs] for k, vs in stored.items()} != {k: [float(v) for v in vs] for k, vs in grid.items()}:
        raise BloodcellError(f"this storage holds another grid ({stored}); use another --storage or --out")


class _NothingQueued(Exception):
    """Another worker took the last queued grid point between our look and our ask."""


class QueueOnly(optuna.samplers.BaseSampler):
    """A grid worker's sampler: parameters come only from the queue, never from sampling."""

    def infer_relative_search_space(self, study, trial) -> dict:
        return {}

    def sample_relative(self, study, trial, search_space) -> dict:
        return {}

    def sample_independent(self, study, trial, param_name, param_distribution):
        raise _NothingQueued()


def _give_silent_trials_a_heartbeat(study: optuna.Study, seen: set[int]) -> None:
    """Record one heartbeat for each running trial this worker sees for the first time.

    Optuna fails only trials whose last heartbeat is old; a worker killed after taking a point
    but before its first heartbeat leaves a running trial with none, which would wait forever.
    One heartbeat on our first sight makes such a trial go stale after the grace period like any
    other; for a live trial it changes nothing (its own worker keeps beating).
    """
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if trial._trial_id not in seen:
            seen.add(trial._trial_id)
            study._storage.record_heartbeat(trial._trial_id)


def work_through_grid(study: optuna.Study, objective, limit: int | None, pause: float) -> int:
    """Run queued grid points until none is queued or running; returns how many this worker ran."""
    states = optuna.trial.TrialState
    ran = 0
    seen_running: set[int] = set()

    def queued_only(trial: optuna.Trial) -> float:
        try:
            return objective(trial)
        except _NothingQueued:
            raise optuna.TrialPruned("no queued grid point left") from None

    while limit is None or ran < limit:
        _give_silent_trials_a_heartbeat(study, seen_running)
        optuna.storages.fail_stale_trials(study)  # a killed worker's point goes back in the queue
        waiting = study.get_trials(deepcopy=False, states=(states.WAITING,))
        if not waiting:
            if not study.get_trials(deepcopy=False, states=(states.RUNNING,)):
                break
            time.sleep(pause)  # others are busy, or have gone silent: look again
            continue
        study.optimize(queued_only, n_trials=1, show_progress_bar=False)
        ran += 1
    return ran


def tune(dataset: Dataset, out_dir: Path, config: TuneConfig, storage: str | None = None) -> dict:
    """Run (or resume, or join) the search and write tune_results.csv/png and best_params.json."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    storage = storage or f"sqlite:///{(out_dir / 'tune.db').resolve()}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = open_study(storage, config)

    def objective(trial: optuna.Trial) -> float:
        started = time.perf_counter()
        score = cv_score(dataset, _params(trial, config), config)
        trial.set_user_attr("std", score["std"])
        trial.set_user_attr("epochs_run", score["epochs_run"])
        trial.set_user_attr("seconds", time.perf_counter() - started)
        return score["accuracy"]

    if config.grid is not None:
        work_through_grid(study, objective, config.trials, pause=config.heartbeat)
    else:
        study.optimize(objective, n_trials=config.trials or 20, show_progress_bar=True)
    return write_results(study, out_dir)


def write_results(study: optuna.Study, out_dir: Path) -> dict:
    trials = sorted(
        study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)),
        key=lambda t: t.value,
        reverse=True,
    )
    if not trials:
        raise BloodcellError(f"{out_dir}: no completed trials yet")
    rows = [
        {
            **t.params,
            "cv_accuracy": round(t.value, 4),
            "cv_std": round(t.user_attrs.get("std", float("nan")), 4),
            "mean_epochs_run": float(np.mean(t.user_attrs.get("epochs_run", [0]))),
            "seconds": round(t.user_attrs.get("seconds", float("nan")), 1),
        }
        for t in trials
    ]
    write_csv(out_dir / "tune_results.csv", rows)
    header = list(rows[0])
    plots.table(
        [[str(r[h]) for h in header] for r in rows],
        header,
        out_dir / "tune_results.png",
        title="CV accuracy, best first",
    )
    best = {"params": trials[0].params, "cv_accuracy": trials[0].value, "completed_trials": len(trials)}
    write_json(out_dir / "best_params.json", best)
    return {**best, "results": rows}
