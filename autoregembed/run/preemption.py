"""Graceful stop on preemption: save within ``CHECK_EVERY`` optimizer steps, then exit with ``EXIT_STOPPED``.

A stop is requested by SIGUSR1, SIGTERM or SIGINT (Ctrl-C) reaching a rank, or by the file
``<stage_dir>/STOP`` appearing (what the Slurm scripts' USR1 trap creates, which works
whatever launcher sits between the batch shell and the ranks).  Ranks agree through an
all-reduce, so all of them save the same step; a training stage carries its request in the
all-reduce that reads its step metrics back (monitor.py), every ``CHECK_EVERY`` steps, so waiting
for the GPU stays out of the steps between.  After saving, the stage writes
``<stage_dir>/PREEMPTED`` (the step) so the batch script knows to requeue, and the run exits
``EXIT_STOPPED``, never 0: ``train.py && next-step`` must not take a stopped run for a finished one.
Work that saves nothing (evaluation, mining) runs ``on_rank0``: a request stops it at once, and it
reruns after the requeue.  A second Ctrl-C (more than ``DEBOUNCE_S`` after the first: one Ctrl-C
reaches a rank twice under torchrun, from the terminal and from torchrun) quits without saving.

The handlers are installed when a run starts, and a request is only ever consumed by the stage
that honours it (``honoured``): one that arrives while a model loads, or during reference
scoring, export or evaluation, is not lost.
"""
from __future__ import annotations

import _thread
import contextlib
import os
import signal
import threading
import time

from ..ground.atomic import atomic_write_text
from ..ground.distributed import any_across_ranks, barrier, rank

EXIT_STOPPED = 75  # sysexits' EX_TEMPFAIL: stopped on request with its state saved; rerun with --resume
CHECK_EVERY = 5  # optimizer steps between a training stage's stop checks: 5 x a 7B step is well inside Slurm's 300 s
DEBOUNCE_S = 2.0

_requested = False
_first_interrupt = None  # when the first Ctrl-C arrived
_raise_now = False  # inside ``interruptible``: a request raises StopRequested at once


class StopRequested(Exception):
    """A stop request inside ``interruptible`` (work that has nothing to save)."""


def _handler(signum, frame):
    global _requested, _first_interrupt, _raise_now
    if signum == signal.SIGINT:
        now = time.monotonic()
        if _first_interrupt is not None and now - _first_interrupt > DEBOUNCE_S:
            raise KeyboardInterrupt  # the user will not wait for the save
        _first_interrupt = _first_interrupt or now
    _requested = True
    if _raise_now:  # once: the cleanup of ``interruptible`` must not be interrupted in turn
        _raise_now = False
        raise StopRequested


def install():
    for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _handler)


def stop_file(stage_dir: str) -> str:
    return os.path.join(stage_dir, "STOP")


def marker_file(stage_dir: str) -> str:
    return os.path.join(stage_dir, "PREEMPTED")


def asked(stage_dir: str) -> bool:
    """This rank saw a signal or the stop file (ranks agree through ``requested`` or a stage's own all-reduce)."""
    return _requested or os.path.exists(stop_file(stage_dir))


def requested(stage_dir: str) -> bool:
    """True on every rank if any rank saw a signal or the stop file."""
    return any_across_ranks(asked(stage_dir))


def clear_marker(stage_dir: str):
    """A stage starting (again) is no longer preempted; a pending STOP file stays pending.
    Every rank calls it; rank 0 touches the files."""
    if rank() == 0 and os.path.exists(marker_file(stage_dir)):
        os.remove(marker_file(stage_dir))


@contextlib.contextmanager
def interruptible(stage_dir: str, poll_s: float = 0.5):
    """Within it a stop request raises ``StopRequested`` at once: a signal through the handler, the STOP
    file through a thread that polls for it and interrupts the main thread as that signal would."""
    global _raise_now
    if _requested or os.path.exists(stop_file(stage_dir)):
        raise StopRequested
    done = threading.Event()

    def watch():
        while not done.wait(poll_s):
            if os.path.exists(stop_file(stage_dir)):
                _thread.interrupt_main(signal.SIGTERM)
                return

    watcher = threading.Thread(target=watch, daemon=True)
    _raise_now = True
    watcher.start()
    try:
        yield
    finally:
        _raise_now = False
        done.set()
        watcher.join()


def on_rank0(stage_dir: str, work):
    """``work()`` on rank 0 under ``interruptible`` while the other ranks wait; every rank returns
    (stopped, what work returned on rank 0, else None) alike."""
    stopped, result = False, None
    if rank() == 0:
        try:
            with interruptible(stage_dir):
                result = work()
        except StopRequested:
            stopped = True
    return any_across_ranks(stopped), result


def honoured(stage_dir: str, what: str):
    """After the state is saved: write the PREEMPTED marker (``what``: the step saved, or the stage
    to rerun) and consume the request, so the requeued run does not stop at once.  Every rank
    calls it; rank 0 touches the files."""
    global _requested, _first_interrupt
    _requested, _first_interrupt = False, None
    if rank() == 0:
        atomic_write_text(marker_file(stage_dir), what)
        if os.path.exists(stop_file(stage_dir)):
            os.remove(stop_file(stage_dir))
    barrier()  # no rank exits (EXIT_STOPPED makes srun kill the others) before the marker exists
