"""Writing files safely: atomically (a crash never leaves half a file) and with normal permissions.

Every file bloodcell writes (run directories, figures, CSV, JSON, reports) goes through
`atomic_path`, so an interrupted command leaves either the old file or the new one. Temporary
files from `mkstemp` are owner-only (0600); the finished file gets what the user's umask allows,
like any file an ordinary program creates.
"""

from __future__ import annotations

import csv
import json
import math
import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from bloodcell.errors import BloodcellError


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_current_umask()


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; it replaces `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def finite_or_none(value):
    """JSON has no NaN or infinity: write them as null, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def _json_default(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def to_json(data) -> str:
    """Strict JSON text (NaN and infinity become null), the one encoding every output uses."""
    plain = json.loads(json.dumps(data, default=_json_default))  # numpy and Path values -> plain values
    return json.dumps(finite_or_none(plain), indent=2, allow_nan=False)


def write_json(path: str | os.PathLike, data) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(to_json(data) + "\n")
    return Path(path)


def read_json(path: str | os.PathLike):
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise BloodcellError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise BloodcellError(f"{path}: is a folder, expected a JSON file") from None
    except PermissionError:
        raise BloodcellError(f"{path}: permission denied") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BloodcellError(f"{path}: not valid JSON ({exc})") from None


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_csv(path: str | os.PathLike, rows: Sequence[dict]) -> Path:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return Path(path)


def read_csv(path: str | os.PathLike) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor]) -> Path:
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    return Path(path)


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors from a safetensors file (never unpickles anything)."""
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise BloodcellError(f"{path}: file not found") from None
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise BloodcellError(f"{path}: not a valid safetensors file ({exc})") from None


def printable(text: str) -> str:
    """`text` with control characters escaped, so a file name cannot break a line of output."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))
