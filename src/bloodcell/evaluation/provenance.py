"""Where a figure comes from: the command, the machine (CPU, instruction set, cores, torch) and the date.

Every benchmark and experiment prints `stamp()` first and puts it in its JSON, so a number quoted
in the documentation carries what is needed to rerun it and to judge it (a 2-core AVX2 CPU trains
two to three times slower than an AVX-512 one).
"""

from __future__ import annotations

import os
import platform
import shlex
import statistics
import subprocess
import sys
from datetime import date
from pathlib import Path

import torch


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def machine() -> str:
    """'AMD EPYC 9B14, AVX2, 2 threads, torch 2.13.0+cpu' (and a oneDNN cap, if one is set)."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA")
    isa = torch.backends.cpu.get_cpu_capability().upper().replace("AVX512", "AVX-512")
    return f"{cpu_model()}, {isa}, {torch.get_num_threads()} threads, torch {torch.__version__}" + (
        f", oneDNN capped to {cap}" if cap else ""
    )


def revision() -> str:
    """bloodcell's version, and the git commit of the source tree it runs from, where there is one."""
    from bloodcell import __version__

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        ).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        if commit and git("status", "--porcelain", "--untracked-files=no"):
            commit += "+changes"  # uncommitted edits: the figure is not exactly that commit's
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"bloodcell {__version__}" + (f" ({commit})" if commit else "")


def stamp(argv: list[str] | None = None) -> dict[str, str]:
    """The command as typed, the code, the machine and today's date."""
    argv = sys.argv if argv is None else argv
    return {
        "command": shlex.join(["python", *argv]),
        "code": revision(),
        "machine": machine(),
        "date": date.today().isoformat(),
    }


def stamp_line(argv: list[str] | None = None) -> str:
    s = stamp(argv)
    return f"# {s['command']}\n# {s['code']}; {s['machine']}; {s['date']}"


def mean_std(values: list[float], digits: int = 4) -> str:
    """'0.9803 +- 0.0006': the mean and the sample standard deviation over seeds."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} +- {std:.{digits}f}"
