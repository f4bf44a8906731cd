"""Writing files safely: atomically (a crash never leaves half a file) and with normal permissions.

Every file bloodcell writes (run directories, figures, CSV, JSON, reports) goes through
`atomic_path`, so an interrupted command leaves either the old file or the new one. What a path
already is, is respected: a symbolic link keeps pointing where it did (the file it points to is
replaced), a device or FIFO (`/dev/stdout`, a pipe) is written into, never renamed over, and a
folder is refused. Every failure is one line naming the path (`check_writable` finds most of them
before a long command starts). Temporary files from `mkstemp` are owner-only (0600); the finished
file gets what the user's umask allows, like any file an ordinary program creates.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
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


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__


def _target(path: Path) -> Path:
    """Where writing `path` lands: the end of its chain of symbolic links, or the path itself."""
    try:
        return path.resolve() if path.is_symlink() else path
    except (OSError, RuntimeError) as exc:  # a loop of links
        raise BloodcellError(f"{printable(path)}: cannot write (a broken chain of symbolic links: {exc})") from None


def check_writable(path: str | os.PathLike, inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """Refuse now, with one line, a path that writing would fail on later (before hours of work), or
    one that would replace a file the command reads (`inputs`)."""
    path = Path(path)
    target = _target(path)
    if target.is_dir():
        raise BloodcellError(f"{printable(path)}: is a folder; give a file name")
    if target.is_file() and any(Path(p).is_file() and os.path.samefile(p, target) for p in inputs):
        raise BloodcellError(f"{printable(path)}: is one of the inputs; give another file name")
    if target.exists() and not target.is_file():
        if not os.access(target, os.W_OK):
            raise BloodcellError(f"{printable(path)}: cannot write (permission denied)")
        return path
    parent = next((p for p in (target.parent, *target.parent.parents) if p.exists()), Path("/"))
    if not parent.is_dir():
        raise BloodcellError(f"{printable(path)}: cannot write ({printable(parent)} is not a folder)")
    try:  # a real attempt: permissions alone do not tell (root may "access" /proc, a read-only mount)
        fd, probe = tempfile.mkstemp(dir=parent, prefix=".bloodcell-", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise BloodcellError(f"{printable(path)}: cannot write in {printable(parent)} ({_reason(exc)})") from None
    return path


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path; if the block succeeds, its contents become `path`'s.

    A regular file (or a new one) is replaced by renaming the temporary file over it; through a
    symbolic link, the file it points to is replaced and the link stays; a device, FIFO or other
    special file gets the contents written into it. Any OS error is one BloodcellError line."""
    path = Path(path)
    target = _target(path)
    if target.is_dir():
        raise BloodcellError(f"{printable(path)}: is a folder; give a file name")
    special = target.exists() and not target.is_file()
    try:
        if not special:
            target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=None if special else target.parent, prefix=f".{target.name}.", suffix=".tmp")
        os.close(fd)
    except OSError as exc:
        raise BloodcellError(f"{printable(path)}: cannot write ({_reason(exc)})") from None
    try:
        yield Path(tmp)
        if special:
            with open(tmp, "rb") as source, open(target, "wb") as sink:
                shutil.copyfileobj(source, sink)
        else:
            os.chmod(tmp, FILE_MODE)
            os.replace(tmp, target)
    except OSError as exc:
        raise BloodcellError(f"{printable(path)}: cannot write ({_reason(exc)})") from None
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
        tmp.write_text(text, encoding="utf-8", errors="backslashreplace")
    return Path(path)


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")  # what a spreadsheet would run as a formula (OWASP)


def spreadsheet_safe(value):
    """A text cell a spreadsheet would evaluate gets a leading apostrophe, so it stays text."""
    return "'" + value if isinstance(value, str) and value.startswith(FORMULA_STARTS) else value


def write_csv(path: str | os.PathLike, rows: Sequence[dict]) -> Path:
    """Rows as CSV (UTF-8; a file name that is not valid UTF-8 keeps its bytes as backslash
    escapes), with cells a spreadsheet would run as formulas neutralised."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8", errors="backslashreplace") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else [])
        writer.writeheader()
        writer.writerows({k: spreadsheet_safe(v) for k, v in row.items()} for row in rows)
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
