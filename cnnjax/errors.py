"""The errors a user can fix (a setting, an input, a file), under one base class, and how a
command reports them."""

import contextlib
import os
import sys
from collections.abc import Iterator


class CnnjaxError(Exception):
    """Something the user can fix; the message says what is wrong, the value and the fix.
    Commands print it as one paragraph and exit with status 2; anything else is a bug."""


class ConfigError(CnnjaxError, ValueError):
    """A setting whose value cannot work."""


class DataError(CnnjaxError, RuntimeError):
    """A dataset or image that cannot be found, read or prepared; the message says how to fix it."""


class RunDirError(CnnjaxError):
    """A run directory that cannot be used as asked (not a run, no readable checkpoint)."""


@contextlib.contextmanager
def reported() -> Iterator[None]:
    """A command's body: a CnnjaxError inside ends the process with its message and status 2,
    without a traceback (with HYDRA_FULL_ERROR=1, with it); anything else, a bug, propagates
    with its traceback."""
    try:
        yield
    except CnnjaxError as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
