"""The machinery stages run on: a model on a DeepSpeed engine (``Session``), the training loop every
training stage runs (``train_stage``, one ``micro_step`` at a time), reference scoring, export and
evaluation.  Each function takes the run's ``RunContext`` (what every engine is built with) and the
stage object (stages.py) that says what it reads and minimises; the pipeline that chains the stages is
pipeline.py.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import math
import os
import time

import torch

from . import checkpoint, preemption
from ..ground import distributed as D
from ..ground.atomic import atomic_file, atomic_write_text
from ..method.batches import compression_batch, to_device, token_count
from .config import Config, DataConfig, EvalConfig, ModelConfig, MonitorConfig
from ..ground.data import row_key
from .decoder_scale import calibration_indices, rescale_final_norm, scale_factors
from .diagnostics import (PROBE_ROWS, HealthWatch, KeepBest, reading_as_export, retrieval_during_training,
                          sts_during_training, why_dead)
from ..ground.errors import TrainingDiverged
from .ds_config import build_ds_config, zero_stage
from ..release.export import export_adapter, export_encoder
from ..release.meta import META_FILE, ExportMeta
from ..release.retrieval import load as load_retrieval
from .loading import (hf_zero3_config, load_frozen_decoder, load_model, prepare_base, resolve_attention,
                      resolve_dtype)
from ..ground.monitor import Progress, StepMonitor, WandbRun, ds_monitor_settings, finish_wandb, log, truncate_metrics
from ..ground.arch import Arch
from ..release.plot import EVAL_RESULT
from .layout import Layout
from .prefetch import Prefetcher
from .refscores import ReferenceScores, fingerprint, online_references, reusable, save_scores
from ..method.model import pooled_positions
from ..method.scorers import Scorer
from ..method.shared_prefix import PREFIX_FILE, fit_shared_prefix, read_prefix, write_prefix
from ..method.tokenization import TextEncoder


@dataclasses.dataclass(frozen=True)
class RunContext:
    """What every engine of a run is built with and every training loop reports through, whatever the
    stage: the model section, the text lengths, the evaluation and monitor settings, the seed, where
    things go and the DeepSpeed JSON.  Built once per run (``of``), so nothing below reads the whole
    Config and the DeepSpeed path is not relayed from function to function."""

    model: ModelConfig
    scorer: Scorer  # the LM head's backend, as the loader built it (scorer.kind)
    data: DataConfig  # its text lengths (the tokenizer's) and batching choices
    eval: EvalConfig  # the instructions and pooling an export stores; eval.every during training
    monitor: MonitorConfig
    seed: int
    layout: Layout
    ds_path: str | dict  # the DeepSpeed JSON: its path, or its content
    base_corpus: tuple[str, ...]  # the data files the tiny base's tokenizer is trained on
    record: dict  # the whole configuration, as the experiment tracker logs it

    @classmethod
    def of(cls, cfg: Config, ds_path: str | dict) -> RunContext:
        return cls(cfg.model, cfg.scorer.backend, cfg.data, cfg.eval, cfg.monitor, cfg.seed, cfg.layout, ds_path,
                   tuple(s.path for n in (1, 2) for s in cfg.sources(n)), dataclasses.asdict(cfg))

    def base(self) -> str:
        """The base causal LM's folder, the tiny default built on first use (loading.prepare_base)."""
        return prepare_base(self.model, self.layout.base_model, list(self.base_corpus))

    def reference_fingerprint(self) -> str:
        """What reference scoring writes into the score file and stage 2 expects to find there: read on
        rank 0 before any model loads, the same string on every rank."""
        fp, base = None, self.base()  # every rank: a tiny base is built behind a barrier
        if D.rank() == 0:
            fp = fingerprint(self.layout.stage1_model, base, self.model.num_embed_tokens,
                             self.data.max_text_len, self.data.max_target_len, self.model.decoder_bos)
        return D.broadcast_object(fp)


def _on_device(prefix: torch.Tensor | None) -> torch.Tensor | None:
    """The shared prefix where the decoder runs, once: read from the CPU it would be copied (a blocking
    host-to-device copy) in every decoder pass."""
    return None if prefix is None else prefix.to(D.device())


def _arch(path: str) -> Arch:
    from transformers import AutoConfig

    return Arch.from_config(AutoConfig.from_pretrained(path).to_dict())


