"""Fine-tuning to a new lab: accuracy on the rest of its images against labelled images per class.

    python benchmarks/finetune_curve.py RUN --data-dir ../shared/data [--images DIR ...] [--shots 1 5 10 25]
        [--draws 5] [--classes NAMES] [--set KNOB=VALUE ...]

For each number of labelled images per class and each random draw, picks that many images per
class from the lab's folders (`--images`, default `ood_dev`'s two BCCD folders; fewer where a class
has fewer), runs `bloodcell.finetune` on them, and scores the fine-tuned run on the lab's other
images (the classes present). Where a folder has a `manifest.csv` of groups (the copies of one
cell, the frames of one slide), each picked image comes from another group and the images scored
share no group with them. Prints one JSON line per draw and a table of mean +- std; the zero-shot
run is the first row.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import tempfile
from dataclasses import fields
from pathlib import Path

import bloodcell
from bloodcell.datasets import bloodmnist
from bloodcell.datasets.folders import labelled_folders
from bloodcell.datasets.labs import groups_of
from bloodcell.evaluation.provenance import stamp_line
from bloodcell.evaluation.scoring import score_records
from bloodcell.workflows.finetune import FinetuneConfig, finetune


def main() -> None:
    print(stamp_line(), flush=True)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--data-dir")
    parser.add_argument("--images", nargs="+", type=Path, help="the lab's labelled folders (default: ood_dev)")
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 5, 10, 25])
    parser.add_argument("--draws", type=int, default=5)
    parser.add_argument("--classes", metavar="NAMES", help="score with predictions restricted to these classes")
    parser.add_argument("--set", nargs="*", default=[], metavar="KNOB=VALUE", help="FinetuneConfig knobs to change")
    args = parser.parse_args()
    knobs = {f.name: f.type for f in fields(FinetuneConfig)}
    changes = {}
    for item in args.set:
        name, _, value = item.partition("=")
        if name not in knobs:
            parser.error(f"--set {item}: FinetuneConfig has no knob {name!r} (it has {', '.join(knobs)})")
        parse = {"int": int, "float": float, "bool": lambda v: v.lower() in ("1", "true", "yes")}[knobs[name]]
        changes[name] = parse(value)
    root = bloodmnist.resolve_data_dir(args.data_dir)
    parent = bloodcell.load(args.run_dir)
    dataset = bloodmnist.load(args.data_dir, size=parent.image_size)
    folders = args.images or [root / "ood_dev" / "bccd_crops", root / "ood_dev" / "bccd_fields"]
    files, labels, _ = labelled_folders(folders, parent.classes)
    group_of = {}
    for folder in folders:
        inside = [f for f in files if f.is_relative_to(folder)]
        group_of |= {f: f"{folder}:{g}" for f, g in groups_of(Path(folder), inside).items()}
    groups = [group_of[f] for f in files]
    by_class: dict[int, dict[str, list[int]]] = {}  # class -> group -> images
    for i, label in enumerate(labels):
        by_class.setdefault(label, {}).setdefault(groups[i], []).append(i)

    def score(classifier, indices: list[int]) -> float:
        if args.classes:
            classifier = classifier.restricted_to(args.classes.split(","))
        records = classifier.predict_files([files[i] for i in indices], cells="one")
        return score_records(records, [labels[i] for i in indices], classifier.classes, {})["accuracy"]

    results = {0: [score(parent, list(range(len(files))))]}
    for shots in args.shots:
        results[shots] = []
        for draw in range(args.draws):
            rng = random.Random(1000 * shots + draw)
            picked = {}
            for k, by_group in by_class.items():  # one image from each of `shots` groups, a group always left
                chosen_groups = rng.sample(sorted(by_group), min(shots, len(by_group) - 1))
                picked[k] = [rng.choice(by_group[g]) for g in chosen_groups]
            used = {groups[i] for members in picked.values() for i in members}
            rest = [i for i in range(len(files)) if groups[i] not in used]
            with tempfile.TemporaryDirectory() as tmp:
                lab = Path(tmp) / "lab"
                for k, members in picked.items():
                    folder = lab / parent.classes[k].replace(" ", "_")
                    folder.mkdir(parents=True)
                    for i in members:
                        shutil.copy(files[i], folder / f"{i}_{Path(files[i]).name}")
                out = Path(tmp) / "run"
                finetune(Path(args.run_dir), lab, dataset, out, FinetuneConfig(**changes, seed=draw), progress=False)
                accuracy = score(bloodcell.load(out), rest)
            results[shots].append(accuracy)
            print(json.dumps({"shots": shots, "draw": draw, "test_images": len(rest), "accuracy": round(accuracy, 4)}))
    print(f"\n| labelled images per class | accuracy on the rest of {', '.join(map(str, folders))} |\n|---|---|")
    for shots, values in results.items():
        spread = f" +- {statistics.stdev(values):.3f}" if len(values) > 1 else ""
        print(f"| {shots or 'zero-shot'} | {statistics.mean(values):.3f}{spread} |")


if __name__ == "__main__":
    main()
