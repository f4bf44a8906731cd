"""`bloodcell` command line: a table of commands, each declared with its arguments beside its handler.

A handler calls plain library functions and returns an `Output`; `main` renders it once, as text
or (with --json) as strict JSON. Options that mirror a config dataclass (`TrainConfig`,
`PredictOptions`) are generated from its fields, so each setting is declared in one place.

Exit codes: 0 success, 1 a user-fixable error (one line on stderr), 2 bad usage (argparse);
`predict` also returns 3 when some files could not be classified and 4 when none could.
"""

from __future__ import annotations

import argparse
import os
import sys
import typing
from collections.abc import Callable, Sequence
from dataclasses import MISSING, dataclass, fields, replace
from pathlib import Path

from bloodcell import __version__
from bloodcell.errors import BloodcellError
from bloodcell.files import printable, to_json

EXIT_ERROR = 1
EXIT_SOME_FAILED = 3
EXIT_NONE_CLASSIFIED = 4


@dataclass(frozen=True)
class Output:
    """What a command hands back: `data` for --json, `text` for people, the exit code, and for a
    command that ran but failed (after printing its report), the one-line error."""

    data: dict
    text: str
    exit_code: int = 0
    error: str | None = None
    warnings: tuple[str, ...] = ()  # one line each on stderr


@dataclass(frozen=True)
class Arg:
    flags: tuple[str, ...]
    options: dict


def arg(*flags: str, **options) -> Arg:
    return Arg(flags, options)


# An argument item: one `arg`, a group of them, or a function returning them (for options generated
# from config classes, so that only the chosen command's modules are imported).
ArgItem = Arg | Sequence[Arg] | Callable[[], Sequence[Arg]]


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    arguments: tuple[ArgItem, ...]
    handler: Callable[[argparse.Namespace], Output]
    description: str | None = None
    json: bool = True

    def expanded_arguments(self) -> list[Arg]:
        out: list[Arg] = []
        for item in self.arguments:
            out += [item] if isinstance(item, Arg) else list(item() if callable(item) else item)
        return out


COMMANDS: dict[str, Command] = {}


def command(name: str, help: str, *arguments: ArgItem, description: str | None = None, json: bool = True):
    """Register a handler together with its arguments."""

    def register(handler: Callable[[argparse.Namespace], Output]):
        COMMANDS[name] = Command(name, help, arguments, handler, description, json)
        return handler

    return register


def options_for(config_class, names: Sequence[str] | None = None, defaults: bool = True) -> list[Arg]:
    """One `--option` per field of a config dataclass, typed, with the field's own help text.

    `defaults=False` leaves unset options as None, so a preset's value stays (train's overrides).
    """
    hints = typing.get_type_hints(config_class)
    args = []
    for f in fields(config_class):
        if (names is not None and f.name not in names) or "help" not in f.metadata:
            continue
        kind = [t for t in typing.get_args(hints[f.name]) if t is not type(None)] or [hints[f.name]]
        default = f.default if f.default is not MISSING else None
        options = {"help": f.metadata["help"], "dest": f.name}
        if typing.get_origin(hints[f.name]) is tuple:  # a list of values: --labs A B C
            options |= {"nargs": "+", "type": kind[0], "metavar": "DIR" if f.name == "labs" else f.name.upper()}
            kind = [tuple]
        elif kind[0] is bool:
            options["action"] = argparse.BooleanOptionalAction
        else:
            options["type"] = kind[0]
            options["metavar"] = f.name.upper()
        if f.metadata.get("choices"):
            options["choices"] = list(f.metadata["choices"]())
            options.pop("metavar", None)
        if defaults:
            options["default"] = default
            if default not in (None, False, ()):
                options["help"] += f" (default {default})"
        else:
            options["default"] = None
        args.append(arg(f"--{f.name.replace('_', '-')}", **options))
    return args


def config_values(config_class, args: argparse.Namespace) -> dict:
    """The parsed values of the options `options_for(config_class)` generated."""
    return {f.name: getattr(args, f.name) for f in fields(config_class) if hasattr(args, f.name)}


# ---------------------------------------------------------------- shared arguments

DATA = (
    arg(
        "--data-dir",
        help="folder holding bloodmnist*.npz (default: $BLOODCELL_DATA_DIR, else ~/.medmnist); "
        "the official file is downloaded there if missing",
    ),
    arg("--data-file", help="use this BloodMNIST-format .npz instead of the official file"),
)
SIZE = arg("--size", type=int, default=28, choices=(28, 64, 128, 224), help="image size (default 28)")
RUN = arg("run_dir", help="run directory written by `bloodcell train`")
PACKAGED_OR_RUN = arg(
    "run_dir",
    nargs="?",
    metavar="RUN",
    help="run directory written by `bloodcell train` (default: the model packaged with bloodcell)",
)
DEVICE = arg(
    "--device",
    choices=("auto", "cpu", "cuda", "mps"),
    default="cpu",
    help="where the network runs: cpu (default), cuda, mps, or auto (a GPU if PyTorch sees one)",
)
CLASSES = arg(
    "--classes",
    metavar="NAMES",
    help="answer only among these classes, comma-separated (e.g. a white-cell differential: "
    "basophil,eosinophil,lymphocyte,monocyte,neutrophil); the others get probability 0",
)
INFERENCE = (
    DEVICE,
    arg(
        "--backend",
        choices=("torch", "onnx"),
        default="torch",
        help="run the network on PyTorch (default) or on onnxruntime (the run's model.onnx, see `export`)",
    ),
    arg(
        "--precision",
        choices=("float32", "bfloat16"),
        default="float32",
        help="inference precision; bfloat16 is about 2.5x faster on CPUs with AVX512-BF16/AMX (default float32)",
    ),
    arg(
        "--compile",
        action="store_true",
        help="torch.compile the model first (about 10 s; helps wide models, not the default res-small)",
    ),
    CLASSES,
)


