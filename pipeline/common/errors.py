"""User errors versus bugs, and the one way every command ends.

A :class:`UserError` is something the user can fix (a params value, a data file, a path): the
command prints one line naming it and exits 1. Anything else is a bug or an environment
failure (an exporter crash, CUDA out of memory) and keeps its full traceback.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable


class UserError(Exception):
    """Bad params, data or paths; the message names the field or file and what to do."""


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")


def run_command(body: Callable[[], object], interrupted: str = "interrupted") -> int:
    """Run a command's body: 0 on success, 1 with one line for a :class:`UserError`, 130 on Ctrl-C.

    Any other exception propagates with its traceback (Python exits 1 and prints it).
    """
    try:
        body()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130
    return 0
