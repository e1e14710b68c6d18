"""Progress of long steps that shows both on a terminal and in a log file or CI output.

tqdm redraws one line with carriage returns, which a log file keeps as a single endless line (or, when callers
disable the bar off a terminal, nothing at all). `progress_bar` gives tqdm on a terminal and, elsewhere, the
same bar written as a plain line at most every `LOG_INTERVAL_S` seconds and at the end. `stage` logs one line
per stage of a long command through the `vptq_mlc.progress` logger, which the CLI shows by default.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from typing import Any, TextIO

from tqdm import tqdm

PROGRESS_LOGGER = "vptq_mlc.progress"
LOG_INTERVAL_S = 15.0

_log = logging.getLogger(PROGRESS_LOGGER)


class _LineWriter:
    """A file for tqdm that turns each redraw into one newline-terminated line."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").strip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(iterable: Iterable[Any] | None = None, *, disable: bool = False, **kw: Any) -> tqdm:
    """tqdm(iterable, **kw) on a terminal; off a terminal, plain lines every LOG_INTERVAL_S seconds and at the end."""
    if disable or sys.stderr.isatty():
        return tqdm(iterable, disable=disable, **kw)
    return tqdm(iterable, file=_LineWriter(sys.stderr), mininterval=LOG_INTERVAL_S, ascii=True, ncols=100, **kw)


def stage(message: str, *args: Any) -> None:
    """One line saying which stage of a long command is starting (shown by the CLI without -v)."""
    _log.info(message, *args)
