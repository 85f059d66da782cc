"""DeepSpeed checkpoints that are only ever seen complete.

Each save goes to ``<dir>/<tag>.partial``; once every rank has written its shard, rank 0
renames it to ``<dir>/<tag>`` and atomically rewrites ``<dir>/latest``.  A crash during
a save therefore leaves ``latest`` on the previous complete checkpoint.  The frozen
decoder is not saved (it is the base model, reloaded from disk).

A checkpoint written by a different number of ranks is converted once to DeepSpeed's
universal format (``<dir>/universal/<tag>``) and loaded from there.  The global batch must
not change: the sampler then hands every step exactly the same rows, so the resumed run
follows the same trajectory (up to floating-point summation order).
"""
from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import sys

import numpy as np
import torch

from . import distributed as D
from .atomic import atomic_dir, atomic_write_text

_TAG = re.compile(r"^step(\d{8})$")


def _complete_tags(ckpt_dir: str) -> list[str]:
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted(t for t in os.listdir(ckpt_dir) if _TAG.match(t))


def latest_tag(ckpt_dir: str) -> str | None:
    path = os.path.join(ckpt_dir, "latest")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        tag = f.read().strip()
    return tag if os.path.isdir(os.path.join(ckpt_dir, tag)) else None


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _saved_world_size(tag_dir: str) -> int:
    return len([n for n in os.listdir(tag_dir) if n.endswith("_optim_states.pt")])


def _to_universal(ckpt_dir: str, tag: str) -> str:
    """Convert (rank 0, once) a checkpoint to the universal format; returns its parent folder."""
    parent = os.path.join(ckpt_dir, "universal")
    out = os.path.join(parent, tag)
    if D.rank() == 0 and not os.path.isdir(out):
        with atomic_dir(out) as tmp:
            cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                   os.path.join(ckpt_dir, tag), "--output_folder", tmp, "--num_extract_workers", "1",
                   "--num_merge_workers", "1"]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"{ckpt_dir}/{tag}: universal checkpoint conversion failed:\n{r.stderr[-2000:]}")
    D.barrier()
    return parent


def save(engine, ckpt_dir: str, step: int, keep_last: int = 2, extra: dict | None = None):
    """Save after ``step`` optimizer steps; every rank must call this."""
    tag = f"step{step:08d}"
    partial = tag + ".partial"
    if D.rank() == 0:
        shutil.rmtree(os.path.join(ckpt_dir, partial), ignore_errors=True)
    D.barrier()
    client_state = {"step": step, "rng": rng_state(), "global_batch": engine.train_batch_size(), **(extra or {})}
    engine.save_checkpoint(ckpt_dir, tag=partial, client_state=client_state, save_latest=False,
                           exclude_frozen_parameters=True)
    D.barrier()
    if D.rank() == 0:
        final = os.path.join(ckpt_dir, tag)
        shutil.rmtree(final, ignore_errors=True)
        os.rename(os.path.join(ckpt_dir, partial), final)
        atomic_write_text(os.path.join(ckpt_dir, "latest"), tag)
        for old in _complete_tags(ckpt_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(os.path.join(ckpt_dir, old), ignore_errors=True)
    D.barrier()


def load_latest(engine, ckpt_dir: str) -> dict | None:
    """Restore the newest complete checkpoint; returns its client state (None if there is none)."""
    tag = latest_tag(ckpt_dir)
    if tag is None:
        return None
    load_dir = ckpt_dir
    saved_world = _saved_world_size(os.path.join(ckpt_dir, tag))
    if saved_world != D.world_size():
        load_dir = _to_universal(ckpt_dir, tag)
        engine._config.load_universal_checkpoint = True
    try:
        _, client_state = engine.load_checkpoint(load_dir, tag=tag, load_module_strict=False,
                                                 load_optimizer_states=True, load_lr_scheduler_states=True)
    finally:
        engine._config.load_universal_checkpoint = False
    if client_state is None:
        raise RuntimeError(f"{ckpt_dir}/{tag}: DeepSpeed could not load this checkpoint")
    if client_state.get("global_batch", engine.train_batch_size()) != engine.train_batch_size():
        raise RuntimeError(
            f"{ckpt_dir}/{tag} was trained with a global batch of {client_state['global_batch']} on {saved_world} "
            f"rank(s); now it is {engine.train_batch_size()} on {D.world_size()}: set gradient_accumulation_steps "
            f"so that micro_batch_size x gradient_accumulation_steps x world size = {client_state['global_batch']}")
    set_rng_state(client_state["rng"])
    return client_state
