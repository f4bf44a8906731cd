"""Which validation images do several runs all get wrong, and does a soft vote of the runs help?

    python experiments/shared_errors.py RUN [RUN ...] --data-dir DIR [--out shared_errors.png]

Each run is scored on the validation split of its own image size (8-view TTA); the soft vote
averages their calibrated probabilities (every run must hold the same images, which `build-data`
guarantees: validation index i is the same cell at every size). Prints each run's accuracy, the
vote's, and every image all runs get wrong, with its label and each run's answer, and saves those
images side by side (at the largest size) as a PNG to look at. Errors that every model shares are
where more capacity or a vote cannot help: ambiguous cells, or labels a second reader might
dispute. The test split is never read here.

The answer is documented in docs/full-resolution.md#where-the-last-errors-are.
"""

from __future__ import annotations

import argparse

import torch
from PIL import Image

import bloodcell
from bloodcell.datasets import bloodmnist
from bloodcell.evaluation.provenance import stamp_line


def main() -> None:
    print(stamp_line(), flush=True)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--data-dir")
    parser.add_argument("--out", default="shared_errors.png")
    args = parser.parse_args()
    classifiers = [bloodcell.load(run) for run in args.runs]
    datasets = {c.image_size: bloodmnist.load(args.data_dir, size=c.image_size) for c in classifiers}
    labels = next(iter(datasets.values())).val.labels
    if any(not torch.equal(d.val.labels, labels) for d in datasets.values()):
        raise SystemExit("the runs' validation splits differ: build every size with `bloodcell build-data`")

    probabilities = []
    for run, classifier in zip(args.runs, classifiers):
        probabilities.append(classifier.predict_proba(datasets[classifier.image_size].val.images, tta=True))
        errors = int((probabilities[-1].argmax(1) != labels).sum())
        print(f"{run}: validation accuracy (TTA) {1 - errors / len(labels):.4f}, {errors} errors")
    vote = torch.stack(probabilities).mean(0)
    print(f"soft vote of {len(args.runs)} runs: {(vote.argmax(1) == labels).float().mean().item():.4f}")

    wrong = torch.stack([p.argmax(1) != labels for p in probabilities])
    shared = wrong.all(0).nonzero().squeeze(1).tolist()
    print(f"wrong in every run: {len(shared)} of {len(labels)} images")
    classes = classifiers[0].classes
    for i in shared:
        answers = ", ".join(f"{classes[int(p[i].argmax())]} {p[i].max():.2f}" for p in probabilities)
        print(f"  val index {i}: label {classes[int(labels[i])]}; runs say {answers}")
    if shared:
        largest = datasets[max(datasets)].val.images
        strip = torch.cat([largest[i] for i in shared], dim=2).permute(1, 2, 0).numpy()
        Image.fromarray(strip).save(args.out)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
