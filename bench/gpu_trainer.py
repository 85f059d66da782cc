"""gpu_check's trainer section: the step users run, timed on a randomly initialised LLaMA with 7B
layer shapes (hidden 4096, intermediate 11008, 32 heads, vocabulary 32000, 4 layers).

Each variant is a Session (the trainer's DeepSpeed engine, bf16, activation checkpointing, the
default shared prefix) in training mode running ``step.optimizer_step``, the trainer's own step,
over micro-batches built before the clock starts.  Variants differ in one arm at a time from the
base (stage 1 or 2, full-length 512-token texts, packed, ZeRO-3, decoder whole on the GPU and
recomputed): ragged lengths, padded passes, ZeRO-2, the decoder partitioned, its checkpointing off
or on half its layers.  Each one's micro-batch is the largest up to the stage's target that
``autoregembed plan`` says fits in 85% of the GPU, and its row says what plan predicted beside the
peak it measured.  One variant failing costs only its own row.
"""
from __future__ import annotations

import dataclasses
import gc
import os
import random
import tempfile
import time

from harness import ROOT

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0}  # dense bf16 tensor-core peak, SXM
ATTENTION_KERNELS = ("flash", "fmha", "efficient_attention", "cudnn", "attention")
SHAPE = dict(hidden=4096, intermediate=11008, heads=32, layers=4, vocab=32000)
SMOKE_SHAPE = dict(hidden=64, intermediate=128, heads=4, layers=2, vocab=4096)
PLAN_SHARE = 0.85  # of the GPU's memory a variant may be planned to use (allocator slack, kernels' workspaces)


@dataclasses.dataclass(frozen=True)
class Variant:
    """One timed configuration; the defaults are the base arm."""

    stage: str
    ragged: bool = False
    packed: bool = True
    zero: int = 3
    shard_decoder: bool = False
    decoder_checkpointing: bool | str = True  # True: every layer, False: none, "half": the first half

    @property
    def label(self) -> str:
        arms = [] if self.zero == 3 else [f"zero{self.zero}"]
        arms += ["decoder sharded"] if self.shard_decoder else []
        arms += [] if self.decoder_checkpointing is True else [f"decoder recompute {self.decoder_checkpointing or 'off'}"]
        return (f"{self.stage} {'ragged' if self.ragged else 'full'} {'packed' if self.packed else 'padded'}"
                + (f" ({', '.join(arms)})" if arms else ""))

    @property
    def is_base_arm(self) -> bool:
        return self.zero == 3 and not self.shard_decoder and self.decoder_checkpointing is True


def variants() -> list[Variant]:
    """Most wanted first (a deadline cuts from the end): each stage's base, ragged and padded rows,
    then one arm at a time on full-length packed rows."""
    out = [Variant(st, ragged, packed) for packed in (True, False) for ragged in (False, True) for st in ("stage1", "stage2")]
    for st in ("stage2", "stage1"):
        out += [Variant(st, decoder_checkpointing=False), Variant(st, decoder_checkpointing="half"),
                Variant(st, zero=2), Variant(st, shard_decoder=True)]
    return out


def step_flops(n_layer_params: int, head_params: int, enc_tokens: int, dec_tokens: int, scored: int,
               enc_recompute: bool = False, dec_recompute: float = 0.0, fwd_enc_tokens: int = 0,
               fwd_dec_tokens: int = 0, fwd_scored: int = 0) -> float:
    """FLOPs of one step, attention's own T^2 term left out (under 1% at 512 tokens and hidden 4096).
    Model FLOPs (no recompute, real tokens): the encoder trains (6 N per token), the frozen decoder
    passes gradients to its inputs only (4 N per token), the LM head scores each target token forward
    and backward (4 V D per scored token); rows run without gradient (``fwd_*``: a positive held as a
    target) cost their forward alone (2 N per token, 2 V D per scored token).  Hardware FLOPs: the
    tokens the layers really ran (padding included) and one more forward (2 N) of each trained row
    under activation checkpointing: the encoder's (``enc_recompute``) and ``dec_recompute``, the
    share of the decoder's layers that recompute (no_grad rows keep nothing to recompute)."""
    return ((6 + 2 * enc_recompute) * n_layer_params * enc_tokens
            + (4 + 2 * dec_recompute) * n_layer_params * dec_tokens + 4 * head_params * scored
            + 2 * n_layer_params * (fwd_enc_tokens + fwd_dec_tokens) + 2 * head_params * fwd_scored)


