"""One run per output folder: rank 0 holds an exclusive lock on ``<output_dir>/.lock`` while it runs.

Two runs into one folder would interleave metrics and overwrite each other's checkpoints and
exports; the second is refused with the holder's PID and host.  ``flock`` locks die with their
process, so a killed run never leaves a stale lock behind.
"""
from __future__ import annotations

import fcntl
import os
import socket
import time

from ..ground.errors import UserError


class RunLockError(UserError, RuntimeError):
    """Another run holds the output folder."""


class RunLock:
    def __init__(self, output_dir: str):
        self.path = os.path.join(output_dir, ".lock")
        self._file = None

    def acquire(self) -> "RunLock":
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise RunLockError(f"{os.path.dirname(self.path)} is in use by {holder}; wait for that run to end "
                               f"or choose another output_dir") from None
        except OSError as e:  # a filesystem without flock: run unprotected rather than not at all
            print(f"[autoregembed] warning: cannot lock {self.path} ({e}); make sure no other run uses this folder",
                  flush=True)
            f.close()
            return self
        f.seek(0)
        f.truncate()
        f.write(f"PID {os.getpid()} on {socket.gethostname()} (since {time.strftime('%Y-%m-%d %H:%M:%S')})\n")
        f.flush()
        self._file = f
        return self

    def release(self):
        if self._file is not None:
            self._file.truncate(0)
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None
