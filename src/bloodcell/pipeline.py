"""`bloodcell train` as a function: data -> fit (checkpointed) -> calibrate -> evaluate -> run directory."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

from bloodcell import metrics, models, plots, runs
from bloodcell.calibrate import fit_temperature
from bloodcell.data import CLASSES, Dataset
from bloodcell.evaluate import evaluate, write_figures
from bloodcell.files import read_json, write_csv, write_json
from bloodcell.predict import Classifier
from bloodcell.runs import Preprocessing, RunRecord
from bloodcell.train import TrainConfig, build_model, fit


def train_run(
    dataset: Dataset,
    run_dir: Path,
    config: TrainConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    stop_after_epochs: int | None = None,
) -> dict | None:
    """Train, calibrate on val, evaluate on test once; write the run directory. Returns metrics.

    Returns None when `stop_after_epochs` ended training early (an interrupted run, resumable).
    """
    run_dir = Path(run_dir)
    if resume and runs.is_run_dir(run_dir):
        return read_json(run_dir / runs.METRICS)  # already finished: nothing to do
    runs.prepare_run_dir(run_dir, overwrite=overwrite, resume=resume)
    model = build_model(config, dataset.image_size)
    checkpoint = run_dir / runs.CHECKPOINT
    result = fit(
        model,
        dataset.train,
        dataset.val,
        config,
        checkpoint_dir=checkpoint,
        resume=resume,
        progress=progress,
        description=f"training {config.model}",
        stop_after_epochs=stop_after_epochs,
    )
    if not result.finished:
        return None

    record = RunRecord(
        arch=config.model,
        arch_args=models.resolved_args(config.model),
        classes=CLASSES,
        preprocessing=Preprocessing(dataset.image_size, tuple(result.mean), tuple(result.std)),
        train_config=config.to_dict(),
        data={"file": str(dataset.path), "md5": dataset.md5, "official": dataset.official},
        train_seconds=result.seconds,
    )
    uncalibrated = Classifier(result.model, record)
    val_logits = uncalibrated.logits(dataset.val.images)
    classifier = Classifier(result.model, record.with_temperature(fit_temperature(val_logits, dataset.val.labels)))
    test_logits = classifier.logits(dataset.test.images)  # the one look at test
    scores = {
        "val": evaluate(classifier, dataset.val, logits=val_logits),
        "test": evaluate(classifier, dataset.test, logits=test_logits),
        "test_tta": evaluate(classifier, dataset.test, tta=True),
    }
    write_figures(classifier, dataset.test, scores["test"], run_dir, "test", logits=test_logits)
    record = replace(classifier.record, metrics={split: metrics.headline(values) for split, values in scores.items()})

    write_csv(run_dir / runs.HISTORY, result.history)
    plots.history_curves(result.history, run_dir / "learning_curves.png", title=config.model)
    write_json(run_dir / runs.METRICS, scores)
    runs.write_model(run_dir, record, result.model.state_dict())  # model.json last: marks a finished run
    shutil.rmtree(checkpoint, ignore_errors=True)
    return scores
