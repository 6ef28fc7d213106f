"""The errors a user can fix (a setting, an input, a file), under one base class, and how a
command reports them."""

import contextlib
import sys
from collections.abc import Iterator


class CnnjaxError(Exception):
    """Something the user can fix; the message says what is wrong, the value and the fix.
    Commands print it as one paragraph and exit with status 2; anything else is a bug."""


class ConfigError(CnnjaxError, ValueError):
    """A setting whose value cannot work."""


class RunDirError(CnnjaxError):
    """A run directory that cannot be used as asked (not a run, no readable checkpoint)."""


@contextlib.contextmanager
def reported() -> Iterator[None]:
    """A command's body: a CnnjaxError inside ends the process with its message and status 2
    (no traceback); anything else propagates, traceback and all."""
    try:
        yield
    except CnnjaxError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