def lr_factor(schedule: str, warmup: int, total: int):
    """The learning-rate multiplier at each step (``LambdaLR``): linear warm-up over ``warmup``
    steps, then ``schedule`` (config.LR_SCHEDULES) from 1 to 0 at ``total``, or constant."""
    def f(step):
        if step < warmup:
            return (step + 1) / (warmup + 1)
        left = max(0.0, (total - step) / max(1, total - warmup))  # 1 -> 0 after the warm-up
        if schedule == "constant":
            return 1.0
        return left if schedule == "linear" else 0.5 * (1 - math.cos(math.pi * left))

    return f


def client_adamw(params, optim, on_cuda: bool) -> torch.optim.AdamW:
    """The AdamW DeepSpeed wraps when its JSON names no optimizer (a JSON that offloads the
    optimizer names DeepSpeed's own).  On CUDA it is the fused kernel: one launch over all
    tensors, where foreach issues several per parameter group; on CPU the foreach one, whose
    rounding the recorded CPU results were measured with."""
    return torch.optim.AdamW(params, lr=optim.learning_rate, weight_decay=optim.weight_decay,
                             fused=True if on_cuda else None)


class Session:
    """One model on one DeepSpeed engine for one stage (a stages.Stage with ``settings``)."""

    def __init__(self, ctx: RunContext, stage, encoder_path: str, train: bool,
                 norm_scale: torch.Tensor | None = None, resume: checkpoint.Resume | None = None):
        """norm_scale: per-dimension factors for the encoder's final norm, applied before the
        optimizer copies the weights (see decoder_scale.py).  resume: the checkpoint this engine
        will load (its DeepSpeed settings enter the config)."""
        import deepspeed

        self.ctx, self.spec, self.stage = ctx, stage, stage.name  # the stages.Stage, and its name (folders, logs)
        self.encoder_path = encoder_path
        self.base = ctx.base()
        self.optim = stage.settings()
        dtype = resolve_dtype(ctx.model.dtype)
        self.ds = build_ds_config(ctx.ds_path, self.optim, D.world_size(), _arch(self.base), dtype,
                                  D.local_world_size())
        if train:
            for key, value in ds_monitor_settings(ctx.monitor, ctx.layout.stage_dir(self.stage), self.stage).items():
                self.ds.setdefault(key, value)  # a writer the DeepSpeed JSON configures stays as it is
        for key, value in (resume.ds_settings() if resume else {}).items():
            self.ds[key] = {**self.ds.get(key, {}), **value}
        if not train and zero_stage(self.ds) in (1, 2):
            # ZeRO-1/2 shard only optimizer state and gradients, and DeepSpeed refuses them
            # without an optimizer: a forward-only session runs unsharded
            self.ds["zero_optimization"] = {**self.ds["zero_optimization"], "stage": 0}
        torch.manual_seed(ctx.seed)
        m = ctx.model
        lora = (dict(rank=m.lora_rank, alpha=m.lora_alpha, dropout=m.lora_dropout, targets=m.lora_targets)
                if train and m.trains_lora(self.stage) else None)  # scoring reads merged exports as they are
        attn, packed = resolve_attention(m.attn_implementation, m.packing)
        checkpointing = train and m.gradient_checkpointing
        dec_checkpointing = train and (m.gradient_checkpointing if m.decoder_checkpointing is None
                                       else m.decoder_checkpointing)
        reads_decoder = stage.reads_decoder()
        if not reads_decoder:
            log(f"{self.stage}: its objective reads embeddings only; the frozen decoder is not loaded")
        # loaded before ZeRO-3's config is set, so it is built whole (model.shard_decoder)
        outside = (None if not reads_decoder or (m.shard_decoder and zero_stage(self.ds) == 3) else
                   load_frozen_decoder(self.base, dtype, attn, dec_checkpointing).to(D.device()))
        with contextlib.ExitStack() as zero3:  # held for the session's lifetime, closed at once on failure
            zero3.enter_context(hf_zero3_config(self.ds))
            self.model, self.tokenizer = load_model(
                encoder_path, self.base, m.num_embed_tokens, dtype, attn, gradient_checkpointing=checkpointing,
                lora=lora, decoder_bos=m.decoder_bos, scorer=ctx.scorer, outside_decoder=outside, packed=packed,
                decoder_checkpointing=dec_checkpointing, with_decoder=reads_decoder)
            if norm_scale is not None:
                rescale_final_norm(self.model.encoder, norm_scale)
            if os.path.isdir(encoder_path):  # a stage-1 export brings the decoder's shared prefix along
                self.model.shared_prefix = _on_device(read_prefix(encoder_path))
            self.model.pooled = pooled_positions(ctx.eval.pooling, m.num_embed_tokens)
            self.text_encoder = TextEncoder(self.tokenizer, ctx.model.num_embed_tokens, ctx.data.max_text_len,
                                            ctx.data.max_target_len,
                                            getattr(self.model.encoder.config, "max_position_embeddings", None))
            for key in ("instruction", "query_instruction", "document_instruction"):  # what the export will read
                if getattr(ctx.eval, key) is not None:
                    self.text_encoder.instruction_ids(getattr(ctx.eval, key), f"key 'eval.{key}'")
            kwargs = {}
            if train:
                trainable = [p for p in self.model.parameters() if p.requires_grad]
                if "optimizer" not in self.ds:
                    kwargs["optimizer"] = client_adamw(trainable, self.optim, torch.cuda.is_available())
                else:
                    kwargs["model_parameters"] = trainable
                kwargs["lr_scheduler"] = lambda opt: torch.optim.lr_scheduler.LambdaLR(
                    opt, lr_factor(self.optim.lr_schedule, self.optim.warmup_steps, self.optim.max_steps))
            self.engine, _, _, self.scheduler = deepspeed.initialize(model=self.model, config=self.ds, **kwargs)
            self._zero3 = zero3.pop_all()  # closed in close()
        if not train:
            self.engine.eval()
        self.device = D.device()

    @property
    def encoder(self):
        return self.engine.module.encoder

    def export(self, out_dir: str, kept: str | None = None) -> str:
        """The encoder as it is now into ``out_dir``; a dead model (``diagnostics.why_dead``) is refused
        before anything is written, so no run ends with exit 0 and an export that scores NaN.  ``kept``:
        why this step's model is the export (eval.keep_best), for the card."""
        ev = self.ctx.eval
        with reading_as_export(self.engine, self.text_encoder, ev.instruction) as encoder:
            dead = why_dead(encoder)
        if dead:
            o = self.optim
            raise TrainingDiverged(
                f"{self.stage}: the trained model is dead ({dead}); not exported. Its checkpoints are kept in "
                f"{self.ctx.layout.checkpoint_dir(self.stage)}; lower {self.stage}.learning_rate (now {o.learning_rate:g}) "
                f"and start the stage again")
        meta = ExportMeta(num_embed_tokens=self.ctx.model.num_embed_tokens, instruction=ev.instruction,
                          query_instruction=ev.query_instruction, document_instruction=ev.document_instruction,
                          max_text_len=self.ctx.data.max_text_len, stage=self.stage, base_model=self.ctx.model.base,
                          decoder_bos=self.ctx.model.decoder_bos,
                          training={**self._provenance(), **({"kept": kept} if kept else {})},
                          pooled=None if self.model.pooled is None else [i + 1 for i in self.model.pooled],
                          shared_prefix=0 if self.model.shared_prefix is None else len(self.model.shared_prefix))
        export_encoder(self.encoder, self.tokenizer, out_dir, meta, shared_prefix=self.model.shared_prefix)
        log(f"{self.stage}: exported model to {out_dir}")
        adapter = os.path.join(os.path.dirname(out_dir), "adapter")
        if self.ctx.model.trains_lora(self.stage):
            self._export_adapter(adapter, meta)
        elif D.rank() == 0 and os.path.isdir(adapter):  # an earlier LoRA run's: it does not fit this model
            aside = f"{adapter}.{time.strftime('earlier-%Y%m%d-%H%M%S')}"
            os.rename(adapter, aside)
            log(f"{self.stage}: {adapter} held an earlier run's adapters, which do not fit this export; moved to {aside}")
        return out_dir

    def _export_adapter(self, out_dir: str, meta: ExportMeta):
        """Its adapters alone beside the merged export, over the export this stage started from; a stage
        that started from the base model has none to hand over this way (its EMBED token rows are not in
        the base, so adapters over it would not load)."""
        if not os.path.isfile(os.path.join(self.encoder_path, META_FILE)):
            log(f"{self.stage}: no adapter-only export: LoRA over the base model {self.encoder_path}, which lacks "
                f"the EMBED tokens (the merged export holds them)")
            return
        export_adapter(self.encoder, self.tokenizer, out_dir, meta, os.path.abspath(self.encoder_path),
                       shared_prefix=self.model.shared_prefix)
        log(f"{self.stage}: exported its LoRA adapters alone to {out_dir} (over {self.encoder_path})")

    def _provenance(self) -> dict:
        """How this stage trained, as the model card states it."""
        o, ctx = self.optim, self.ctx
        data = [s.path for s in self.spec.sources()]
        out = {"stage": self.stage, "data": data, "steps": o.max_steps,
               "batch": f"{o.micro_batch_size} x {o.gradient_accumulation_steps} accumulation x {D.world_size()} ranks",
               "learning rate": f"{o.learning_rate} ({o.lr_schedule}, {o.warmup_steps} warm-up steps)",
               "parameters": (f"LoRA rank {ctx.model.lora_rank}" if ctx.model.trains_lora(self.stage)
                              else "full fine-tune")}
        if self.spec.loss_settings():
            out["loss"] = self.spec.loss_settings()
        return out

    def close(self):
        """Release the engine and leave ``hf_zero3_config``."""
        finish_wandb()
        self.engine.destroy()
        del self.engine, self.model
        self._zero3.close()
        gc.collect()


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


