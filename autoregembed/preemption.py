"""Graceful stop on preemption: save at the next step boundary, then exit cleanly.

A stop is requested by SIGUSR1/SIGTERM reaching a rank, or by the file
``<stage_dir>/STOP`` appearing (what the Slurm scripts' USR1 trap creates, which works
whatever launcher sits between the batch shell and the ranks).  Ranks agree through an
all-reduce, so all of them save the same step.  After saving, the stage writes
``<stage_dir>/PREEMPTED`` (the step) so the batch script knows to requeue.
"""
from __future__ import annotations

import os
import signal

from .distributed import any_across_ranks

_requested = False


def _handler(signum, frame):
    global _requested
    _requested = True


def install():
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, _handler)


def stop_file(stage_dir: str) -> str:
    return os.path.join(stage_dir, "STOP")


def marker_file(stage_dir: str) -> str:
    return os.path.join(stage_dir, "PREEMPTED")


def requested(stage_dir: str) -> bool:
    """True on every rank if any rank saw a signal or the stop file."""
    return any_across_ranks(_requested or os.path.exists(stop_file(stage_dir)))


def clear(stage_dir: str):
    global _requested
    _requested = False
    for path in (stop_file(stage_dir), marker_file(stage_dir)):
        if os.path.exists(path):
            os.remove(path)
