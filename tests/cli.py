"""Run the real `bloodcell` CLI: in a subprocess as a user would, or in-process (same `main`, faster)."""

from __future__ import annotations

import io
import socket
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout

from bloodcell.app.cli import main


def run_cli(*args, check: bool = True) -> subprocess.CompletedProcess:
    """`python -m bloodcell ARGS` in a subprocess."""
    result = subprocess.run([sys.executable, "-m", "bloodcell", *map(str, args)], capture_output=True, text=True)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def call_cli(*args, check: bool = True) -> subprocess.CompletedProcess:
    """`bloodcell.cli.main(ARGS)` in this process, with stdout and stderr captured."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:  # argparse usage errors and --help
            code = exc.code
    result = subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())
    if check:
        assert code == 0, result.stderr[-3000:]
    return result


def free_port() -> int:
    """A loopback port nobody listens on (for servers the tests start)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
