"""Progress on long work (recon scoring, recovery, OBS, ``--steps``, validation): a bar on stderr when stderr is a
terminal, nothing otherwise, so logs, pipes and machine-read output stay clean.

Library code wraps a loop with :func:`progress` and calls ``advance()`` per unit of work; the CLI turns bars off for
a run whose output is read by a program (:func:`silenced`). Built on click's progress bar (click is a dependency
already)."""

from __future__ import annotations

import contextlib
import contextvars
import sys
from collections.abc import Callable, Iterator

import click

_ENABLED: contextvars.ContextVar[bool] = contextvars.ContextVar("onnxprune_progress", default=True)
MIN_UNITS = 2  # a single step is not worth a bar


@contextlib.contextmanager
def progress(total: int, label: str) -> Iterator[Callable[[int], None]]:
    """Yield ``advance(n=1)`` for a job of ``total`` units; draws a bar only when it helps (see the module)."""
    if total < MIN_UNITS or not _ENABLED.get() or not sys.stderr.isatty():
        yield lambda n=1: None
        return
    with click.progressbar(length=total, label=label, file=sys.stderr, show_pos=True, show_eta=True) as bar:
        yield lambda n=1: bar.update(n)  # click's update() has no default step


@contextlib.contextmanager
def silenced() -> Iterator[None]:
    """No bars inside this block (a run writing machine-read output to stdout or stderr)."""
    token = _ENABLED.set(False)
    try:
        yield
    finally:
        _ENABLED.reset(token)
