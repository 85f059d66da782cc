"""The training loop every training stage runs (``train_stage``: rows -> batches on a prefetch thread ->
``step.optimizer_step`` -> metrics, checks, checkpoints, stop requests -> export), with stage 1's
initialisation before it (decoder scale, shared prefix), and the consolidation of a checkpoint into an
export.  Each function takes the run's ``session.RunContext`` and the stage object (stages.py) that says
what it reads and minimises; the pipeline that chains the stages is pipeline.py.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time

import torch

from . import checkpoint, preemption
from ..ground import distributed as D
from ..ground.atomic import atomic_file
from ..method.batches import compression_batch, to_device, token_count
from .decoder_scale import calibration_indices, scale_factors
from .diagnostics import PROBE_ROWS, HealthWatch, KeepBest, retrieval_during_training, sts_during_training
from ..ground.errors import TrainingDiverged
from ..release.retrieval import load as load_retrieval
from ..ground.monitor import Progress, StepMonitor, WandbRun, log, truncate_metrics
from .layout import Layout
from .prefetch import Prefetcher
from .session import RunContext, Session, on_device
from .step import optimizer_step
from .refscores import ReferenceScores
from ..method.shared_prefix import PREFIX_FILE, fit_shared_prefix, read_prefix, write_prefix


def calibration_batches(ctx: RunContext, s: Session, rows: list[dict], n_rows: int = 128) -> list:
    """Stage-1 micro-batches of ``n_rows`` rows drawn with the run's seed (not the first rows: files are
    often sorted by source), on the session's device: what the decoder scale is measured on and the
    shared prefix fitted on, the same rows on every rank and in every resumed run."""
    sample = [rows[i] for i in calibration_indices(len(rows), n_rows, ctx.seed)]
    bs = s.optim.micro_batch_size
    return [to_device(compression_batch(sample[i : i + bs], s.text_encoder), s.device)
            for i in range(0, len(sample), bs)]


def measure_decoder_scale(ctx: RunContext, stage, encoder_path: str, rows: list[dict],
                          n_rows: int = 128) -> torch.Tensor:
    """Final-norm factors for stage 1, measured on ``calibration_batches``, so every rank and every
    resumed run gets the same factors."""
    s = Session(ctx, stage, encoder_path, train=False)
    factors = scale_factors(s.engine.module, calibration_batches(ctx, s, rows, n_rows))
    s.close()
    log(f"{stage.name}: final-norm scale to the decoder's word embeddings: median {factors.median():.4g} "
        f"(min {factors.min():.4g}, max {factors.max():.4g})")
    return factors


def stage_shared_prefix(ctx: RunContext, s: Session, rows: list[dict], resume: bool) -> torch.Tensor:
    """The shared prefix stage 1 trains with (shared_prefix.py): the one in the stage folder when
    resuming, else fitted on ``calibration_batches`` with the encoder as it starts.  Every rank
    fits (the encoder's passes are collective under ZeRO-3); rank 0's result is used and kept."""
    stage = s.stage
    path = os.path.join(ctx.layout.stage_dir(stage), PREFIX_FILE)
    if resume and os.path.exists(path):
        return read_prefix(ctx.layout.stage_dir(stage))
    m = ctx.model
    progress = Progress(f"{stage}: shared prefix fit", m.shared_prefix_steps, "steps")  # 34 min on CPU at 135M
    prefix, before, after = fit_shared_prefix(s.engine.module, calibration_batches(ctx, s, rows), m.shared_prefix,
                                              m.shared_prefix_steps, m.shared_prefix_lr, progress.update)
    prefix = D.broadcast_object(prefix.cpu()).to(s.device)
    if D.rank() == 0:
        os.makedirs(ctx.layout.stage_dir(stage), exist_ok=True)
        with atomic_file(path) as tmp:
            write_prefix(tmp, prefix)
    D.barrier()
    log(f"{stage}: shared prefix of {m.shared_prefix} vectors fitted in {m.shared_prefix_steps} steps: decoder "
        f"loss {before:.4f} -> {after:.4f} nats/token with every text's e in place (written to {path})")
    return prefix


def _norm_scale(ctx: RunContext, stage, encoder_path: str, rows: list[dict] | None = None):
    """The stage-1 final-norm factors, or None.  Measured whenever a stage-1 engine is built,
    resumed or re-exported runs included: the same base and rows give the same factors, and a
    frozen norm (LoRA) is not in the checkpoint that then overwrites everything trainable."""
    if not stage.rescales_norm or not ctx.model.match_decoder_scale:
        return None
    return measure_decoder_scale(ctx, stage, encoder_path, rows or stage.rows())


def _set_aside_earlier_run(layout: Layout, stage: str):
    """A fresh (not --resume) run into a stage folder that holds an earlier run's checkpoints moves
    them and its metrics aside, never deleting them: pruning would otherwise treat the earlier,
    higher-numbered checkpoints as newer than this run's."""
    ckpt_dir, metrics = layout.checkpoint_dir(stage), os.path.join(layout.stage_dir(stage), "metrics.jsonl")
    if D.rank() == 0 and checkpoint.complete_tags(ckpt_dir):
        suffix = time.strftime("earlier-%Y%m%d-%H%M%S")
        os.rename(ckpt_dir, f"{ckpt_dir}.{suffix}")
        if os.path.exists(metrics):
            os.rename(metrics, os.path.join(layout.stage_dir(stage), f"metrics.{suffix}.jsonl"))
        log(f"{stage}: {ckpt_dir} held checkpoints of an earlier run; moved to {ckpt_dir}.{suffix} "
            f"(pass --resume to continue a run instead)")
    D.barrier()


class SkippedUpdates:
    """The optimizer steps DeepSpeed skipped because a gradient was non-finite (its overflow check, which
    ZeRO runs at every precision).  Under fp16 its loss scaler skips a few steps on purpose while it finds
    its scale; at fp32 or bf16 a skipped step is a model that stopped training while its loss still looks
    finite (lr 1e3 ran all but its first step that way and exported with exit 0), so the stage stops.
    ``after`` reads a host counter (no GPU wait); ``check`` runs where the loss's finite check runs."""

    def __init__(self, engine, ds: dict):
        self.engine, self.start, self.first = engine, engine.skipped_steps, None
        self.scaled = ds.get("fp16", {}).get("enabled") is True
        self.steps = 0

    def after(self, step: int):
        self.steps += 1
        if self.first is None and self.engine.skipped_steps > self.start:
            self.first = step

    def check(self, stage: str, learning_rate: float, ckpt_dir: str):
        if self.first is None or self.scaled:
            return
        raise TrainingDiverged(
            f"{stage}: gradients were non-finite from step {self.first} ({self.engine.skipped_steps - self.start} of "
            f"{self.steps} steps skipped by DeepSpeed's overflow check): the model is not training; lower "
            f"{stage}.learning_rate (now {learning_rate:g}) or set {stage}.gradient_clipping, and start the stage "
            f"again (any checkpoints so far are in {ckpt_dir})")


@dataclasses.dataclass(frozen=True)
class StageResult:
    """How a stage ended.  ``done``: it ran to the end and wrote ``artifact`` (an export, a score
    file).  ``preempted``: a stop request was honoured (checkpoint saved, PREEMPTED written; the
    requeued job continues).  ``stopped``: ``<stage>.stop_after`` steps were reached (checkpoint
    saved, nothing exported; --resume continues)."""

    status: str
    artifact: str | None = None
    score: float | None = None  # eval: STS Spearman x100


def train_stage(ctx: RunContext, st, resume: bool = False) -> StageResult:
    """Train ``st`` (a stages.TrainingStage); export at the end (``<stage>.stop_after``: see StageResult)."""
    stage = st.name
    encoder_path = st.input_model(ctx)
    rows = st.rows()
    refs = None
    online = st.reference_source() == "online"
    if st.reference_source() == "file":
        fp = ctx.reference_fingerprint()
        refs = ReferenceScores(ctx.layout.reference_scores, expected_fingerprint=fp)
        pairs = (" (in-batch pairs: seed, stage2.max_steps, micro_batch_size, gradient_accumulation_steps and the "
                 "rank count must be the reference stage's)" if ctx.data.in_batch_negatives else "")
        source = ", ".join(x.path for x in st.sources()) + pairs
        refs.check_all(st.scheduled_rows(rows), source)  # before any model loads
    loss_fn = st.loss()
    if not resume:
        _set_aside_earlier_run(ctx.layout, stage)
    ckpt_dir, stage_dir = ctx.layout.checkpoint_dir(stage), ctx.layout.stage_dir(stage)
    resume_from = checkpoint.find_resume(ckpt_dir, log=lambda m: log(f"{stage}: {m}")) if resume else None
    s = Session(ctx, st, encoder_path, train=True,
                norm_scale=_norm_scale(ctx, st, encoder_path, rows), resume=resume_from)
    if st.fits_shared_prefix and ctx.model.shared_prefix:
        s.model.shared_prefix = stage_shared_prefix(ctx, s, rows, resume)
    o = s.optim
    sampler = st.sampler(rows)
    mixture = st.mixture(rows)
    if mixture:
        log(f"{stage}: sources: {mixture}")
    start = 0
    if resume:
        if resume_from is not None:
            start = checkpoint.load(s.engine, resume_from, log=lambda m: log(f"{stage}: {m}"))["step"]
        truncate_metrics(stage_dir, start)
    end = o.max_steps if o.stop_after is None else min(o.max_steps, o.stop_after)
    preemption.install()
    preemption.clear_marker(stage_dir)
    D.barrier()
    s.engine.train()
    wandb = (WandbRun(ctx.monitor, stage_dir, stage, ctx.record)
             if ctx.monitor.wandb and D.rank() == 0 else None)
    monitor = StepMonitor(stage, stage_dir, o.max_steps, start, end, o.log_every, s.engine, log, wandb)
    watch = HealthWatch(stage, o.warmup_steps, o.max_steps, log)
    probe = st.probe
    if probe is not None and o.micro_batch_size < 2:
        log(f"{stage}: micro_batch_size 1: no information gap (it compares a text's compressed tokens "
            f"with the micro-batch mean of them)")
        probe = None
    if probe is not None:  # the same seeded rows at every step, on every rank
        sample = [rows[i] for i in calibration_indices(len(rows), PROBE_ROWS, ctx.seed)]
        probe_batches = [to_device(st.make_batch(sample[i : i + o.micro_batch_size], s.text_encoder, None),
                                   s.device) for i in range(0, len(sample), o.micro_batch_size)]
    def build(key):  # on the prefetch thread: rows -> tokens -> typed batch, and its tokens counted on the host
        batch = st.make_batch(st.step_rows(rows, sampler, *key, D.rank()), s.text_encoder, refs)
        return token_count(batch), batch

    keys = ((step, micro) for step in range(start, end) for micro in range(o.gradient_accumulation_steps))
    with Prefetcher(build, keys) as batches:  # closed on every way out: a stop, an error, the end
        upcoming = iter(batches)
        tokens = 0

        def this_step():  # the step's micro-batches, their tokens counted on the host
            nonlocal tokens
            for _ in range(o.gradient_accumulation_steps):
                _, (n, batch) = next(upcoming)
                tokens += n
                yield batch

        ev = ctx.eval
        retrieval = load_retrieval(ctx.eval.retrieval_path) if ev.every and ctx.eval.retrieval_path else None
        prompts = {"query": ev.query_instruction or ev.instruction, "document": ev.document_instruction or ev.instruction}
        best = KeepBest(ev.keep_best_key, stage_dir, start) if ev.keep_best else None
        flush_every = min(o.log_every, preemption.CHECK_EVERY)
        skips = SkippedUpdates(s.engine, s.ds)
        for step in range(start, end):
            tokens = 0
            loss = optimizer_step(s.engine, this_step(), loss_fn, online)
            skips.after(step + 1)
            extra, t_extra = {}, time.time()
            if probe is not None and ((step + 1) % o.log_every == 0 or step + 1 == end):
                with torch.no_grad():
                    extra.update(probe(s.engine, probe_batches))  # after the step's update
            if ev.every and ((step + 1) % ev.every == 0 or (best is not None and step + 1 == end)):
                extra.update(sts_during_training(s.engine, s.text_encoder, ev.instruction, ctx.eval.sts_path, ev.batch_size))
                if retrieval is not None:
                    extra.update(retrieval_during_training(s.engine, s.text_encoder, ev.instruction, prompts,
                                                           retrieval, ev.batch_size))
                # rank 0's scores decide for every rank: an export is collective, and a last-bit difference
                # between ranks' scores must not send one rank into it alone
                if best is not None and D.broadcast_object(best.improves(extra)):
                    best.kept(step + 1, D.broadcast_object(extra[best.metric]))
                    s.export(ctx.layout.export_dir(stage), kept=best.describe(o.max_steps))
            monitor.step(step + 1, loss, s.scheduler.get_last_lr()[0], s.engine.get_global_grad_norm(), tokens,
                         extra, time.time() - t_extra)
            save = o.save_every and (step + 1) % o.save_every == 0 and step + 1 < end
            if not (save or step == start or (step + 1) % flush_every == 0 or (step + 1) % o.log_every == 0
                    or step + 1 == end):  # the first step answers a stop asked for while the model loaded
                continue  # the GPU runs on: metrics, the finite check and stop requests wait for the next flush
            records, stop = monitor.flush(preemption.asked(stage_dir))
            diverged = next((r for r in records if not math.isfinite(r["loss"])), None)
            if diverged is not None:
                raise TrainingDiverged(f"{stage}: loss is {diverged['loss']} at step {diverged['step']}: training "
                                       f"diverged; lower {stage}.learning_rate (now {o.learning_rate:g}) and start "
                                       f"the stage again (any checkpoints so far are in {ckpt_dir})")
            skips.check(stage, o.learning_rate, ckpt_dir)
            for record in records:
                watch.update(record)
            stop = stop and step + 1 < end
            if stop or save:
                checkpoint.save(s.engine, ckpt_dir, step + 1, o.keep_last)
            if stop:
                preemption.honoured(stage_dir, str(step + 1))
                log(f"{stage}: stop requested; saved step {step + 1} to {ckpt_dir}, exiting for requeue")
                s.close()
                return StageResult("preempted")
    checkpoint.save(s.engine, ckpt_dir, end, o.keep_last)
    if watch.summary():
        log(f"{stage}: {watch.summary()}")
    if end < o.max_steps:
        log(f"{stage}: {stage}.stop_after={o.stop_after} reached; saved step {end} to {ckpt_dir} (--resume continues)")
        s.close()
        return StageResult("stopped")
    if best is not None:  # the export already holds the best evaluated step's model
        out = ctx.layout.export_dir(stage)
        log(f"{stage}: kept the export of {best.describe(o.max_steps)} (eval.keep_best) in {out}")
    else:
        out = s.export(ctx.layout.export_dir(stage))
    s.close()
    return StageResult("done", out)


def open_trained(ctx: RunContext, st) -> Session:
    """A Session holding the latest complete checkpoint of ``st``, a training stage (close it when done)."""
    stage, encoder_path = st.name, st.input_model(ctx)
    resume = checkpoint.find_resume(ctx.layout.checkpoint_dir(stage), log=lambda m: log(f"{stage}: {m}"))
    if resume is None:
        raise checkpoint.CheckpointError(f"{ctx.layout.checkpoint_dir(stage)}: no complete checkpoint")
    s = Session(ctx, st, encoder_path, train=True,
                norm_scale=_norm_scale(ctx, st, encoder_path), resume=resume)
    checkpoint.load(s.engine, resume, log=lambda m: log(f"{stage}: {m}"))
    if st.fits_shared_prefix and ctx.model.shared_prefix:
        s.model.shared_prefix = on_device(read_prefix(ctx.layout.stage_dir(stage)))
        if s.model.shared_prefix is None:
            s.close()
            raise checkpoint.CheckpointError(f"{ctx.layout.stage_dir(stage)}: no {PREFIX_FILE} beside the checkpoints of a "
                                             f"run with model.shared_prefix={ctx.model.shared_prefix}")
    return s


def export_stage(ctx: RunContext, st) -> StageResult:
    """Consolidate the latest checkpoint of ``st``, a training stage, into its export folder."""
    s = open_trained(ctx, st)
    out = s.export(ctx.layout.export_dir(st.name))
    s.close()
    return StageResult("done", out)
