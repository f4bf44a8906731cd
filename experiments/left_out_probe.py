"""What moves a left-out lab at test time? (not part of the test suite)

    python experiments/left_out_probe.py RUN LAB_FOLDER [--classes NAMES] [--red-cell PX]

RUN is a leave-one-lab-out run that never saw LAB_FOLDER (`benchmarks/leave_one_lab_out.py
--runs KEEP`). The lab's images are framed once, then scored with one change at a time, each
of which a lab could make without retraining:

- framing: the cell finder's own scale, image by image, against the lab's magnification measured
  once over its images (`--crop cell:measure`: the whole, round red cells of up to 200 of them,
  pooled; each image on its own where under a quarter show any), or one stated (`--red-cell PX`);
- colour normalisation: the per-image gain on the Lab spread capped lower than the run's 4x
  (the lab's images are far flatter than the training labs', so their colours are stretched most),
  or one gain shared by a and b (the smaller), so that hues are not turned by stretching a more
  than b;
- focus: a Gaussian blur or an unsharp mask on the model input.

If none of them moves accuracy much, what fails is what the network learnt, not the pipeline
around it. Also prints where each class's images go (the confusion, by predicted class).
The answer is documented in docs/other-labs.md#what-a-lab-can-change-without-retraining.
"""

from __future__ import annotations

import argparse
import collections
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter

import bloodcell
from bloodcell import runs
from bloodcell.classes import WHITE_CELLS
from bloodcell.datasets.folders import labelled_folders
from bloodcell.evaluation.provenance import stamp_line
from bloodcell.evaluation.scoring import score_records
from bloodcell.images import colour
from bloodcell.inference import network
from bloodcell.inference.classifier import PredictOptions

ONE_CELL = PredictOptions(cells="one")


def capped_normalisation(max_l: float, max_ab: float, shared_chroma: bool = False) -> Callable:
    """`colour.normalize_colours` with separate caps on the lightness and the colour gains, and
    (`shared_chroma`) a and b stretched by the smaller of their two gains."""

    def normalise(pixels: torch.Tensor, target: list[float]) -> torch.Tensor:
        lab = colour.rgb_to_lab(pixels)
        mean = lab.mean(dim=(2, 3), keepdim=True)
        spread = lab.std(dim=(2, 3), keepdim=True).clamp(min=colour.MIN_SPREAD)
        gain = torch.tensor(target[3:]).view(1, 3, 1, 1) / spread
        chroma = gain[:, 1:].amin(dim=1, keepdim=True).expand(-1, 2, -1, -1) if shared_chroma else gain[:, 1:]
        gain = torch.cat([gain[:, :1].clamp(max=max_l), chroma.clamp(max=max_ab)], dim=1)
        return colour.lab_to_rgb((lab - mean) * gain + torch.tensor(target[:3]).view(1, 3, 1, 1))

    return normalise


def filtered(prepared: list, image_filter: ImageFilter.Filter) -> list:
    """The prepared model inputs with a PIL filter applied to each."""
    out = []
    for item in prepared:
        framed = tuple((np.asarray(Image.fromarray(px).filter(image_filter)), frame) for px, frame in item.cells)
        out.append(replace(item, cells=framed))
    return out


def main() -> None:
    print(stamp_line(), flush=True)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("lab", type=Path)
    parser.add_argument("--classes", default=",".join(WHITE_CELLS), help="the classes the lab's images hold")
    parser.add_argument("--red-cell", type=float, metavar="PX", help="also score with this red cell stated (cell:PX)")
    args = parser.parse_args()
    classifier = bloodcell.load(args.run).restricted_to(args.classes.split(","))
    files, labels, counts = labelled_folders([args.lab], classifier.classes)
    names = [str(f) for f in files]

    def prepare(options: PredictOptions) -> list:
        return classifier.prepare_sources([(str(f), f) for f in files], options)

    def score(prepared: list) -> tuple[dict, list[dict]]:
        records = classifier.classify_prepared(names, prepared, ONE_CELL)
        return score_records(records, labels, classifier.classes, counts), records

    measured, scale = classifier.measured_options(files, replace(ONE_CELL, crop=runs.MEASURE))
    print(f"{args.lab}: {len(files)} images; {scale.describe()}")

    base = prepare(ONE_CELL)
    pixels = torch.from_numpy(np.stack([px for item in base for px, _ in item.cells])).permute(0, 3, 1, 2)
    spread = colour.rgb_to_lab(pixels.float() / 255).std(dim=(2, 3)).median(0).values
    target = classifier.record.preprocessing.colour_target
    if target:
        gain = torch.tensor(target[3:]) / spread.clamp(min=colour.MIN_SPREAD)
        print(
            "median Lab spread (L, a, b): " + ", ".join(f"{v:.1f}" for v in spread.tolist()) + "; the run's "
            "normalisation stretches it " + ", ".join(f"{v:.2f}x" for v in gain.tolist())
        )
    stated = replace(ONE_CELL, crop=f"cell:{args.red_cell}") if args.red_cell else None
    probes: dict[str, Callable[[], tuple[dict, list[dict]]]] = {
        "as the run frames and normalises": lambda: score(base),
        f"`--crop cell:measure` ({measured.crop})": lambda: score(prepare(measured)),
        **({f"stated `--crop cell:{args.red_cell:g}`": lambda: score(prepare(stated))} if args.red_cell else {}),
        "colour gain capped at 2": lambda: with_normalisation(capped_normalisation(2, 2), lambda: score(base)),
        "colour gain capped at 1.5 on a, b": lambda: with_normalisation(
            capped_normalisation(4, 1.5), lambda: score(base)
        ),
        "one colour gain for a and b": lambda: with_normalisation(
            capped_normalisation(4, 4, shared_chroma=True), lambda: score(base)
        ),
        "blur, sigma 1 px": lambda: score(filtered(base, ImageFilter.GaussianBlur(1))),
        "unsharp mask, radius 1, 150%": lambda: score(filtered(base, ImageFilter.UnsharpMask(1, 150, 0))),
    }
    print("\n| test-time change | accuracy | macro recall | flagged | right among unflagged |\n|---|---|---|---|---|")
    confusion = None
    for name, probe in probes.items():
        scores, records = probe()
        confusion = confusion or records
        accuracy, recall, flagged = scores["accuracy"], scores["macro_recall"], scores["flagged_fraction"]
        print(f"| {name} | {accuracy:.3f} | {recall:.3f} | {flagged:.3f} | {scores['selective_accuracy']:.3f} |")
    print("\n| true class | predicted (as the run frames and normalises) |\n|---|---|")
    for k in sorted(set(labels)):
        answers = collections.Counter(r["class"] for r, y in zip(confusion, labels) if y == k)
        print(f"| {classifier.classes[k]} | {', '.join(f'{c} {n}' for c, n in answers.most_common())} |")


def with_normalisation(normalise: Callable, probe: Callable):
    """Run `probe` with the network's colour normalisation replaced by `normalise`."""
    original = network.normalize_colours
    network.normalize_colours = normalise
    try:
        return probe()
    finally:
        network.normalize_colours = original


if __name__ == "__main__":
    main()
