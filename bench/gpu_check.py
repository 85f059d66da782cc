"""Everything the GPU path must show, measured in one run (issue: "GPU path").

    bash bench/gpu_check.sh                      # on one H100/H200 (installs the carried wheels first)
    python bench/gpu_check.py --smoke --out X    # the same code paths on CPU at toy sizes (tests)

0. preflight (seconds): the imports and one tiny call to the attention kernel and the scorer the
   trainer will use, so a broken image fails in seconds, not after the first engine is built.
1. trainer (gpu_trainer.py): the trainer's own optimizer step on LLaMA-7B layer shapes, per variant
   (stages, lengths, packing, ZeRO-2/3, decoder replicated or sharded, decoder checkpointing): seconds
   per step, tokens/s, MFU, hardware TFLOP/s, peak memory against plan's, attention kernels, and the
   loss against the CPU fp32 padded path.
2. kernels, 3. timing (gpu_scorer.py): the scorer against float64, and side by side with the others.

Results go to --out (JSON) after every variant and section; each variant's error is its own row;
work that would not finish before --deadline-s (from the start) is recorded as skipped.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

from harness import ROOT, record_header  # bench/harness.py, beside this script


class Results:
    """The JSON written after every change, so a time-out keeps everything measured before it."""

    def __init__(self, path: str, header: dict):
        self.path, self.data = path, {**header, "errors": {}}
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.write()

    def write(self):
        from autoregembed.ground.atomic import atomic_write_text

        atomic_write_text(self.path, json.dumps(self.data, indent=2))


def preflight(torch, device: str) -> dict:
    """Imports and one tiny call each to the attention kernel and the scorer the trainer will use."""
    t0 = time.perf_counter()
    import deepspeed  # noqa: F401
    import transformers  # noqa: F401

    from autoregembed.method.logprobs import token_logprobs
    from autoregembed.method.packing import VARLEN, varlen_attention
    from autoregembed.run.loading import resolve_attention

    name, packed = resolve_attention("auto", None)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q = torch.randn(1, 4, 16, 64, device=device, dtype=dtype)
    if name == VARLEN:
        cu = torch.tensor([0, 7, 16], dtype=torch.int32, device=device)
        out, _ = varlen_attention(None, q, q, q, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=16,
                                  max_length_k=16)
    elif name == "flash_attention_2":
        from flash_attn import flash_attn_func

        out = flash_attn_func(q.transpose(1, 2), q.transpose(1, 2), q.transpose(1, 2), causal=True)
    else:
        out = torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
    h = torch.randn(8, 64, device=device, dtype=dtype)
    lp = token_logprobs(h, torch.randn(128, 64, device=device, dtype=dtype), torch.arange(8, device=device))
    if device == "cuda":
        torch.cuda.synchronize()
    if not (torch.isfinite(out.float()).all() and torch.isfinite(lp.float()).all()):
        raise RuntimeError(f"preflight: {name} or the scorer returned non-finite values")
    return {"attention": name, "packed": packed, "seconds": round(time.perf_counter() - t0, 2)}


def run_trainer(torch, device: str, args, results: Results, deadline: float, profile_path: str | None):
    from gpu_trainer import TrainerBench, describe, variants

    bench = TrainerBench(torch, device, args.smoke, 1 if args.smoke else args.steps, profile_path)
    rows = results.data["trainer"] = []
    results.write()
    longest = 0.0
    for v in variants():
        t0 = time.perf_counter()
        if time.perf_counter() + max(longest, 1.0) > deadline:
            row = {"variant": v.label, "skipped": "deadline"}
        else:
            try:
                row = bench.run(v)
            except Exception as e:  # noqa: BLE001 - the row says it; the run fails at the end
                traceback.print_exc()
                row = {"variant": v.label, "error": f"{type(e).__name__}: {e}"[:500]}
                if device == "cuda":
                    torch.cuda.empty_cache()
            longest = max(longest, time.perf_counter() - t0)
        rows.append(row)
        results.write()
        print(describe(row), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="toy sizes on CPU (Triton interpreter): checks the logic")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT") or os.path.join(ROOT, "bench", "results"),
                                                  "gpu.json"))
    ap.add_argument("--sections", default="trainer,kernels,timing")
    ap.add_argument("--steps", type=int, default=3, help="timed trainer steps per variant")
    ap.add_argument("--deadline-s", type=float, default=330.0,
                    help="stop starting work that would end later than this many seconds after the start")
    ap.add_argument("--cudnn-sdpa", action="store_true",
                    help="leave SDPA's cuDNN backend on (the baseline of loading.sdpa_without_cudnn)")
    ap.add_argument("--profile", action="store_true", help="one profiled step per variant: profile.txt beside --out")
    args = ap.parse_args()
    deadline = time.perf_counter() + args.deadline_s
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports kernels
    import torch
    import triton

    from autoregembed.ground.quiet import quiet_libraries

    quiet_libraries()  # the device call returns only the output's last 12,000 characters: keep them for results
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    if not args.smoke and device != "cuda":
        raise SystemExit("no CUDA device: run with --smoke to check the logic on CPU")
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    if args.cudnn_sdpa:
        from autoregembed.run import loading

        loading.sdpa_without_cudnn = lambda: None
    results = Results(args.out, {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                                 "torch": torch.__version__, "triton": triton.__version__, **record_header(),
                                 "smoke": args.smoke})
    profile_path = os.path.join(os.path.dirname(os.path.abspath(args.out)), "profile.txt") if args.profile else None
    try:
        results.data["preflight"] = preflight(torch, device)
        print(f"preflight: {results.data['preflight']}", flush=True)
    except Exception as e:  # noqa: BLE001 - nothing else can run: say why in seconds
        traceback.print_exc()
        results.data["errors"]["preflight"] = f"{type(e).__name__}: {e}"
        results.write()
        return 1
    results.write()
    from autoregembed.ground import distributed as D
    from gpu_scorer import check_kernels, time_kernels

    big = [(32000, 16384, 4096), (128256, 16384, 4096)]
    small = [(300, 70, 48), (1000, 129, 64)]
    shapes = small if args.smoke else big
    sections = {"trainer": ("trainer steps (the trainer's optimizer step, per variant):",
                            lambda: run_trainer(torch, device, args, results, deadline, profile_path)),
                "kernels": ("kernels vs float64 (bf16 inputs):", lambda: check_kernels(torch, shapes, device)),
                "timing": ("speed and peak memory, side by side:",
                           lambda: time_kernels(torch, shapes, device, reps=2 if args.smoke else 10))}
    D.init_distributed()
    for name in args.sections.split(","):
        title, fn = sections[name]
        if time.perf_counter() > deadline:
            results.data["errors"][name] = "skipped: deadline"
            continue
        print(title, flush=True)
        try:  # one device session: a failing section must not cost the others their numbers
            out = fn()
            if out is not None:
                results.data[name] = out
        except Exception as e:  # noqa: BLE001 - recorded and reported, the run fails at the end
            traceback.print_exc()
            results.data["errors"][name] = f"{type(e).__name__}: {e}"
            if device == "cuda":
                torch.cuda.empty_cache()
        results.write()
    D.shutdown()
    print(f"wrote {args.out}")
    r = results.data
    ok = (not r["errors"] and all(k["ok"] for k in r.get("kernels", []))
          and all("error" not in t and t.get("loss_ok", True) for t in r.get("trainer", [])))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
