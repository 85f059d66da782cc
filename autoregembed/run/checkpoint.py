"""DeepSpeed checkpoints that are only ever seen complete.

Each save goes to ``<dir>/<tag>.partial``; once every rank has written its shard, rank 0
records every file's size in ``<tag>.partial/manifest.json``, renames the folder to
``<dir>/<tag>`` and atomically rewrites ``<dir>/latest``.  A crash during a save therefore
leaves ``latest`` on the previous complete checkpoint, and a failed save (a full disk) removes
its partial folder and says so.  Pruning only removes checkpoints older than the one just
written.  Loading takes the newest complete checkpoint whose files match their manifest (also
when ``latest`` is missing or stale) and says which one it took and which it skipped.  The
frozen decoder is not saved (it is the base model, reloaded from disk).

A checkpoint written by a different number of ranks is converted once to DeepSpeed's
universal format (``<dir>/universal/<tag>``) and loaded from there.  The global batch must
not change: the sampler then hands every step exactly the same rows, so the resumed run
follows the same trajectory (up to floating-point summation order).
"""
from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import torch

from ..ground import distributed as D
from ..ground.atomic import atomic_dir, atomic_write_text
from ..ground.errors import UserError

_TAG = re.compile(r"^step(\d{8})$")


MANIFEST = "manifest.json"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint could not be written or read; the message names the folder."""


def complete_tags(ckpt_dir: str) -> list[str]:
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted(t for t in os.listdir(ckpt_dir) if _TAG.match(t))


def _file_sizes(tag_dir: str) -> dict:
    return {os.path.relpath(os.path.join(root, n), tag_dir): os.path.getsize(os.path.join(root, n))
            for root, _, names in os.walk(tag_dir) for n in names if n != MANIFEST}


def verify(tag_dir: str) -> str | None:
    """None if every file of the checkpoint is there with the size it was written with, else why not."""
    path = os.path.join(tag_dir, MANIFEST)
    if not os.path.exists(path):  # saved before manifests existed: complete by its rename alone
        return None
    try:
        with open(path) as f:
            want = json.load(f)
    except (OSError, ValueError) as e:
        return f"unreadable manifest.json ({e})"
    have = _file_sizes(tag_dir)
    for name, size in want.items():
        if name not in have:
            return f"{name} is missing"
        if have[name] != size:
            return f"{name} has {have[name]} bytes, {size} were written"
    return None


def loadable_tags(ckpt_dir: str) -> tuple[list[str], list[str]]:
    """(complete tags whose files match their manifests, newest first; 'tag: why' for the others)."""
    good, bad = [], []
    for tag in reversed(complete_tags(ckpt_dir)):
        why = verify(os.path.join(ckpt_dir, tag))
        (bad.append(f"{tag}: {why}") if why else good.append(tag))
    return good, bad


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


def _universal_dir(ckpt_dir: str) -> str:
    return os.path.join(ckpt_dir, "universal")


def _to_universal(ckpt_dir: str, tag: str):
    """Convert (rank 0, once) a checkpoint to the universal format, into ``<ckpt_dir>/universal/<tag>``."""
    parent = _universal_dir(ckpt_dir)
    out = os.path.join(parent, tag)
    if D.rank() == 0 and not os.path.isdir(out):
        with atomic_dir(out) as tmp:
            cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                   os.path.join(ckpt_dir, tag), "--output_folder", tmp, "--num_extract_workers", "1",
                   "--num_merge_workers", "1"]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                raise CheckpointError(f"{ckpt_dir}/{tag}: universal checkpoint conversion failed:\n{r.stderr[-2000:]}")
    D.barrier()


def save(engine, ckpt_dir: str, step: int, keep_last: int = 2, extra: dict | None = None):
    """Save after ``step`` optimizer steps; every rank must call this."""
    tag = f"step{step:08d}"
    partial = tag + ".partial"
    if D.rank() == 0:
        shutil.rmtree(os.path.join(ckpt_dir, partial), ignore_errors=True)
    D.barrier()
    client_state = {"step": step, "rng": rng_state(), "global_batch": engine.train_batch_size(), **(extra or {})}
    error = None
    try:
        engine.save_checkpoint(ckpt_dir, tag=partial, client_state=client_state, save_latest=False,
                               exclude_frozen_parameters=True)
    except (OSError, RuntimeError) as e:  # a full disk surfaces as either, depending on the writer
        error = e
    if D.any_across_ranks(error is not None):
        if D.rank() == 0:
            shutil.rmtree(os.path.join(ckpt_dir, partial), ignore_errors=True)
        D.barrier()
        free = shutil.disk_usage(ckpt_dir).free if os.path.isdir(ckpt_dir) else 0
        kept = latest_tag(ckpt_dir)
        raise CheckpointError(f"saving {ckpt_dir}/{tag} failed ({error or 'on another rank'}; {free / 2**30:.1f} GiB "
                              f"free there); removed the partial save, {kept or 'no earlier checkpoint'} is intact")
    D.barrier()
    if D.rank() == 0:
        atomic_write_text(os.path.join(ckpt_dir, partial, MANIFEST),
                          json.dumps(_file_sizes(os.path.join(ckpt_dir, partial)), indent=0))
        final = os.path.join(ckpt_dir, tag)
        shutil.rmtree(final, ignore_errors=True)
        os.rename(os.path.join(ckpt_dir, partial), final)
        atomic_write_text(os.path.join(ckpt_dir, "latest"), tag)
        older = [t for t in complete_tags(ckpt_dir) if t < tag]  # never the one just written
        for old in older[: max(0, len(older) - (keep_last - 1))] if keep_last > 0 else []:
            shutil.rmtree(os.path.join(ckpt_dir, old), ignore_errors=True)
    D.barrier()


@dataclass(frozen=True)
class Resume:
    """The checkpoint a run resumes from, chosen before its engine is built: one saved by another
    number of ranks loads through DeepSpeed's universal format, which is an engine setting
    (``checkpoint.load_universal``, see ``ds_settings``)."""

    ckpt_dir: str
    tag: str
    saved_world: int
    universal: bool

    def ds_settings(self) -> dict:
        """What the engine's DeepSpeed config must contain to load this checkpoint."""
        return {"checkpoint": {"load_universal": True}} if self.universal else {}