def _wbc_count(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < 1000:
        raise argparse.ArgumentTypeError(f"a white-cell count in x10^9/L, such as 7.2, not {text!r}")
    return value


WBC_COUNT = arg(
    "--wbc-count",
    type=_wbc_count,
    metavar="N",
    help="the analyser's white-cell count (x10^9/L): the differential also gives each white-cell class per litre",
)


def _seed(default: int = 42) -> Arg:
    return arg("--seed", type=int, default=default, help=f"random seed (default {default})")


def _dataset(args: argparse.Namespace, size: int | None = None):
    from bloodcell.datasets import bloodmnist

    return bloodmnist.load(args.data_dir, size=size or getattr(args, "size", 28), data_file=args.data_file)


def _classifier(args: argparse.Namespace):
    from bloodcell.inference.classifier import Classifier

    classifier = Classifier.from_run(
        args.run_dir,
        getattr(args, "precision", "float32"),
        getattr(args, "compile", False),
        getattr(args, "backend", "torch"),
        getattr(args, "device", "cpu"),
    )
    only = getattr(args, "classes", None)
    return classifier if only is None else classifier.restricted_to(only.split(","))


def _run_or_packaged(args: argparse.Namespace, inputs: str) -> tuple[str, ...]:
    """Let RUN be left out: a first argument that is not a run but an image path is an input.

    Returns the note to print when the packaged model is used, so that nobody mistakes it for their own run."""
    from bloodcell import runs

    paths = getattr(args, inputs)
    if args.run_dir is not None and not runs.is_run_dir(args.run_dir):
        if runs.looks_like_run(args.run_dir):
            runs.read_record(args.run_dir)  # a damaged run: one line saying what is missing, never another model
        if not Path(args.run_dir).exists():
            raise BloodcellError(f"{printable(args.run_dir)}: no such run directory, image file or folder")
        paths.insert(0, args.run_dir)
        args.run_dir = None
    for path in paths:
        if runs.looks_like_run(path):
            raise BloodcellError(f"{printable(path)} is a run directory; name it first, then the images: RUN IMAGES...")
    return _packaged_note() if args.run_dir is None else ()


def _packaged_note() -> tuple[str, ...]:
    """The warning a command prints when no RUN was named, so nobody mistakes the model for their own."""
    from bloodcell import runs

    return (f"no run named: using the model packaged with bloodcell ({runs.PACKAGED_RUN})",)


def _writable_folder(folder: Path) -> Path:
    """A folder outputs go into: refused now, in one line, if files could not be written there."""
    from bloodcell.files import check_writable

    if folder.exists() and not folder.is_dir():
        raise BloodcellError(f"{printable(folder)}: exists and is not a folder")
    check_writable(folder / ".bloodcell-check")
    return folder


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"a port is a whole number from 1 to 65535, not {text!r}")
    return int(text)


def _wrote(paths: Sequence[Path], existed: set[Path] = frozenset()) -> str:
    return "\n".join(f"{'rewrote' if Path(p) in existed else 'wrote'} {printable(p)}" for p in paths)


# ---------------------------------------------------------------- info / explore


@command(
    "info",
    "show the data file, its MD5 and the per-split class counts; or, given a run, what it was trained on",
    arg("run_dir", nargs="?", metavar="RUN", help="a run directory: its model, training data and headline metrics"),
    DATA,
    SIZE,
)
def cmd_info(args: argparse.Namespace) -> Output:
    from bloodcell.reporting.explore import count_table, format_count_table

    if args.run_dir is not None:
        from bloodcell import runs

        record = runs.read_record(args.run_dir)
        return Output(record.to_json(), f"{printable(args.run_dir)}\n{record.describe()}")
    dataset = _dataset(args)
    counts = count_table(dataset)
    text = "\n".join(
        [
            f"file        {printable(dataset.path)}",
            f"md5         {dataset.md5} ({dataset.describe_source()})",
            f"image size  {dataset.image_size} x {dataset.image_size} px, RGB",
            "",
            format_count_table(counts),
        ]
    )
    return Output({**dataset.provenance(), "counts": counts}, text)


@command(
    "explore",
    "write the study's data figures (montage, distribution, examples)",
    DATA,
    SIZE,
    arg("--out", default="explore", help="output folder (default ./explore)"),
    _seed(),
)
def cmd_explore(args: argparse.Namespace) -> Output:
    from bloodcell.reporting.explore import count_table, explore, format_count_table

    dataset = _dataset(args)
    paths = explore(dataset, Path(args.out), seed=args.seed)
    counts = count_table(dataset)
    return Output(
        {"counts": counts, "figures": [str(p) for p in paths]}, f"{format_count_table(counts)}\n\n{_wrote(paths)}"
    )


@command(
    "build-data",
    "rebuild BloodMNIST at 64/128/224 px from the PBC source images, with the official split and order",
    arg("pbc_dir", help="the PBC images: PBC_dataset_normal_DIB/<class>/*.jpg"),
    arg("--size", type=int, action="append", required=True, help="size to build (64, 128 or 224); repeat for more"),
    arg("--out", help="folder for bloodmnist_SIZE.npz and the provenance CSV (default: the data folder)"),
    arg("--partial", action="store_true", help="write even if some official images were not found (marked partial)"),
    DATA,
    description="Matches every PBC file to the official 28 px image it became (nearest neighbour, labels must "
    "agree) and writes bloodmnist_SIZE.npz in the official layout and order, plus bloodmnist_build.csv (file, "
    "split, index, distance, margin, status). Nothing is written unless every official image is found, "
    "unless --partial is given.",
)
def cmd_build_data(args: argparse.Namespace) -> Output:
    from bloodcell.datasets import bloodmnist
    from bloodcell.datasets.build import build

    official = _dataset(args, 28)
    out = _writable_folder(Path(args.out) if args.out else bloodmnist.checked_data_dir(args.data_dir))
    summary = build(Path(args.pbc_dir), official, tuple(args.size), out, partial=args.partial, progress=not args.json)
    lines = [
        f"{summary['files']} source images, {summary['filled']} of {summary['slots']} official images found "
        f"({summary['by_elimination']} of them by elimination among near-duplicates), {summary['problems']} files "
        f"with problems (see {printable(summary['provenance'])})",
        *(f"wrote {printable(p)}" for p in summary["written"]),
    ]
    error = None
    if not summary["complete"] and not summary["written"]:
        error = (
            f"{summary['empty_slots']} official images not found in {args.pbc_dir}; nothing written "
            "(--partial writes what was found, marked partial)"
        )
    return Output(summary, "\n".join(lines), exit_code=1 if error else 0, error=error)


