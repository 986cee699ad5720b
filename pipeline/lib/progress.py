"""Progress of long loops: a bar on a terminal, a plain line every few seconds in a log.

tqdm does the counting, the rate and the ETA in both cases. On a terminal it draws its bar; when
stderr is not a terminal (CI, ``nohup``, a pipe, ``dvc repro > log``) the same tqdm object writes
one whole line per interval instead of carriage-return redraws that a log would never show::

    decode: 12800/70000 img (18%), 402.3img/s, elapsed 00:31, ETA 02:22

The interval is ``CNN_PROGRESS_INTERVAL`` seconds (default 10; 0 = every step, for tests).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import IO, TypeVar

from tqdm import tqdm

INTERVAL_ENV = "CNN_PROGRESS_INTERVAL"
DEFAULT_INTERVAL_S = 10.0
LINE_FORMAT = "{desc}: {n_fmt}/{total_fmt} {unit} ({percentage:.0f}%), {rate_fmt}, elapsed {elapsed}, " \
              "ETA {remaining}{postfix}"
LINE_FORMAT_NO_TOTAL = "{desc}: {n_fmt} {unit}, {rate_fmt}, elapsed {elapsed}{postfix}"

T = TypeVar("T")


class _Lines:
    """A file for tqdm that turns its redraws (``\\r`` + status + padding) into whole lines."""

    def __init__(self, stream: IO[str]):
        self.stream = stream
        self.last = ""

    def write(self, text: str) -> None:
        line = text.strip()
        if line and line != self.last:  # the final refresh repeats the last line when nothing moved
            self.stream.write(line + "\n")
            self.stream.flush()
            self.last = line

    def flush(self) -> None:
        self.stream.flush()


class _LogTqdm(tqdm):
    """tqdm for logs: a postfix is shown with the next timed line instead of forcing a line of its own."""

    def set_postfix(self, ordered_dict=None, refresh=False, **kwargs) -> None:
        super().set_postfix(ordered_dict, refresh=False, **kwargs)


def interval_s() -> float:
    """Seconds between two log lines, from ``CNN_PROGRESS_INTERVAL``."""
    value = os.environ.get(INTERVAL_ENV, "")
    try:
        return max(float(value), 0.0) if value else DEFAULT_INTERVAL_S
    except ValueError:
        return DEFAULT_INTERVAL_S


def progress(iterable: Iterable[T], total: int | None = None, desc: str = "", unit: str = "it",
             enabled: bool = True, leave: bool = True, stream: IO[str] | None = None) -> tqdm:
    """Wrap ``iterable`` in a tqdm bar (terminal) or a tqdm that logs a line per interval (anything else).

    Args:
        total: the number of items, for the percentage and the ETA.
        desc, unit: what is counted, e.g. ``decode`` and ``img``.
        enabled: False shows nothing (e.g. on the non-zero ranks of a distributed run).
        leave: keep the bar on the terminal when done; log lines always stay.
        stream: where to write; default stderr.
    Returns:
        The tqdm object: iterate it, call ``set_postfix`` on it.
    """
    stream = stream or sys.stderr
    if not enabled:
        return tqdm(iterable, total=total, disable=True)
    if stream.isatty():
        return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, file=stream)
    # miniters=1: check the clock at every step (a float compare), so a slow step is reported
    # at the next one instead of waiting for tqdm's adaptive step count to catch up.
    return _LogTqdm(iterable, total=total, desc=desc, unit=unit, leave=True, file=_Lines(stream),
                mininterval=interval_s(), maxinterval=float("inf"), miniters=1, ascii=True,
                bar_format=LINE_FORMAT if total is not None else LINE_FORMAT_NO_TOTAL)
