"""A lock left by a process killed while DeepSpeed loaded its CPU op must not hang every later start."""
import os
import time

from autoregembed.ground.distributed import STALE_LOCK_S, clear_stale_extension_lock


def test_an_abandoned_extension_lock_is_removed_and_a_live_one_kept(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = tmp_path / "deepspeed_shm_comm" / "lock"
    assert clear_stale_extension_lock() is None  # none there: nothing to do
    lock.parent.mkdir(exist_ok=True)
    lock.touch()  # a build in progress
    assert clear_stale_extension_lock() is None and lock.exists()
    old = time.time() - STALE_LOCK_S - 5
    os.utime(lock, (old, old))  # its owner died ten minutes ago
    assert clear_stale_extension_lock() == str(lock) and not lock.exists()
    assert "removed" in capsys.readouterr().err
