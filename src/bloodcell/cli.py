"""`bloodcell` command line: argument parsing only; every command calls plain library functions.

Exit codes: 0 success, 1 a user-fixable error (one line on stderr), 2 bad usage (argparse).
`predict` adds its own codes, documented in its --help.
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
