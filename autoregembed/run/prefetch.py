"""Building the coming micro-batches on a background thread while the device computes.

Tokenising B x (1 + N) texts and copying them to pinned memory takes host time every micro-step;
on the main thread it leaves the GPU idle.  The batches are a pure function of (step, micro)
(data.StepSampler), so building them ahead changes nothing but when; a fast tokenizer releases the
GIL while it encodes, so a thread is enough (no worker processes, nothing to pickle).
"""
from __future__ import annotations

import queue
import threading
from typing import Callable, Iterable


class Prefetcher:
    """Yields ``build(key)`` for each key of ``keys`` in order, built up to ``depth`` ahead.

    An exception in ``build`` is raised in the consumer at that key; ``close()`` (or leaving the
    ``with`` block, e.g. on a stop request) ends the thread without building the rest."""

    _DONE = object()

    def __init__(self, build: Callable, keys: Iterable, depth: int = 2):
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(build, keys), daemon=True, name="prefetch")
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, build, keys):
        try:
            for key in keys:
                if not self._put((key, build(key), None)):
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            self._put((None, None, e))
            return
        self._put(self._DONE)

    def __iter__(self):
        while True:
            item = self._queue.get()
            if item is self._DONE:
                return
            key, value, error = item
            if error is not None:
                raise error
            yield key, value

    def close(self):
        self._stop.set()
        self._thread.join(timeout=10)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
