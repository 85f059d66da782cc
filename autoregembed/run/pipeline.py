"""``train.py`` / ``autoregembed train``: run the configured stage, or every stage of the pipeline in
order (stages.PIPELINE), after every up-front check and with the output folder locked."""
from __future__ import annotations

import os

import torch

from ..ground import distributed as D
from . import preemption
from .config import Config, check_runtime
from .ds_config import check_early
from .loading import resolve_dtype
from ..ground.monitor import log
from ..ground.arch import Arch
from ..release.plot import plot_run
from .runlock import RunLock, RunLockError
from .stages import TRAINING, stages_for
from .session import RunContext


def _early_arch(base: str) -> Arch:
    """The base's shapes (``base``: model.base) when its config is on disk, else a small preset (only
    ZeRO's bucket "auto"s depend on it, and the engine's config is resolved again with the real one)."""
    path = os.path.join(base, "config.json")
    return Arch.load(base if os.path.exists(path) else "smollm2-135m")


def _lock_output_dir(output_dir: str) -> RunLock | None:
    """Rank 0 locks the output folder; every rank fails together when another run holds it."""
    lock, error = None, None
    if D.rank() == 0:
        try:
            lock = RunLock(output_dir).acquire()
        except RunLockError as e:
            error = e
    if D.any_across_ranks(error is not None):
        raise error or RunLockError(f"{output_dir} is in use by another run (see rank 0)")
    return lock


def run(cfg: Config, ds_path, resume: bool = False) -> tuple[dict, str]:
    """Run ``cfg.stage`` (or the whole pipeline); returns where each artifact went, and "done" or how the
    run ended early (a StageResult status: "preempted", "stopped"; --resume continues).  Everything a
    user can get wrong (the config, the DeepSpeed file, every stage's inputs and rows) fails here
    before any model is built: the tiny default's base model alone takes minutes to build."""
    check_runtime(cfg, D.world_size())
    stages = stages_for(cfg).check()
    check_early(ds_path, {s.name: s.settings() for s in stages if s.settings() is not None}, D.world_size(),
                _early_arch(cfg.model.base), resolve_dtype(cfg.model.dtype))
    lock = _lock_output_dir(cfg.output_dir)
    try:
        return _run_stages(RunContext.of(cfg, ds_path), stages, resume, summary=cfg.is_pipeline)
    finally:
        if lock is not None:
            lock.release()


def _run_stages(ctx: RunContext, stages: list, resume: bool, summary: bool) -> tuple[dict, str]:
    """Each stage in turn until one ends early; then, for a pipeline (``summary``), the plot
    (monitor.plot) and where every artifact went."""
    if D.device().type == "cuda" and resolve_dtype(ctx.model.dtype) == torch.float32:
        log("model.dtype=fp32 on a GPU: matmuls and the fused scorer run without tensor cores "
            "(IEEE fp32, several times slower); bf16 is the GPU default (model.dtype=auto)")
    out, status = {}, "done"
    preemption.install()  # from the start: a request while a model loads must not be lost
    for stage in stages:
        if not stage.trains and preemption.requested(stage.dir):  # training stages stop mid-stage
            preemption.honoured(stage.dir, stage.name)
            log(f"{stage.name}: stop requested before it started; exiting for requeue")
            status = "preempted"
            break
        result = stage.run(ctx, resume)
        if result.artifact is not None:
            out[stage.name] = result.artifact
        if result.score is not None:
            out["sts_spearman"] = result.score
        if result.status != "done":  # the checkpoint is saved; later stages must wait for this one
            status = result.status
            break
    if D.rank() == 0 and summary:
        if ctx.monitor.plot and "sts_spearman" in out:
            try:
                out["plot"] = plot_run(ctx.layout.output_dir, TRAINING)
            except ImportError as e:  # the run's results are complete; a missing plot library must not fail it
                log(f"plot skipped ({e}); `pip install matplotlib`, then `autoregembed plot {ctx.layout.output_dir}`")
        for k, v in out.items():
            log(f"artifact {k}: {v}")
    return out, status