def find_resume(ckpt_dir: str, log=print) -> Resume | None:
    """The newest complete checkpoint whose files match their manifest (converted to the universal
    format first when the rank count changed); None if there is none.  ``log`` hears what was
    skipped.  Every rank must call this."""
    good, bad = loadable_tags(ckpt_dir)
    for why in bad:
        log(f"skipping checkpoint {ckpt_dir}/{why}")
    if not good:
        log(f"no complete checkpoint in {ckpt_dir}: starting at step 0")
        return None
    tag = good[0]
    if tag != latest_tag(ckpt_dir):
        log(f"{ckpt_dir}/latest names {latest_tag(ckpt_dir) or 'nothing loadable'}; loading {tag}, "
            f"the newest complete checkpoint")
    saved_world = _saved_world_size(os.path.join(ckpt_dir, tag))
    universal = saved_world != D.world_size()
    if universal:
        converted = os.path.isdir(os.path.join(_universal_dir(ckpt_dir), tag))
        log(f"{ckpt_dir}/{tag} was saved by {saved_world} rank(s) and is loaded on {D.world_size()}: through "
            f"DeepSpeed's universal format, {'converted before' if converted else 'converting it now'} into "
            f"{_universal_dir(ckpt_dir)}/{tag}")
        _to_universal(ckpt_dir, tag)
    return Resume(ckpt_dir, tag, saved_world, universal)


class _Unreadable(Exception):
    """A file of a checkpoint could not be read on this rank (the message names it)."""


def _unreadable_file(tag_dir: str) -> str:
    """Which file of ``tag_dir`` cannot be read, and why: each is opened as ``torch.load`` opens it
    (memory-mapped, so the tensors' bytes are not read); only asked once a load has failed."""
    for root, _, names in sorted(os.walk(tag_dir)):
        for name in sorted(n for n in names if n.endswith(".pt")):
            path = os.path.join(root, name)
            try:
                torch.load(path, map_location="cpu", mmap=True, weights_only=False)
            except Exception as e:  # noqa: BLE001 - whatever the reader says is the reason
                return f"{path} ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})"
    return f"{tag_dir} (no single file fails on its own)"


def _load_tag(engine, resume: Resume, tag: str) -> dict:
    load_dir = _universal_dir(resume.ckpt_dir) if resume.universal else resume.ckpt_dir
    try:
        _, client_state = engine.load_checkpoint(load_dir, tag=tag, load_module_strict=False,
                                                 load_optimizer_states=True, load_lr_scheduler_states=True)
    except (OSError, RuntimeError, EOFError, ValueError, KeyError, pickle.UnpicklingError) as e:
        raise _Unreadable(_unreadable_file(os.path.join(load_dir, tag))) from e
    if client_state is None:
        raise _Unreadable(f"{os.path.join(load_dir, tag)} (DeepSpeed could not load it)")
    return client_state


def load(engine, resume: Resume, log=print) -> dict:
    """Restore ``resume`` into ``engine`` (built with ``resume.ds_settings()``); returns the client state.
    A checkpoint with a file that cannot be read on any rank (one whose size still matches the
    manifest: ``find_resume`` skips the others) is skipped the same way, naming the file: every rank
    falls back together to the next older complete checkpoint saved by as many ranks, and the error
    comes only when none is left (a full load overwrites whatever the failed one had restored)."""
    ckpt_dir = resume.ckpt_dir
    if engine.load_universal_checkpoint() != resume.universal:
        raise CheckpointError(f"{ckpt_dir}/{resume.tag}: the engine was not built with this checkpoint's ds_settings()")
    saved_world = resume.saved_world
    older = [t for t in loadable_tags(ckpt_dir)[0] if t < resume.tag
             and _saved_world_size(os.path.join(ckpt_dir, t)) == saved_world]
    client_state, tag = None, None
    for tag in [resume.tag, *older]:
        if resume.universal and tag != resume.tag:
            _to_universal(ckpt_dir, tag)
        error = None
        try:
            client_state = _load_tag(engine, resume, tag)
        except _Unreadable as e:
            error = e
        if not D.any_across_ranks(error is not None):
            break
        log(f"skipping checkpoint {ckpt_dir}/{tag}: cannot read {error or 'a file of it on another rank'}")
        client_state = None
    if client_state is None:
        raise CheckpointError(f"{ckpt_dir}: no checkpoint can be read (the newest, {resume.tag}, and every older one "
                              f"failed: see the lines above); move the folder aside to start again")
    if client_state.get("global_batch", engine.train_batch_size()) != engine.train_batch_size():
        raise CheckpointError(
            f"{ckpt_dir}/{tag} was trained with a global batch of {client_state['global_batch']} on {saved_world} "
            f"rank(s); now it is {engine.train_batch_size()} on {D.world_size()}: set gradient_accumulation_steps "
            f"so that micro_batch_size x gradient_accumulation_steps x world size = {client_state['global_batch']}")
    set_rng_state(client_state["rng"])
    log(f"loaded checkpoint {ckpt_dir}/{tag} (step {client_state['step']})")
    return client_state
