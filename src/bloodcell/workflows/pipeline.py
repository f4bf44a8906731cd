"""`bloodcell train` as a function: data -> fit (checkpointed) -> calibrate -> evaluate -> run directory.

The data is BloodMNIST's training split, and optionally labelled folders of other labs' cells
(`TrainConfig.labs`), each framed as `predict` frames images and split by group: most of each
lab is trained on, in fixed shares of every batch, and its held-out groups calibrate the model,
fit its review threshold and are scored."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from bloodcell import models, runs
from bloodcell.classes import CLASSES
from bloodcell.datasets.bloodmnist import Dataset, Split
from bloodcell.datasets.labs import LabImages, hold_out_groups, provenance, read_lab
from bloodcell.errors import BloodcellError
from bloodcell.evaluation import metrics
from bloodcell.evaluation.scoring import evaluate
from bloodcell.files import read_json, write_csv, write_json
from bloodcell.inference import network, ood
from bloodcell.inference.calibrate import fit_temperature
from bloodcell.inference.classifier import Classifier
from bloodcell.inference.ood import OodModel
from bloodcell.reporting import plots
from bloodcell.reporting.figures import write_figures
from bloodcell.runs import Preprocessing, RunRecord
from bloodcell.training import distributed
from bloodcell.training.loop import build_model, fit
from bloodcell.training.recipe import TrainConfig, differences


@dataclass(frozen=True)
class TrainingData:
    """What one run trains and is calibrated on: BloodMNIST's splits and the lab folders' parts.

    `sources` says which source each training image comes from (0 BloodMNIST when it is trained
    on, then the labs in order); `val_sources` the same for the held-out images, which calibrate
    the probabilities and fit the review threshold on every source the model learnt from."""

    train: Split
    sources: torch.Tensor | None
    val: Split
    val_sources: torch.Tensor | None
    lab_val: dict[str, Split]
    labs: list[dict]  # provenance of each lab folder

    @classmethod
    def assemble(cls, dataset: Dataset, labs: Sequence[LabImages], config: TrainConfig) -> TrainingData:
        if not labs:
            return cls(dataset.train, None, dataset.val, None, {}, [])
        parts = [hold_out_groups(lab, config.lab_holdout) for lab in labs]
        train_parts = ([dataset.train] if config.bloodmnist else []) + [t.split() for t, _ in parts]
        val_parts = ([dataset.val] if config.bloodmnist else []) + [v.split() for _, v in parts if len(v)]
        return cls(
            train=_concat(train_parts),
            sources=torch.cat([torch.full((len(p),), i) for i, p in enumerate(train_parts)]),
            val=_concat(val_parts),
            val_sources=torch.cat([torch.full((len(p),), i) for i, p in enumerate(val_parts)]),
            lab_val={lab.name: v.split() for lab, (_, v) in zip(labs, parts) if len(v)},
            labs=[provenance(lab, t, v) for lab, (t, v) in zip(labs, parts)],
        )


def _concat(parts: Sequence[Split]) -> Split:
    return Split(torch.cat([p.images for p in parts]), torch.cat([p.labels for p in parts]))


def read_labs(config: TrainConfig, image_size: int, progress: bool = True) -> list[LabImages]:
    """The recipe's lab folders, framed for it; each folder's problems printed one line each."""
    labs = [read_lab(folder, image_size, config.crop, progress) for folder in config.labs]
    names = [lab.name for lab in labs]
    if len(set(names)) != len(names):
        raise BloodcellError(f"--labs: two folders share a name ({', '.join(names)}); each lab needs its own name")
    for lab in labs:
        if progress:
            print(lab.describe(), file=sys.stderr, flush=True)
            for problem in lab.problems:
                print(f"bloodcell: warning: {problem}", file=sys.stderr, flush=True)
    return labs


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
    labs: Sequence[LabImages] | None = None,
) -> dict | None:
    """Train, calibrate on val, evaluate on test once; write the run directory. Returns metrics.

    Returns None when `stop_after_epochs` ended training early (an interrupted run, resumable).
    `teacher` (a run and the dataset at its image size) is distilled with weight `config.distill`.
    `labs` are the recipe's lab folders already read (`read_labs`), to reuse them between runs;
    by default they are read here. Each lab's held-out groups are scored as `val_<lab>`.
    """
    run_dir = Path(run_dir)
    if dataset.image_size != config.image_size:
        raise BloodcellError(
            f"{dataset.path}: images are {dataset.image_size} px but the recipe is for {config.image_size} px "
            "(--image-size, or a --preset of that size)"
        )
    if resume and runs.is_run_dir(run_dir):  # already finished: nothing to do, if it is this recipe
        finished = runs.read_record(run_dir).train_config
        changed = differences(finished, config.to_dict())
        if changed:
            raise BloodcellError(
                f"{run_dir}: finished with another recipe ({'; '.join(changed[:4])}); --resume continues a run "
                "as it was started: drop it to train afresh (with --overwrite), or use another --out"
            )
        return read_json(run_dir / runs.METRICS)
    distributed.setup(network.resolve_device(device))  # several processes (torchrun): rank 0 writes
    distributed.check_batch(config.batch_size)  # before anything is written
    if labs is None:
        labs = read_labs(config, dataset.image_size, progress and distributed.is_main())
    data = TrainingData.assemble(dataset, labs, config)
    if distributed.is_main():
        runs.prepare_run_dir(run_dir, overwrite=overwrite, resume=resume)
    distributed.barrier()
    model = build_model(config, dataset.image_size)
    checkpoint = run_dir / runs.CHECKPOINT
    teacher_logits = _teacher_logits(teacher, dataset, progress) if config.distill else None
    result = fit(
        model,
        data.train,
        data.val,
        config,
        checkpoint_dir=checkpoint,
        resume=resume,
        progress=progress,
        description=f"training {config.model}",
        stop_after_epochs=stop_after_epochs,
        teacher_logits=teacher_logits,
        sources=data.sources,
        device=device,
    )
    if not result.finished or not distributed.is_main():
        return None  # interrupted (resumable), or a helper process of a multi-process run

    provenance_ = {"file": str(dataset.path), "md5": dataset.md5, "official": dataset.official}
    if data.labs:
        provenance_ |= {"bloodmnist": config.bloodmnist, "labs": data.labs}
    if config.distill:
        provenance_["teacher"] = str(Path(teacher[0]).resolve())
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
        data=provenance_,
        train_seconds=result.seconds,
        warnings=real_image_warnings(config),
    )
    uncalibrated = Classifier(result.model, record)
    val_logits = uncalibrated.logits(data.val.images)
    detector = fit_ood(uncalibrated, data) if hasattr(result.model, "embed") else None
    record = replace(
        record,
        temperature=fit_temperature(val_logits, data.val.labels),
        ood_threshold=detector.threshold if detector else None,
    )
    classifier = Classifier(result.model, record, detector)
    scores = {}
    if config.bloodmnist:
        val_logits, val_ood = classifier.logits_and_ood(dataset.val.images)
        test_logits, test_ood = classifier.logits_and_ood(dataset.test.images)  # the one look at test
        scores["val"] = evaluate(classifier, dataset.val, logits=val_logits, ood_scores=val_ood)
        scores["test"] = evaluate(classifier, dataset.test, logits=test_logits, ood_scores=test_ood)
        scores["test_tta"] = evaluate(classifier, dataset.test, tta=True)
        write_figures(classifier, dataset.test, scores["test"], run_dir, "test", logits=test_logits)
    else:  # the lab folders alone: their held-out images are all there is to score
        scores["val"] = evaluate(classifier, data.val)
        write_figures(classifier, data.val, scores["val"], run_dir, "val")
    for name, split in data.lab_val.items():
        scores[f"val_{name}"] = evaluate(classifier, split)
    record = replace(classifier.record, metrics={split: metrics.headline(values) for split, values in scores.items()})

    write_csv(run_dir / runs.HISTORY, result.history)
    plots.history_curves(result.history, run_dir / "learning_curves.png", title=config.model)
    write_json(run_dir / runs.METRICS, scores)
    ood_tensors = detector.tensors() if detector else None
    runs.write_model(run_dir, record, result.model.state_dict(), ood_tensors)  # model.json last: a finished run
    shutil.rmtree(checkpoint, ignore_errors=True)
    return scores


def fit_ood(classifier: Classifier, data: TrainingData) -> OodModel:
    """The out-of-distribution model: the training features' class centres and covariance; the
    threshold from the held-out images of every source trained on."""

    def features(images: torch.Tensor) -> torch.Tensor:
        return classifier.logits_and_features(images)[1]

    return ood.fit(
        features(data.train.images), data.train.labels, features(data.val.images), val_sources=data.val_sources
    )


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
