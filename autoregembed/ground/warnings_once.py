"""Each distinct Python warning is shown once per process.

Why: third-party code warns from inside the training loop (DeepSpeed calls torch's deprecated
``reduce_scatter_tensor`` every step), and libraries that reset the warning filters make
Python's own "once per location" repeat them, burying the progress lines in thousands of copies.
"""
from __future__ import annotations

import warnings

_installed = False


def show_once(show):
    """``show`` (a ``warnings.showwarning``), called for the first of each (category, message)."""
    seen: set[tuple[type, str]] = set()

    def wrapper(message, category, filename, lineno, file=None, line=None):
        key = (category, str(message))
        if key not in seen:
            seen.add(key)
            show(message, category, filename, lineno, file, line)

    return wrapper


def install():
    """Route this process's warnings through ``show_once``: idempotent."""
    global _installed
    if not _installed:
        warnings.showwarning = show_once(warnings.showwarning)  # the filters still decide what is shown at all
        _installed = True
