"""The one error contract: a ``UserError`` is a problem the user can fix (a config key, a file, a
folder, a value on the command line, the disk); every command prints it as one line and exits 2.
Anything else is a bug in autoregembed and keeps its traceback.

Why one base: a typo must not look like a crash, and a crash must not look like a typo.
Each class also derives from the builtin a caller would expect (ValueError, OSError, ...), so
code that catches those keeps working.
"""
from __future__ import annotations

import os
import sys


class UserError(Exception):
    """Something the user gave us or our environment is wrong; the message names the key, file or folder."""


class InputError(UserError, ValueError):
    """A bad value: on the command line, in a file the user named, or in a model they chose."""


class ConfigError(InputError):
    """A configuration problem; the message names the offending key."""


def finite(value: float) -> bool:
    """Neither NaN nor infinite (a config value's first check)."""
    return value == value and value not in (float("inf"), float("-inf"))


class MissingInputError(UserError, FileNotFoundError):
    """A file or folder the user named (or an earlier stage should have written) is not there."""


class StorageError(UserError, OSError):
    """Writing an output failed (a full disk, a read-only folder); what was there before is intact."""


class TrainingDiverged(UserError, FloatingPointError):
    """Training left a model that is no model (a non-finite loss, embeddings all zero or non-finite):
    the settings, usually the learning rate, are the user's to change; the checkpoints are kept."""


def user_message(e: BaseException) -> str | None:
    """The one line a command prints for ``e``, or None when ``e`` is a bug (its traceback is owed).
    An OSError that names its file (missing, a folder, no permission, no space) is the user's
    environment, not our code, so it counts as a user error too."""
    if isinstance(e, UserError):
        return str(e)
    if isinstance(e, OSError) and e.filename is not None:
        return f"{e.filename}: {e.strerror or e}"
    return None


def reporting_user_errors(command, prog: str = "autoregembed") -> int:
    """Run ``command()`` and return its exit code; a user error is printed as one line naming ``prog``
    and returns 2, anything else is a bug and keeps its traceback (every entry point, the package's
    and bench/'s, ends through here so a bad input reads the same everywhere)."""
    try:
        return command() or 0
    except Exception as e:
        message = user_message(e)
        if message is None:
            raise
        if os.environ.get("RANK", "0") == "0":  # every rank hits the same error: say it once
            print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
        return 2
