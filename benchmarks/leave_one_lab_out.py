"""Leave one lab out: how a recipe trained on some labs does on a lab it has never seen.

    python benchmarks/leave_one_lab_out.py VARIANT [VARIANT ...] --data-dir DIR [--seeds 0 1 2]
        [--held-out pbc chula lisc] [--runs KEEP_DIR] [--all-labs] [--show-test] [--epochs N]
    python benchmarks/leave_one_lab_out.py --table A/leave_one_lab_out.json B/... [--runs OUT]

DIR holds the BloodMNIST file of the variant's image size (`bloodcell build-data` makes the 64 and
128 px ones), `labs/chula` and `labs/lisc` (trainable lab folders with group manifests),
`pbc_sample/` (full-size PBC images) and `ood_dev/` (BCCD, never trained on).

For each variant, seed and held-out lab L in {pbc, chula, lisc}, the variant is trained on the
other two (PBC is BloodMNIST's training split; each lab folder keeps its held-out groups apart to
calibrate), then scored on all of L's images through `predict`'s own path (the run's crop and
size, answers restricted to the five white-cell classes the labs hold), and on BCCD (dev).
Per held-out set: accuracy, macro recall, the share flagged for review, the accuracy of the
unflagged images, and the AUROC of the confidence and of the out-of-distribution score for
telling wrong answers from right ones. PBC is scored on the 250 full-size white-cell images of
`pbc_sample`; a run without PBC trains as many steps as one with it (more epochs over the small
labs). Runs with PBC also report BloodMNIST validation accuracy. `--all-labs` adds the model
trained on all three labs (the one a lab would get), with BCCD and BloodMNIST validation;
`--show-test` prints its BloodMNIST test accuracy, for the final recipe only.

Prints one JSON line per run, then a Markdown table of mean +- std over seeds per variant and
held-out lab, and writes `leave_one_lab_out.json` and `.png` beside the runs.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

import bloodcell
from bloodcell.classes import WHITE_CELLS
from bloodcell.datasets import bloodmnist
from bloodcell.datasets.folders import labelled_folders
from bloodcell.datasets.labs import read_lab
from bloodcell.evaluation.provenance import mean_std, stamp, stamp_line
from bloodcell.evaluation.scoring import score_records
from bloodcell.files import write_json
from bloodcell.inference.classifier import PredictOptions
from bloodcell.reporting import plots
from bloodcell.training.augment import AugmentConfig
from bloodcell.training.loop import batch_shares
from bloodcell.training.recipe import PRESETS, TrainConfig
from bloodcell.training.sampling import steps_per_epoch
from bloodcell.workflows.pipeline import TrainingData, train_run

LABS = ("pbc", "chula", "lisc")
# Photometric and stain augmentation of the cross-lab recipe, in the units of a 28 px image.
PHOTO = AugmentConfig(stain=0.15, brightness=0.15, contrast=0.15, gamma=0.2, saturation=0.25, blur=0.8, scale=0.15)
RES28 = replace(PRESETS["crosslab"], lab_share=0.5)  # res-small, 15 epochs, Lab colour, PHOTO, crop cell
# Stronger stain, colour, blur and zoom: labs differ most in sharpness and magnification.
STRONG = replace(
    PHOTO, translate=4, stain=0.3, brightness=0.25, contrast=0.25, gamma=0.3, saturation=0.4, blur=3.0, scale=0.5
)
# ImageNet Lite0 at 64 px, BatchNorm frozen, Lab colour, PHOTO + translate, blur; 4 epochs, as first
# packaged. Every lite64-* variant changes one setting of it; lite64-long (8 epochs) is the packaged recipe.
LITE64 = replace(PRESETS["multilab"], epochs=4)
VARIANTS: dict[str, TrainConfig] = {
    "res28": RES28,
    "res28-nolab": replace(RES28, colour="none"),
    "res28-noaug": replace(RES28, augment=AugmentConfig()),
    "res28-gn": replace(RES28, model="res-small-gn"),
    "lite64": LITE64,
    "lite64-trainbn": replace(LITE64, freeze_norm=False),  # BatchNorm statistics trained: the recipe before
    "lite64-nolab": replace(LITE64, colour="none"),
    "lite64-ema": replace(LITE64, ema_decay=0.998),
    "lite64-long": PRESETS["multilab"],
    "lite64-strong": replace(LITE64, augment=STRONG),
    "lite96": replace(LITE64, image_size=96, augment=replace(PHOTO, translate=6, blur=2.7)),
    "lite64-haze": replace(LITE64, augment=replace(LITE64.augment, haze=0.8)),  # flat, veiled labs
    "lite64-measure": replace(LITE64, crop="cell:measure"),  # each lab framed at its measured magnification
}


def white_cell_folder_scores(classifier, folders: list[Path], prepared: dict) -> dict:
    """Score labelled folders the way `evaluate --images --classes <white cells>` does; the
    decoded and framed inputs are reused between runs of one image size and crop."""
    restricted = classifier.restricted_to(WHITE_CELLS)
    files, labels, counts = labelled_folders(folders, classifier.classes)
    options = PredictOptions(cells="one")  # a labelled image is one cell
    key = (tuple(map(str, folders)), classifier.image_size, classifier.record.preprocessing.crop)
    if key not in prepared:
        prepared[key] = restricted.prepare_sources([(str(f), f) for f in files], options)
    records = restricted.classify_prepared([str(f) for f in files], prepared[key], options)
    return score_records(records, labels, classifier.classes, counts)


def summary_row(scores: dict) -> dict:
    keys = ("accuracy", "macro_recall", "flagged_fraction", "selective_accuracy", "auroc_wrong_confidence")
    return {k: scores[k] for k in keys} | {"auroc_wrong_ood": scores.get("auroc_wrong_ood"), "n": scores["n"]}


def train_without(held_out: str, config: TrainConfig, labs: dict, dataset, run_dir: Path):
    """Train `config` on every lab but `held_out`; without PBC, as many steps as with it."""
    others = [labs[name] for name in LABS[1:] if name != held_out]
    config = replace(config, labs=tuple(lab.folder for lab in others), bloodmnist=held_out != "pbc")
    if held_out == "pbc":
        with_pbc = replace(config, bloodmnist=True)
        full = TrainingData.assemble(dataset, others, with_pbc)
        alone = TrainingData.assemble(dataset, others, config)
        steps = steps_per_epoch(len(full.train), config.batch_size, full.sources, batch_shares(with_pbc, full.sources))
        alone_steps = steps_per_epoch(
            len(alone.train), config.batch_size, alone.sources, batch_shares(config, alone.sources)
        )
        config = replace(config, epochs=max(1, round(config.epochs * steps / alone_steps)))
    train_run(dataset, run_dir, config, progress=False, labs=others, overwrite=True)
    return bloodcell.load(run_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="*", metavar="VARIANT", help=f"one of {', '.join(VARIANTS)}")
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--held-out", nargs="+", choices=LABS, default=list(LABS))
    parser.add_argument("--runs", type=Path, help="keep the runs here (default: a temporary folder)")
    parser.add_argument("--all-labs", action="store_true", help="also train on all three labs")
    parser.add_argument("--show-test", action="store_true", help="print the all-labs model's test accuracy")
    parser.add_argument("--epochs", type=int, help="override every variant's epochs (a quick look, not a result)")
    parser.add_argument(
        "--table", type=Path, nargs="+", metavar="JSON", help="join earlier runs' leave_one_lab_out.json into one table"
    )
    args = parser.parse_args()
    if args.table:
        joined(args.table, args.runs or Path("."))
        return
    if not args.variants or not args.data_dir:
        parser.error("give the variants and --data-dir (or --table JSON...)")
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    print(stamp_line(), flush=True)
    keep = args.runs or Path(tempfile.mkdtemp(prefix="lolo-"))
    keep.mkdir(parents=True, exist_ok=True)
    pbc_files = [args.data_dir / "pbc_sample" / c.replace(" ", "_") for c in WHITE_CELLS]
    pbc_folder = Path(tempfile.mkdtemp(prefix="pbc-white-cells-"))
    for source in pbc_files:  # pbc_sample's white-cell folders, as one labelled folder
        (pbc_folder / source.name).symlink_to(source.resolve())
    held_out_sets = {
        "pbc": [pbc_folder],
        "chula": [args.data_dir / "labs/chula"],
        "lisc": [args.data_dir / "labs/lisc"],
    }
    bccd = [args.data_dir / "ood_dev/bccd_crops", args.data_dir / "ood_dev/bccd_fields"]
    prepared: dict = {}
    rows = []
    for variant in args.variants:
        base = VARIANTS[variant]
        dataset = bloodmnist.load(args.data_dir, size=base.image_size)
        labs = {name: read_lab(args.data_dir / "labs" / name, base.image_size, base.crop) for name in LABS[1:]}
        folds = list(args.held_out) + (["none"] if args.all_labs else [])
        for seed in args.seeds:
            for held_out in folds:
                run_dir = keep / f"{variant}-without-{held_out}-{seed}"
                config = replace(base, seed=seed, epochs=args.epochs or base.epochs)
                classifier = train_without(held_out, config, labs, dataset, run_dir)
                record = classifier.record
                row = {"variant": variant, "seed": seed, "held_out": held_out, "train_seconds": record.train_seconds}
                if held_out != "none":
                    row["held_out_scores"] = summary_row(
                        white_cell_folder_scores(classifier, held_out_sets[held_out], prepared)
                    )
                row["bccd"] = summary_row(white_cell_folder_scores(classifier, bccd, prepared))
                if "val" in record.metrics and record.train_config.get("bloodmnist", True):
                    row["bloodmnist_val"] = record.metrics["val"]["accuracy"]
                    row["bloodmnist_val_flagged"] = record.metrics["val"].get("flagged_fraction")
                if held_out == "none" and args.show_test:
                    row["bloodmnist_test"] = record.metrics["test"]["accuracy"]
                    row["bloodmnist_test_tta"] = record.metrics["test_tta"]["accuracy"]
                    row["bloodmnist_test_flagged"] = record.metrics["test"].get("flagged_fraction")
                rows.append(row)
                print(json.dumps(row), flush=True)
                write_json(keep / "leave_one_lab_out.json", {"stamp": stamp(), "rows": rows})  # after each run
    table = markdown(rows)
    print(table)
    figure(rows, keep / "leave_one_lab_out.png")
    print(f"wrote {keep / 'leave_one_lab_out.json'} and .png")


def joined(files: list[Path], out: Path) -> None:
    """One table and figure from the rows of several invocations (each keeps its own stamp)."""
    parts = [json.loads(f.read_text()) for f in files]
    rows = [row for part in parts for row in part["rows"]]
    for part, f in zip(parts, files, strict=True):
        print(f"{f}: {part['stamp']}")
    print(markdown(rows))
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "leave_one_lab_out.json", {"stamp": stamp(), "joined": [p["stamp"] for p in parts], "rows": rows})
    figure(rows, out / "leave_one_lab_out.png")
    print(f"wrote {out / 'leave_one_lab_out.json'} and .png")


def _stats(values: list) -> str:
    values = [v for v in values if v is not None]
    return mean_std(values, 3) if values else "-"


def markdown(rows: list[dict]) -> str:
    """Per variant and held-out lab: mean +- std over seeds of the held-out lab's and BCCD's scores."""
    lines = [
        "| variant | held out | seeds | accuracy | macro recall | flagged | right among unflagged | AUROC conf. "
        "| AUROC OOD | BCCD accuracy | BCCD macro recall | BCCD flagged | BCCD right among unflagged "
        "| BloodMNIST val | train s |",
        "|" + "---|" * 15,
    ]
    keys = sorted(
        {(r["variant"], r["held_out"]) for r in rows}, key=lambda k: (k[0], LABS.index(k[1]) if k[1] in LABS else 9)
    )
    for variant, held_out in keys:
        group = [r for r in rows if r["variant"] == variant and r["held_out"] == held_out]
        held = [r.get("held_out_scores") or {} for r in group]
        cells = [_stats([h.get(k) for h in held]) for k in
                 ("accuracy", "macro_recall", "flagged_fraction", "selective_accuracy", "auroc_wrong_confidence",
                  "auroc_wrong_ood")]  # fmt: skip
        bccd = [_stats([r["bccd"][k] for r in group]) for k in
                ("accuracy", "macro_recall", "flagged_fraction", "selective_accuracy")]  # fmt: skip
        val = _stats([r.get("bloodmnist_val") for r in group])
        seconds = f"{np.median([r['train_seconds'] for r in group]):.0f}"
        lines.append(f"| {variant} | {held_out} | {len(group)} | " + " | ".join([*cells, *bccd, val, seconds]) + " |")
    return "\n".join(lines)


def figure(rows: list[dict], path: Path) -> Path:
    """Accuracy on each held-out lab and on BCCD per variant (mean over seeds), as a grouped bar chart."""
    variants = sorted({r["variant"] for r in rows})
    sets = [h for h in LABS if any(r["held_out"] == h for r in rows)] + ["bccd"]
    values = {
        v: [
            float(np.mean([
                (r["bccd"] if s == "bccd" else r["held_out_scores"])["accuracy"]
                for r in rows
                if r["variant"] == v and (r["held_out"] == s or (s == "bccd" and r["held_out"] in LABS))
            ] or [np.nan]))
            for s in sets
        ]
        for v in variants
    }  # fmt: skip
    return plots.grouped_bars(values, [f"{s} (held out)" if s != "bccd" else "BCCD (dev)" for s in sets], path,
                              title="Accuracy on labs never trained on (five white-cell classes)")  # fmt: skip


if __name__ == "__main__":
    main()
