"""One model on one DeepSpeed engine for one stage (``Session``), built from the run's ``RunContext``:
what every engine of a run is built with, read from the config once (``RunContext.of``).

Why its own room: the training loop, reference scoring, export and the benchmarks all open sessions;
building one (the DeepSpeed config, the frozen decoder inside or outside ZeRO-3, LoRA, the optimizer)
is one concern apart from what each of them does with it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import os
import sys
import time

import torch

from . import checkpoint
from ..ground import distributed as D
from .config import Config, DataConfig, EvalConfig, ModelConfig, MonitorConfig
from .decoder_scale import rescale_final_norm
from .diagnostics import reading_as_export, why_dead
from ..ground.errors import TrainingDiverged
from .ds_config import build_ds_config, zero_stage
from ..release.export import export_adapter, export_encoder
from ..release.meta import META_FILE, ExportMeta
from .loading import (hf_zero3_config, load_frozen_decoder, load_model, prepare_base, resolve_attention,
                      resolve_dtype)
from ..ground.monitor import ds_monitor_settings, finish_wandb, log
from ..ground.arch import Arch
from .layout import Layout
from .refscores import fingerprint
from ..method.model import pooled_positions
from ..method.scorers import Scorer
from ..method.shared_prefix import read_prefix
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


def on_device(prefix: torch.Tensor | None) -> torch.Tensor | None:
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
                self.model.shared_prefix = on_device(read_prefix(encoder_path))
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
        """Release the engine and leave ``hf_zero3_config``; nothing of the engine outlives it."""
        finish_wandb()
        _destroy_engine(self.engine)
        del self.engine, self.model
        self._zero3.close()
        gc.collect()


def _destroy_engine(engine):
    """``engine.destroy()``, then drop the references DeepSpeed keeps after it (ZeRO-3, 0.19): a
    module-level stack (``parameter_offload.FWD_MODULE_STACK``) holding each engine's module and any
    submodule whose forward it saw begin and not end, and a class-level ``lru_cache`` keyed by the
    parameter coordinator and submodules.  Through the modules' hooks they hold the engine, its
    optimizer states and its process groups: without this a pipeline carried every stage's engine
    into the next (device memory) and to the process' exit."""
    mine = {id(m) for m in engine.module.modules()}
    engine.destroy()
    stack = getattr(sys.modules.get("deepspeed.runtime.zero.parameter_offload"), "FWD_MODULE_STACK", None)
    if stack is not None:
        stack[:] = [m for m in stack if id(m) not in mine]
    coordinator = sys.modules.get("deepspeed.runtime.zero.partitioned_param_coordinator")
    method = getattr(getattr(coordinator, "PartitionedParameterCoordinator", None),
                     "_PartitionedParameterCoordinator__params_to_release", None)
    for f in [method] + [c.cell_contents for c in getattr(method, "__closure__", None) or ()]:  # under an nvtx wrapper
        if hasattr(f, "cache_clear"):  # a cache: other live engines only recompute what they need
            f.cache_clear()
