"""How far a run's features can go on another lab: linear probes on `ood_dev`, no fine-tuning.

    python experiments/feature_probe.py RUN --data-dir ../shared/data [--shots 10 25] [--draws 5]

Takes the network's frozen features (the input of its last layer, length-normalised) for every
`ood_dev` image with the run's own crop, and fits a logistic regression over the classes present:
on all images with k-fold cross-validation (the most the features can give with plenty of that
lab's labels), and on that many images per class, drawn as `finetune_curve.py` draws them, scored
on the rest. Zero-shot accuracy, restricted to the same classes, is the first line. If the probes
stay low, the features, not the way of adapting them, are what bounds few-shot adaptation.

The answer is documented in docs/other-labs.md#single-lab-recipes.
"""

from __future__ import annotations

import argparse
import random
import statistics

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict

import bloodcell
from bloodcell.datasets import bloodmnist
from bloodcell.datasets.folders import labelled_folders
from bloodcell.evaluation.provenance import stamp_line
from bloodcell.images import crops


def main() -> None:
    print(stamp_line(), flush=True)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--data-dir")
    parser.add_argument("--shots", type=int, nargs="+", default=[10, 25])
    parser.add_argument("--draws", type=int, default=5)
    parser.add_argument("--folds", type=int, default=3)
    args = parser.parse_args()
    root = bloodmnist.resolve_data_dir(args.data_dir)
    classifier = bloodcell.load(args.run_dir)
    files, labels, _ = labelled_folders(
        [root / "ood_dev" / "bccd_crops", root / "ood_dev" / "bccd_fields"], classifier.classes
    )
    images = crops.to_tensor([classifier.prepare(f)[0] for f in files])
    _, features = classifier.logits_and_features(images)
    x = (features / features.norm(dim=1, keepdim=True).clamp_min(1e-12)).numpy()
    y = np.array(labels)
    present = [classifier.classes[k] for k in sorted(set(labels))]
    zero_shot = classifier.restricted_to(present).predict_proba(images).argmax(1).numpy()
    print(f"{len(y)} images, classes {', '.join(present)}")
    print(f"zero-shot, answers among the classes present: {np.mean(zero_shot == y):.3f}")
    folds = StratifiedKFold(args.folds, shuffle=True, random_state=0)
    predicted = cross_val_predict(LogisticRegression(max_iter=5000), x, y, cv=folds)
    print(f"probe on all images, {args.folds}-fold cross-validation: {np.mean(predicted == y):.3f}")
    by_class = {k: np.flatnonzero(y == k) for k in sorted(set(labels))}
    for shots in args.shots:
        accuracies = []
        for draw in range(args.draws):
            rng = random.Random(1000 * shots + draw)  # the draws of finetune_curve.py
            picked = [
                i for members in by_class.values() for i in rng.sample(list(members), min(shots, len(members) - 1))
            ]
            rest = np.setdiff1d(np.arange(len(y)), picked)
            probe = LogisticRegression(max_iter=5000).fit(x[picked], y[picked])
            accuracies.append(float(np.mean(probe.predict(x[rest]) == y[rest])))
        spread = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
        print(
            f"probe on {shots} images per class, scored on the rest: {statistics.mean(accuracies):.3f} +- {spread:.3f}"
        )


if __name__ == "__main__":
    main()