@dataclasses.dataclass(frozen=True)
class StageResult:
    """How a stage ended.  ``done``: it ran to the end and wrote ``artifact`` (an export, a score
    file).  ``preempted``: a stop request was honoured (checkpoint saved, PREEMPTED written; the
    requeued job continues).  ``stopped``: ``<stage>.stop_after`` steps were reached (checkpoint
    saved, nothing exported; --resume continues)."""

    status: str
    artifact: str | None = None
    score: float | None = None  # eval: STS Spearman x100


def micro_step(engine, batch, loss_fn, online: bool = False, after_backward=None) -> torch.Tensor:
    """One micro-batch of training, the one every trainer path runs (stages, parity test, benchmarks):
    its online reference values (``online``), forward, loss, backward and DeepSpeed's step, which
    updates the weights at the accumulation boundary.  ``after_backward(engine)`` runs between backward
    and step (gradients are whole then).  Returns the loss, detached, on the device."""
    if online:
        batch = online_references(engine, batch)
    loss = loss_fn(engine(batch), batch)
    engine.backward(loss)
    if after_backward is not None:
        after_backward(engine)
    engine.step()
    return loss.detach()


def optimizer_step(engine, batches, loss_fn, online: bool = False, after_backward=None) -> torch.Tensor:
    """One optimizer step, the one the trainer, the parity test, gpu_check and the benchmarks run:
    ``batches``, the step's micro-batches on the host (as many as the engine's gradient accumulation
    steps: DeepSpeed updates the weights after the last), each moved to the device and run through
    ``micro_step``.  Returns the mean loss on the device: nothing here waits for the GPU."""
    total, n = 0.0, 0
    for batch in batches:
        total = total + micro_step(engine, to_device(batch, D.device()), loss_fn, online, after_backward)
        n += 1
    if n != engine.gradient_accumulation_steps():
        raise ValueError(f"{n} micro-batches for a step of {engine.gradient_accumulation_steps()}")
    return total / n


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
        for step in range(start, end):
            tokens = 0
            loss = optimizer_step(s.engine, this_step(), loss_fn, online)
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
                                       f"the stage again (checkpoints so far are in {ckpt_dir})")
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
        s.model.shared_prefix = _on_device(read_prefix(ctx.layout.stage_dir(stage)))
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


