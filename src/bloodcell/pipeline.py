"""`bloodcell train` as a function: data -> fit (checkpointed) -> calibrate -> evaluate -> run directory."""

from __future__ import annotations

import shutil
from pathlib import Path

from bloodcell import __version__, plots, runs
from bloodcell.calibrate import fit_temperature
from bloodcell.data import CLASSES, Dataset
from bloodcell.evaluate import evaluate
from bloodcell.predict import Classifier
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
        return runs.read_json(run_dir / runs.METRICS)  # already finished: nothing to do
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

    meta = {
        "arch": config.model,
        "arch_args": config.model_args,
        "classes": list(CLASSES),
        "image_size": dataset.image_size,
        "normalize": {"mean": result.mean, "std": result.std},
        "temperature": 1.0,
        "train_config": config.to_dict(),
        "data": {"file": str(dataset.path), "md5": dataset.md5, "official": dataset.official},
        "bloodcell_version": __version__,
        "train_seconds": result.seconds,
    }
    classifier = Classifier(result.model, meta)
    val_logits = classifier.logits(dataset.val.images)
    meta["temperature"] = fit_temperature(val_logits, dataset.val.labels)
    val = evaluate(classifier, dataset.val, logits=val_logits)
    test = evaluate(classifier, dataset.test, figures_dir=run_dir)  # the one look at test
    test_tta = evaluate(classifier, dataset.test, tta=True)
    metrics = {"val": val, "test": test, "test_tta": test_tta}
    meta["metrics"] = {split: headline(values) for split, values in metrics.items()}

    runs.write_csv(run_dir / runs.HISTORY, result.history)
    plots.history_curves(result.history, run_dir / "learning_curves.png", title=config.model)
    runs.write_json(run_dir / runs.METRICS, metrics)
    runs.save_tensors(run_dir / runs.MODEL_WEIGHTS, result.model.state_dict())
    runs.write_json(run_dir / runs.MODEL_META, meta)  # written last: its presence marks a finished run
    shutil.rmtree(checkpoint, ignore_errors=True)
    return metrics


def headline(values: dict) -> dict:
    """The few numbers worth keeping in model.json and printing."""
    keys = ("accuracy", "balanced_accuracy", "auc_macro_ovr", "f1_macro", "nll", "ece")
    return {k: values[k] for k in keys if k in values}
