"""`bloodcell train` as a function: data -> fit (checkpointed) -> calibrate -> evaluate -> run directory."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import torch

from bloodcell import distributed, inference, metrics, models, ood, plots, runs
from bloodcell.calibrate import fit_temperature
from bloodcell.data import CLASSES, Dataset
from bloodcell.errors import BloodcellError
from bloodcell.evaluate import evaluate, write_figures
from bloodcell.files import read_json, write_csv, write_json
from bloodcell.ood import OodModel
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
    teacher: tuple[Path, Dataset] | None = None,
    device: str = "cpu",
) -> dict | None:
    """Train, calibrate on val, evaluate on test once; write the run directory. Returns metrics.

    Returns None when `stop_after_epochs` ended training early (an interrupted run, resumable).
    `teacher` (a run and the dataset at its image size) is distilled with weight `config.distill`.
    """
    run_dir = Path(run_dir)
    if dataset.image_size != config.image_size:
        raise BloodcellError(
            f"{dataset.path}: images are {dataset.image_size} px but the recipe is for {config.image_size} px "
            "(--image-size, or a --preset of that size)"
        )
    if resume and runs.is_run_dir(run_dir):
        return read_json(run_dir / runs.METRICS)  # already finished: nothing to do
    distributed.setup(inference.resolve_device(device))  # several processes (torchrun): rank 0 writes
    distributed.check_batch(config.batch_size)  # before anything is written
    if distributed.is_main():
        runs.prepare_run_dir(run_dir, overwrite=overwrite, resume=resume)
    distributed.barrier()
    model = build_model(config, dataset.image_size)
    checkpoint = run_dir / runs.CHECKPOINT
    teacher_logits = _teacher_logits(teacher, dataset, progress) if config.distill else None
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
        teacher_logits=teacher_logits,
        device=device,
    )
    if not result.finished or not distributed.is_main():
        return None  # interrupted (resumable), or a helper process of a multi-process run

    record = RunRecord(
        arch=config.model,
        arch_args=models.resolved_args(config.model),
        classes=CLASSES,
        preprocessing=Preprocessing(
            dataset.image_size,
            tuple(result.mean),
            tuple(result.std),
            crop=config.crop,
            colour_target=tuple(result.colour_target) if result.colour_target else None,
        ),
        train_config=config.to_dict(),
        data={"file": str(dataset.path), "md5": dataset.md5, "official": dataset.official}
        | ({"teacher": str(Path(teacher[0]).resolve())} if config.distill else {}),
        train_seconds=result.seconds,
        warnings=real_image_warnings(config),
    )
    uncalibrated = Classifier(result.model, record)
    val_logits = uncalibrated.logits(dataset.val.images)
    detector = fit_ood(uncalibrated, dataset) if config.model.startswith("res-") else None
    record = replace(
        record,
        temperature=fit_temperature(val_logits, dataset.val.labels),
        ood_threshold=detector.threshold if detector else None,
    )
    classifier = Classifier(result.model, record, detector)
    val_logits, val_ood = classifier.logits_and_ood(dataset.val.images)
    test_logits, test_ood = classifier.logits_and_ood(dataset.test.images)  # the one look at test
    scores = {
        "val": evaluate(classifier, dataset.val, logits=val_logits, ood_scores=val_ood),
        "test": evaluate(classifier, dataset.test, logits=test_logits, ood_scores=test_ood),
        "test_tta": evaluate(classifier, dataset.test, tta=True),
    }
    write_figures(classifier, dataset.test, scores["test"], run_dir, "test", logits=test_logits)
    record = replace(classifier.record, metrics={split: metrics.headline(values) for split, values in scores.items()})

    write_csv(run_dir / runs.HISTORY, result.history)
    plots.history_curves(result.history, run_dir / "learning_curves.png", title=config.model)
    write_json(run_dir / runs.METRICS, scores)
    ood_tensors = detector.tensors() if detector else None
    runs.write_model(run_dir, record, result.model.state_dict(), ood_tensors)  # model.json last: a finished run
    shutil.rmtree(checkpoint, ignore_errors=True)
    return scores


def fit_ood(classifier: Classifier, dataset: Dataset) -> OodModel:
    """The out-of-distribution model: training features' class centres and covariance, the
    threshold from the validation split."""

    def features(images: torch.Tensor) -> torch.Tensor:
        return classifier.logits_and_features(images)[1]

    return ood.fit(features(dataset.train.images), dataset.train.labels, features(dataset.val.images))


def real_image_warnings(config: TrainConfig) -> tuple[str, ...]:
    """What a user should know before classifying full-size images with a model of this recipe."""
    if config.augment.sharpness or config.augment.blur:
        return ()
    return (
        "trained without blur/sharpen augmentation: on full-size images expect lower accuracy than on "
        "BloodMNIST itself (the fast preset of bloodcell 0.1 lost 1.6 points)",
    )


def _teacher_logits(teacher: tuple[Path, Dataset] | None, dataset: Dataset, progress: bool):
    """The teacher's logits (8-view TTA) on the training images at its own resolution."""
    if teacher is None:
        raise BloodcellError("distillation (distill > 0) needs a teacher run: train --teacher RUN")
    run_dir, teacher_data = teacher
    if len(teacher_data.train) != len(dataset.train) or not (teacher_data.train.labels == dataset.train.labels).all():
        raise BloodcellError(f"{teacher_data.path}: its training split is not the student's (same images, same order)")
    classifier = Classifier.from_run(run_dir)
    if progress:
        print(f"teacher {run_dir}: predicting {len(dataset.train)} training images", flush=True)
    return classifier.logits(teacher_data.train.images, tta=True)
