"""Adapting a trained run to a lab's own images: fine-tuning on a few labelled cells per class.

Another lab's stains, camera and framing leave differences that no augmentation covers, and a
few labelled cells per class from that lab close most of the gap. `finetune` continues training
the run's network on them, mixed with BloodMNIST training images so that all eight classes stay
known (a lab's folder rarely has every class), with the run's own preprocessing, normalisation
and augmentations and the one training loop. Part of the lab's images is held out: with the
validation split it fits the temperature, and it is scored. The out-of-distribution model is
refitted with the lab's cells among the familiar ones. The result is an ordinary run directory.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from bloodcell import runs
from bloodcell.config import knob
from bloodcell.datasets.bloodmnist import Dataset, Split
from bloodcell.datasets.folders import labelled_folders
from bloodcell.errors import BloodcellError
from bloodcell.evaluation import metrics
from bloodcell.evaluation.scoring import evaluate
from bloodcell.files import write_csv, write_json
from bloodcell.images import crops, decode
from bloodcell.inference import ood
from bloodcell.inference.calibrate import fit_temperature
from bloodcell.inference.classifier import Classifier
from bloodcell.reporting import plots
from bloodcell.reporting.figures import write_figures
from bloodcell.training.loop import fit
from bloodcell.training.recipe import TrainConfig, with_overrides


@dataclass(frozen=True)
class FinetuneConfig:
    """How a run is adapted; the defaults were chosen on the cross-lab dev set (benchmarks/finetune_curve.py)."""

    epochs: int = knob(10, "passes over the mixed training set (lab images and BloodMNIST replay)")
    lr: float = knob(2e-3, "peak learning rate (one-cycle)")
    batch_size: int = knob(128, "images per step")
    replay: int = knob(2000, "BloodMNIST training images mixed in, so that every class stays known")
    lab_share: float = knob(0.25, "share of the mixed training set made of (repeated) lab images")
    holdout: float = knob(0.2, "share of each class's lab images held out for calibration and scoring")
    seed: int = knob(42, "random seed (the hold-out draw and training)")

    def __post_init__(self):
        if not (1 <= self.epochs <= 1000 and 1 <= self.batch_size <= 4096 and 0 < self.lr <= 1):
            raise BloodcellError("finetune: epochs 1..1000, batch size 1..4096 and lr in (0, 1] please")
        if not (0 <= self.holdout < 1 and 0 < self.lab_share < 1 and self.replay >= 0):
            raise BloodcellError("finetune: holdout in [0, 1), lab_share in (0, 1) and replay >= 0 please")


def lab_images(classifier: Classifier, folder: Path) -> tuple[Split, list[str], dict[str, int]]:
    """The lab's labelled images as model input (the run's own crop), their files, and counts."""
    files, labels, counts = labelled_folders([folder], classifier.classes)
    images, kept, kept_labels, skipped = [], [], [], []
    for path, label in zip(files, labels):
        try:
            images.append(classifier.prepare(path)[0])
        except decode.ImageError as exc:
            skipped.append(f"{path}: {exc}")
            continue
        kept.append(str(path))
        kept_labels.append(label)
    if not images:
        raise BloodcellError(f"{folder}: none of the {len(files)} images could be read ({skipped[0]})")
    return Split(crops.to_tensor(images), torch.tensor(kept_labels)), kept, counts


def hold_out(labels: torch.Tensor, share: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices to train on and to hold out: `share` of each class, none of a class with under 3 images."""
    generator = torch.Generator().manual_seed(seed)
    train, held = [], []
    for k in labels.unique().tolist():
        members = (labels == k).nonzero().squeeze(1)
        members = members[torch.randperm(len(members), generator=generator)]
        n_held = math.floor(len(members) * share) if len(members) >= 3 else 0
        held.append(members[:n_held])
        train.append(members[n_held:])
    return torch.cat(train).sort().values, torch.cat(held).sort().values