# ---------------------------------------------------------------- the seed study


@command(
    "reproduce",
    "rerun the seed study: baseline and CNN, 5-fold CV as published and done honestly, every fold model scored on test",
    DATA,
    SIZE,
    arg("--out", default="study", help="output folder (default ./study)"),
    arg("--folds", type=int, default=5, help="cross-validation folds (default 5)"),
    arg("--epochs", type=int, default=5, help="epochs per fold (default 5)"),
    arg("--batch-size", type=int, default=128, help="batch size (default 128)"),
    arg("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)"),
    arg("--subset", type=int, help="use a stratified subset of this many train+val images (quick runs)"),
    arg(
        "--protocol",
        nargs="+",
        choices=("published", "independent", "carried"),
        default=["published", "independent"],
        help="published: the study's code (folds over train+test+val, a fresh model per fold; each fold model "
        "trains on about 80%% of the test split); independent: folds over train+val only, the honest estimate; "
        "carried: a hypothesis, one model trained on through the folds (default: published independent)",
    ),
    _seed(),
)
def cmd_reproduce(args: argparse.Namespace) -> Output:
    from bloodcell.research.study import StudyConfig, markdown_table, reproduce, results_table

    config = StudyConfig(
        folds=args.folds,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        subset=args.subset,
        protocols=tuple(dict.fromkeys(args.protocol)),
    )
    summary = reproduce(_dataset(args), Path(args.out), config)
    header, rows = results_table(summary["models"])
    text = markdown_table(header, rows) + (
        f"{summary['runtime_seconds']:.0f} s; wrote {printable(args.out)}/results.{{json,md,png}}, curves, "
        "confusion matrices"
    )
    return Output(summary, text)


@command(
    "tune",
    "hyper-parameter search (the study's grid, or TPE), resumable via Optuna storage",
    DATA,
    SIZE,
    arg("--out", default="tune", help="output folder (default ./tune)"),
    arg("--model", default="seed-cnn", help="model to tune (default seed-cnn)"),
    arg(
        "--grid",
        help="'study' (batch 64/128/256 x epochs 30/50 x lr 1e-3/1e-2/1e-1, the default) or "
        "'batch_size=64,128;max_epochs=30;lr=1e-3,1e-2'",
    ),
    arg("--trials", type=int, help="without --grid: run a TPE search of N trials; with it: at most N points"),
    arg("--storage", help="Optuna storage URL shared by workers (default sqlite:///OUT/tune.db)"),
    arg("--folds", type=int, default=5, help="CV folds per trial (default 5)"),
    arg("--max-epochs", type=int, help="cap every trial's epochs (quick looks)"),
    arg("--patience", type=int, default=5, help="early-stopping patience on validation loss (default 5)"),
    arg("--subset", type=int, help="use a stratified subset of this many train+val images"),
    arg(
        "--heartbeat",
        type=float,
        default=60.0,
        help="seconds between a running trial's heartbeats; a worker silent for 3x this is taken as dead and its "
        "grid point is run again (default 60)",
    ),
    _seed(),
)
def cmd_tune(args: argparse.Namespace) -> Output:
    from bloodcell.research.tune import TuneConfig, parse_grid, tune

    config = TuneConfig(
        model=args.model,
        grid=None if args.trials and not args.grid else parse_grid(args.grid or "study"),
        trials=args.trials,
        folds=args.folds,
        max_epochs=args.max_epochs,
        patience=args.patience,
        seed=args.seed,
        subset=args.subset,
        heartbeat=args.heartbeat,
    )
    result = tune(_dataset(args), Path(args.out), config, storage=args.storage)
    lines = ["  ".join(f"{k}={v}" for k, v in row.items()) for row in result["results"][:10]]
    lines.append(
        f"best: {result['params']} (CV accuracy {result['cv_accuracy']:.4f}); "
        f"wrote {printable(args.out)}/tune_results.csv"
    )
    return Output(result, "\n".join(lines))


# ---------------------------------------------------------------- train / evaluate


def _train_arguments() -> list[Arg]:
    from bloodcell.training.recipe import PRESETS, TrainConfig

    return [
        *DATA,
        arg("--out", default="runs/default", help="run directory (default runs/default)"),
        arg(
            "--preset",
            default="default",
            choices=list(PRESETS),
            help="recipe: default (best on BloodMNIST images), default-64 / default-128 (larger images, from "
            "`build-data`), crosslab (other labs' images: colour normalisation, stain augmentation, cell framing; "
            "costs in-domain accuracy), multilab (the packaged model's: ImageNet EfficientNet-Lite0 at 64 px on "
            "BloodMNIST plus the --labs folders, which it needs), fast (a few minutes; trained without blur/sharpen, "
            "so about 1.5 points weaker on full-size images), study (the seed CNN's); the options below override "
            "single settings",
        ),
        *options_for(TrainConfig, defaults=False),
        arg("--teacher", metavar="RUN", help="distil this run's predictions (e.g. a 128 px run into a 28 px model)"),
        DEVICE,
        arg("--resume", action="store_true", help="continue an interrupted run in --out from its checkpoint"),
        arg("--overwrite", action="store_true", help="replace an existing run in --out"),
    ]