@torch.no_grad()
def score_references(ctx: RunContext, st, resume: bool = False) -> StageResult:
    """Every rank scores its share of ``st.rows`` (stages.Reference); rank 0 writes the file.  Preempted:
    stopped on request before the end (PREEMPTED written; nothing partial is kept).  Resumed: a file
    with the same fingerprint that covers every row is kept as it is."""
    rows = st.rows()
    fp = ctx.reference_fingerprint()
    path = ctx.layout.reference_scores
    if resume:
        why = reusable(path, fp, rows)
        if all(D.all_gather_objects(why is None)):  # every rank takes the same branch (the scoring is collective)
            log(f"{st.name}: {path} already scores all {len(rows)} rows with this stage-1 model; kept")
            return StageResult("done", path)
        log(f"{st.name}: scoring again ({why or 'another rank cannot read the file'})")
    s = Session(ctx, st, st.input_model(ctx), train=False)
    mine = rows[D.rank() :: D.world_size()]
    bs = s.optim.micro_batch_size
    n_batches = -(-len(rows) // (bs * D.world_size()))  # the same count on every rank (ZeRO-3 gathers are collective)
    results = []
    stage_dir = ctx.layout.stage_dir(st.name)
    preemption.clear_marker(stage_dir)
    progress = Progress(st.name, n_batches, "batches")
    for b in range(n_batches):
        if preemption.requested(stage_dir):  # nothing partial is kept: the stage reruns after requeue
            preemption.honoured(stage_dir, st.name)
            log(f"{st.name}: stop requested after {b} of {n_batches} batches; exiting for requeue")
            s.close()
            return StageResult("preempted")
        chunk = mine[b * bs : (b + 1) * bs]
        real = len(chunk)
        chunk = chunk or rows[:1]  # a rank with nothing left still takes part in the collectives
        scores = s.engine(to_device(st.make_batch(chunk, s.text_encoder, None), s.device))
        owner = scores.owner.tolist()
        for i, row in enumerate(chunk[:real]):
            results.append((row_key(row), [scores.c_q[i].item()] + [scores.r[j].item() for j, o in enumerate(owner) if o == i]))
        progress.update(b + 1)
    gathered = D.all_gather_objects(results)
    if D.rank() == 0:
        merged = dict(kv for part in gathered for kv in part)
        save_scores(path, list(merged), list(merged.values()), fp)
        log(f"{st.name}: scored {len(merged)} rows -> {path}")
    D.barrier()
    s.close()
    return StageResult("done", path)


def _retrieval_line(r: dict) -> str:
    return f"nDCG@10 {r['ndcg@10']:.4f}, MRR@10 {r['mrr@10']:.4f}, recall@100 {r['recall@100']:.4f} ({r['queries']} queries)"


def _verdict(result: dict) -> str:
    """How far the training moved each figure from the untrained base, with a warning when the run's own
    evaluation fell below it: retrieval nDCG@10 when the run has a retrieval set (embedders are chosen on
    retrieval), else STS; the other figure is reported beside it."""
    moves = [("STS", result["spearman_x100"] - result["base_spearman_x100"], ".2f")]
    if "retrieval" in result:
        moves.insert(0, ("retrieval nDCG@10", result["retrieval"]["ndcg@10"] - result["base_retrieval"]["ndcg@10"],
                         ".4f"))
    text = "the training moved " + ", ".join(f"{name} by {d:+{f}}" for name, d, f in moves) + " from the untrained base"
    return text + (f"; WARNING: {moves[0][0]} below the untrained base, the training made the embedding worse"
                   if moves[0][1] < 0 else "")


def evaluate(ev: EvalConfig, layout: Layout, model_dir: str) -> dict:
    """STS of ``model_dir`` on ``ev.sts_path`` and its retrieval on ``ev.retrieval_path``, beside the
    untrained base's (eval.compare_base), as ``autoregembed eval`` prints them; also written to
    ``<output_dir>/eval/result.json`` (read by ``autoregembed plot``)."""
    from ..release.encoder import Encoder
    from ..release.evaluate import base_report, retrieval_report, sts_report
    from ..release.model_card import write_model_card

    model, retrieval = Encoder.from_pretrained(model_dir), ev.retrieval_path
    result = sts_report(model, model_dir, ev.sts_path, ev.batch_size, show_progress_bar="eval: the model")
    log(f"eval: STS Spearman x100 = {result['spearman_x100']:.2f}, mean pairwise cosine "
        f"{result['mean_pairwise_cosine']:.3f} "
        f"({ev.sts_path}, model {model_dir})")
    if retrieval:
        result["retrieval"] = retrieval_report(model, retrieval, ev.batch_size, "eval: retrieval corpus")
        log(f"eval: retrieval {_retrieval_line(result['retrieval'])} ({retrieval})")
    del model  # the base loads after it, not beside it
    if ev.compare_base:
        result.update(base_report(layout.base_model, model_dir, ev.sts_path, ev.batch_size,
                                  show_progress_bar="eval: the untrained base", retrieval=retrieval))
        log(f"eval: the untrained base, read the same way (the mean of its EMBED states): STS "
            f"{result['base_spearman_x100']:.2f}"
            + (f"; retrieval {_retrieval_line(result['base_retrieval'])}" if retrieval else ""))
        log("eval: " + _verdict(result))
    write_model_card(model_dir, result)  # the card shows what the run measured
    path = os.path.join(layout.output_dir, EVAL_RESULT)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write_text(path, json.dumps(result, indent=2) + "\n")
    return result