def pass_tokens(enc: list, tgt: list, k: int, bos: int) -> dict:
    """One encoder pass over the stacked masks ``enc`` and one decoder pass over the stacked targets
    ``tgt``: real and as-run tokens (each pass pads its rows to its widest) and scored targets."""
    scored, n_seq = sum(int(m.sum()) for m in tgt), sum(m.shape[0] for m in tgt)
    enc_rows, enc_width = sum(m.shape[0] for m in enc), max(m.shape[1] for m in enc)
    width = max(m.shape[1] for m in tgt) + k + bos
    return {"enc_real": sum(int(m.sum()) for m in enc), "enc_padded": enc_rows * enc_width,
            "dec_real": scored + n_seq * (k + bos), "dec_padded": n_seq * width, "scored": scored}


def token_counts(b, k: int, bos: int) -> dict:
    """Real and as-run (padded) tokens of a batch's encoder and decoder passes, and scored targets, of
    the rows trained and (``fwd_*``) of those run without gradient; ``k``: the positions the decoder
    reads before the target besides BOS (compressed tokens and prefix)."""
    from autoregembed.method.batches import AlignmentBatch

    forward_only = {}
    if not isinstance(b, AlignmentBatch):  # the contrast scores every target twice, in one pass
        trained = pass_tokens([b.attention_mask], [b.target_mask] * (2 if b.contrast else 1), k, bos)
    elif b.p_no_grad:  # queries and their candidates trained; positives and pos|e_p in passes of their own
        c = b.candidates
        trained = pass_tokens([c.q_attention_mask], [c.pos_mask, c.neg_mask], k, bos)
        forward_only = pass_tokens([b.p_attention_mask], [c.pos_mask], k, bos)
    else:  # queries and positives stacked in one encoder pass, every candidate in one decoder pass
        c = b.candidates
        trained = pass_tokens([c.q_attention_mask, b.p_attention_mask], [c.pos_mask, c.pos_mask, c.neg_mask], k, bos)
    return {**trained, **{f"fwd_{key}": forward_only.get(key, 0) for key in trained}}


def random_llama(out_dir: str, hidden: int, intermediate: int, heads: int, layers: int, vocab: int, dtype):
    """A randomly initialised LLaMA with the given shapes and the tiny default's tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from autoregembed.run.config import Config
    from autoregembed.run.loading import build_tiny_base

    cfg = Config()
    tiny = build_tiny_base(os.path.join(out_dir, "tok"), [cfg.data.stage1, cfg.data.stage2], hidden_size=32,
                           layers=1, pretrain_steps=0)
    tok = AutoTokenizer.from_pretrained(tiny)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=1024, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(dtype)
    path = os.path.join(out_dir, "base")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path, config


def texts(tok, lengths: list[int], seed: int) -> list[str]:
    """Texts of about ``lengths`` tokens each: windows of the bundled corpus, decoded."""
    from autoregembed.run.config import Config
    from autoregembed.ground.data import records

    cfg = Config()
    corpus = " ".join(v for path in (cfg.data.stage1, cfg.data.stage2) for _, r in records(path)
                      for v in r.values() if isinstance(v, str))
    ids = tok(corpus, add_special_tokens=False)["input_ids"]
    rng = random.Random(seed)
    out = []
    for n in lengths:
        start = rng.randrange(0, len(ids) - n)
        out.append(tok.decode(ids[start : start + n]))
    return out


class ConstantReferences:
    """Stage 2's reference values: they enter the loss as constants, so any will do for timing."""

    def lookup(self, row):
        return -40.0, [-60.0] * len(row["neg"])