@command("train", "train a model (default: bloodcell's recommended recipe) into a run directory", _train_arguments)
def cmd_train(args: argparse.Namespace) -> Output:
    from dataclasses import replace

    from bloodcell.evaluation import metrics
    from bloodcell.runs import check_run_dir, read_record
    from bloodcell.training.recipe import (
        PRESETS,
        PRESETS_NEEDING_LABS,
        RECOMMENDED_DISTILL,
        TrainConfig,
        with_overrides,
    )
    from bloodcell.workflows.pipeline import train_run

    config = with_overrides(PRESETS[args.preset], **config_values(TrainConfig, args))
    if args.preset in PRESETS_NEEDING_LABS and not config.labs:
        raise BloodcellError(f"--preset {args.preset} trains on lab folders: give them with --labs DIR [DIR ...]")
    check_run_dir(args.out, overwrite=args.overwrite, resume=args.resume)  # before loading any data
    dataset = _dataset(args, config.image_size)
    if args.data_file and args.image_size is None:  # your own file: its size, unless asked otherwise
        config = replace(config, image_size=dataset.image_size)
    teacher = None
    if args.teacher:
        teacher_size = read_record(args.teacher).image_size
        teacher = (Path(args.teacher), _dataset(args, teacher_size) if teacher_size != dataset.image_size else dataset)
        if not config.distill:
            config = replace(config, distill=RECOMMENDED_DISTILL)
    scores = train_run(
        dataset,
        Path(args.out),
        config,
        resume=args.resume,
        overwrite=args.overwrite,
        teacher=teacher,
        device=args.device,
    )
    if scores is None:  # a helper process of `torchrun ... bloodcell train`: rank 0 reports
        return Output({}, "")
    text = [metrics.format_headline(split, scores[split]) for split in ("val", "test", "test_tta")]
    text.append(f"wrote run to {printable(args.out)}")
    data = {"run_dir": args.out, **{k: metrics.headline(v) for k, v in scores.items()}}
    return Output(data, "\n".join(text))


def _evaluate_arguments() -> list[Arg]:
    from bloodcell.inference.classifier import PredictOptions

    return [
        PACKAGED_OR_RUN,
        *DATA,
        arg("--split", default="test", choices=("train", "val", "test"), help="split (default test)"),
        arg(
            "--images",
            metavar="DIR",
            nargs="+",
            help="score labelled image files instead of a split: DIR/<class>/*.jpg (several DIRs are pooled), "
            "class folders named like the classes (case-insensitive; aliases such as ig, NEUTROPHIL, basophils)",
        ),
        arg(
            "--fields",
            metavar="DIR",
            nargs="+",
            help="score white-cell finding in field images instead: each image with a box file of the same name "
            "(Pascal VOC .xml, or YOLO .txt): recall, precision, and the class of the cells found",
        ),
        arg(
            "--box-classes",
            metavar="NAMES",
            help="the classes of the YOLO class ids, in order (e.g. neutrophil,eosinophil,basophil,lymphocyte,"
            "monocyte); VOC files name theirs",
        ),
        arg("--out", help="folder for the figures (default: the run directory; for the packaged model, here)"),
        *options_for(PredictOptions, ("crop", "tta", "min_confidence", "batch_size", "workers")),
        *INFERENCE,
    ]


@command(
    "evaluate",
    "score a trained run on a split or on labelled image folders: metrics, per-class table, figures",
    _evaluate_arguments,
)
def cmd_evaluate(args: argparse.Namespace) -> Output:
    from bloodcell import runs
    from bloodcell.evaluation.scoring import evaluate, format_metrics
    from bloodcell.reporting.figures import write_figures

    note = () if args.run_dir else _packaged_note()
    classifier = _classifier(args)
    folder = _writable_folder(Path(args.out or args.run_dir or "."))
    args.run_dir = args.run_dir or runs.PACKAGED_RUN
    existed = set(folder.glob("*.png")) if folder.is_dir() else set()
    if args.images:
        output = _evaluate_folder(classifier, args, folder, existed)
        return replace(output, warnings=note + tuple(output.warnings))
    if args.fields:
        output = _evaluate_fields(classifier, args)
        return replace(output, warnings=note + tuple(output.warnings))
    split = _dataset(args, classifier.image_size).split(args.split)
    logits, ood_scores = classifier.logits_and_ood(split.images, tta=args.tta)
    result = evaluate(classifier, split, args.tta, logits, ood_scores, args.min_confidence)
    figures = write_figures(classifier, split, result, folder, args.split, logits=logits)
    text = (
        f"{printable(args.run_dir)}: {args.split} split{' with TTA' if args.tta else ''}\n{_answering(classifier)}"
        f"{format_metrics(result)}\n\n{_wrote(figures, existed)}"
    )
    data = result | {"figures": [str(p) for p in figures], "answerable": list(classifier.answerable)}
    return Output(data, text, warnings=note)


def _answering(classifier) -> str:
    """A line saying which classes a `--classes` restriction left (nothing when there is none)."""
    if classifier.only is None:
        return ""
    return f"answering only among: {', '.join(classifier.answerable)} (--classes)\n"