def finetune(
    run_dir: Path,
    folder: Path,
    dataset: Dataset,
    out: Path,
    config: FinetuneConfig | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Fine-tune the run in `run_dir` on the labelled images in `folder`; write the new run to `out`."""
    config = config or FinetuneConfig()
    parent = Classifier.from_run(run_dir)
    if Path(out).resolve() == Path(run_dir).resolve():
        raise BloodcellError(f"{out}: the fine-tuned run needs its own folder (--out), not the parent's")
    runs.check_run_dir(out, overwrite=overwrite)
    if dataset.image_size != parent.image_size:
        raise BloodcellError(f"the run takes {parent.image_size} px images but the data is {dataset.image_size} px")
    lab, files, counts = lab_images(parent, folder)
    train_idx, held_idx = hold_out(lab.labels, config.holdout, config.seed)
    lab_train, lab_held = lab.subset(train_idx), lab.subset(held_idx)

    generator = torch.Generator().manual_seed(config.seed)
    replay = dataset.train.subset(torch.randperm(len(dataset.train), generator=generator)[: config.replay])
    copies = max(1, round(config.lab_share * len(replay) / ((1 - config.lab_share) * len(lab_train))))
    mixed = Split(
        torch.cat([replay.images, lab_train.images.repeat(copies, 1, 1, 1)]),
        torch.cat([replay.labels, lab_train.labels.repeat(copies)]),
    )
    parent_config = TrainConfig.from_dict(parent.record.train_config) if parent.record.train_config else TrainConfig()
    train_config = with_overrides(
        parent_config, epochs=config.epochs, lr=config.lr, batch_size=config.batch_size, seed=config.seed, patience=None
    )
    model = parent.model.float().train()
    p = parent.record.preprocessing
    runs.prepare_run_dir(out, overwrite=overwrite)
    result = fit(
        model,
        mixed,
        None,
        train_config,
        progress=progress,
        description="fine-tuning",
        normalisation=(list(p.mean), list(p.std), list(p.colour_target) if p.colour_target else None),
    )

    calibration = _concat(dataset.val, lab_held)
    tuned = Classifier(result.model.eval(), parent.record)
    temperature = fit_temperature(tuned.logits(calibration.images), calibration.labels)
    detector = _refit_ood(tuned, _concat(dataset.train, lab_train), calibration) if parent.ood else None
    record = replace(
        parent.record,
        temperature=temperature,
        ood_threshold=detector.threshold if detector else None,
        train_config=parent.record.train_config | {"finetune": asdict(config)},
        data=parent.record.data | {"finetuned_from": str(Path(run_dir).resolve()), "lab_images": str(folder)},
        train_seconds=result.seconds,
    )
    classifier = Classifier(result.model, record, detector)
    scores = {"val": evaluate(classifier, dataset.val)}
    if len(lab_held):
        scores["lab_holdout"] = evaluate(classifier, lab_held)
    record = replace(record, metrics={k: metrics.headline(v) for k, v in scores.items()})

    out = Path(out)
    write_figures(classifier, dataset.val, scores["val"], out, "val")
    write_csv(out / runs.HISTORY, result.history)
    plots.history_curves(result.history, out / "learning_curves.png", title=f"{record.arch}, fine-tuned")
    held_files = set(held_idx.tolist())
    write_csv(
        out / "lab_images.csv",
        [
            {"file": f, "class": classifier.classes[y], "use": "held out" if i in held_files else "training"}
            for i, (f, y) in enumerate(zip(files, lab.labels.tolist()))
        ],
    )
    write_json(out / runs.METRICS, scores)
    runs.write_model(out, record, result.model.state_dict(), detector.tensors() if detector else None)
    return {
        "run_dir": str(out),
        "lab_images": len(lab),
        "per_class": counts,
        "trained_on": len(lab_train),
        "held_out": len(lab_held),
        "copies": copies,
        "temperature": temperature,
        "metrics": record.metrics,
    }


def _concat(a: Split, b: Split) -> Split:
    return Split(torch.cat([a.images, b.images]), torch.cat([a.labels, b.labels]))


def _refit_ood(classifier: Classifier, train: Split, calibration: Split) -> ood.OodModel:
    def features(images: torch.Tensor) -> torch.Tensor:
        return classifier.logits_and_features(images)[1]

    return ood.fit(features(train.images), train.labels, features(calibration.images))