class TrainerBench:
    """The shared model and the per-stage CPU fp32 reference losses; ``run(variant)`` times one variant."""

    def __init__(self, torch, device: str, smoke: bool, steps: int, profile_path: str | None = None):
        from autoregembed.ground.arch import Arch

        self.torch, self.device, self.smoke, self.steps, self.profile_path = torch, device, smoke, steps, profile_path
        self.shape = SMOKE_SHAPE if smoke else SHAPE
        self.length, self.shortest = (32, 8) if smoke else (512, 128)
        self.target_micro = {"stage1": 4 if smoke else 16, "stage2": 2 if smoke else 16}
        self.negatives = 3 if smoke else 7
        self.warm = 1 if smoke else 2
        self.dtype = torch.bfloat16 if device == "cuda" else torch.float32
        self.tmp = tempfile.mkdtemp(prefix="gpu-check-")
        self.base, hf = random_llama(self.tmp, dtype=self.dtype, **self.shape)
        self.arch = Arch.from_config(hf.to_dict())
        name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
        self.peak_tflops = next((v for key, v in PEAK_BF16_TFLOPS.items() if key in name), None)
        self.gpu_mem_gb = torch.cuda.get_device_properties(0).total_memory / 1e9 if device == "cuda" else None
        # the decoder reads a shared prefix as the trainer's default does (model.shared_prefix); its fit
        # before stage 1 is not part of a step, so a fixed random one stands in for it
        self.prefix = 0.02 * torch.randn(5, self.shape["hidden"], generator=torch.Generator().manual_seed(3))
        self.reference = {stage: self._reference_loss(stage) for stage in ("stage1", "stage2")}

    def _settings(self, v: Variant | None, stage: str, micro: int) -> list[str]:
        base = [f"output_dir={self.tmp}/run", f"model.base={self.base}", f"data.max_text_len={self.length}",
                f"data.max_target_len={self.length}", f"{stage}.micro_batch_size={micro}"]
        if v is None:
            return base
        recompute = {True: "true", False: "false", "half": str(self.arch.layers // 2)}[v.decoder_checkpointing]
        return base + ["model.match_decoder_scale=false", f"model.dtype={'bf16' if self.device == 'cuda' else 'fp32'}",
                       f"model.packing={str(v.packed).lower()}", f"model.decoder_checkpointing={recompute}",
                       f"model.shard_decoder={str(v.shard_decoder).lower()}",
                       f"model.shared_prefix={0 if v.shard_decoder else len(self.prefix)}"]

    def rows(self, stage: str, ragged: bool, tok, n: int) -> list[dict]:
        rng = random.Random(0)
        per_row = 2 if stage == "stage1" else 2 + self.negatives
        lengths = [rng.randint(self.shortest, self.length) if ragged else self.length for _ in range(n * per_row)]
        it = iter(texts(tok, lengths, seed=1))
        if stage == "stage1":
            return [{"context": next(it), "instruction": "Reconstruct the original text.", "output": next(it)}
                    for _ in range(n)]
        return [{"query": next(it), "pos": next(it), "neg": [next(it) for _ in range(self.negatives)],
                 "instruction": "Retrieve semantically similar text."} for _ in range(n)]

    def _reference_loss(self, stage: str) -> float:
        """The CPU fp32 padded loss of the first two full-length rows, before any engine exists (a
        Session holds ZeRO-3's config, under which from_pretrained builds partitioned models)."""
        from autoregembed.method.tokenization import TextEncoder
        from autoregembed.run.config import load_config
        from autoregembed.run.loading import load_model
        from autoregembed.run.stages import stages_for

        torch = self.torch
        cfg = load_config(None, self._settings(None, stage, 2))
        torch.manual_seed(cfg.seed)  # the EMBED rows' draw, as a Session seeds it
        model, tok = load_model(self.base, self.base, cfg.model.num_embed_tokens, torch.float32, "sdpa",
                                decoder_bos=cfg.model.decoder_bos)
        model.shared_prefix = self.prefix
        te = TextEncoder(tok, cfg.model.num_embed_tokens, self.length, self.length)
        st = stages_for(cfg)[stage]
        b = st.make_batch(self.rows(stage, False, tok, 2), te, ConstantReferences())
        with torch.no_grad():
            return st.loss()(model(b), b).item()

    def micro_batch(self, v: Variant) -> tuple[int, float | None]:
        """The largest micro-batch up to the stage's target that plan fits in PLAN_SHARE of the GPU, and
        plan's bytes for it (on CPU: the target, unplanned)."""
        from autoregembed.tools.plan import plan

        micro = self.target_micro[v.stage]
        if self.gpu_mem_gb is None:
            return micro, None
        recompute = {True: True, False: False, "half": self.arch.layers // 2}[v.decoder_checkpointing]
        while True:
            p = plan(self.arch, 1, v.zero, micro, self.negatives, self.length, shard_decoder=v.shard_decoder,
                     decoder_checkpointing=recompute, stage=int(v.stage[-1]),
                     prefix=0 if v.shard_decoder else len(self.prefix), contrast=v.stage == "stage1")
            if p["total"] <= PLAN_SHARE * self.gpu_mem_gb * 1e9 or micro == 1:
                return micro, p["total"] / 1e9
            micro //= 2

    def run(self, v: Variant) -> dict:
        from autoregembed.method.batches import to_device
        from autoregembed.run.config import load_config
        from autoregembed.run.stages import stages_for
        from autoregembed.run.session import RunContext, Session
        from autoregembed.run.step import optimizer_step
        from deepspeed.runtime.engine import DeepSpeedEngine

        torch, cuda = self.torch, self.device == "cuda"
        micro, planned_gb = self.micro_batch(v)
        cfg = load_config(None, self._settings(v, v.stage, micro))
        ds = os.path.join(ROOT, "ds_configs", f"zero{v.zero}.json")
        st = stages_for(cfg)[v.stage]
        loss_fn = st.loss()
        s = Session(RunContext.of(cfg, ds), st, self.base, train=True)
        try:
            prefix = None if v.shard_decoder else self.prefix.to(s.device)
            s.model.shared_prefix = prefix
            k = cfg.model.num_embed_tokens + (0 if prefix is None else len(prefix))
            rows = self.rows(v.stage, v.ragged, s.tokenizer, micro * (self.warm + self.steps + 1))
            # every step's batch built before the clock starts: tokenising is the prefetch thread's work
            batches = [st.make_batch(rows[i * micro : (i + 1) * micro], s.text_encoder, ConstantReferences())
                       for i in range(self.warm + self.steps + 1)]
            row = {"variant": v.label, **dataclasses.asdict(v), "lengths": "ragged" if v.ragged else "full",
                   "attention": s.engine.module.encoder.config._attn_implementation, "micro_batch": micro,
                   "layers": self.shape["layers"], "hidden": self.shape["hidden"], "vocab": self.shape["vocab"],
                   "negatives": self.negatives if v.stage == "stage2" else None, "steps": self.steps,
                   "shared_prefix": 0 if prefix is None else len(prefix), "plan_GB": planned_gb}
            if v.is_base_arm and not v.ragged:  # before any update: this path's loss vs the CPU fp32 padded one
                first = st.make_batch(rows[:2], s.text_encoder, ConstantReferences())
                s.engine.eval()
                with torch.no_grad():
                    row["loss"] = loss_fn(s.engine(to_device(first, s.device)), to_device(first, s.device)).item()
                row["loss_cpu_fp32_padded"] = self.reference[v.stage]
                row["loss_rel_diff"] = abs(row["loss"] - row["loss_cpu_fp32_padded"]) / max(abs(row["loss_cpu_fp32_padded"]), 1e-12)
                row["loss_ok"] = row["loss_rel_diff"] <= (2e-2 if self.dtype == torch.bfloat16 else 1e-4)
            s.engine.train()
            counts, losses = {}, []
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            for i in range(self.warm + self.steps):
                if i == self.warm:
                    if cuda:
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                losses.append(optimizer_step(s.engine, [batches[i]], loss_fn))
            if cuda:
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            for b in batches[self.warm : self.warm + self.steps]:  # counted after the clock: host reads
                for key, n in token_counts(b, k, int(cfg.model.decoder_bos)).items():
                    counts[key] = counts.get(key, 0) + n
            row.update(self._throughput(v, counts, dt, cfg))
            row["peak_memory_GB"] = torch.cuda.max_memory_allocated() / 1e9 if cuda else None
            row["losses"] = [x.item() for x in losses]
            row["attention_kernels"] = self._kernels(s, batches[-1], loss_fn, v) if cuda or self.profile_path else []
        finally:
            s.close()
            if cuda:
                torch.cuda.empty_cache()
        # what the next variant (and a pipeline's next stage) inherits: nothing, once the session is closed
        row["engines_after_close"] = sum(isinstance(o, DeepSpeedEngine) for o in gc.get_objects())
        row["allocated_after_close_GB"] = torch.cuda.memory_allocated() / 1e9 if cuda else None
        return row

    def _throughput(self, v: Variant, c: dict, dt: float, cfg) -> dict:
        n_layers, head = self.arch.layers * self.arch.layer_params(), self.arch.vocab * self.arch.hidden
        hw = "real" if v.packed else "padded"
        dec_share = {True: 1.0, False: 0.0, "half": (self.arch.layers // 2) / self.arch.layers}[v.decoder_checkpointing]
        model = step_flops(n_layers, head, c["enc_real"], c["dec_real"], c["scored"], fwd_enc_tokens=c["fwd_enc_real"],
                           fwd_dec_tokens=c["fwd_dec_real"], fwd_scored=c["fwd_scored"])
        hardware = step_flops(n_layers, head, c[f"enc_{hw}"], c[f"dec_{hw}"], c["scored"],
                              enc_recompute=cfg.model.gradient_checkpointing, dec_recompute=dec_share,
                              fwd_enc_tokens=c[f"fwd_enc_{hw}"], fwd_dec_tokens=c[f"fwd_dec_{hw}"],
                              fwd_scored=c["fwd_scored"])
        real = c["enc_real"] + c["dec_real"]
        return {"step_s": dt / self.steps, "tokens_per_s": real / dt, "tokens_per_step": real / self.steps,
                "model_tflops": model / dt / 1e12, "hardware_tflops": hardware / dt / 1e12,
                "mfu": model / dt / 1e12 / self.peak_tflops if self.peak_tflops else None,
                "padding_fraction": 1 - real / (c["enc_padded"] + c["dec_padded"])}

    def _kernels(self, s, batch, loss_fn, v: Variant) -> list[str]:
        """One more step under the profiler: which attention kernels ran (its table appended to
        ``profile_path`` when given)."""
        from torch.profiler import ProfilerActivity, profile

        from autoregembed.run.step import optimizer_step

        torch, cuda = self.torch, self.device == "cuda"
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            optimizer_step(s.engine, [batch], loss_fn)
            if cuda:
                torch.cuda.synchronize()
        table = prof.key_averages()
        if self.profile_path:
            with open(self.profile_path, "a") as f:
                f.write(f"== {v.label}\n" + table.table(sort_by="self_device_time_total" if cuda else
                                                        "self_cpu_time_total", row_limit=25) + "\n")
        return sorted({e.key for e in table if any(a in e.key.lower() for a in ATTENTION_KERNELS)})


def describe(row: dict) -> str:
    """A variant's printed line."""
    if "error" in row or "skipped" in row:
        return f"  {row['variant']}: {row.get('error') or 'skipped: ' + row['skipped']}"
    return (f"  {row['variant']} ({row['attention']}, micro-batch {row['micro_batch']}): {row['step_s']:.3f} s/step, "
            f"{row['tokens_per_step']:.0f} tokens/step, {row['tokens_per_s']:.0f} tokens/s, model "
            f"{row['model_tflops']:.1f} / hardware {row['hardware_tflops']:.1f} TFLOP/s"
            + (f" (MFU {row['mfu']:.1%})" if row["mfu"] else "") + f", padding {row['padding_fraction']:.0%}"
            + (f", peak {row['peak_memory_GB']:.1f} GB (plan {row['plan_GB']:.1f})" if row["peak_memory_GB"] else "")
            + (f"; loss {row['loss']:.5f} vs CPU fp32 padded {row['loss_cpu_fp32_padded']:.5f} "
               f"({'ok' if row['loss_ok'] else 'FAIL'})" if "loss" in row else "")
            + (f"; attention kernels {', '.join(row['attention_kernels'])[:160]}" if row["attention_kernels"] else ""))
