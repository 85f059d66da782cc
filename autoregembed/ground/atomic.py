"""Atomic writes: a reader sees the old file/folder or the complete new one, never a partial one.

The temporary files and folders that become the result get the permissions a plain ``open`` or
``mkdir`` would give under the user's umask (``tempfile`` makes them owner-only, and so does the
safetensors writer, which replaces the file it is given), so teammates on a shared cluster can read
exports, score files and checkpoints: the modes are set again on everything just before it is published.
"""
from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import shutil
import tempfile


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _as_if_created_plainly(path: str, is_dir: bool):
    os.chmod(path, (0o777 if is_dir else 0o666) & ~_umask())


def _tree_as_if_created_plainly(root: str):
    for folder, dirs, files in os.walk(root):
        _as_if_created_plainly(folder, is_dir=True)
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                _as_if_created_plainly(path, is_dir=False)


@contextlib.contextmanager
def atomic_dir(final: str):
    """Yield a temporary folder next to ``final``; on success it replaces ``final`` in one rename.

    The writer holds an flock on ``<temporary>.lock`` until it is done, so a later call can tell a
    dead writer's leftovers (a SIGKILL skips every cleanup) from a live one's: those are removed, and
    a replacement cut between its two renames is rolled back to the previous ``final``."""
    parent = os.path.dirname(os.path.abspath(final)) or "."
    os.makedirs(parent, exist_ok=True)
    _recover(final)
    fd, lock_path = tempfile.mkstemp(prefix=os.path.basename(final) + ".tmp-", suffix=".lock", dir=parent)
    lock = os.fdopen(fd, "w")
    fcntl.flock(lock, fcntl.LOCK_EX)  # before the folder exists: no moment shows it unguarded
    tmp = lock_path[: -len(".lock")]
    try:
        os.mkdir(tmp)
        _as_if_created_plainly(tmp, is_dir=True)
        yield tmp
        _tree_as_if_created_plainly(tmp)
        if os.path.exists(final):
            old = tempfile.mkdtemp(prefix=os.path.basename(final) + ".old-", dir=parent)
            os.rename(final, os.path.join(old, "x"))
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(lock_path)
        lock.close()


def _recover(final: str):
    """Remove the temporaries of dead ``atomic_dir`` writers of ``final``; when none is alive, put a
    previous ``final`` set aside by an interrupted replacement back (the newest, if several) and
    remove the superseded ones."""
    parent, name = os.path.dirname(os.path.abspath(final)) or ".", os.path.basename(final)
    alive = False
    for lock_path in glob.glob(os.path.join(glob.escape(parent), glob.escape(name) + ".tmp-*.lock")):
        with open(lock_path, "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # held: its writer is alive (or the filesystem has no flock: keep it)
                alive = True
                continue
            shutil.rmtree(lock_path[: -len(".lock")], ignore_errors=True)
            with contextlib.suppress(FileNotFoundError):  # its writer finished and removed it meanwhile
                os.remove(lock_path)
    if alive:
        return
    old = sorted(glob.glob(os.path.join(glob.escape(parent), glob.escape(name) + ".old-*")), key=os.path.getmtime)
    if old and not os.path.exists(final) and os.path.isdir(os.path.join(old[-1], "x")):
        os.rename(os.path.join(old[-1], "x"), final)
    for path in old:
        shutil.rmtree(path, ignore_errors=True)


def atomic_write_text(path: str, text: str):
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".tmp-", dir=parent)
    _as_if_created_plainly(tmp, is_dir=False)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # e.g. a full disk: the old file stays, the partial copy goes
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def atomic_file(path: str):
    """Yield a temporary path next to ``path``; on success it replaces ``path``."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".tmp-", dir=parent)
    os.close(fd)
    _as_if_created_plainly(tmp, is_dir=False)
    try:
        yield tmp
        _as_if_created_plainly(tmp, is_dir=False)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