def _evaluate_fields(classifier, args: argparse.Namespace) -> Output:
    from bloodcell.classes import class_named
    from bloodcell.evaluation.detection import field_pairs, read_boxes, score_fields

    names = tuple(n.strip() for n in args.box_classes.split(",")) if args.box_classes else ()
    box_classes = tuple(class_named(n) for n in names)
    if None in box_classes:
        raise BloodcellError(f"--box-classes: unknown class name {names[box_classes.index(None)]!r}")
    pairs = field_pairs([Path(d) for d in args.fields], box_classes)
    for _, boxes in pairs:  # every box file read before any work: a corrupt one is one line now
        read_boxes(boxes, (1, 1), box_classes)
    options = replace(_prediction_options(args), cells="every")
    records = classifier.predict_files([image for image, _ in pairs], options, progress=not args.json)
    result = score_fields(records, pairs, box_classes)

    def fmt(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.4f}"

    lines = [
        f"{result['fields']} fields, {result['white_cell_boxes']} white-cell boxes, {result['found']} cells found",
        f"recall     {fmt(result['recall'])}  (boxes with a found cell's centre inside, one to one)",
        f"precision  {fmt(result['precision'])}  (meaningful where every white cell is boxed)",
        f"classes    accuracy {fmt(result['accuracy'])}, macro recall {fmt(result['macro_recall'])} over "
        f"{result['classified_cells']} found cells with a labelled box",
    ]
    return Output(result | {"records": records}, "\n".join(lines), warnings=classifier.record.warnings)


def _evaluate_folder(classifier, args: argparse.Namespace, folder: Path, existed: set[Path]) -> Output:
    from bloodcell.datasets.folders import labelled_folders
    from bloodcell.evaluation.scoring import format_folder_scores, score_records
    from bloodcell.reporting import plots

    files, labels, counts = labelled_folders(args.images, classifier.classes)
    options = replace(_prediction_options(args), cells="one")  # a labelled image is one cell
    options, scale = classifier.measured_options(files, options)
    records = classifier.predict_files(files, options, progress=not args.json)
    unreadable = sum(r["error"] is not None for r in records)
    if unreadable == len(records):
        reasons = sorted({r["error"] for r in records})
        raise BloodcellError(f"none of the {len(records)} images could be read ({'; '.join(reasons[:2])})")
    result = score_records(records, labels, classifier.classes, counts)
    present = [classifier.classes.index(c) for c in result["classes_present"]]
    matrix = [result["confusion_matrix"][k] for k in present]
    label = "+".join(Path(d).resolve().name for d in args.images)
    figure = plots.confusion_matrix(
        matrix, folder / f"confusion_{label}.png", label, rows=result["classes_present"], columns=classifier.classes
    )
    shown = " ".join(map(printable, args.images))
    measured = f"framing: {scale.describe()}\n" if scale else ""
    text = f"{printable(args.run_dir)} on {shown}\n{measured}{_answering(classifier)}{format_folder_scores(result)}\n\n"
    text += _wrote([figure], existed)
    labelled = [r | {"label": classifier.classes[y]} for r, y in zip(records, labels)]
    data = result | {
        "figures": [str(figure)],
        "records": labelled,
        "answerable": list(classifier.answerable),
        "warnings": list(classifier.record.warnings),
        "crop": options.crop or classifier.record.preprocessing.crop,
    }
    failed = (f"{unreadable} of {len(records)} images could not be read: scored as wrong",) if unreadable else ()
    return Output(data, text, warnings=classifier.record.warnings + failed)


@command(
    "robustness",
    "accuracy under MedMNIST-C's corruptions (pixelate, JPEG, blur, brightness, contrast, saturation, stain, bubbles)",
    RUN,
    DATA,
    arg("--split", default="test", choices=("train", "val", "test"), help="split (default test)"),
    arg("--limit", type=int, help="score a stratified subset of this many images (default: the whole split)"),
    arg("--families", nargs="+", metavar="FAMILY", help="only these corruption families (default: all)"),
    arg("--out", help="folder for robustness.json/.png (default: the run directory)"),
    _seed(0),
)
def cmd_robustness(args: argparse.Namespace) -> Output:
    from bloodcell.evaluation import robustness
    from bloodcell.files import write_json
    from bloodcell.reporting import plots
    from bloodcell.research.study import stratified_subset

    unknown = sorted(set(args.families or ()) - set(robustness.FAMILIES))
    if unknown:
        raise BloodcellError(f"unknown corruption family {unknown}; choose from {', '.join(robustness.FAMILIES)}")
    classifier = _classifier(args)
    folder = _writable_folder(Path(args.out or args.run_dir))
    split = _dataset(args, classifier.image_size).split(args.split)
    if args.limit:
        split = stratified_subset(split, args.limit, args.seed)
    families = tuple(args.families or robustness.FAMILIES)
    result = robustness.evaluate_corruptions(
        classifier, split.images, split.labels, families, args.seed, progress=not args.json
    )
    result |= {"split": args.split, "n": len(split), "seed": args.seed}
    written = [write_json(folder / "robustness.json", result), plots.robustness(result, folder / "robustness.png")]
    lines = [f"{'family':<18}" + "".join(f"{f'sev {s}':>8}" for s in range(1, 6))]
    lines += [f"{name:<18}" + "".join(f"{v:>8.4f}" for v in values) for name, values in result["accuracy"].items()]
    lines += [
        "",
        f"clean accuracy {result['clean']:.4f}; mean over corruptions {result['mean_corrupted']:.4f} "
        f"({result['relative']:.1%} of clean), n={len(split)} {args.split} images",
        _wrote(written),
    ]
    return Output(result, "\n".join(lines))


def _finetune_arguments() -> list[Arg]:
    from bloodcell.workflows.finetune import FinetuneConfig

    return [
        RUN,
        arg("images", metavar="DIR", help="the lab's labelled images: DIR/<class>/*.jpg (as few as 5 per class)"),
        arg("--out", required=True, help="folder for the fine-tuned run"),
        arg("--overwrite", action="store_true", help="replace an existing run in --out"),
        *options_for(FinetuneConfig),
        *DATA,
    ]


