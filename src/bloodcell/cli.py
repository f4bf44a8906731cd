"""`bloodcell` command line: argument parsing only; every command calls plain library functions.

Exit codes: 0 success, 1 a user-fixable error (one line on stderr), 2 bad usage (argparse);
`predict` also returns 3 when some files could not be classified and 4 when none could.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from bloodcell import __version__
from bloodcell.errors import BloodcellError

EXIT_ERROR = 1
EXIT_SOME_FAILED = 3
EXIT_NONE_CLASSIFIED = 4
COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def command(name: str):
    """Register a handler for a sub-command."""

    def register(handler: Callable[[argparse.Namespace], int]):
        COMMANDS[name] = handler
        return handler

    return register


def emit_json(data: dict) -> None:
    print(json.dumps(data, indent=2, default=str))


def _load_dataset(args: argparse.Namespace):
    from bloodcell import data

    return data.load(args.data_dir, size=getattr(args, "size", 28), data_file=args.data_file)


def _data_options(p: argparse.ArgumentParser, size: bool = True) -> None:
    g = p.add_argument_group("data")
    g.add_argument(
        "--data-dir",
        help="folder holding bloodmnist*.npz (default: $BLOODCELL_DATA_DIR, else ~/.medmnist); "
        "the official file is downloaded there if missing",
    )
    g.add_argument("--data-file", help="use this BloodMNIST-format .npz instead of the official file")
    if size:
        g.add_argument("--size", type=int, default=28, choices=(28, 64, 128, 224), help="image size (default 28)")


def _json_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")


def _inference_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--precision",
        choices=("float32", "bfloat16"),
        default="float32",
        help="inference precision; bfloat16 is about 2.5x faster on CPUs with AVX512-BF16/AMX (default float32)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the model first (about 10 s; helps wide models, not the default res-small)",
    )


def _image_file_options(p: argparse.ArgumentParser) -> None:
    """How full-size cell images are classified (`predict` and `serve`)."""
    p.add_argument("--tta", action="store_true", help="average over the 8 flips/rotations")
    p.add_argument(
        "--min-confidence",
        type=float,
        default=0.8,
        help="flag images whose top probability is below this for review (default 0.8)",
    )
    p.add_argument(
        "--crop",
        default="medmnist",
        help="'medmnist' (the BloodMNIST geometry, default), 'none' (largest centred square) or a fraction",
    )


def _seed_option(p: argparse.ArgumentParser, default: int = 42) -> None:
    p.add_argument("--seed", type=int, default=default, help=f"random seed (default {default})")


# ---------------------------------------------------------------- info / explore


@command("info")
def cmd_info(args: argparse.Namespace) -> int:
    from bloodcell.explore import count_table, format_count_table

    dataset = _load_dataset(args)
    counts = count_table(dataset)
    if args.json:
        emit_json({**dataset.provenance(), "counts": counts})
        return 0
    print(f"file        {dataset.path}")
    print(f"md5         {dataset.md5} ({'official' if dataset.official else 'NOT the official file'})")
    print(f"image size  {dataset.image_size} x {dataset.image_size} px, RGB")
    print()
    print(format_count_table(counts))
    return 0


@command("explore")
def cmd_explore(args: argparse.Namespace) -> int:
    from bloodcell.explore import count_table, explore, format_count_table

    dataset = _load_dataset(args)
    paths = explore(dataset, Path(args.out), seed=args.seed)
    if args.json:
        emit_json({"counts": count_table(dataset), "figures": [str(p) for p in paths]})
        return 0
    print(format_count_table(count_table(dataset)))
    print()
    for path in paths:
        print(f"wrote {path}")
    return 0


# ---------------------------------------------------------------- the seed study


@command("reproduce")
def cmd_reproduce(args: argparse.Namespace) -> int:
    from bloodcell.study import PROTOCOLS, StudyConfig, markdown_table, reproduce, results_table

    config = StudyConfig(
        folds=args.folds,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        subset=args.subset,
        protocols=tuple(PROTOCOLS) if args.protocol == "both" else (args.protocol,),
    )
    summary = reproduce(_load_dataset(args), Path(args.out), config)
    if args.json:
        emit_json(summary)
        return 0
    header, rows = results_table(summary["models"])
    print(markdown_table(header, rows))
    print(f"{summary['runtime_seconds']:.0f} s; wrote {args.out}/results.{{json,md,png}}, curves, confusion matrices")
    return 0


@command("tune")
def cmd_tune(args: argparse.Namespace) -> int:
    from bloodcell.tune import TuneConfig, parse_grid, tune

    config = TuneConfig(
        model=args.model,
        grid=None if args.trials and not args.grid else parse_grid(args.grid or "study"),
        trials=args.trials,
        folds=args.folds,
        max_epochs=args.max_epochs,
        patience=args.patience,
        seed=args.seed,
        subset=args.subset,
    )
    result = tune(_load_dataset(args), Path(args.out), config, storage=args.storage)
    if args.json:
        emit_json(result)
        return 0
    for row in result["results"][:10]:
        print("  ".join(f"{k}={v}" for k, v in row.items()))
    print(f"best: {result['params']} (CV accuracy {result['cv_accuracy']:.4f}); wrote {args.out}/tune_results.csv")
    return 0


# ---------------------------------------------------------------- train / evaluate


@command("train")
def cmd_train(args: argparse.Namespace) -> int:
    from bloodcell.pipeline import headline, train_run
    from bloodcell.train import PRESETS, with_overrides

    config = with_overrides(
        PRESETS[args.preset],
        model=args.model,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
    )
    metrics = train_run(_load_dataset(args), Path(args.out), config, resume=args.resume, overwrite=args.overwrite)
    if args.json:
        emit_json({"run_dir": args.out, **{k: headline(v) for k, v in metrics.items()}})
        return 0
    for split in ("val", "test", "test_tta"):
        m = metrics[split]
        print(f"{split:<9} accuracy {m['accuracy']:.4f}  macro AUC {m['auc_macro_ovr']:.4f}  ECE {m['ece']:.4f}")
    print(f"wrote run to {args.out}")
    return 0


@command("evaluate")
def cmd_evaluate(args: argparse.Namespace) -> int:
    from bloodcell import data
    from bloodcell.evaluate import evaluate, format_metrics
    from bloodcell.predict import Classifier

    classifier = Classifier.from_run(args.run_dir, args.precision, args.compile)
    dataset = data.load(args.data_dir, size=classifier.image_size, data_file=args.data_file)
    result = evaluate(
        classifier, dataset.split(args.split), tta=args.tta, figures_dir=Path(args.out or args.run_dir), name=args.split
    )
    if args.json:
        emit_json(result)
        return 0
    print(f"{args.run_dir}: {args.split} split{' with TTA' if args.tta else ''}")
    print(format_metrics(result))
    return 0


# ---------------------------------------------------------------- predict


@command("predict")
def cmd_predict(args: argparse.Namespace) -> int:
    from bloodcell.predict import Classifier, differential
    from bloodcell.runs import write_csv

    classifier = Classifier.from_run(args.run_dir, args.precision, args.compile)
    records = classifier.predict_files(
        args.paths,
        crop=args.crop,
        tta=args.tta,
        top_k=args.top_k,
        min_confidence=args.min_confidence,
        batch_size=args.batch_size,
        workers=args.workers,
        progress=not args.json,
    )
    if not records:
        raise BloodcellError(f"no image files found in {' '.join(args.paths)}")
    summary = differential(records, classifier.classes)
    if args.csv:
        write_csv(Path(args.csv), [_csv_row(r) for r in records])
    if args.json:
        emit_json({"records": records, "summary": summary})
    else:
        _print_predictions(records, summary)
    if summary["classified"] == 0:
        return EXIT_NONE_CLASSIFIED
    return EXIT_SOME_FAILED if summary["failed"] else 0


@command("serve")
def cmd_serve(args: argparse.Namespace) -> int:
    from bloodcell.predict import Classifier
    from bloodcell.serve import serve

    classifier = Classifier.from_run(args.run_dir, args.precision, args.compile)
    serve(classifier, args.host, args.port, crop=args.crop, tta=args.tta, min_confidence=args.min_confidence)
    return 0


def _csv_row(record: dict) -> dict:
    top = "; ".join(f"{t['class']}={t['probability']:.4f}" for t in record["top_k"])
    return {k: record[k] for k in ("path", "class", "probability", "review", "error")} | {"top_k": top}


def _print_predictions(records: list[dict], summary: dict) -> None:
    for r in records:
        if r["error"]:
            print(f"{r['path']}\tERROR\t{r['error']}")
        else:
            flag = "\treview" if r["review"] else ""
            print(f"{r['path']}\t{r['class']}\t{r['probability']:.4f}{flag}")
    print()
    print(
        f"{summary['classified']} of {summary['images']} images classified, "
        f"{summary['flagged_for_review']} flagged for review, {summary['failed']} failed"
    )
    print(f"{'class':<22}{'count':>7}{'%':>8}")
    for name, row in summary["per_class"].items():
        print(f"{name:<22}{row['count']:>7}{row['percent']:>8.1f}")
    if summary["white_cells"]:
        print(f"\nwhite-cell differential ({summary['white_cells']} white cells)")
        for name, row in summary["white_cell_differential"].items():
            print(f"{name:<22}{row['count']:>7}{row['percent']:>8.1f}")
        print(f"erythroblasts per 100 white cells: {summary['erythroblasts_per_100_wbc']:.1f}")
    print(f"platelets (counted apart): {summary['platelets']}")


# ---------------------------------------------------------------- explain / report


@command("explain")
def cmd_explain(args: argparse.Namespace) -> int:
    from bloodcell import data, explain
    from bloodcell.predict import Classifier

    classifier = Classifier.from_run(args.run_dir)
    out = Path(args.out)
    written = [explain.explain_file(classifier, Path(p), out, args.class_name, args.crop) for p in args.images]
    if args.index:
        split = data.load(args.data_dir, size=classifier.image_size, data_file=args.data_file).split(args.split)
        for index in args.index:
            if not 0 <= index < len(split):
                raise BloodcellError(f"--index {index} is outside the {args.split} split (0..{len(split) - 1})")
            image = split.images[index].permute(1, 2, 0).numpy()
            explanation = explain.explain_image(classifier, image, args.class_name)
            source = f"{args.split}[{index}] (true {classifier.classes[split.labels[index]]})"
            written.append(
                explain.render(classifier, explanation, image, out / f"{args.split}_{index}_gradcam.png", source)
            )
    if not written:
        raise BloodcellError("nothing to explain: give image files and/or --index")
    if args.json:
        emit_json({"figures": [str(p) for p in written]})
    else:
        for path in written:
            print(f"wrote {path}")
    return 0


@command("report")
def cmd_report(args: argparse.Namespace) -> int:
    from bloodcell import data, report

    run_dir = Path(args.run_dir)
    out = Path(args.out or run_dir / "report.html")
    if (run_dir / "results.json").is_file():
        path = report.study_report(run_dir, out)
    else:
        from bloodcell.predict import Classifier

        classifier = Classifier.from_run(run_dir)
        dataset = data.load(args.data_dir, size=classifier.image_size, data_file=args.data_file)
        path = report.run_report(run_dir, dataset, out)
    size = path.stat().st_size
    if args.json:
        emit_json({"report": str(path), "bytes": size})
    else:
        print(f"wrote {path} ({size / 1e6:.1f} MB)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bloodcell",
        description="Classify peripheral blood cell images into the eight BloodMNIST classes.",
    )
    parser.add_argument("--version", action="version", version=f"bloodcell {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("info", help="show the data file, its MD5 and the per-split class counts")
    _data_options(p)
    _json_option(p)

    p = sub.add_parser("explore", help="write the study's data figures (montage, distribution, examples)")
    _data_options(p)
    p.add_argument("--out", default="explore", help="output folder (default ./explore)")
    _seed_option(p)
    _json_option(p)
    p = sub.add_parser(
        "reproduce",
        help="rerun the seed study: baseline and CNN, k-fold CV on train+val, every fold model scored on test",
    )
    _data_options(p)
    p.add_argument("--out", default="study", help="output folder (default ./study)")
    p.add_argument("--folds", type=int, default=5, help="cross-validation folds (default 5)")
    p.add_argument("--epochs", type=int, default=5, help="epochs per fold (default 5)")
    p.add_argument("--batch-size", type=int, default=128, help="batch size (default 128)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    p.add_argument("--subset", type=int, help="use a stratified subset of this many train+val images (quick runs)")
    p.add_argument(
        "--protocol",
        choices=("both", "study", "independent"),
        default="both",
        help="study: one model trained on through the folds, as the study's code did (reproduces its numbers); "
        "independent: a fresh model per fold (correct CV); both (default): side by side",
    )
    _seed_option(p)
    _json_option(p)

    p = sub.add_parser("tune", help="hyper-parameter search (the study's grid, or TPE), resumable via Optuna storage")
    _data_options(p)
    p.add_argument("--out", default="tune", help="output folder (default ./tune)")
    p.add_argument("--model", default="seed-cnn", help="model to tune (default seed-cnn)")
    p.add_argument(
        "--grid",
        help="'study' (batch 64/128/256 x epochs 30/50 x lr 1e-3/1e-2/1e-1, the default) or "
        "'batch_size=64,128;max_epochs=30;lr=1e-3,1e-2'",
    )
    p.add_argument("--trials", type=int, help="without --grid: run a TPE search of N trials; with it: at most N points")
    p.add_argument("--storage", help="Optuna storage URL shared by workers (default sqlite:///OUT/tune.db)")
    p.add_argument("--folds", type=int, default=5, help="CV folds per trial (default 5)")
    p.add_argument("--max-epochs", type=int, help="cap every trial's epochs (quick looks)")
    p.add_argument("--patience", type=int, default=5, help="early-stopping patience on validation loss (default 5)")
    p.add_argument("--subset", type=int, help="use a stratified subset of this many train+val images")
    _seed_option(p)
    _json_option(p)

    p = sub.add_parser("train", help="train a model (default: bloodcell's recommended recipe) into a run directory")
    _data_options(p)
    p.add_argument("--out", default="runs/default", help="run directory (default runs/default)")
    p.add_argument(
        "--preset",
        default="default",
        choices=("default", "fast", "study"),
        help="recipe: default (best), fast (under two minutes), study (the seed CNN's)",
    )
    p.add_argument("--model", help="architecture from the registry (overrides the preset's)")
    p.add_argument("--epochs", type=int, help="epochs (overrides the preset's)")
    p.add_argument("--batch-size", type=int, help="batch size (overrides the preset's)")
    p.add_argument("--lr", type=float, help="peak learning rate (overrides the preset's)")
    p.add_argument("--seed", type=int, help="random seed (default 42)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out from its checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    _json_option(p)

    p = sub.add_parser("evaluate", help="score a trained run on a split: metrics, per-class table, CI, figures")
    p.add_argument("run_dir", help="run directory written by `bloodcell train`")
    _data_options(p, size=False)
    p.add_argument("--split", default="test", choices=("train", "val", "test"), help="split (default test)")
    p.add_argument("--tta", action="store_true", help="average over the 8 flips/rotations")
    p.add_argument("--out", help="folder for the figures (default: the run directory)")
    _inference_options(p)
    _json_option(p)

    p = sub.add_parser(
        "predict",
        help="classify image files/folders with a trained run and print the differential count",
        description="Classify cell images (JPEG/PNG/BMP/TIFF, one cell per image, any size). Exit codes: 0 all "
        "classified, 3 some files could not be read (error rows), 4 none could, 1 other errors.",
    )
    p.add_argument("run_dir", help="run directory written by `bloodcell train`")
    p.add_argument("paths", nargs="+", help="image files or folders (searched recursively)")
    p.add_argument("--csv", help="also write one row per image to this CSV file")
    p.add_argument("--top-k", type=int, default=3, help="classes listed per image (default 3)")
    p.add_argument("--batch-size", type=int, default=256, help="images per inference batch (default 256)")
    p.add_argument("--workers", type=int, help="image-decoding threads (default: 2 x CPU cores, at most 8)")
    _image_file_options(p)
    _inference_options(p)
    _json_option(p)

    p = sub.add_parser(
        "serve",
        help="serve a trained run over HTTP (POST /predict with image files; docs at /docs)",
        description="An HTTP API for lab software: GET /health, POST /predict (multipart image files) returning "
        "the same records and differential count as `predict --json`. Needs `pip install 'bloodcell[serve]'`.",
    )
    p.add_argument("run_dir", help="run directory written by `bloodcell train`")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    _image_file_options(p)  # the server's defaults; a request can set tta and min_confidence
    _inference_options(p)

    p = sub.add_parser("explain", help="Grad-CAM heat maps for image files or dataset images")
    p.add_argument("run_dir", help="run directory written by `bloodcell train`")
    p.add_argument("images", nargs="*", help="full-size image files (preprocessed as in `predict`)")
    p.add_argument("--out", default="explain", help="output folder for the PNGs (default ./explain)")
    p.add_argument("--class", dest="class_name", help="explain this class instead of the predicted one")
    p.add_argument("--split", default="test", choices=("train", "val", "test"), help="split for --index")
    p.add_argument("--index", type=int, nargs="+", help="dataset image indices in --split")
    p.add_argument("--crop", default="medmnist", help="crop for image files, as in `predict`")
    _data_options(p, size=False)
    _json_option(p)

    p = sub.add_parser("report", help="one self-contained HTML report for a run (or a `reproduce` folder)")
    p.add_argument("run_dir", help="run directory, or an output folder of `bloodcell reproduce`")
    p.add_argument("--out", help="HTML file (default RUN_DIR/report.html)")
    _data_options(p, size=False)
    _json_option(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    threads = os.environ.get("BLOODCELL_THREADS")
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    try:
        return COMMANDS[args.command](args)
    except BloodcellError as exc:
        print(f"bloodcell: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("bloodcell: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
