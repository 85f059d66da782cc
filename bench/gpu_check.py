"""Everything the GPU path must show, measured in one run (issue: "GPU path").

    bash bench/gpu_check.sh                      # on one H100/H200 (installs the carried wheels first)
    python bench/gpu_check.py --smoke --out X    # the same code paths on CPU at toy sizes (tests)

1. the scorer vs float64: log-probabilities and dL/dH of logprobs.token_logprobs, bf16 inputs, at
   V = 32000 and 128256, D = 4096, M = 16384 (the reference is computed in float64, in row chunks).
2. speed and memory side by side, same shapes, same run: forward and forward+backward of ours,
   the bare bf16 matmul H @ W^T (1 matmul: the forward floor; 2 matmuls, H W^T and dZ W: the
   forward+backward floor), naive log_softmax, Liger's fused linear cross-entropy and
   cut-cross-entropy (when their packages are importable); peak memory above the inputs.
3. the real trainer (``trainer_steps``): stage-1 and stage-2 steps (ZeRO-3 engine, bf16, gradient
   checkpointing) on a randomly initialised LLaMA with 7B layer shapes (hidden 4096, intermediate
   11008, 32 heads, vocabulary 32000, 4 layers) at 512-token texts, full length and ragged, packed
   and padded: seconds per step, tokens/s, MFU and hardware TFLOP/s (``_step_flops`` states the
   convention), padding fraction, peak memory, the attention kernels the profiler saw, and the
   loss against the CPU fp32 padded path.
Prints a table per section and writes all numbers to --out (JSON).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
import traceback

from harness import ROOT, record_header  # bench/harness.py, beside this script

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0}  # dense bf16 tensor-core peak, SXM


def _device_name(torch) -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def _sync(torch):
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_ms(torch, fn, reps: int) -> float:
    """Median milliseconds of ``fn`` (CUDA: triton's do_bench, L2 flushed between calls)."""
    if torch.cuda.is_available():
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=3, rep=max(reps * 10, 50), return_mode="median"))
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * sorted(times)[len(times) // 2]


def peak_bytes(torch, fn) -> int:
    """Peak bytes allocated above what was allocated before ``fn``."""
    if torch.cuda.is_available():
        _sync(torch)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        _sync(torch)
        return torch.cuda.max_memory_allocated() - base
    from harness import peak_allocated_bytes

    return peak_allocated_bytes(fn)[1]


def _inputs(torch, v, m, d, dtype, device, seed=0, peaked=False):
    """Random hidden states, head and targets.  Flat: the softmax is near uniform (largest
    probability ~0.015 at V=32k), the worst case for cut-cross-entropy's gradient filter.  Peaked:
    like a trained LM's, each target well ahead of the rest (probability ~0.5)."""
    g = torch.Generator(device=device).manual_seed(seed)
    h = torch.randn(m, d, device=device, generator=g)
    w = torch.randn(v, d, device=device, generator=g) * (2.0 / d**0.5)
    y = torch.randint(0, v, (m,), device=device, generator=g)
    if peaked:  # the logit of y raised by log(V) + 2 (the logits' spread is ~2): h moves along y's row
        norm = w[y].norm(dim=1, keepdim=True)
        h = h + w[y] / norm * ((math.log(v) + 2.0) / norm)
    return h.to(dtype), w.to(dtype), y


def float64_reference(torch, h, w, y, g, rows: int = 2048):
    """log p(y) and g * dlog p(y)/dh in float64, ``rows`` tokens at a time."""
    w64 = w.double()
    lp = torch.empty(h.shape[0], dtype=torch.float64, device=h.device)
    grad = torch.empty(h.shape, dtype=torch.float64, device=h.device)
    for s in range(0, h.shape[0], rows):
        h64 = h[s : s + rows].double()
        logits = h64 @ w64.T
        lse = torch.logsumexp(logits, 1)
        yy = y[s : s + rows]
        lp[s : s + rows] = logits.gather(1, yy[:, None])[:, 0] - lse
        p = torch.exp(logits - lse[:, None])
        del logits
        gg = g[s : s + rows].double()
        grad[s : s + rows] = gg[:, None] * (w64[yy] - p @ w64)
        del p
    return lp, grad


def _backends() -> dict:
    """The scorer backends to check (scorers.py): ours, and cut-cross-entropy where it is installed."""
    from autoregembed.method.scorers import scorer_for

    names = {"ours": "auto"}
    try:
        import cut_cross_entropy  # noqa: F401

        names["cce"] = "cce"
    except ImportError:
        pass
    return {label: scorer_for(name) for label, name in names.items()}


def check_kernels(torch, shapes, device) -> list[dict]:
    out = []
    for v, m, d in shapes:
        h, w, y = _inputs(torch, v, m, d, torch.bfloat16, device)
        g = torch.randn(m, device=device, generator=torch.Generator(device=device).manual_seed(1))
        ref_lp, ref_grad = float64_reference(torch, h, w, y, g)
        for label, backend in _backends().items():
            hg = h.clone().requires_grad_()
            lp = backend.token_logprobs(hg, w, y)
            (lp * g).sum().backward()
            lp_err = (lp.detach().double() - ref_lp).abs().max().item()
            grad_err = (hg.grad.double() - ref_grad).abs().max().item()
            grad_rel = grad_err / max(ref_grad.abs().max().item(), 1e-30)
            row = {"impl": label, "V": v, "M": m, "D": d, "dtype": "bf16", "logprob_max_abs_err": lp_err,
                   "grad_max_abs_err": grad_err, "grad_max_rel_err": grad_rel,
                   "ok": lp_err <= 1e-2 and grad_rel <= 1e-2}
            out.append(row)
            print(f"  {label:<5} V={v:>6} M={m:>5} D={d:>4}: |dlogp| {lp_err:.2e}  |dgrad| {grad_err:.2e} "
                  f"(rel {grad_rel:.2e})  {'ok' if row['ok'] else 'FAIL'}", flush=True)
            del hg, lp
        del h, w, y, g, ref_lp, ref_grad
    return out


def _arms(torch, h, w, y, g):
    """name -> (forward fn, forward+backward fn or None, per_token): per-token arms return log p(y_t)
    (the forward+backward weights them by g), summed arms return sum_t -log p(y_t) (Liger and
    cut-cross-entropy, which cannot give stage 2 its per-sequence scores)."""
    from autoregembed.method.logprobs import token_logprobs

    hg = h.detach().clone().requires_grad_()

    def fb(lp_fn):  # per-token log-probabilities, weighted by g
        def run():
            hg.grad = None
            (lp_fn(hg) * g).sum().backward()
        return run

    def fb_loss(loss_fn):  # a summed cross-entropy (what Liger and CCE return)
        def run():
            hg.grad = None
            loss_fn(hg).backward()
        return run

    def naive(x):
        return torch.log_softmax((x @ w.T).float(), -1).gather(1, y[:, None])[:, 0]

    arms = {
        "matmul_1": (lambda: h @ w.T, None, None),
        "ours": (lambda: token_logprobs(h, w, y), fb(lambda x: token_logprobs(x, w, y)), lambda x: token_logprobs(x, w, y)),
        "naive": (lambda: naive(h), fb(naive), naive),
    }
    if not h.is_cuda:  # Liger's and cut-cross-entropy's kernels are Triton's, for CUDA only
        return arms, hg
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss(reduction="sum")
        arms["liger"] = (lambda: liger(w, h, y), fb_loss(lambda x: liger(w, x, y)), None)
    except ImportError:
        pass
    try:
        from cut_cross_entropy import linear_cross_entropy

        from autoregembed.method.scorers import scorer_for

        for name, eps in (("cce", "auto"), ("cce_nofilter", None)):  # with and without gradient filtering
            arms[name] = (lambda eps=eps: linear_cross_entropy(h, w, y, reduction="sum", filter_eps=eps),
                          fb_loss(lambda x, eps=eps: linear_cross_entropy(x, w, y, reduction="sum", filter_eps=eps)),
                          None)
        cce = scorer_for("cce").token_logprobs  # per token, as model.scorer=cce trains with it
        arms["cce_per_token"] = (lambda: cce(h, w, y), fb(lambda x: cce(x, w, y)), lambda x: cce(x, w, y))
    except ImportError:
        pass
    return arms, hg


def _arm_errors(torch, arms, hg, g, ref_lp, jac) -> dict:
    """Each arm's largest error against float64: log-probabilities (per-token arms) or the summed
    loss (summed arms), and the gradient w.r.t. the hidden states relative to its largest value."""
    errors = {}
    for name, (fwd, fwd_bwd, per_token) in arms.items():
        if fwd_bwd is None:
            continue
        with torch.no_grad():
            value = fwd()
        fwd_bwd()
        grad = hg.grad.double()
        ref_grad = g.double()[:, None] * jac if per_token else -jac  # d(sum -log p)/dh = -J
        err = {"grad_rel": ((grad - ref_grad).abs().max() / ref_grad.abs().max().clamp(min=1e-30)).item()}
        if per_token:
            err["logprob_abs"] = (value.double() - ref_lp).abs().max().item()
        else:
            err["loss_rel"] = abs(value.double().item() + ref_lp.sum().item()) / max(abs(ref_lp.sum().item()), 1e-30)
        errors[name] = err
        hg.grad = None
    return errors


def time_kernels(torch, shapes, device, reps: int) -> list[dict]:
    """Side by side per shape and distribution (flat, peaked): milliseconds of the forward without
    gradient (what reference scoring runs) and of forward+backward, peak memory above the inputs
    (the previous call's gradient freed first), and every arm's error against float64."""
    out = []
    for v, m, d in shapes:
        for peaked in (False, True):
            h, w, y = _inputs(torch, v, m, d, torch.bfloat16 if device == "cuda" else torch.float32, device,
                              peaked=peaked)
            g = torch.randn(m, device=device) / m
            arms, hg = _arms(torch, h, w, y, g)
            ref_lp, jac = float64_reference(torch, h, w, y, torch.ones(m, device=device))
            row = {"V": v, "M": m, "D": d, "distribution": "peaked" if peaked else "flat",
                   "largest_probability_median": torch.softmax((h[:256] @ w.T).float(), -1).max(-1).values.median().item(),
                   "ms": {}, "peak_MB": {}, "errors": _arm_errors(torch, arms, hg, g, ref_lp, jac)}
            del jac, ref_lp
            dz = torch.randn(m, v, device=device, dtype=h.dtype)
            mm = time_ms(torch, lambda: h @ w.T, reps)
            mm_back = time_ms(torch, lambda: dz @ w, reps)
            del dz
            row["ms"]["matmul_2"] = mm + mm_back  # logits, dZ @ W: the floor of forward+backward
            for name, (fwd, fwd_bwd, _) in arms.items():
                with torch.no_grad():
                    row["ms"][name] = time_ms(torch, fwd, reps)
                    row["peak_MB"][name] = peak_bytes(torch, fwd) / 2**20
                if fwd_bwd is not None:
                    row["ms"][name + "_fb"] = time_ms(torch, fwd_bwd, reps)
                    hg.grad = None  # else the base would hold the last call's gradient, freed inside
                    row["peak_MB"][name + "_fb"] = peak_bytes(torch, fwd_bwd) / 2**20
            ms = row["ms"]
            row["ours_fwd_nograd_over_matmul"] = ms["ours"] / ms["matmul_1"]
            row["ours_fb_over_2_matmuls"] = ms["ours_fb"] / ms["matmul_2"]
            for other in ("liger", "cce", "cce_nofilter"):
                if other + "_fb" in ms:
                    row[f"ours_fb_over_{other}_fb"] = ms["ours_fb"] / ms[other + "_fb"]
                    row[f"ours_peak_over_{other}_peak"] = row["peak_MB"]["ours_fb"] / max(row["peak_MB"][other + "_fb"], 1e-9)
            out.append(row)
            print(f"  V={v} M={m} D={d} {row['distribution']} (median largest probability "
                  f"{row['largest_probability_median']:.3f}); forward = no gradient (reference scoring)")
            print("    " + "  ".join(f"{k} {t:.2f} ms" for k, t in ms.items()))
            print("    peak MB above the inputs " + "  ".join(f"{k} {x:.0f}" for k, x in row["peak_MB"].items()))
            print("    error vs float64 " + "  ".join(f"{k} " + ",".join(f"{e}={x:.1e}" for e, x in errs.items())
                                                      for k, errs in row["errors"].items()))
            print(f"    ours/matmul fwd (no grad) {row['ours_fwd_nograd_over_matmul']:.2f}, "
                  f"ours/2 matmuls fwd+bwd {row['ours_fb_over_2_matmuls']:.2f} (target <= 1.2)"
                  + "".join(f", ours/{o} fwd+bwd {row[f'ours_fb_over_{o}_fb']:.2f}, peak {row[f'ours_peak_over_{o}_peak']:.2f}"
                            for o in ("liger", "cce", "cce_nofilter") if f"ours_fb_over_{o}_fb" in row), flush=True)
            del h, w, y, g, hg, arms
            if device == "cuda":
                torch.cuda.empty_cache()
    return out


def _random_llama(out_dir: str, hidden: int, intermediate: int, heads: int, layers: int, vocab: int, dtype):
    """A randomly initialised LLaMA with the given shapes and the tiny default's tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from autoregembed.runtime.config import Config
    from autoregembed.runtime.loading import build_tiny_base

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


def _step_flops(n_layer_params: int, head_params: int, enc_tokens: int, dec_tokens: int, scored: int,
                recompute: bool = False, fwd_enc_tokens: int = 0, fwd_dec_tokens: int = 0,
                fwd_scored: int = 0) -> float:
    """FLOPs of one step, attention's own T^2 term left out (under 1% at 512 tokens and hidden 4096).
    Model FLOPs (recompute False, real tokens): the encoder trains (6 N per token), the frozen
    decoder passes gradients to its inputs only (4 N per token), the LM head scores each target
    token forward and backward (4 V D per scored token); rows run without gradient (``fwd_*``: a
    positive held as a target) cost their forward alone (2 N per token, 2 V D per scored token).
    Hardware FLOPs: the tokens the layers really ran (padding included) and, under activation
    checkpointing, one more forward (2 N) of each row trained (no_grad rows keep nothing to recompute)."""
    extra = 2 * n_layer_params if recompute else 0
    return ((6 * n_layer_params + extra) * enc_tokens + (4 * n_layer_params + extra) * dec_tokens
            + 4 * head_params * scored
            + 2 * n_layer_params * (fwd_enc_tokens + fwd_dec_tokens) + 2 * head_params * fwd_scored)


ATTENTION_KERNELS = ("flash", "fmha", "efficient_attention", "cudnn", "attention")


def _texts(tok, lengths: list[int], seed: int) -> list[str]:
    """Texts of about ``lengths`` tokens each: windows of the bundled corpus, decoded."""
    import random

    from autoregembed.runtime.config import Config
    from autoregembed.runtime.data import records

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


def _pass_tokens(enc: list, tgt: list, k: int, bos: int) -> dict:
    """One encoder pass over the stacked masks ``enc`` and one decoder pass over the stacked targets
    ``tgt``: real and as-run tokens (each pass pads its rows to its widest) and scored targets."""
    scored, n_seq = sum(int(m.sum()) for m in tgt), sum(m.shape[0] for m in tgt)
    enc_rows, enc_width = sum(m.shape[0] for m in enc), max(m.shape[1] for m in enc)
    width = max(m.shape[1] for m in tgt) + k + bos
    return {"enc_real": sum(int(m.sum()) for m in enc), "enc_padded": enc_rows * enc_width,
            "dec_real": scored + n_seq * (k + bos), "dec_padded": n_seq * width, "scored": scored}


def _token_counts(b, k: int, bos: int) -> dict:
    """Real and as-run (padded) tokens of a batch's encoder and decoder passes, and scored targets, of
    the rows trained and (``fwd_*``) of those run without gradient; ``k``: the positions the decoder
    reads before the target besides BOS (compressed tokens and prefix)."""
    from autoregembed.method.batches import AlignmentBatch

    forward_only = {}
    if not isinstance(b, AlignmentBatch):  # the contrast scores every target twice, in one pass
        trained = _pass_tokens([b.attention_mask], [b.target_mask] * (2 if b.contrast else 1), k, bos)
    elif b.p_no_grad:  # queries and their candidates trained; positives and pos|e_p in passes of their own
        c = b.candidates
        trained = _pass_tokens([c.q_attention_mask], [c.pos_mask, c.neg_mask], k, bos)
        forward_only = _pass_tokens([b.p_attention_mask], [c.pos_mask], k, bos)
    else:  # queries and positives stacked in one encoder pass, every candidate in one decoder pass
        c = b.candidates
        trained = _pass_tokens([c.q_attention_mask, b.p_attention_mask], [c.pos_mask, c.pos_mask, c.neg_mask], k, bos)
    return {**trained, **{f"fwd_{key}": forward_only.get(key, 0) for key in trained}}


def trainer_steps(torch, device: str, smoke: bool, steps: int, profile_dir: str | None = None) -> list[dict]:
    """The real trainer's step (Session, ZeRO-3 engine, bf16, activation checkpointing, the default
    shared prefix) on a randomly initialised LLaMA with 7B layer shapes, per variant: stage 1 (16 texts of 512 tokens, their
    targets as long) and stage 2 (16 queries x (1 positive + 7 negatives), 512 tokens each), with
    every text full length or ragged (lengths uniform in [128, 512]), packed or padded."""
    import random

    from autoregembed.runtime import distributed as D
    from autoregembed.method.batches import to_device
    from autoregembed.runtime.config import load_config
    from autoregembed.runtime.loading import load_model
    from autoregembed.runtime.arch import Arch
    from autoregembed.runtime.stages import STAGES
    from autoregembed.method.tokenization import TextEncoder
    from autoregembed.runtime.trainer import Session, micro_step

    shape = dict(hidden=64, intermediate=128, heads=4, layers=2, vocab=4096) if smoke else \
        dict(hidden=4096, intermediate=11008, heads=32, layers=4, vocab=32000)
    length, shortest = (32, 8) if smoke else (512, 128)
    micro = {"stage1": 4 if smoke else 16, "stage2": 2 if smoke else 16}
    negatives = 3 if smoke else 7
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tmp = tempfile.mkdtemp(prefix="gpu-check-")
    base, hf = _random_llama(tmp, dtype=dtype, **shape)
    arch = Arch.from_config(hf.to_dict())
    n_layers, head = arch.layers * arch.layer_params(), arch.vocab * arch.hidden
    name = _device_name(torch)
    peak_tflops = next((v for key, v in PEAK_BF16_TFLOPS.items() if key in name), None)
    D.init_distributed()
    ds = os.path.join(ROOT, "ds_configs", "zero3.json")

    class ConstantReferences:  # stage 2's reference values enter the loss as constants
        def lookup(self, row):
            return -40.0, [-60.0] * len(row["neg"])

    def rows_for(stage, ragged, tok, n_batches):
        rng = random.Random(0)
        mb = micro[stage]
        per_row = 2 if stage == "stage1" else 2 + negatives
        lengths = [rng.randint(shortest, length) if ragged else length for _ in range(mb * n_batches * per_row)]
        texts = iter(_texts(tok, lengths, seed=1))
        if stage == "stage1":
            return [{"context": next(texts), "instruction": "Reconstruct the original text.", "output": next(texts)}
                    for _ in range(mb * n_batches)]
        return [{"query": next(texts), "pos": next(texts), "neg": [next(texts) for _ in range(negatives)],
                 "instruction": "Retrieve semantically similar text."} for _ in range(mb * n_batches)]

    warm = 1 if smoke else 2
    out, reference = [], {}
    for stage in ("stage1", "stage2"):
        # the CPU fp32 padded loss of the first two full-length rows, before any engine exists (a Session
        # holds ZeRO-3's config, under which from_pretrained builds partitioned models)
        cfg = load_config(None, [f"model.base={base}", f"data.max_text_len={length}", f"data.max_target_len={length}"])
        torch.manual_seed(cfg.seed)  # the EMBED rows' draw, as a Session seeds it
        ref_model, ref_tok = load_model(base, base, cfg.model.num_embed_tokens, torch.float32, "sdpa",
                                        decoder_bos=cfg.model.decoder_bos)
        # the decoder reads a shared prefix as the trainer's default does (model.shared_prefix); its fit
        # before stage 1 is not part of a step, so a fixed random one stands in for it
        prefix = 0.02 * torch.randn(cfg.model.shared_prefix, shape["hidden"], generator=torch.Generator().manual_seed(3))
        ref_model.shared_prefix = prefix
        ref_b = STAGES[stage].make_batch(cfg, rows_for(stage, False, ref_tok, 1)[:2],
                                         TextEncoder(ref_tok, cfg.model.num_embed_tokens, length, length),
                                         ConstantReferences())
        with torch.no_grad():
            reference[stage] = STAGES[stage].loss(cfg)(ref_model(ref_b), ref_b).item()
        del ref_model
        for ragged in (False, True):
            for packed in (True, False):
                cfg = load_config(None, [f"output_dir={tmp}/run", f"model.base={base}", "model.match_decoder_scale=false",
                                         f"model.dtype={'bf16' if device == 'cuda' else 'fp32'}",
                                         f"model.packing={str(packed).lower()}", f"data.max_text_len={length}",
                                         f"data.max_target_len={length}", f"{stage}.micro_batch_size={micro[stage]}"])
                s = Session(cfg, STAGES[stage], ds, base, train=True)
                s.model.shared_prefix = prefix
                st, mb, k = STAGES[stage], micro[stage], cfg.model.num_embed_tokens + len(prefix)
                rows = rows_for(stage, ragged, s.tokenizer, warm + steps + 1)
                loss_fn = st.loss(cfg)

                def batch(i, n=mb):
                    return st.make_batch(s.cfg, rows[i * mb : i * mb + n], s.text_encoder, ConstantReferences())

                row = {"stage": stage, "lengths": "ragged" if ragged else "full", "packed": packed,
                       "attention": s.engine.module.encoder.config._attn_implementation, "layers": shape["layers"],
                       "hidden": shape["hidden"], "vocab": shape["vocab"], "micro_batch": mb,
                       "negatives": negatives if stage == "stage2" else None, "steps": steps,
                       "shared_prefix": len(prefix)}
                if not ragged:  # before any update: this path's loss vs the CPU fp32 padded reference
                    cpu_b = batch(0, n=2)
                    with torch.no_grad():
                        row["loss"] = loss_fn(s.engine(to_device(cpu_b, s.device)), to_device(cpu_b, s.device)).item()
                    row["loss_cpu_fp32_padded"] = reference[stage]
                    row["loss_rel_diff"] = abs(row["loss"] - reference[stage]) / max(abs(reference[stage]), 1e-12)
                    row["loss_ok"] = row["loss_rel_diff"] <= (2e-2 if dtype == torch.bfloat16 else 1e-4)
                counts, losses = {}, []
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                for i in range(warm + steps):
                    if i == warm:
                        _sync(torch)
                        t0 = time.perf_counter()
                    b = batch(i)
                    if i >= warm:
                        for key, v in _token_counts(b, k, int(cfg.model.decoder_bos)).items():
                            counts[key] = counts.get(key, 0) + v
                    losses.append(micro_step(s.engine, to_device(b, s.device), loss_fn))
                _sync(torch)
                dt = time.perf_counter() - t0
                enc_hw, dec_hw = ((counts["enc_real"], counts["dec_real"]) if packed else
                                  (counts["enc_padded"], counts["dec_padded"]))
                fwd_hw = ((counts["fwd_enc_real"], counts["fwd_dec_real"]) if packed else
                          (counts["fwd_enc_padded"], counts["fwd_dec_padded"]))
                model_flops = _step_flops(n_layers, head, counts["enc_real"], counts["dec_real"], counts["scored"],
                                          fwd_enc_tokens=counts["fwd_enc_real"], fwd_dec_tokens=counts["fwd_dec_real"],
                                          fwd_scored=counts["fwd_scored"])
                hw_flops = _step_flops(n_layers, head, enc_hw, dec_hw, counts["scored"],
                                       recompute=cfg.model.gradient_checkpointing, fwd_enc_tokens=fwd_hw[0],
                                       fwd_dec_tokens=fwd_hw[1], fwd_scored=counts["fwd_scored"])
                kernels = []
                if device == "cuda" or profile_dir:  # one more step under the profiler: which attention ran
                    from torch.profiler import ProfilerActivity, profile

                    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
                    with profile(activities=acts) as prof:
                        micro_step(s.engine, to_device(batch(warm + steps), s.device), loss_fn)
                        _sync(torch)
                    table = prof.key_averages()
                    kernels = sorted({e.key for e in table if any(a in e.key.lower() for a in ATTENTION_KERNELS)})
                    if profile_dir:
                        tag = f"{stage}_{row['lengths']}_{'packed' if packed else 'padded'}"
                        with open(os.path.join(profile_dir, f"profile_{tag}.txt"), "w") as f:
                            f.write(table.table(sort_by="self_device_time_total" if device == "cuda" else
                                                "self_cpu_time_total", row_limit=25))
                row.update({"step_s": dt / steps, "tokens_per_s": (counts["enc_real"] + counts["dec_real"]) / dt,
                            "model_tflops": model_flops / dt / 1e12, "hardware_tflops": hw_flops / dt / 1e12,
                            "mfu": model_flops / dt / 1e12 / peak_tflops if peak_tflops else None,
                            "padding_fraction": 1 - (counts["enc_real"] + counts["dec_real"]) /
                            (counts["enc_padded"] + counts["dec_padded"]),
                            "tokens_per_step": (counts["enc_real"] + counts["dec_real"]) / steps,
                            "peak_memory_GB": torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else None,
                            "attention_kernels": kernels, "losses": [v.item() for v in losses]})
                out.append(row)
                print(f"  {stage} {row['lengths']:6} {'packed' if packed else 'padded'} ({row['attention']}): "
                      f"{row['step_s']:.3f} s/step, {row['tokens_per_step']:.0f} tokens/step, "
                      f"{row['tokens_per_s']:.0f} tokens/s, model {row['model_tflops']:.1f} / hardware "
                      f"{row['hardware_tflops']:.1f} TFLOP/s" + (f" (MFU {row['mfu']:.1%})" if row["mfu"] else "")
                      + f", padding {row['padding_fraction']:.0%}"
                      + (f", peak {row['peak_memory_GB']:.1f} GB" if row["peak_memory_GB"] else "")
                      + (f"; loss {row['loss']:.5f} vs CPU fp32 padded {row['loss_cpu_fp32_padded']:.5f} "
                         f"({'ok' if row['loss_ok'] else 'FAIL'})" if "loss" in row else "")
                      + (f"; attention kernels {', '.join(kernels)[:160]}" if kernels else ""), flush=True)
                s.close()
                if device == "cuda":
                    torch.cuda.empty_cache()
    D.shutdown()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="toy sizes on CPU (Triton interpreter): checks the logic")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "gpu.json"))
    ap.add_argument("--sections", default="kernels,timing,trainer")
    ap.add_argument("--steps", type=int, default=3, help="timed trainer steps per variant")
    ap.add_argument("--cudnn-sdpa", action="store_true",
                    help="leave SDPA's cuDNN backend on (the baseline of loading.sdpa_without_cudnn)")
    ap.add_argument("--profile", action="store_true", help="profile one trainer step per stage (profile_*.txt beside --out)")
    args = ap.parse_args()
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports kernels
    import torch

    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    if not args.smoke and device != "cuda":
        raise SystemExit("no CUDA device: run with --smoke to check the logic on CPU")
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    sections = set(args.sections.split(","))
    if args.cudnn_sdpa:
        from autoregembed.runtime import loading

        loading.sdpa_without_cudnn = lambda: None
    big = [(32000, 16384, 4096), (128256, 16384, 4096)]
    small = [(300, 70, 48), (1000, 129, 64)]
    import triton

    res = {"device": _device_name(torch), "torch": torch.__version__, "triton": triton.__version__,
           **record_header(), "smoke": args.smoke, "errors": {}}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    runs = {"kernels": ("kernels vs float64 (bf16 inputs):",
                        lambda: check_kernels(torch, small if args.smoke else big, device)),
            "timing": ("speed and peak memory, side by side:",
                       lambda: time_kernels(torch, small if args.smoke else big, device, reps=2 if args.smoke else 10)),
            "trainer": ("trainer steps (ZeRO-3 engine, gradient checkpointing):",
                        lambda: trainer_steps(torch, device, args.smoke, 1 if args.smoke else args.steps,
                                                      os.path.dirname(os.path.abspath(args.out)) if args.profile else None))}
    for name, (title, fn) in runs.items():
        if name not in sections:
            continue
        print(title, flush=True)
        try:  # one device session: a failing section must not cost the others their numbers
            res[name] = fn()
        except Exception as e:  # noqa: BLE001 - recorded and reported, the run fails at the end
            traceback.print_exc()
            res["errors"][name] = f"{type(e).__name__}: {e}"
            if device == "cuda":
                torch.cuda.empty_cache()
        with open(args.out, "w") as f:  # after every section, so a time-out keeps what was measured
            json.dump(res, f, indent=2)
    print(f"wrote {args.out}")
    ok = not res["errors"] and all(r["ok"] for r in res.get("kernels", [])) and \
        all(r.get("loss_ok", True) for r in res.get("trainer", []))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
