"""Trained stages kept by a key, so that bench/quality.py trains each at most once: stage 1 by what decides
it, so the report split reuses the tuning run's (the longest part of an arm), and every other trained
stage ((b)'s and (g)'s InfoNCE, (d)-(f)'s stage 2) by its run's whole config, so the same point run again
after its session ended picks up its model instead of training it again.

Why a key of everything: a cache hit must be the very model a fresh run would train, bit for bit, so the
key holds the settings, the seed, the files they name by content (rows, the model a stage starts from),
the package's code, the DeepSpeed config and the base model's files; a stage stopped early is never
stored.  A stage trains in ``<entry>.partial``, outside the run's scratch (which the next run empties),
so one killed with its session resumes from its latest checkpoint when a later run asks for the same key:
the trainer's resume retraces the uninterrupted run, so when and whether it checkpoints is not in the key.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import shutil

from harness import package_code_file_hashes  # bench/harness.py, beside this script

from autoregembed.ground.atomic import atomic_dir
from autoregembed.run.config import Config, OptimConfig
from autoregembed.run.runlock import RunLock
from autoregembed.run.session import RunContext
from autoregembed.run.stages import stages_for


def run_stage(cfg, name: str, ds: str, resume: bool = False):
    """One stage of ``cfg`` as the pipeline runs it (without its up-front checks and lock)."""
    return stages_for(cfg)[name].run(RunContext.of(cfg, ds), resume=resume)


KEPT = ("model", "metrics.jsonl", "shared_prefix.safetensors")  # what the later arms and the record read


def cached_stage1(cfg, ds: str, base: str, cache: str) -> tuple[str, str | None]:
    """Stage 1's exported model and its cache entry (``cached_stage`` under ``stage1_keys``): stage 1 is
    bit-exact for a given key on one machine and reads no STS-B half, so the report split's stage 1 is
    the tuning split's."""
    return cached_stage(cfg, "stage1", ds, cache, stage1_keys(cfg, ds, base) if cache else None)


def cached_stage(cfg, stage: str, ds: str, cache: str, keys: list[str] | None = None) -> tuple[str, str | None]:
    """The exported model of training ``stage`` of ``cfg``, and the cache entry that holds it (None: not
    kept, ``cache`` empty): copied from ``cache`` when a run with the same key (``keys``, default:
    ``run_key`` in each of its ``KEY_SCHEMES``; the first that has an entry) finished it, else trained
    (resumed where an earlier run of the key was stopped or killed) and kept there.  A stage stopped
    before its end (a stop request, SIGTERM, Ctrl-C: the trainer checkpoints) ends the run in one line:
    the benchmark has no model to score."""
    if not cache:
        result = run_stage(cfg, stage, ds)
        if result.status != "done":
            raise SystemExit(f"[quality] {stage} stopped before its end ({result.status}); without a cache it "
                             "trains again from the start")
        return result.artifact, None
    entry = _pick(cache, keys or [run_key(cfg, stage, ds, scheme) for scheme in KEY_SCHEMES])
    if os.path.isdir(entry):
        print(f"[quality] {stage} from the cache: {entry}", flush=True)
    else:
        partial = entry + PARTIAL
        result = _train_in(cfg, stage, ds, partial)
        if result.status != "done":
            raise SystemExit(f"[quality] {stage} stopped before its end ({result.status}); the same command "
                             f"resumes it from its checkpoint in {partial}")
        with atomic_dir(entry) as tmp:  # a kill mid-copy leaves no entry, never a partial one
            for name in KEPT:
                _copy(os.path.join(partial, stage, name), os.path.join(tmp, name))
        shutil.rmtree(partial)  # the entry holds what it was trained for
    for name in KEPT:
        _copy(os.path.join(entry, name), os.path.join(cfg.layout.stage_dir(stage), name))
    return cfg.layout.export_dir(stage), entry


PARTIAL = ".partial"  # a key's stage in training, beside the finished entries


def _pick(cache: str, keys: list[str]) -> str:
    """The entry of the first of ``keys`` that has one (finished, else in training), else the first key's:
    entries made under an earlier key scheme (the last of ``keys``) keep being found."""
    for suffix in ("", PARTIAL):
        for key in keys:
            if os.path.isdir(os.path.join(cache, key + suffix)):
                return os.path.join(cache, key)
    return os.path.join(cache, keys[0])


def _train_in(cfg, stage: str, ds: str, root: str):
    """``stage`` of ``cfg`` trained with ``root`` as its output folder, resumed from the latest checkpoint
    an earlier run left there; one run at a time holds ``root`` (a second is refused)."""
    os.makedirs(root, exist_ok=True)
    lock = RunLock(root).acquire()
    try:
        return run_stage(dataclasses.replace(cfg, output_dir=root), stage, ds, resume=True)
    finally:
        lock.release()


CHECKPOINTING = ("save_every", "keep_last", "stop_after")  # when a stage checkpoints or stops decides nothing


def _without_checkpointing(settings: dict, stages: tuple[str, ...]):
    defaults = OptimConfig()
    for stage in stages:
        settings[stage].update({k: getattr(defaults, k) for k in CHECKPOINTING})


def _hash_files(h, named: list[tuple[str, str]]):
    for name, path in named:  # by content only
        h.update(name.encode())
        with open(path, "rb") as f:
            h.update(hashlib.sha256(f.read()).digest())


def _hash_code(h):
    """The package code by content, as the records name it (harness.package_code_file_hashes)."""
    for rel, sha in package_code_file_hashes():
        h.update(rel.encode())
        h.update(bytes.fromhex(sha))


