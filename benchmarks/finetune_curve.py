"""Fine-tuning to a new lab: accuracy on the rest of its images against labelled images per class.

    python benchmarks/finetune_curve.py RUN --data-dir ../shared/data [--shots 1 5 10 25] [--draws 5]
        [--classes NAMES] [--set KNOB=VALUE ...]

For each number of labelled images per class and each random draw, picks that many images per
class from `ood_dev` (both folders; fewer where a class has fewer), runs `bloodcell.finetune` on
them, and scores the fine-tuned run on every other dev image (the five classes present).
Prints one JSON line per draw and a table of mean +- std; the zero-shot run is the first row.
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
from bloodcell.evaluation.provenance import stamp_line
from bloodcell.evaluation.scoring import score_records
from bloodcell.workflows.finetune import FinetuneConfig, finetune


def main() -> None:
    print(stamp_line(), flush=True)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--data-dir")
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
    dev = [root / "ood_dev" / "bccd_crops", root / "ood_dev" / "bccd_fields"]
    files, labels, _ = labelled_folders(dev, parent.classes)
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(label, []).append(i)

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
            picked = {k: rng.sample(members, min(shots, len(members) - 1)) for k, members in by_class.items()}
            chosen = {i for members in picked.values() for i in members}
            rest = [i for i in range(len(files)) if i not in chosen]
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
    print("\n| labelled images per class | accuracy on the rest of ood_dev |\n|---|---|")
    for shots, values in results.items():
        spread = f" +- {statistics.stdev(values):.3f}" if len(values) > 1 else ""
        print(f"| {shots or 'zero-shot'} | {statistics.mean(values):.3f}{spread} |")


if __name__ == "__main__":
    main()
