"""Configuration as small frozen dataclasses whose fields document themselves.

A `knob` is a dataclass field with a help text (and optional choices); the command line builds
its options from these fields (`cli.options_for`), so a setting is declared once, where it lives.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import field


def knob(default, help: str, choices: Callable[[], Sequence] | None = None):
    """A config field with its help text; `choices` is a callable (evaluated when the CLI is built)."""
    return field(default=default, metadata={"help": help, "choices": choices})