@command(
    "finetune",
    "adapt a trained run to a lab's own labelled images (a few per class); writes a new run",
    _finetune_arguments,
    description="Continues training the run on the lab's images mixed with BloodMNIST images (all eight classes "
    "stay known), with the run's own preprocessing; holds part of the lab's images out to calibrate and score. "
    "The result is an ordinary run directory that every command accepts.",
)
def cmd_finetune(args: argparse.Namespace) -> Output:
    from bloodcell.runs import read_record
    from bloodcell.workflows.finetune import FinetuneConfig, finetune

    config = FinetuneConfig(**config_values(FinetuneConfig, args))
    image_size = read_record(args.run_dir).image_size
    summary = finetune(
        Path(args.run_dir),
        Path(args.images),
        _dataset(args, image_size),
        Path(args.out),
        config,
        overwrite=args.overwrite,
        progress=not args.json,
    )
    lines = [
        f"{summary['lab_images']} lab images ({', '.join(f'{k} {v}' for k, v in summary['per_class'].items())}): "
        f"trained on {summary['trained_on']}, held out {summary['held_out']}",
        *_headline_lines(summary["metrics"]),
        f"wrote run to {printable(args.out)}",
    ]
    return Output(summary, "\n".join(lines))


def _headline_lines(scores: dict) -> list[str]:
    from bloodcell.evaluation import metrics

    return [metrics.format_headline(split, values) for split, values in scores.items()]


@command(
    "export",
    "export a run to ONNX (preprocessing in the graph, metadata, model card) for software outside Python",
    RUN,
    arg("--format", default="onnx", choices=("onnx",), help="export format (default onnx)"),
    arg("--out", help="output file (default RUN_DIR/model.onnx, which predict/serve --backend onnx use)"),
    description="Writes an ONNX graph that takes raw RGB pixels (float32 N x 3 x H x W, 0..255) and returns "
    "calibrated probabilities, logits and OOD features, with classes, image size, crop, normalisation and "
    "temperature as metadata, and a Markdown model card beside it. Needs `pip install 'bloodcell[export]'`.",
)
def cmd_export(args: argparse.Namespace) -> Output:
    from bloodcell import runs
    from bloodcell.files import check_writable
    from bloodcell.inference.export import export_onnx

    out = check_writable(Path(args.out or Path(args.run_dir) / runs.ONNX))
    runs.read_record(args.run_dir)  # a clear error for a folder that is not a run, before importing onnx
    result = export_onnx(Path(args.run_dir), out)
    text = f"wrote {printable(result['onnx'])} (opset {result['opset']}, {result['bytes'] / 1e6:.1f} MB)\n"
    text += f"wrote {printable(result['model_card'])}"
    return Output(result, text)


# ---------------------------------------------------------------- predict / serve


def _prediction_options(args: argparse.Namespace):
    from bloodcell.inference.classifier import PredictOptions

    return PredictOptions(**config_values(PredictOptions, args))


def _predict_arguments() -> list[Arg]:
    from bloodcell.inference.classifier import PredictOptions

    return [
        PACKAGED_OR_RUN,
        arg("paths", nargs="+", help="image files or folders (searched recursively)"),
        arg("--csv", help="also write one row per image (per white cell of a field) to this CSV file"),
        WBC_COUNT,
        arg(
            "--shard",
            metavar="I/N",
            help="classify only part I of N of the sorted file list (every N-th file), for spreading a large "
            "folder over machines; join the parts' --json outputs with `bloodcell merge`",
        ),
        *options_for(PredictOptions),
        *INFERENCE,
    ]


@command(
    "predict",
    "classify image files/folders with a trained run and print the differential count",
    _predict_arguments,
    description="Classify cell images (JPEG/PNG/BMP/TIFF, one cell per image, any size). Exit codes: 0 all "
    "classified, 3 some files could not be read (error rows), 4 none could, 1 other errors.",
)
def cmd_predict(args: argparse.Namespace) -> Output:
    from bloodcell import runs
    from bloodcell.files import check_writable, write_csv
    from bloodcell.images import decode
    from bloodcell.inference.differential import differential, format_differential

    shard = _parse_shard(args.shard) if args.shard else None
    if args.csv:
        check_writable(args.csv, inputs=args.paths)  # before the work, not after it
    note = _run_or_packaged(args, "paths")
    classifier = _classifier(args)
    options = _prediction_options(args)
    problems: list[str] = []
    files = decode.find_images(args.paths, problems)
    if not files:
        raise BloodcellError(f"no image files found in {' '.join(map(printable, args.paths))}")
    total = len(files)
    listing = sorted(files, key=str)
    options, scale = classifier.measured_options(listing, options)  # over every shard's files: one framing
    if shard:
        files = listing[shard[0] - 1 :: shard[1]]
    records = classifier.predict_files(files, options, progress=not args.json)
    summary = differential(records, classifier.classes, args.wbc_count)
    lines = [_prediction_line(r) for r in records] + ["", _answering(classifier) + format_differential(summary)]
    if scale:
        lines.insert(0, f"framing: {scale.describe()}")
    exit_code = EXIT_NONE_CLASSIFIED if summary["classified"] == 0 else EXIT_SOME_FAILED if summary["failed"] else 0
    warnings = note + classifier.record.warnings + tuple(problems)
    data = {
        "records": records,
        "summary": summary,
        "warnings": list(warnings),
        "classes": list(classifier.classes),
        "answerable": list(classifier.answerable),
        "crop": options.crop or classifier.record.preprocessing.crop,
    }
    if shard:
        data["shard"] = {
            "index": shard[0],
            "of": shard[1],
            "files_in_all_shards": total,
            "listing_sha256": _listing_digest(listing),
            "run_sha256": runs.digest(args.run_dir or runs.PACKAGED_RUN),
            "options": _shard_options(args, options),
        }
    error = _write_or_say(lambda: write_csv(Path(args.csv), [_csv_row(r) for r in records])) if args.csv else None
    return Output(data, "\n".join(lines), EXIT_ERROR if error else exit_code, error=error, warnings=warnings)


