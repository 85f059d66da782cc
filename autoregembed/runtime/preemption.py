"""Graceful stop on preemption: save at the next step boundary, then exit cleanly.

A stop is requested by SIGUSR1/SIGTERM reaching a rank, or by the file
``<stage_dir>/STOP`` appearing (what the Slurm scripts' USR1 trap creates, which works
whatever launcher sits between the batch shell and the ranks).  Ranks agree through an
all-reduce, so all of them save the same step.  After saving, the stage writes
``<stage_dir>/PREEMPTED`` (the step) so the batch script knows to requeue.

The handlers are installed when a run starts, and a request is only ever consumed by the stage
that honours it (``honoured``): one that arrives while a model loads, or during reference
scoring, export or evaluation, is not lost.
"""
from __future__ import annotations

import os
import signal

from .atomic import atomic_write_text
from .distributed import any_across_ranks, rank

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


def clear_marker(stage_dir: str):
    """A stage starting (again) is no longer preempted; a pending STOP file stays pending.
    Every rank calls it; rank 0 touches the files."""
    if rank() == 0 and os.path.exists(marker_file(stage_dir)):
        os.remove(marker_file(stage_dir))


def honoured(stage_dir: str, what: str):
    """After the state is saved: write the PREEMPTED marker (``what``: the step saved, or the stage
    to rerun) and consume the request, so the requeued run does not stop at once.  Every rank
    calls it; rank 0 touches the files."""
    global _requested
    _requested = False
    if rank() != 0:
        return
    atomic_write_text(marker_file(stage_dir), what)
    if os.path.exists(stop_file(stage_dir)):
        os.remove(stop_file(stage_dir))
