"""Stage 1's results kept by what decides them, so that bench/quality.py's ``--split report`` reuses the
tuning run's stage 1 (the longest part of an arm) instead of training it again.

Why a key of everything: a cache hit must be the very stage 1 a fresh run would train, bit for bit,
so the key holds every stage-1 setting, the seed, the rows, the package's code, the DeepSpeed config
and the base model's files; a stage stopped early is never stored.  It trains in ``<entry>.partial``,
outside the run's scratch (which the next run empties), so a stage 1 killed with its session resumes
from its latest checkpoint when a later run asks for the same key: the trainer's resume retraces the
uninterrupted run, so when and whether it checkpoints is not part of the key.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import shutil

from harness import ROOT, package_code_files  # bench/harness.py, beside this script

from autoregembed.ground.atomic import atomic_dir
from autoregembed.run.config import OptimConfig
from autoregembed.run.runlock import RunLock
from autoregembed.run.session import RunContext
from autoregembed.run.stages import stages_for


def run_stage(cfg, name: str, ds: str, resume: bool = False):
    """One stage of ``cfg`` as the pipeline runs it (without its up-front checks and lock)."""
    return stages_for(cfg)[name].run(RunContext.of(cfg, ds), resume=resume)


STAGE1_KEPT = ("model", "metrics.jsonl", "shared_prefix.safetensors")  # what the later arms and the record read


def cached_stage1(cfg, ds: str, base: str, cache: str) -> tuple[str, str | None]:
    """Stage 1's exported model, and the cache entry that holds it (None: not kept): copied from
    ``cache`` when a run with the same key finished it, else trained (resumed where an earlier run of
    the key was stopped or killed) and kept there.  Stage 1 is bit-exact for a given key on one machine
    and reads no STS-B half, so the report split's stage 1 is the tuning split's; the key is every
    stage-1 setting, the seed, the stage-1 rows, the package's code, the DeepSpeed config and the base
    model's files."""
    if not cache:
        return run_stage(cfg, "stage1", ds).artifact, None
    entry = os.path.join(cache, stage1_key(cfg, ds, base))
    if os.path.isdir(entry):
        print(f"[quality] stage 1 from the cache: {entry}", flush=True)
    else:
        partial = entry + PARTIAL
        result = _train_in(cfg, ds, partial)
        if result.status != "done":  # stopped early (a stop request): its checkpoints wait in ``partial``
            return result.artifact, None
        with atomic_dir(entry) as tmp:  # a kill mid-copy leaves no entry, never a partial one
            for name in STAGE1_KEPT:
                _copy(os.path.join(partial, "stage1", name), os.path.join(tmp, name))
        shutil.rmtree(partial)  # the entry holds what it was trained for
    for name in STAGE1_KEPT:
        _copy(os.path.join(entry, name), os.path.join(cfg.layout.stage_dir("stage1"), name))
    return cfg.layout.stage1_model, entry


PARTIAL = ".partial"  # a key's stage 1 in training, beside the finished entries


def _train_in(cfg, ds: str, root: str):
    """Stage 1 of ``cfg`` trained with ``root`` as its output folder, resumed from the latest checkpoint
    an earlier run left there; one run at a time holds ``root`` (a second is refused)."""
    os.makedirs(root, exist_ok=True)
    lock = RunLock(root).acquire()
    try:
        return run_stage(dataclasses.replace(cfg, output_dir=root), "stage1", ds, resume=True)
    finally:
        lock.release()


def stage1_key(cfg, ds: str, base: str) -> str:
    """Hash of what decides stage 1's result (not the output folder, stage 2, the references or the
    evaluation)."""
    settings = dataclasses.asdict(cfg)
    for name in ("output_dir", "paths", "stage2", "reference", "eval", "mine", "monitor", "stage"):
        settings.pop(name, None)
    settings["data"] = {k: v for k, v in settings["data"].items() if k not in ("stage2", "stage1")}
    defaults = OptimConfig()  # when it checkpoints or stops decides nothing: a resumed stage retraces the run
    settings["stage1"].update({k: getattr(defaults, k) for k in ("save_every", "keep_last", "stop_after")})
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    code = package_code_files()
    model_files = sorted(p for p in glob.glob(os.path.join(base, "*")) if os.path.isfile(p))
    named = [(os.path.relpath(p, ROOT), p) for p in code] + [(os.path.basename(p), p) for p in model_files]
    for name, path in [("rows", cfg.data.stage1), ("deepspeed", ds), *named]:  # the rows and config by content only
        h.update(name.encode())
        with open(path, "rb") as f:
            h.update(hashlib.sha256(f.read()).digest())
    return f"seed{cfg.seed}-{h.hexdigest()[:16]}"


def _copy(src: str, dst: str):
    if os.path.isdir(src):
        shutil.copytree(src, dst, dirs_exist_ok=True)
    elif os.path.exists(src):
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copy2(src, dst)
