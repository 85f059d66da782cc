"""Everything the GPU path must show, measured in one run (issue: "GPU path").

    bash bench/gpu_check.sh                      # on one H100/H200 (installs the carried wheels first)
    python bench/gpu_check.py --smoke --out X    # the same code paths on CPU at toy sizes (tests)

1. the scorer vs float64: log-probabilities and dL/dH of logprobs.token_logprobs, bf16 inputs, at
   V = 32000 and 128256, D = 4096, M = 16384 (the reference is computed in float64, in row chunks).
2. speed and memory side by side, same shapes, same run: forward and forward+backward of ours,
   the bare bf16 matmul H @ W^T (1 matmul: the forward floor; 2 matmuls, H W^T and dZ W: the
   forward+backward floor), naive log_softmax, Liger's fused linear cross-entropy and
   cut-cross-entropy (when their packages are importable); peak memory above the inputs.
3. the real trainer: stage-1 and stage-2 steps (ZeRO-3 engine, bf16, gradient checkpointing) on a
   randomly initialised LLaMA with 7B layer shapes (hidden 4096, intermediate 11008, 32 heads,
   vocabulary 32000, a few layers): tokens/s, model FLOPs utilisation, peak memory, and the loss
   of one batch with the Triton row kernel vs PyTorch's row operations.
Prints a table per section and writes all numbers to --out (JSON).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
    from memory import peak_allocated_bytes

    return peak_allocated_bytes(fn)[1]


def _inputs(torch, v, m, d, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    h = torch.randn(m, d, device=device, generator=g).to(dtype)
    w = (torch.randn(v, d, device=device, generator=g) * (2.0 / d**0.5)).to(dtype)
    y = torch.randint(0, v, (m,), device=device, generator=g)
    return h, w, y


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


def check_kernels(torch, shapes, device) -> list[dict]:
    from autoregembed.logprobs import token_logprobs

    out = []
    for v, m, d in shapes:
        h, w, y = _inputs(torch, v, m, d, torch.bfloat16, device)
        g = torch.randn(m, device=device, generator=torch.Generator(device=device).manual_seed(1))
        ref_lp, ref_grad = float64_reference(torch, h, w, y, g)
        hg = h.clone().requires_grad_()
        lp = token_logprobs(hg, w, y)
        (lp * g).sum().backward()
        lp_err = (lp.detach().double() - ref_lp).abs().max().item()
        grad_err = (hg.grad.double() - ref_grad).abs().max().item()
        grad_rel = grad_err / max(ref_grad.abs().max().item(), 1e-30)
        row = {"impl": "ours", "V": v, "M": m, "D": d, "dtype": "bf16", "logprob_max_abs_err": lp_err,
               "grad_max_abs_err": grad_err, "grad_max_rel_err": grad_rel, "ok": lp_err <= 1e-2 and grad_rel <= 1e-2}
        out.append(row)
        print(f"  V={v:>6} M={m:>5} D={d:>4}: |dlogp| {lp_err:.2e}  |dgrad| {grad_err:.2e} "
              f"(rel {grad_rel:.2e})  {'ok' if row['ok'] else 'FAIL'}", flush=True)
        del h, w, y, g, ref_lp, ref_grad, hg, lp
    return out


def _arms(torch, h, w, y, g):
    """name -> (forward fn, forward+backward fn or None)."""
    from autoregembed.logprobs import token_logprobs

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
        "matmul_1": (lambda: h @ w.T, None),
        "ours": (lambda: token_logprobs(h, w, y), fb(lambda x: token_logprobs(x, w, y))),
        "naive": (lambda: naive(h), fb(naive)),
    }
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss(reduction="sum")
        arms["liger"] = (lambda: liger(w, h, y), fb_loss(lambda x: liger(w, x, y)))
    except ImportError:
        pass
    try:
        from cut_cross_entropy import linear_cross_entropy

        arms["cce"] = (lambda: linear_cross_entropy(h, w, y, reduction="sum"),
                       fb_loss(lambda x: linear_cross_entropy(x, w, y, reduction="sum")))
    except ImportError:
        pass
    return arms, hg


def time_kernels(torch, shapes, device, reps: int) -> list[dict]:
    out = []
    for v, m, d in shapes:
        h, w, y = _inputs(torch, v, m, d, torch.bfloat16 if device == "cuda" else torch.float32, device)
        g = torch.randn(m, device=device) / m
        arms, hg = _arms(torch, h, w, y, g)
        dz = torch.randn(m, v, device=device, dtype=h.dtype)
        row = {"V": v, "M": m, "D": d, "ms": {}, "peak_MB": {}}
        mm = time_ms(torch, lambda: h @ w.T, reps)
        mm_back = time_ms(torch, lambda: dz @ w, reps)
        del dz
        row["ms"]["matmul_2"] = mm + mm_back  # logits, dZ @ W: the floor of forward+backward
        for name, (fwd, fwd_bwd) in arms.items():
            with torch.no_grad():
                row["ms"][name] = time_ms(torch, fwd, reps)
                row["peak_MB"][name] = peak_bytes(torch, fwd) / 2**20
            if fwd_bwd is not None:
                row["ms"][name + "_fb"] = time_ms(torch, fwd_bwd, reps)
                row["peak_MB"][name + "_fb"] = peak_bytes(torch, fwd_bwd) / 2**20
        ms = row["ms"]
        row["ours_fwd_over_matmul"] = ms["ours"] / ms["matmul_1"]
        row["ours_fb_over_2_matmuls"] = ms["ours_fb"] / ms["matmul_2"]
        if "liger_fb" in ms:
            row["ours_fb_over_liger_fb"] = ms["ours_fb"] / ms["liger_fb"]
        if "cce_fb" in ms:
            row["ours_fb_over_cce_fb"] = ms["ours_fb"] / ms["cce_fb"]
            row["ours_peak_over_cce_peak"] = row["peak_MB"]["ours_fb"] / max(row["peak_MB"]["cce_fb"], 1e-9)
        out.append(row)
        print(f"  V={v} M={m} D={d}")
        print("    " + "  ".join(f"{k} {t:.2f} ms" for k, t in ms.items()))
        print("    peak MB " + "  ".join(f"{k} {x:.0f}" for k, x in row["peak_MB"].items()))
        print(f"    ours/matmul fwd {row['ours_fwd_over_matmul']:.2f} (target <= 1.3), "
              f"ours/2 matmuls fwd+bwd {row['ours_fb_over_2_matmuls']:.2f}"
              + (f", ours/liger fwd+bwd {row['ours_fb_over_liger_fb']:.2f}" if "liger_fb" in ms else "")
              + (f", ours/cce fwd+bwd {row['ours_fb_over_cce_fb']:.2f} (target <= 1), peak ours/cce "
                 f"{row['ours_peak_over_cce_peak']:.2f} (target <= 1)" if "cce_fb" in ms else ""), flush=True)
        del h, w, y, g, hg, arms
        if device == "cuda":
            torch.cuda.empty_cache()
    return out


def _random_llama(out_dir: str, hidden: int, intermediate: int, heads: int, layers: int, vocab: int, dtype):
    """A randomly initialised LLaMA with the given shapes and the tiny default's tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from autoregembed.config import Config
    from autoregembed.loading import build_tiny_base

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