def _write_or_say(write) -> str | None:
    """Write an output file; a failure becomes the command's error line, after its results print."""
    try:
        write()
    except BloodcellError as exc:
        return str(exc)
    return None


def _listing_digest(files: list[Path]) -> str:
    import hashlib

    return hashlib.sha256("\n".join(map(str, files)).encode("utf-8", "backslashreplace")).hexdigest()


def _shard_options(args: argparse.Namespace, options) -> dict:
    """What decides a shard's answers besides the run and the files: merged parts must agree on it."""
    from dataclasses import asdict

    chosen = {k: v for k, v in asdict(options).items() if k not in ("batch_size", "workers")}
    return chosen | {"classes": args.classes, "backend": args.backend, "precision": args.precision}


def _parse_shard(spec: str) -> tuple[int, int]:
    try:
        index, count = (int(part) for part in spec.split("/"))
    except ValueError:
        raise BloodcellError(f"--shard must look like 2/8 (part 2 of 8), got {spec!r}") from None
    if not 1 <= index <= count:
        raise BloodcellError(f"--shard {spec}: the part must be between 1 and {count}")
    return index, count


@command(
    "merge",
    "join the --json outputs of `predict --shard I/N` runs into one set of records and differential count",
    arg("parts", nargs="+", help="JSON files written by `bloodcell predict ... --shard I/N --json`"),
    arg("--csv", help="also write one row per image (per white cell of a field) to this CSV file"),
    WBC_COUNT,
)
def cmd_merge(args: argparse.Namespace) -> Output:
    from bloodcell.files import check_writable, read_json, write_csv
    from bloodcell.inference.differential import differential, format_differential

    if args.csv:
        check_writable(args.csv, inputs=args.parts)
    parts = [read_json(p) for p in args.parts]
    identity = ("of", "files_in_all_shards", "listing_sha256", "run_sha256", "options")
    for path, part in zip(args.parts, parts):
        shard = part.get("shard") if isinstance(part, dict) else None
        if not isinstance(shard, dict) or not isinstance(part.get("records"), list) or "classes" not in part:
            raise BloodcellError(f"{printable(path)}: not the --json output of `bloodcell predict --shard I/N`")
        if set(identity) - set(shard):
            raise BloodcellError(f"{printable(path)}: made by an older bloodcell (no run or listing digest); rerun it")
        of, index = shard["of"], shard["index"]
        if not (isinstance(of, int) and isinstance(index, int) and 1 <= index <= of):
            raise BloodcellError(f"{printable(path)}: part {index!r} of {of!r} is not a part of a sharding")
    first = parts[0]["shard"]
    for path, part in zip(args.parts[1:], parts[1:]):
        differs = [key for key in identity if part["shard"][key] != first[key]] + (
            ["classes"] if part["classes"] != parts[0]["classes"] else []
        )
        if differs:
            raise BloodcellError(
                f"{printable(path)}: not a part of the same job as {printable(args.parts[0])} "
                f"(different {', '.join(differs)}); merge the parts of one predict --shard job only"
            )
    indices = sorted(part["shard"]["index"] for part in parts)
    if indices != sorted(set(indices)):
        raise BloodcellError(f"a part is given twice (parts {indices})")
    of = first["of"]
    missing = sorted(set(range(1, of + 1)) - set(indices))
    records = sorted((r for part in parts for r in part["records"]), key=lambda r: r["path"])
    summary = differential(records, list(parts[0]["classes"]), args.wbc_count)
    warnings = (
        (f"parts {missing} of {of} are missing: the count covers {len(indices)} of {of} parts",) if missing else ()
    )
    exit_code = EXIT_NONE_CLASSIFIED if summary["classified"] == 0 else EXIT_SOME_FAILED if summary["failed"] else 0
    data = {"records": records, "summary": summary, "parts": indices, "of": of, "missing_parts": missing}
    error = _write_or_say(lambda: write_csv(Path(args.csv), [_csv_row(r) for r in records])) if args.csv else None
    return Output(
        data, format_differential(summary), EXIT_ERROR if error else exit_code, error=error, warnings=warnings
    )


def _prediction_line(record: dict) -> str:
    path = printable(record["path"])
    cell = record.get("cell") or {}
    if record.get("image_kind") == "field":
        where = f" cell {cell['index'] + 1} at {','.join(map(str, cell['box']))}" if cell else ""
        path = f"{path}{where}"
    if record["error"]:
        return f"{path}\tERROR\t{printable(record['error'])}"
    review = f"\treview: {printable(record['review_reason'])}" if record["review"] else ""
    uncounted = "\t(not counted)" if record.get("counted") is False and record["class"] else ""
    answer = f"{record['class']}\t{record['probability']:.4f}" if record["class"] else "-"
    return f"{path}\t{answer}{review}{uncounted}"


def _csv_row(record: dict) -> dict:
    top = "; ".join(f"{t['class']}={t['probability']:.4f}" for t in record["top_k"])
    cell = record.get("cell") or {}
    row = {k: record.get(k) for k in ("path", "class", "probability", "review", "review_reason", "error")}
    return row | {
        "top_k": top,
        "cell_found": cell.get("found"),
        "white_cells": cell.get("white_cells"),
        "image_kind": record.get("image_kind"),
        "cell_index": cell.get("index"),
        "box": " ".join(map(str, cell["box"])) if cell.get("box") else None,
        "cut": cell.get("cut"),
        "counted": record.get("counted"),
    }


