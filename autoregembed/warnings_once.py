"""Each distinct Python warning is shown once per process.

Why: third-party code warns from inside the training loop (DeepSpeed calls torch's deprecated
``reduce_scatter_tensor`` every step), and libraries that reset the warning filters make
Python's own "once per location" repeat them, burying the progress lines in thousands of copies.
"""
from __future__ import annotations

import warnings

_seen: set[tuple[type, str]] = set()
_installed = False


def install():
    """Route warnings through a filter on (category, message): idempotent."""
    global _installed
    if _installed:
        return
    show = warnings.showwarning

    def show_once(message, category, filename, lineno, file=None, line=None):
        key = (category, str(message))
        if key in _seen:
            return
        _seen.add(key)
        show(message, category, filename, lineno, file, line)

    warnings.showwarning = show_once  # the filters still decide what is shown at all
    _installed = True