def _step_flops(n_layer_params: int, head_params: int, enc_tokens: int, dec_tokens: int, scored: int) -> float:
    """Model FLOPs of one step (recomputation not counted, as MFU conventions do): the encoder
    trains (6 N per token), the frozen decoder passes gradients to its inputs only (4 N per token),
    the LM head scores each target token forward and backward (4 V D per scored token)."""
    return 6 * n_layer_params * enc_tokens + 4 * n_layer_params * dec_tokens + 4 * head_params * scored


def trainer_steps(torch, device: str, smoke: bool, steps: int, profile_dir: str | None = None) -> list[dict]:
    from autoregembed import distributed as D
    from autoregembed.batches import AlignmentBatch, to_device
    from autoregembed.stages import STAGES
    from autoregembed.config import load_config
    from autoregembed.data import load_rows
    from autoregembed.plan import Arch
    from autoregembed.trainer import Session

    shape = dict(hidden=64, intermediate=128, heads=4, layers=2, vocab=4096) if smoke else \
        dict(hidden=4096, intermediate=11008, heads=32, layers=4, vocab=32000)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tmp = tempfile.mkdtemp(prefix="gpu-check-")
    base, hf = _random_llama(tmp, dtype=dtype, **shape)
    arch = Arch.from_config(hf.to_dict())
    n_layers = arch.layers * arch.layer_params()
    head = arch.vocab * arch.hidden
    micro = {"stage1": 4 if smoke else 16, "stage2": 2 if smoke else 8}
    cfg = load_config(None, [f"output_dir={tmp}/run", f"model.base={base}", "model.match_decoder_scale=false",
                             f"model.dtype={'bf16' if device == 'cuda' else 'fp32'}", "data.max_text_len=128",
                             "data.max_target_len=128", f"stage1.micro_batch_size={micro['stage1']}",
                             f"stage2.micro_batch_size={micro['stage2']}"])
    D.init_distributed()
    nli = load_rows(cfg.data.stage2, stage=2)
    negatives = 7
    s2_rows = [{**r, "neg": [nli[(i + j + 1) % len(nli)]["pos"] for j in range(negatives)]} for i, r in enumerate(nli)]
    s1_rows = load_rows(cfg.data.stage1, stage=1)
    ds = os.path.join(ROOT, "ds_configs", "zero3.json")

    class ConstantReferences:  # stage 2's reference values enter the loss as constants
        def lookup(self, row):
            return -40.0, [-60.0] * len(row["neg"])

    out = []
    for stage in ("stage1", "stage2"):
        s = Session(cfg, stage, ds, base, train=True)
        st, mb = STAGES[stage], micro[stage]
        loss_fn = st.loss(cfg)

        def batch(i):
            rows = (s1_rows if stage == "stage1" else s2_rows)[i * mb : (i + 1) * mb]
            return to_device(st.make_batch(s.cfg, rows, s.text_encoder, ConstantReferences()), s.device)

        def counts(b):
            k = cfg.model.num_embed_tokens
            if not isinstance(b, AlignmentBatch):
                return int(b.attention_mask.sum()), int(b.target_mask.sum()) + b.target_mask.shape[0] * k, \
                    int(b.target_mask.sum())
            c = b.candidates
            enc = int(c.q_attention_mask.sum() + b.p_attention_mask.sum())
            n_seq = 2 * c.pos_mask.shape[0] + c.neg_mask.shape[0]
            scored = int(2 * c.pos_mask.sum() + c.neg_mask.sum())
            return enc, scored + n_seq * k, scored

        losses, flops, tokens = [], 0.0, 0
        warm = 1 if smoke else 2
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for i in range(warm + steps):
            if i == warm:
                _sync(torch)
                t0 = time.perf_counter()
            b = batch(i)
            loss = loss_fn(s.engine(b), b)
            s.engine.backward(loss)
            s.engine.step()
            losses.append(loss.item())
            if i >= warm:
                enc, dec, scored = counts(b)
                flops += _step_flops(n_layers, head, enc, dec, scored)
                tokens += enc + dec
        _sync(torch)
        dt = time.perf_counter() - t0
        if profile_dir:  # one more step under the profiler: where a step's time goes
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
            with profile(activities=acts) as prof:
                b = batch(warm + steps)
                s.engine.backward(loss_fn(s.engine(b), b))
                s.engine.step()
                _sync(torch)
            table = prof.key_averages()
            with open(os.path.join(profile_dir, f"profile_{stage}.txt"), "w") as f:
                for key in ("self_cpu_time_total", "cpu_time_total") + (("self_device_time_total",) if
                                                                         device == "cuda" else ()):
                    f.write(table.table(sort_by=key, row_limit=25) + "\n")
        # one batch, no update: the loss with the Triton row kernel vs with PyTorch's row operations
        b = batch(0)
        with torch.no_grad():
            kernel_loss = loss_fn(s.engine(b), b).item()
            s.engine.module.head.scorer = "torch"
            torch_loss = loss_fn(s.engine(b), b).item()
        name = _device_name(torch)
        peak_tflops = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
        row = {"stage": stage, "layers": shape["layers"], "hidden": shape["hidden"], "vocab": shape["vocab"],
               "micro_batch": mb, "negatives": negatives if stage == "stage2" else None, "steps": steps,
               "tokens_per_s": tokens / dt, "step_s": dt / steps, "model_tflops": flops / dt / 1e12,
               "mfu": flops / dt / 1e12 / peak_tflops if peak_tflops else None,
               "peak_memory_GB": torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else None,
               "losses": losses, "loss_triton_rows": kernel_loss, "loss_torch_rows": torch_loss,
               "loss_rel_diff": abs(kernel_loss - torch_loss) / max(abs(torch_loss), 1e-12)}
        row["loss_ok"] = row["loss_rel_diff"] <= (1e-2 if dtype == torch.bfloat16 else 1e-5)
        out.append(row)
        print(f"  {stage}: {row['tokens_per_s']:.0f} tokens/s, {row['step_s']:.3f} s/step, "
              f"{row['model_tflops']:.1f} model TFLOP/s"
              + (f" (MFU {row['mfu']:.1%})" if row["mfu"] else "")
              + (f", peak {row['peak_memory_GB']:.1f} GB" if row["peak_memory_GB"] else "")
              + f"; loss Triton rows {kernel_loss:.5f} vs PyTorch rows {torch_loss:.5f} ({'ok' if row['loss_ok'] else 'FAIL'})",
              flush=True)
        s.close()
    D.shutdown()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="toy sizes on CPU (Triton interpreter): checks the logic")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "gpu.json"))
    ap.add_argument("--sections", default="kernels,timing,trainer")
    ap.add_argument("--steps", type=int, default=5, help="timed trainer steps per stage")
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
        from autoregembed import loading

        loading.sdpa_without_cudnn = lambda: None
    big = [(32000, 16384, 4096), (128256, 16384, 4096)]
    small = [(300, 70, 48), (1000, 129, 64)]
    import triton

    res = {"device": _device_name(torch), "torch": torch.__version__, "triton": triton.__version__,
           "date": time.strftime("%Y-%m-%d"), "smoke": args.smoke, "errors": {}}
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
        all(r["loss_ok"] for r in res.get("trainer", []))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