def _folder_files(folder: str) -> list[tuple[str, str]]:
    paths = sorted(p for p in glob.glob(os.path.join(folder, "**", "*"), recursive=True) if os.path.isfile(p))
    return [(os.path.relpath(p, folder), p) for p in paths]


def _non_default(settings: dict, defaults: dict) -> dict:
    """``settings`` without the values equal to ``defaults``': a config field added later at its default
    keeps every key (a changed default changes the package code, which the keys hold)."""
    out = {}
    for k, v in settings.items():
        d = defaults.get(k, _MISSING)
        if isinstance(v, dict) and isinstance(d, dict):
            if sub := _non_default(v, d):
                out[k] = sub
        elif v != d:
            out[k] = v
    return out


_MISSING = object()


def stage1_keys(cfg, ds: str, base: str) -> list[str]:
    """``stage1_key``, then the key its entries had before 2026-12-07 (every setting, defaults included)."""
    return [stage1_key(cfg, ds, base), stage1_key(cfg, ds, base, with_defaults=True)]


def stage1_key(cfg, ds: str, base: str, with_defaults: bool = False) -> str:
    """Hash of what decides stage 1's result (not the output folder, stage 2, the references or the
    evaluation): the settings that differ from the defaults, the rows, DeepSpeed config, package code and
    base model files by content."""
    def kept(settings: dict) -> dict:
        for name in ("output_dir", "paths", "stage2", "reference", "eval", "mine", "monitor", "stage"):
            settings.pop(name, None)
        settings["data"] = {k: v for k, v in settings["data"].items() if k not in ("stage2", "stage1")}
        _without_checkpointing(settings, ("stage1",))
        return settings

    settings = kept(dataclasses.asdict(cfg))
    if not with_defaults:
        settings = _non_default(settings, kept(dataclasses.asdict(Config())))
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    model_files = sorted(p for p in glob.glob(os.path.join(base, "*")) if os.path.isfile(p))
    _hash_files(h, [("rows", cfg.data.stage1), ("deepspeed", ds)])
    _hash_code(h)
    _hash_files(h, [(os.path.basename(p), p) for p in model_files])
    return f"seed{cfg.seed}-{h.hexdigest()[:16]}"


KEY_SCHEMES = ("relative", "paths", "bare_words")  # run_key's, newest first: entries of each keep being found


def run_key(cfg, stage: str, ds: str, scheme: str = "relative") -> str:
    """Hash of the whole config but its output folder (the values that differ from the defaults), every
    file or folder it names by content (the rows, the STS file, the model the stage starts from, the
    base), the DeepSpeed config and the package's code: a stage other than stage 1 is reused only by a run
    of the same settings on the same inputs (in practice the same point of the benchmark run again, into
    any --out).  Earlier ``scheme``s: "paths" (until 2026-12-08) hashed the names of the files under the
    output folder too (a stage 1 at runs/A/seed1/stage1/model is another key than the same model under
    runs/B), "bare_words" (until 2026-12-07) read every string as a path (``_names_a_path``)."""
    bare_words = scheme == "bare_words"
    def kept(settings: dict) -> dict:
        settings.pop("output_dir")
        _without_checkpointing(settings, ("stage1", "stage2"))
        return settings

    settings = kept(dataclasses.asdict(cfg))
    named = []
    scratch = os.path.abspath(cfg.output_dir)
    for key, value in sorted(_strings(settings)):  # every file the config names, defaults included
        if not (bare_words or _names_a_path(value)):  # bare_words: the key before 2026-12-07 (_names_a_path)
            continue
        if os.path.isfile(value):
            named.append((key, value))
        elif os.path.isdir(value) and not (scratch + os.sep).startswith(os.path.abspath(value) + os.sep):
            named += [(f"{key}/{name}", path) for name, path in _folder_files(value)]  # not a folder the run writes in
    settings = _non_default(settings, kept(dataclasses.asdict(Config())))
    if scheme == "relative":
        settings = _under_output(settings, scratch)
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    _hash_files(h, [("deepspeed", ds)])
    _hash_code(h)
    _hash_files(h, named)
    return f"{stage}-seed{cfg.seed}-{h.hexdigest()[:16]}"


def _under_output(settings: dict, out: str) -> dict:
    """``settings`` with every string that names a path under the output folder ``out`` written relative
    to it: its content is hashed (``named``), and where a run writes is no setting of what it computes."""
    def rel(v):
        if isinstance(v, dict):
            return {k: rel(x) for k, x in v.items()}
        if isinstance(v, str) and _names_a_path(v) and os.path.abspath(v).startswith(out + os.sep):
            return os.path.join("<output_dir>", os.path.relpath(os.path.abspath(v), out))
        return v

    return rel(settings)


def _names_a_path(value: str) -> bool:
    """A setting's string is read as a path only when it is written as one (absolute, or with a folder in
    it): else a bare word such as ``monitor.wandb_project``'s "autoregembed" names the package's folder from
    the repository root, and its raw source in the key would outlive every change code_alias.py vouches for."""
    return os.path.isabs(value) or os.sep in value


def _strings(settings: dict, prefix: str = "") -> list[tuple[str, str]]:
    """(dotted key, value) of every string in the nested ``settings``."""
    out = []
    for k, v in settings.items():
        if isinstance(v, dict):
            out += _strings(v, f"{prefix}{k}.")
        elif isinstance(v, str):
            out.append((f"{prefix}{k}", v))
    return out


def _copy(src: str, dst: str):
    if os.path.isdir(src):
        shutil.copytree(src, dst, dirs_exist_ok=True)
    elif os.path.exists(src):
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copy2(src, dst)