def _serve_arguments() -> list[Arg]:
    from bloodcell.inference.classifier import PredictOptions

    return [
        PACKAGED_OR_RUN,
        arg("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1, this machine only)"),
        arg("--port", type=_port, default=8000, help="port (default 8000)"),
        arg(
            "--reviews",
            metavar="DIR",
            default=str(Path("~/.bloodcell/reviews").expanduser()),
            help="folder of the reviews database (SQLite): every review the page starts is kept there, and "
            "reopened after a restart (default ~/.bloodcell/reviews)",
        ),
        arg(
            "--allow-host",
            action="append",
            default=[],
            metavar="NAME",
            help="also answer requests whose Host header names NAME (a DNS name of this machine); by default only "
            "the address it listens on (and, on loopback, localhost) is accepted, which stops DNS-rebinding pages",
        ),
        arg(
            "--token",
            help="require 'Authorization: Bearer TOKEN' on the API (default: $BLOODCELL_TOKEN); needed for any "
            "--host other than this machine",
        ),
        *options_for(PredictOptions, ("crop", "tta", "min_confidence", "top_k", "cells", "border_cells")),
        *INFERENCE,
    ]


@command(
    "serve",
    "serve a trained run over HTTP (POST /predict with image files; docs at /docs)",
    _serve_arguments,
    description="A review page for the lab at / and an HTTP API for lab software: GET /health, POST /predict "
    "(multipart image files) returning the same records and differential count as `predict --json`, POST /explain "
    "(Grad-CAM for one image), docs at /docs. Needs `pip install 'bloodcell[serve]'`.",
    json=False,
)
def cmd_serve(args: argparse.Namespace) -> Output:
    from bloodcell.app.serve import serve

    if args.run_dir is None:
        args.paths = []
        print(_run_or_packaged(args, "paths")[0], file=sys.stderr)  # before the server's own log lines
    serve(
        _classifier(args),
        _prediction_options(args),
        args.host,
        args.port,
        token=args.token,
        allowed_hosts=tuple(args.allow_host),
        reviews=args.reviews,
    )
    return Output({}, "")


# ---------------------------------------------------------------- explain / report


@command(
    "explain",
    "Grad-CAM heat maps for image files/folders or dataset images",
    PACKAGED_OR_RUN,
    arg("images", nargs="*", help="full-size image files or folders (preprocessed as in `predict`)"),
    arg("--out", default="explain", help="output folder for the PNGs (default ./explain)"),
    arg("--class", dest="class_name", help="explain this class instead of the predicted one"),
    arg("--split", default="test", choices=("train", "val", "test"), help="split for --index"),
    arg("--index", type=int, nargs="+", help="dataset image indices in --split"),
    arg("--crop", help="framing for image files, as in `predict` (default: the run's)"),
    CLASSES,
    DATA,
)
def cmd_explain(args: argparse.Namespace) -> Output:
    from bloodcell.images import decode
    from bloodcell.reporting import explain

    note = _run_or_packaged(args, "images")
    classifier = _classifier(args)
    out = _writable_folder(Path(args.out))
    written = []
    for path in decode.find_images(args.images):
        written += explain.explain_file(classifier, path, out, args.class_name, args.crop, taken=written)
    if args.index:
        split = _dataset(args, classifier.image_size).split(args.split)
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
        raise BloodcellError("nothing to explain: give image files or folders and/or --index")
    return Output({"figures": [str(p) for p in written]}, _wrote(written), warnings=note)


@command(
    "report",
    "one self-contained HTML report for a run (or a `reproduce` folder)",
    arg("run_dir", help="run directory, or an output folder of `bloodcell reproduce`"),
    arg("--out", help="HTML file (default RUN_DIR/report.html)"),
    DATA,
)
def cmd_report(args: argparse.Namespace) -> Output:
    from bloodcell.files import check_writable
    from bloodcell.reporting import report

    run_dir = Path(args.run_dir)
    out = check_writable(Path(args.out or run_dir / "report.html"))
    if (run_dir / "results.json").is_file():
        from bloodcell.research.study import study_report

        path = study_report(run_dir, out)
    else:
        classifier = _classifier(args)
        path = report.run_report(classifier, run_dir, _dataset(args, classifier.image_size), out)
    size = path.stat().st_size
    return Output({"report": str(path), "bytes": size}, f"wrote {printable(path)} ({size / 1e6:.1f} MB)")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser; with `only`, just that command gets its arguments (the others are listed by name)."""
    parser = argparse.ArgumentParser(
        prog="bloodcell", description="Classify peripheral blood cell images into the eight BloodMNIST classes."
    )
    parser.add_argument("--version", action="version", version=f"bloodcell {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for spec in COMMANDS.values():
        p = sub.add_parser(spec.name, help=spec.help, description=spec.description or spec.help)
        if only not in (None, spec.name):
            continue
        for a in spec.expanded_arguments():
            p.add_argument(*a.flags, **a.options)
        if spec.json:
            p.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(chosen if chosen in COMMANDS else None).parse_args(argv)
    reports = os.environ.get("RANK", "0") == "0"  # under torchrun, one process reports for all
    try:
        _set_threads()
        output = COMMANDS[args.command].handler(args)
    except BloodcellError as exc:
        if reports:
            print(f"bloodcell: error: {printable(str(exc))}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as exc:  # a path the system refuses (too long, no permission ...): name it, one line
        if reports:
            where = f"{exc.filename}: " if exc.filename else ""
            print(f"bloodcell: error: {printable(where + (exc.strerror or str(exc)))}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("bloodcell: interrupted", file=sys.stderr)
        return 130
    if not reports:
        return output.exit_code
    if getattr(args, "json", False):
        print(to_json(output.data))
    elif output.text:
        print(output.text)
    for warning in output.warnings:
        print(f"bloodcell: warning: {printable(warning)}", file=sys.stderr)
    if output.error:
        print(f"bloodcell: error: {printable(output.error)}", file=sys.stderr)
    return output.exit_code


def _set_threads() -> None:
    threads = os.environ.get("BLOODCELL_THREADS")
    if threads:
        if not threads.isdigit() or int(threads) < 1:
            raise BloodcellError(f"BLOODCELL_THREADS must be a positive whole number, got {threads!r}")
        import torch

        torch.set_num_threads(int(threads))


if __name__ == "__main__":
    sys.exit(main())
