"""The run directory: every file a later command reads, always written atomically.

RUN_DIR/model.safetensors   weights only (never pickled)
RUN_DIR/model.json          architecture, classes, normalisation, temperature, config, metrics
RUN_DIR/metrics.json        val/test metrics
RUN_DIR/history.csv         per-epoch loss/accuracy
RUN_DIR/checkpoint/         resumable training state while training
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from bloodcell.errors import BloodcellError

MODEL_WEIGHTS = "model.safetensors"
MODEL_META = "model.json"
METRICS = "metrics.json"
HISTORY = "history.csv"
CHECKPOINT = "checkpoint"


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; it replaces `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_json(path: Path, data: dict) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")
    return Path(path)


def _json_default(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise BloodcellError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BloodcellError(f"{path}: not valid JSON ({exc})") from None


def write_text(path: Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_csv(path: Path, rows: Sequence[dict]) -> Path:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return Path(path)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    return Path(path)


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise BloodcellError(f"{path}: file not found") from None
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise BloodcellError(f"{path}: not a valid safetensors file ({exc})") from None


def prepare_run_dir(path: Path, overwrite: bool = False, resume: bool = False) -> Path:
    """Create a fresh run directory; refuse to clobber a finished or started run unless asked."""
    path = Path(path)
    if path.exists() and any(path.iterdir()) and not resume:
        if not overwrite:
            raise BloodcellError(f"{path}: run directory exists and is not empty; use --overwrite or --resume")
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def is_run_dir(path: Path) -> bool:
    return (Path(path) / MODEL_META).is_file() and (Path(path) / MODEL_WEIGHTS).is_file()
